"""What packing costs: peak memory and wall time of ``edgepack pack`` on a large decoder built
from a config.

    python examples/benchmark_pack.py --apply quantize:scheme=int8                # 0.41 B Llama
    python examples/benchmark_pack.py --size 0.9b --apply quantize:scheme=int4
    python examples/benchmark_pack.py --size 0.9b --apply quantize:scheme=int8 --cap 3GB --work-memory 3GB
    python examples/benchmark_pack.py --size 0.4b --budget 500MB                  # the planner chooses

The model is written once under ``--work`` (default /tmp/edgepack-pack-bench) and reused. The
pack runs as a child process (``edgepack pack ... --json``); a sampler
(:func:`edgepack.testing.run_with_peaks`) reads the memory of that process and of every
process below it (the fresh process that measures each candidate) every 20 ms. It reports
each peak twice: resident (which counts the page cache of the source's memory-mapped
weights, memory the kernel drops under pressure) and anonymous (memory the processes own).

``--cap SIZE`` runs the pack in a memory cgroup (v1, as root) limited to SIZE: a hard limit on
everything the pack and its children hold, page cache included (the model's files are first
dropped from the page cache, so that the pack reads them inside the cgroup); the kernel
reclaims page cache first and kills the pack if its own memory does not fit. The cgroup's own peak
(``memory.max_usage_in_bytes``) and failure count are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

#: (hidden, layers, intermediate, heads[, other config settings]) of the built models (the
#: MiniLM tokenizer's vocabulary of 30522 tokens; a quarter as many key/value heads; the small
#: test config's head width of 16 unless set); parameters 0.15 B, 0.41 B, 0.94 B, and 1.09 B for
#: TinyLlama-1.1B's shapes (head width 64, 4 key/value heads; its vocabulary is 32000)
SIZES: dict[str, tuple] = {
    "0.15b": (768, 16, 2048, 12),
    "0.4b": (1536, 16, 4096, 12),
    "0.9b": (2048, 22, 5632, 32),
    "1.1b": (2048, 22, 5632, 32, {"head_dim": 64, "num_key_value_heads": 4}),
}


def build(size: str, work: Path) -> Path:
    out = work / f"llama-{size}"
    if (out / "config.json").is_file():
        return out
    from edgepack.testing import build_decoder

    hidden, layers, inter, heads, *more = SIZES[size]
    settings = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                    num_key_value_heads=heads // 4 if heads >= 8 else heads, max_position_embeddings=2048)
    print(f"building a {size} Llama under {out}", file=sys.stderr)
    return build_decoder("llama", out, **{**settings, **(more[0] if more else {})})


def _evict(directory: Path) -> None:
    """Drop the page cache of a model's files (POSIX_FADV_DONTNEED: clean pages only)."""
    for file in directory.iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _cgroup(size: str) -> Path:
    from edgepack.memory import parse_size

    group = Path(f"/sys/fs/cgroup/memory/edgepack-bench-{os.getpid()}")
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(parse_size(size, "--cap")))
    except OSError as exc:
        sys.exit(f"--cap needs a writable cgroup v1 memory controller (root): {exc}")
    return group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.4b", choices=sorted(SIZES))
    parser.add_argument("--apply", action="append", default=[], help="a fixed plan step (repeatable)")
    parser.add_argument("--budget", help="the budget (default: the plan alone, no budget)")
    parser.add_argument("--work-memory", help="pack --work-memory SIZE")
    parser.add_argument("--min-fidelity", default="0")
    parser.add_argument("--cap", help="run the pack in a memory cgroup limited to this size (Linux, cgroup v1, root)")
    parser.add_argument("--work", default="/tmp/edgepack-pack-bench")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more pack arguments")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build(args.size, work)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    cmd = [str(Path(sys.executable).parent / "edgepack"), "pack", str(model), "--target", "cpu", "--out", str(work / "out"),
           "--force", "--json", "--min-fidelity", args.min_fidelity]
    for step in args.apply:
        cmd += ["--apply", step]
    if args.budget:
        cmd += ["--budget", args.budget]
    if args.work_memory:
        cmd += ["--work-memory", args.work_memory]
    cmd += args.extra
    print("$ " + " ".join(cmd), file=sys.stderr)
    from edgepack.testing import run_with_peaks

    cgroup = _cgroup(args.cap) if args.cap else None
    if cgroup is not None:  # pages already cached stay charged elsewhere: make the pack read them inside
        _evict(model)
    extra = {"preexec_fn": lambda: (cgroup / "tasks").write_text(str(os.getpid()))} if cgroup else {}
    try:
        run = run_with_peaks(cmd, interval=0.02, **extra)
        capped = {} if cgroup is None else {
            "cap_bytes": int((cgroup / "memory.limit_in_bytes").read_text()),
            "cgroup_peak_bytes": int((cgroup / "memory.max_usage_in_bytes").read_text()),
            "cgroup_failcnt": int((cgroup / "memory.failcnt").read_text())}
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    result = {"rc": run.returncode, "wall_s": round(run.seconds, 1), "model": str(model), "source_weights_bytes": weights,
              **{f"peak_{k}_bytes": v for k, v in run.peaks.items()}, **capped}
    if run.returncode == 0:
        pack = json.loads(run.stdout.strip().splitlines()[-1])
        out = Path(pack["bundle"])
        result["output_weights_bytes"] = sum(p.stat().st_size for p in (out / "model").rglob("*.safetensors"))
        result["plan"] = " + ".join(f"{s['plugin']}:" + ",".join(f"{k}={v}" for k, v in sorted(s["options"].items()))
                                    for s in pack["plan"])
        result["phases"] = pack.get("phases")
        result["goal_peak_bytes"] = int(1.2 * result["output_weights_bytes"] + 1e9)
    else:
        result["stderr"] = run.stderr[-2000:]
    gb = 1e9
    print(json.dumps(result, indent=2))
    if "cap_bytes" in result:
        print(f"cgroup cap {result['cap_bytes'] / gb:.2f} GB: peak inside it {result['cgroup_peak_bytes'] / gb:.2f} GB "
              f"(page cache included), limit hit {result['cgroup_failcnt']} times", file=sys.stderr)
    if result["rc"] == 0:
        print(f"{result['plan']}: source {weights / gb:.2f} GB -> output {result['output_weights_bytes'] / gb:.2f} GB; "
              f"pack process peak {result['peak_rss_bytes'] / gb:.2f} GB resident, {result['peak_anon_bytes'] / gb:.2f} GB "
              f"anonymous; with its children {result['peak_tree_rss_bytes'] / gb:.2f} GB resident, "
              f"{result['peak_tree_anon_bytes'] / gb:.2f} GB anonymous; goal <= {result['goal_peak_bytes'] / gb:.2f} GB; "
              f"{result['wall_s']} s", file=sys.stderr)
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
