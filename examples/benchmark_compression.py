"""Size, fidelity and latency of edgepack's compression plans on MiniLM, side by side with what
a user would do by hand.

    python examples/benchmark_compression.py
    python examples/benchmark_compression.py --rounds 9 --json results.json

For each plan a bundle is packed for the cpu target (``edgepack.pack(..., apply=plan)``), then
every bundle is loaded with ``edgepack.load`` in this one process. Fidelity is the mean cosine
similarity of mean-pooled, normalised embeddings against the fp32 model on sentences that are
neither smoke nor calibration inputs. Latency is batch 32 x 32 tokens, ``torch.set_num_threads(2)``,
median over interleaved rounds (every model timed once per round), as a ratio to fp32 measured
in the same rounds. The baseline is ``torch.ao.quantization.quantize_dynamic`` on the Linear
layers (what most users reach for), with its size from its state dict.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PLANS = [
    [],
    ["precision:dtype=bf16"],
    ["quantize:scheme=int8"],
    ["precision:dtype=bf16", "quantize:scheme=int8"],
    ["quantize:scheme=int8-dynamic"],
    ["quantize:scheme=int4,group_size=32"],
    ["precision:dtype=bf16", "quantize:scheme=int4,group_size=32"],
    ["quantize:scheme=int4,group_size=128"],
    ["prune:ffn=0.25", "quantize:scheme=int8"],
    ["sparsify:format=bitmask,sparsity=0.5"],
]

HELD_OUT = [
    "The weather is lovely today.", "He drove to the airport at dawn.", "Stock markets fell sharply on Monday.",
    "A recipe for chocolate cake with walnuts.", "The algorithm sorts the list in linear time.",
    "Please close the door behind you.", "My grandmother grew tomatoes in her garden.",
    "The violinist played a difficult concerto.", "Quantum computers use qubits instead of bits.",
    "We missed the bus and had to walk home.", "The patient was discharged after two days.",
    "Elections will be held in November.", "Cats sleep for most of the day.", "The bridge was closed for repairs.",
    "She wrote her thesis on medieval poetry.", "Rainfall this year was below average.",
    "The server returned a 404 error.", "He apologised for the delay.",
    "Solar panels convert sunlight to electricity.", "The children built a sandcastle on the beach.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from edgepack.environment import quiet_libraries

    quiet_libraries()
    import torch
    import transformers

    import edgepack
    from edgepack.smoke import mean_pool
    from edgepack.testing import minilm_path

    torch.set_num_threads(2)
    source = minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    held = tokenizer(HELD_OUT, padding=True, return_tensors="pt")
    words = ("edge devices need small fast models " * 8).split()
    bench = tokenizer([" ".join(words[i:i + 30]) for i in range(32)], padding="max_length", truncation=True,
                      max_length=32, return_tensors="pt")

    def embed(model, batch):
        with torch.inference_mode():
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])

    reference_model = transformers.AutoModel.from_pretrained(source).eval()
    reference = embed(reference_model, held)
    rows: list[dict] = []
    models: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        for plan in PLANS:
            label = " + ".join(plan) or "fp32 (no plan)"
            started = time.perf_counter()
            result = edgepack.pack(str(source), target="cpu", apply=plan, min_fidelity=0.0, out=tmp,
                                   force=True, name="minilm-" + str(len(rows)))
            weights = sum(f["size"] for f in result.manifest["files"]
                          if f["path"].startswith("model/") and f["path"].endswith(".safetensors"))
            model = edgepack.load(result.bundle)
            cos = torch.nn.functional.cosine_similarity(reference, embed(model, held))
            rows.append({"plan": label, "weights_bytes": weights, "mean_cosine": cos.mean().item(),
                         "worst_cosine": cos.min().item(), "loader": result.manifest["model"]["loader"] or "stock",
                         "measured_peak_bytes": result.manifest["memory"]["measured_peak_bytes"],
                         "pack_seconds": time.perf_counter() - started})
            models[label] = model
            print(f"packed {label}", file=sys.stderr, flush=True)

        baseline = torch.ao.quantization.quantize_dynamic(
            transformers.AutoModel.from_pretrained(source).eval(), {torch.nn.Linear}, dtype=torch.qint8)
        buffer = io.BytesIO()
        torch.save(baseline.state_dict(), buffer)  # size only; never loaded back
        cos = torch.nn.functional.cosine_similarity(reference, embed(baseline, held))
        label = "baseline: torch quantize_dynamic (Linear int8)"
        rows.append({"plan": label, "weights_bytes": buffer.tell(), "mean_cosine": cos.mean().item(),
                     "worst_cosine": cos.min().item(), "loader": "torch.save (pickle)", "measured_peak_bytes": None})
        models[label] = baseline

        times: dict[str, list[float]] = {k: [] for k in models}
        for model in models.values():  # warm-up
            embed(model, bench)
        for _ in range(args.rounds):
            for label, model in models.items():
                t0 = time.perf_counter()
                embed(model, bench)
                times[label].append(time.perf_counter() - t0)
        fp32 = statistics.median(times["fp32 (no plan)"])
        for row in rows:
            row["latency_ms"] = statistics.median(times[row["plan"]]) * 1000
            row["latency_ratio"] = statistics.median(times[row["plan"]]) / fp32

    full = rows[0]["weights_bytes"]
    print(f"\n{'plan':<56} {'weights':>10} {'smaller':>8} {'cosine':>8} {'worst':>8} {'latency':>9} {'vs fp32':>8}  loader")
    for r in rows:
        print(f"{r['plan']:<56} {r['weights_bytes'] / 1e6:>8.1f}MB {full / r['weights_bytes']:>7.2f}x "
              f"{r['mean_cosine']:>8.5f} {r['worst_cosine']:>8.5f} {r['latency_ms']:>7.1f}ms {r['latency_ratio']:>7.2f}x  {r['loader']}")
    print(f"\nbatch 32 x 32 tokens, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds; "
          f"cosine on {len(HELD_OUT)} held-out sentences vs the fp32 model")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
