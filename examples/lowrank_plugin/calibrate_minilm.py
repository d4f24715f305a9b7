"""Measure what ``lowrank`` costs all-MiniLM-L6-v2, next to the plugin's prior (quality_cost).

    python examples/lowrank_plugin/calibrate_minilm.py            # 1-2 minutes on 2 cores
    python examples/lowrank_plugin/calibrate_minilm.py --json out.json

For each option set the plugin's own ``apply`` factorises a copy of the model; the figure is
1 - mean cosine similarity of mean-pooled, normalised sentence embeddings against the fp32
model, on edgepack's 16 smoke sentences (what ``pack`` judges fidelity on) and on 20 other
sentences. "linear saved" is the share of Linear weight parameters the factors save. The
package need not be installed: the script imports it from its own directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OPTION_SETS = [
    {"rank": 300}, {"rank": 256}, {"rank": 190}, {"rank": 160}, {"rank": 128}, {"rank": 64},
    {"energy": 0.99}, {"energy": 0.97}, {"energy": 0.95}, {"energy": 0.9},
    {"energy": 0.9, "max_rank": 256}, {"rank": 128, "keep": ["intermediate", "output.dense", "value"]},
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
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from edgepack.environment import quiet_libraries

    quiet_libraries()
    import torch
    import transformers

    from edgepack.errors import UsageError
    from edgepack.model import ModelSource
    from edgepack.smoke import DEFAULT_SAMPLES, mean_pool
    from edgepack.testing import minilm_path
    from edgepack_lowrank.compressor import LowRank

    torch.set_num_threads(2)
    source = minilm_path()
    facts = ModelSource.open(source).facts
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    sets = {"smoke": list(DEFAULT_SAMPLES), "held-out": HELD_OUT}
    batches = {k: tokenizer(v, padding=True, return_tensors="pt") for k, v in sets.items()}
    original = transformers.AutoModel.from_pretrained(source).eval()

    def embed(model, batch):
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

    reference = {k: embed(original, b) for k, b in batches.items()}
    linear_params = sum(m.weight.numel() for m in original.modules() if isinstance(m, torch.nn.Linear))
    plugin = LowRank()
    rows = []
    for raw in OPTION_SETS:
        options = plugin.parse_options(raw)
        try:
            model = plugin.apply(copy.deepcopy(original), options, None)
        except UsageError as exc:  # nothing to factorise at this setting
            print(f"{json.dumps(raw):<58} {exc}", flush=True)
            continue
        stored = sum(p.numel() for n, p in model.named_parameters()
                     if n.endswith((".u", ".v")) or (n.endswith(".weight") and p.dim() == 2
                                                    and "embeddings" not in n))
        row = {"options": raw, "linear_saved": 1 - stored / linear_params,
               "prior": plugin.quality_cost(options, facts)}
        for key, batch in batches.items():
            cos = (embed(model, batch) * reference[key]).sum(-1)
            row[key] = 1 - cos.mean().item()
            row[key + " worst"] = 1 - cos.min().item()
        rows.append(row)
        print(f"{json.dumps(raw):<58} saved {row['linear_saved']:.3f}  prior {row['prior']:.3f}  "
              f"smoke {row['smoke']:.4f}  held-out {row['held-out']:.4f}  worst {row['smoke worst']:.4f}",
              flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
