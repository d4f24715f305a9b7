"""Fidelity against memory for uniform and mixed quantization (quantize:scheme=mixed).

    python examples/benchmark_mixed.py                      # both parts
    python examples/benchmark_mixed.py --only encoder --plot fidelity.png --json rows.json

Encoder (all-MiniLM-L6-v2): every plan is packed for the cpu target with ``edgepack.pack(...,
apply=plan, min_fidelity=0)``; its measured peak is the manifest's, its fidelity the mean cosine
of mean-pooled embeddings against the fp32 model on held-out sentences (neither smoke nor
calibration inputs). The table then gives, for each budget, the best plan whose measured peak
fits among the uniform plans alone and among all (uniform and mixed): what the planner can reach
with and without mixed.

Decoder (a Llama-style model built from a config with a fixed seed): ``quantize:scheme=mixed``
(int4 for the insensitive modules, int8 for the sensitive ones) at the stored bits of uniform
int4 g32 and half a bit more, against uniform int4 g32 and g128: next-token top-1
agreement with the fp32 model and relative logit error (sum of squared differences over sum of
squares), on every real position of held-out sentences.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmark_compression import HELD_OUT

UNIFORM = [
    ["quantize:scheme=int8"],
    ["precision:dtype=bf16", "quantize:scheme=int8"],
    ["quantize:scheme=int4,group_size=32"],
    ["precision:dtype=bf16", "quantize:scheme=int4,group_size=32"],
    ["quantize:scheme=int4,group_size=128"],
]
MIXED = [["precision:dtype=bf16", f"quantize:scheme=mixed,bits={b}"] for b in (5.0, 5.5, 6.0, 6.5, 7.0, 7.5)]
BUDGETS_MB = (18, 20, 22, 24, 26, 28, 30)


def _pack(source: Path, plan: list[str], out: str, name: str) -> object:
    import edgepack

    return edgepack.pack(str(source), target="cpu", apply=plan, min_fidelity=0.0, out=out, force=True, name=name,
                         progress=lambda message: None)


def _weights(result: object) -> int:
    return sum(f["size"] for f in result.manifest["files"]
               if f["path"].startswith("model/") and f["path"].endswith(".safetensors"))


def encoder_rows(tmp: str) -> list[dict]:
    import torch
    import transformers

    import edgepack
    from edgepack.smoke import mean_pool
    from edgepack.testing import minilm_path

    source = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    held = dict(tokenizer(HELD_OUT, padding=True, return_tensors="pt"))

    def embed(model):
        with torch.inference_mode():
            return mean_pool(model(**held).last_hidden_state, held["attention_mask"])

    reference = embed(transformers.AutoModel.from_pretrained(source).eval())
    rows = []
    for kind, plans in (("uniform", UNIFORM), ("mixed", MIXED)):
        for plan in plans:
            started = time.perf_counter()
            result = _pack(source, plan, tmp, f"minilm-{len(rows)}")
            cos = torch.nn.functional.cosine_similarity(reference, embed(edgepack.load(result.bundle)))
            rows.append({"model": "all-MiniLM-L6-v2", "kind": kind, "plan": " + ".join(plan),
                         "weights_bytes": _weights(result),
                         "measured_peak_bytes": result.manifest["memory"]["measured_peak_bytes"],
                         "mean_cosine": round(cos.mean().item(), 6), "worst_cosine": round(cos.min().item(), 6),
                         "pack_seconds": round(time.perf_counter() - started, 1)})
            print(f"packed {rows[-1]['plan']}: {rows[-1]['mean_cosine']}", file=sys.stderr, flush=True)
    return rows


def budget_table(rows: list[dict]) -> list[dict]:
    """For each budget, the best held-out fidelity reachable with uniform plans alone and with all."""
    table = []
    for mb in BUDGETS_MB:
        fits = [r for r in rows if r["measured_peak_bytes"] is not None and r["measured_peak_bytes"] <= mb * 1e6]
        best = {kind: max((r for r in fits if kind == "all" or r["kind"] == kind), key=lambda r: r["mean_cosine"],
                          default=None) for kind in ("uniform", "all")}
        table.append({"budget_mb": mb, **{f"{k}_plan": (v or {}).get("plan") for k, v in best.items()},
                      **{f"{k}_mean_cosine": (v or {}).get("mean_cosine") for k, v in best.items()}})
    return table


def decoder_rows(tmp: str) -> list[dict]:
    import torch
    import transformers

    import edgepack
    from edgepack.plugins.quantize import Quantize
    from edgepack.testing import build_decoder

    source = build_decoder("llama", Path(tmp) / "llama-src", seed=0, hidden_size=256, intermediate_size=768,
                           num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    held = dict(tokenizer(HELD_OUT, padding=True, return_tensors="pt", return_token_type_ids=False))
    real = held["attention_mask"].bool()

    def logits(model):
        with torch.inference_mode():
            return model(**held).logits.float()[real]

    reference = logits(transformers.AutoModelForCausalLM.from_pretrained(source).eval())
    bits = Quantize.bits_per_weight({"scheme": "int4", "group_size": 32}, 0)
    plans = [("uniform", ["quantize:scheme=int4,group_size=32"]),
             ("uniform", ["quantize:scheme=int4,group_size=128"]),
             ("mixed", [f"quantize:scheme=mixed,group_size=128,bits={bits}"]),
             ("mixed", [f"quantize:scheme=mixed,group_size=128,bits={bits + 0.5}"]),
             ("mixed", [f"quantize:scheme=mixed,group_size=32,bits={bits + 0.5}"])]
    rows = []
    for kind, plan in plans:
        result = _pack(source, plan, tmp, f"llama-{len(rows)}")
        got = logits(edgepack.load(result.bundle))
        agreement = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        error = (((got - reference) ** 2).sum() / (reference ** 2).sum()).item()
        rows.append({"model": "llama 6x256 (random, seed 0)", "kind": kind, "plan": " + ".join(plan),
                     "weights_bytes": _weights(result),
                     "measured_peak_bytes": result.manifest["memory"]["measured_peak_bytes"],
                     "top1_agreement": round(agreement, 4), "logit_error": round(error, 5)})
        print(f"packed {rows[-1]['plan']}: top-1 {rows[-1]['top1_agreement']}", file=sys.stderr, flush=True)
    return rows


def report(out: dict) -> None:
    """The tables of a run (or of an earlier run's JSON)."""
    if "encoder" in out:
        print(f"\n{'plan':<60} {'weights':>9} {'peak':>9} {'cosine':>9} {'worst':>9}")
        for r in out["encoder"]:
            print(f"{r['plan']:<60} {r['weights_bytes'] / 1e6:>7.1f}MB {r['measured_peak_bytes'] / 1e6:>7.1f}MB "
                  f"{r['mean_cosine']:>9.5f} {r['worst_cosine']:>9.5f}")
        print(f"\n{'budget':>7}  {'best uniform plan':<60} {'cosine':>8}  {'best plan, mixed allowed':<56} {'cosine':>8}")
        for t in budget_table(out["encoder"]):
            print(f"{t['budget_mb']:>5}MB  {t['uniform_plan'] or '-':<60} {t['uniform_mean_cosine'] or '-':>8}  "
                  f"{t['all_plan'] or '-':<56} {t['all_mean_cosine'] or '-':>8}")
    if "decoder" in out:
        print(f"\n{'plan':<52} {'weights':>9} {'peak':>9} {'top-1':>7} {'logit err':>10}")
        for r in out["decoder"]:
            print(f"{r['plan']:<52} {r['weights_bytes'] / 1e6:>7.2f}MB {r['measured_peak_bytes'] / 1e6:>7.1f}MB "
                  f"{r['top1_agreement']:>7.4f} {r['logit_error']:>10.5f}")


def plot(rows: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for kind, color, marker in (("uniform", "tab:gray", "o"), ("mixed", "tab:blue", "s")):
        points = sorted((r["measured_peak_bytes"] / 1e6, r["mean_cosine"], r["plan"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, linestyle="none",
                label=f"{kind} plans")
    frontier, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["measured_peak_bytes"]):
        if r["mean_cosine"] > best:
            best = r["mean_cosine"]
            frontier.append((r["measured_peak_bytes"] / 1e6, best))
            ax.annotate(r["plan"].replace("precision:dtype=", "").replace("quantize:scheme=", ""),
                        frontier[-1], textcoords="offset points", xytext=(5, -11), fontsize=7,
                        color="tab:blue" if r["kind"] == "mixed" else "dimgray")
    ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:blue", alpha=0.4,
            label="best fidelity within a budget")
    ax.axhline(0.99, color="tab:orange", linestyle="--", linewidth=1, label="default floor 0.99")
    ax.set_xlabel("measured peak memory (MB)")
    ax.set_ylabel("held-out mean cosine vs fp32")
    ax.set_title("all-MiniLM-L6-v2 on cpu: uniform and mixed quantization")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png", metadata={"Software": None})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("encoder", "decoder"), default=None)
    parser.add_argument("--plot", default=None, help="draw the encoder's fidelity against memory into this PNG")
    parser.add_argument("--json", dest="json_out", default=None, help="also write every row to this JSON file")
    parser.add_argument("--from-json", default=None, help="print and plot the rows of an earlier --json, packing nothing")
    args = parser.parse_args()
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        report(out)
        if args.plot and "encoder" in out:
            plot(out["encoder"], args.plot)
        return 0

    from edgepack.environment import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(2)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-mixed-") as tmp:
        if args.only in (None, "encoder"):
            out["encoder"] = encoder_rows(tmp)
            out["budgets"] = budget_table(out["encoder"])
            if args.plot:
                plot(out["encoder"], args.plot)
        if args.only in (None, "decoder"):
            out["decoder"] = decoder_rows(tmp)
    report(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
