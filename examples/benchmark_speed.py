"""Decode speed of quantized decoders on this CPU, side by side with the fp32 source.

    python examples/benchmark_speed.py [--hidden 768 --layers 12] [--rounds 5] [--new-tokens 32]
    python examples/benchmark_speed.py --kernels      # the matmul kernels alone, per shape and rows

Decoders: a Llama-style model built from a config (fixed seed, about 100M parameters by
default), quantized in this process exactly as ``edgepack pack`` does (the plugins' ``apply``
then ``prepare``), then batch-1 greedy decoding of ``--new-tokens`` tokens from a 16-token
prompt. Every variant runs once per round, rounds interleaved, and the median tokens/s of each
is reported with its ratio to the fp32 source measured in the same run, and its greedy
agreement with the source. ``int8 (dequantize)`` is the int8 model with the fused decode
kernel switched off: the path every int8 step took before.

``--kernels`` times one Linear at M rows (1 = a decoding step, 128 = a prefill) for the
shapes of a ~1B decoder and an output head: fp32 matmul, int8 dequantize + matmul, and torch's
fused ``_weight_int8pack_mm`` with bf16 activations; it is how ``FUSED_MAX_ROWS`` was chosen.

Speed figures name the CPU they ran on: the script prints the model name and the flags that
matter (avx512_bf16, amx) first.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path


def cpu_line() -> str:
    name, flags = "?", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and name == "?":
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    import torch

    return f"{name}; flags: {', '.join(wanted) or 'none of avx2/avx512/amx'}; torch threads {torch.get_num_threads()}"


def time_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def kernels() -> None:
    import torch

    from edgepack.plugins.quantize import dequantize, quantize_int8_rows

    print(f"{'weight':>12} {'rows':>4} {'fp32':>8} {'int8 deq+mm':>12} {'int8 fused':>11}  (ms, median)")
    for out_f, in_f in ((2048, 2048), (5632, 2048), (2048, 5632), (32000, 768)):
        q, scale = quantize_int8_rows(torch.randn(out_f, in_f))
        weight = dequantize(q, scale, None, 8, torch.float32)
        flat = scale.reshape(-1).to(torch.bfloat16)
        for rows in (1, 4, 8, 16, 64, 128):
            x = torch.randn(rows, in_f)
            with torch.inference_mode():
                fp32 = time_ms(lambda: x @ weight.T)
                deq = time_ms(lambda: x @ dequantize(q, scale, None, 8, torch.float32).T)
                fused = time_ms(lambda: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, flat).float())
            print(f"{out_f:>5}x{in_f:<6} {rows:>4} {fp32:>8.2f} {deq:>12.2f} {fused:>11.2f}")


def decoders(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from edgepack.host import load_registry
    from edgepack.interfaces import ApplyContext

    registry = load_registry()
    target = registry.target("cpu")
    probe = target.probe()
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    source = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        source.get_output_embeddings().weight.mul_(20.0)  # peaked next-token distributions
    source.generation_config.eos_token_id = None
    params = sum(p.numel() for p in source.parameters())
    print(f"decoder: Llama-style, {params / 1e6:.0f}M parameters, batch 1, prompt 16, {args.new_tokens} new tokens")

    def packed(specs: list[str]) -> torch.nn.Module:
        model = copy.deepcopy(source)
        steps = []
        for spec in specs:
            name, _, rest = spec.partition(":")
            compressor = registry.compressor(name)
            raw = dict(kv.split("=") for kv in rest.split(",")) if rest else {}
            options = compressor.parse_options(raw)
            model = compressor.apply(model, options, ApplyContext(target, probe, None, [], lambda m: None))
            steps.append((compressor, options))
        for compressor, options in steps:
            model = compressor.prepare(model, options, "cpu", probe)
        return model.eval()

    variants = {"fp32 source": source, "bf16": packed(["precision:dtype=bf16"]),
                "int8": packed(["quantize:scheme=int8"]),
                "int8 + head": packed(["quantize:scheme=int8,head=true"])}
    off = packed(["quantize:scheme=int8"])
    for module in off.modules():
        if hasattr(module, "fused_rows"):
            module.fused_rows = 0
    variants["int8 (dequantize)"] = off
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    tokens = {}
    speeds: dict[str, list[float]] = {k: [] for k in variants}

    def decode(model):
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
            return out[:, 16:], time.perf_counter() - start

    for name, model in variants.items():  # warm-up
        tokens[name], _ = decode(model)
    for _ in range(args.rounds):
        for name, model in variants.items():
            _, seconds = decode(model)
            speeds[name].append(args.new_tokens / seconds)
    base = statistics.median(speeds["fp32 source"])
    print(f"{'variant':20} {'tokens/s':>9} {'vs fp32':>8} {'greedy agreement':>17}")
    for name in variants:
        median = statistics.median(speeds[name])
        agree = (tokens[name] == tokens["fp32 source"]).float().mean().item()
        print(f"{name:20} {median:9.1f} {median / base:7.2f}x {agree:17.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", action="store_true", help="time the matmul kernels alone")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(cpu_line())
    if args.kernels:
        kernels()
    else:
        decoders(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
