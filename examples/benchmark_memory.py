"""Predicted vs measured peak memory for every plan the built-in plugins produce, and a
budget sweep that checks no bundle's measured peak exceeds its budget.

    python examples/benchmark_memory.py                 # MiniLM + llama + qwen2, all plans, sweep
    python examples/benchmark_memory.py --models minilm --no-sweep
    python examples/benchmark_memory.py --json results.json

Each plan is packed for the cpu target with ``edgepack.pack(..., apply=plan)`` and the manifest's
predicted and measured peaks are compared (the measurement is the fresh-process probe that
``verify`` uses; see README "Memory"). Slow: about 10 s per plan on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def plans_for(registry, facts, probe, subset: bool = False) -> list[list[str]]:
    """Every plan the planner enumerates, as --apply specs; with ``subset``, only plans of one
    step and those of two steps whose first is precision:dtype=bf16 (a quick calibration set)."""
    from edgepack.planner import enumerate_plans
    from edgepack.interfaces import PlanStep

    specs = []
    for steps in enumerate_plans(registry, facts, probe):
        spec = [PlanStep(c.name, c.version, o).spec() for c, o in steps]
        if subset and not (len(spec) <= 1 or (len(spec) == 2 and spec[0] == "precision:dtype=bf16")):
            continue
        specs.append(spec)
    return specs


def model_dirs(names: list[str], work: Path) -> dict[str, Path]:
    from edgepack.testing import build_decoder, minilm_path

    dirs = {}
    for name in names:
        dirs[name] = minilm_path() if name == "minilm" else build_decoder(name, work / name)
    return dirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama,qwen2", help="comma list: minilm, llama, qwen2, gpt2")
    parser.add_argument("--no-sweep", action="store_true", help="skip the budget sweep")
    parser.add_argument("--no-plans", action="store_true", help="skip the per-plan table")
    parser.add_argument("--budgets", type=int, default=8, help="budgets per model in the sweep")
    parser.add_argument("--subset", action="store_true", help="one-step plans and bf16 + one step only")
    parser.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = parser.parse_args()

    from edgepack.environment import quiet_libraries

    quiet_libraries()
    import edgepack
    from edgepack.errors import EdgepackError, NoPlanFits
    from edgepack.host import load_registry
    from edgepack.memory import format_size
    from edgepack.model import ModelSource

    registry = load_registry()
    probe = registry.target("cpu").probe()
    rows, sweep = [], []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        work = Path(tmp)
        dirs = model_dirs([m.strip() for m in args.models.split(",") if m.strip()], work)
        if not args.no_plans:
            print(f"{'model':<8} {'plan':<58} {'predicted':>10} {'measured':>10} {'error':>7} {'fidelity':>9}")
            for name, path in dirs.items():
                facts = ModelSource.open(path).facts
                for plan in plans_for(registry, facts, probe, args.subset):
                    started = time.perf_counter()
                    try:
                        result = edgepack.pack(str(path), target="cpu", apply=plan, min_fidelity=0.0,
                                               out=str(work / "out"), force=True, name=name)
                    except EdgepackError as exc:
                        print(f"{name:<8} {' + '.join(plan) or '(none)':<58} failed: {exc}")
                        continue
                    mem = result.manifest["memory"]
                    pred, meas = mem["predicted_peak_bytes"], mem["measured_peak_bytes"]
                    err = (pred - meas) / meas
                    row = {"model": name, "plan": plan, "predicted": pred, "measured": meas, "error": err,
                           "fidelity": result.manifest["fidelity"]["value"], "weights": mem["predicted"]["weights_bytes"],
                           "activations": mem["predicted"]["activation_bytes"], "kv_cache": mem["predicted"]["kv_cache_bytes"],
                           "workspace": mem["predicted"]["workspace_bytes"], "seconds": time.perf_counter() - started}
                    rows.append(row)
                    print(f"{name:<8} {' + '.join(plan) or '(none)':<58} {format_size(pred):>10} {format_size(meas):>10} "
                          f"{err:>+7.1%} {row['fidelity']:>9.5f}", flush=True)
            if rows:
                worst_under = min(r["error"] for r in rows)
                worst_over = max(r["error"] for r in rows)
                within = sum(1 for r in rows if -0.03 <= r["error"] <= 0.10)
                print(f"\n{within}/{len(rows)} plans within [-3%, +10%]; error range {worst_under:+.1%} .. {worst_over:+.1%}")

        if not args.no_sweep:
            print(f"\n{'model':<8} {'budget':>10} {'outcome':<40} {'measured':>10} {'ok':>4}")
            for name, path in dirs.items():
                facts = ModelSource.open(path).facts
                full = facts.num_parameters * 4
                # from below the smallest plan to above the unquantized model
                budgets = [int(full * f) for f in [0.25 + i * (1.0 / (args.budgets - 1)) for i in range(args.budgets)]]
                for budget in budgets:
                    try:
                        result = edgepack.pack(str(path), target="cpu", budget=budget, out=str(work / "sweep"),
                                               force=True, name=name)
                        meas = result.manifest["memory"]["measured_peak_bytes"]
                        outcome = " + ".join(s["plugin"] + ":" + ",".join(f"{k}={v}" for k, v in sorted(s["options"].items()))
                                             for s in result.manifest["plan"]) or "(none)"
                        ok = meas <= budget
                    except NoPlanFits:
                        meas, outcome, ok = None, "exit 3: no plan fits", True
                    sweep.append({"model": name, "budget": budget, "outcome": outcome, "measured": meas, "ok": ok})
                    print(f"{name:<8} {format_size(budget):>10} {outcome:<40} {format_size(meas):>10} {'yes' if ok else 'NO':>4}", flush=True)
            violations = [s for s in sweep if not s["ok"]]
            print(f"\n{len(sweep)} packs in the sweep, {len(violations)} with measured peak over budget")

    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"plans": rows, "sweep": sweep}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
