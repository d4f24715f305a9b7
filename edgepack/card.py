"""The bundle's model card: README.md (and, with matplotlib, its chart) written from the manifest.

Everything the card states comes from the manifest, except the estimated effect of each plan
step on the weights, which ``pack`` passes in (:func:`step_effects`). The card and its chart are
not content (:data:`~edgepack.bundle.manifest.CONTENT_EXCLUDED_FILES`): they report figures of
one build, and the same content may be packed again with other measurements.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Callable, Sequence

from edgepack.bundle.manifest import CARD_CHART
from edgepack.interfaces import PlanStep
from edgepack.memory import format_peak, format_size, step_footprints
from edgepack.planner import format_measured_fidelity

#: What counts as the bundle's stored weights in the card: tensors and compiled programs.
WEIGHT_SUFFIXES = (".safetensors", ".pte")


def step_effects(steps: Sequence[tuple[Any, dict[str, Any]]], facts: Any, probe: Any) -> list[dict[str, Any]]:
    """The estimated stored weights after each step of a plan (the planner's footprint, the
    same one the budget was negotiated with) and each step's prior quality cost."""
    footprints = step_footprints(facts, steps, probe)
    return [{"step": PlanStep(compressor.name, compressor.version, options).spec(),
             "weights_before": before.weights_bytes, "weights_after": after.weights_bytes,
             "quality_cost": compressor.quality_cost(options, facts)}
            for (compressor, options), before, after in zip(steps, footprints, footprints[1:])]


def _how_to_load(manifest: dict[str, Any]) -> str:
    loader = manifest["model"]["loader"]
    code = manifest["model"].get("code")
    if code:
        return (f"`edgepack.load(\".\", allow_code=True)` (or `trust_remote_code=True` in transformers): the model "
                f"runs its own code, {', '.join(f'`{c}`' for c in code)}; read it first")
    if manifest["model"].get("program"):
        program = manifest["model"]["program"]
        return (f"`edgepack.load(\".\")` (the {program.get('runtime', loader)} runtime runs "
                f"`model/{program['file']}`)")
    if isinstance(manifest.get("parallel"), dict):
        return f"one process per rank: `{manifest['parallel']['launch']}`"
    if loader is None:
        return "`transformers.AutoModel.from_pretrained(\"model\")` (stock transformers) or `edgepack.load(\".\")`"
    return f"`edgepack.load(\".\")` (the `{loader}` plugin restores its weights)"


def _plan_section(manifest: dict[str, Any], effects: Sequence[dict[str, Any]], weights: int) -> str:
    fid = manifest["fidelity"]
    if not manifest["plan"]:
        return f"No compression: the original weights ({format_size(weights)} in `model/`).\n"
    rows = "".join(
        f"| {e['step']} | {format_size(e['weights_before'])} → {format_size(e['weights_after'])} | "
        f"{e['quality_cost']:.4f} |\n" for e in effects
    )
    return ("| step | stored weights (estimated) | quality cost (prior) |\n|---|---|---|\n" + rows
            + f"\nThe whole plan, measured: the weights in `model/` hold {format_size(weights)}; "
              f"{fid['metric']} {fid['value']} against the original (floor {fid['floor']}).\n")


def _considered(candidates: Sequence[dict[str, Any]]) -> str:
    if len(candidates) == 1:
        return "One plan considered; pack measured it against the budget and the floor."
    return (f"The planner estimated {len(candidates)} plans; pack measured those that fit, in this order, "
            "and kept the first that reached the floor.")


def _chart_line(chart: bool | str) -> str:
    if chart is True:
        return f"\n![peak memory against fidelity of every candidate]({CARD_CHART})\n"
    return f"\n({chart}.)\n" if chart else ""


def _candidates_section(manifest: dict[str, Any]) -> str:
    rows = "".join(
        f"| {c['spec']} | {format_size(c['estimated_peak_bytes'])} | "
        f"{format_size((c.get('measured') or {}).get('peak_bytes'))} | "
        f"{format_measured_fidelity(c.get('measured'))} | "
        f"{'chosen' if c.get('chosen') else c.get('rejected_because') or ('fits, ranked lower' if c.get('fits') else '-')} |\n"
        for c in manifest["candidates"]
    )
    return "| plan | est. peak | measured peak | fidelity | outcome |\n|---|---|---|---|---|\n" + rows


def _modules_sections(manifest: dict[str, Any]) -> str:
    tables = ""
    for step in manifest["plan"]:
        modules = (step.get("details") or {}).get("modules")
        if not modules:
            continue
        ranked = sorted(modules.items(), key=lambda item: -(item[1].get("sensitivity") or 0))
        formats: dict[str, int] = {}
        for info in modules.values():
            formats[info["format"]] = formats.get(info["format"], 0) + 1
        tables += (f"\n## Per-module formats ({step['plugin']})\n\n"
                   f"{len(modules)} modules: " + ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
                   + (f"; {step['details']['bits']} bits per weight on average" if "bits" in step["details"] else "")
                   + ". The ten most sensitive (output error with that module alone at the lowest format):\n\n"
                   "| module | format | stored | sensitivity |\n|---|---|---|---|\n"
                   + "".join(f"| {name} | {info['format']} | {format_size(info['bytes'])} | {'-' if info.get('sensitivity') is None else info['sensitivity']} |\n"
                             for name, info in ranked[:10]))
    return tables


def model_card(manifest: dict[str, Any], weights_bytes: int, effects: Sequence[dict[str, Any]] = (),
               chart: bool | str = False) -> str:
    """The text of README.md; ``weights_bytes`` is the size of the weight files in ``model/``;
    ``chart`` is True when the chart is drawn beside it, or why it was not."""
    mem = manifest["memory"]
    fid = manifest["fidelity"]
    b = manifest["bundle"]
    source = manifest["source"]
    hashes = "".join(f"  - `{name}` sha256 `{digest}`\n" for name, digest in sorted((source.get("sha256") or {}).items()))
    producer = manifest["producer"]
    versions = ", ".join(f"{k} {producer[k]}" for k in ("edgepack", "torch", "transformers", "python") if k in producer)
    plugins = ", ".join(f"{k} {v}" for k, v in sorted((producer.get("plugins") or {}).items()))
    return f"""# {b['name']} {b['version']} for {manifest['target']['name']}

Packed by edgepack {producer['edgepack']} on {b['created']}.

- Source: `{source['model']}` ({manifest['model']['architecture']}, {manifest['model']['num_parameters']:,} parameters)
{hashes}- Task: {manifest['model']['task']}
- Target: {manifest['target']['name']}; budget {format_size(mem['budget_bytes'])} per device ({manifest['budget']['source']} bound)
- Peak memory: predicted {format_size(mem['predicted_peak_bytes'])}, measured {format_peak(mem['measured_peak_bytes'])}
  (scope: {mem['scope']})
- Fidelity: {fid['metric']} {fid['value']} (floor {fid['floor']}, worst input {fid.get('worst')})
- Workload: {', '.join(f'{k} {v}' for k, v in sorted(manifest['workload'].items()))}
- Produced with {versions}; plugins {plugins or '-'}

## Verify and load

```
edgepack verify <this directory>
```

checks every file's hash, the schema, the golden outputs and the memory on the machine it runs on,
without running any code of the bundle's. Load with {_how_to_load(manifest)}.

## Plan

{_plan_section(manifest, effects, weights_bytes)}
## Candidates considered

{_considered(manifest['candidates'])}
{_chart_line(chart)}
{_candidates_section(manifest)}{_modules_sections(manifest)}"""


def write_card(directory: Path, manifest: dict[str, Any], effects: Sequence[dict[str, Any]] = (),
               warn: Callable[[str], None] = lambda message: None) -> None:
    """README.md and, when matplotlib is installed, its chart, into the bundle ``directory``.
    The chart is a courtesy: a failure to draw it is reported through ``warn``, not raised."""
    from edgepack.report import Chart, plotting_available, save

    chart: bool | str = False
    if plotting_available():
        try:
            save([Chart.from_manifest(manifest)], directory / CARD_CHART, what="the model card's chart")
            chart = True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise  # a full disk is the pack's failure, reported as such
            chart = f"the chart was not drawn: {exc}"
        except Exception as exc:  # noqa: BLE001 - a drawing failure: the card says so instead
            chart = f"the chart was not drawn: {type(exc).__name__}: {exc}"
        if isinstance(chart, str):
            warn(f"model card: {chart}")
    weights = sum(f.stat().st_size for f in (directory / "model").rglob("*")
                  if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    (directory / "README.md").write_text(model_card(manifest, weights, effects, chart), encoding="utf-8")
