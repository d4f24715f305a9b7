"""pack(): load → plan → apply → measure → write (DESIGN section 1)."""

from __future__ import annotations

import copy
import datetime as _dt
import platform
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import edgepack
from edgepack.errors import NoPlanFits, UsageError, VerificationError
from edgepack.interfaces import ApplyContext, Compressor, Workload
from edgepack.memory import format_size, parse_size
from edgepack.planner import (
    DEFAULT_FLOOR, Budget, Candidate, build_candidate, fixed_plan, negotiate, search, smallest,
)

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.+-]+)?$")

#: How many fitting candidates pack measures before giving up.
MAX_MEASURED = 4


@dataclass
class PackResult:
    """The outcome of :func:`pack`."""

    bundle: Path
    manifest: dict[str, Any]
    archive: Path | None = None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        """Bytes of every file in the bundle (manifest included)."""
        return sum(p.stat().st_size for p in self.bundle.rglob("*") if p.is_file())

    def to_json(self) -> dict[str, Any]:
        """``pack --json`` output (DESIGN section 6)."""
        memory = self.manifest["memory"]
        return {
            "bundle": str(self.bundle),
            "archive": str(self.archive) if self.archive else None,
            "plan": self.manifest["plan"],
            "memory": {k: memory[k] for k in ("budget_bytes", "predicted_peak_bytes", "measured_peak_bytes")},
            "fidelity": {k: self.manifest["fidelity"][k] for k in ("metric", "value", "floor")},
            "size_bytes": self.size_bytes,
            "weights_bytes": sum(f["size"] for f in self.manifest["files"] if f["path"].endswith(".safetensors") and f["path"].startswith("model/")),
        }


def _save_model(model: Any, steps: Sequence[tuple[Compressor, dict[str, Any]]], model_dir: Path) -> str | None:
    """Write the model's weights and config; return the plugin that owns loading, if any."""
    for compressor, options in reversed(steps):
        if compressor.save(model, model_dir, options):
            return compressor.name
    model.save_pretrained(model_dir, safe_serialization=True)
    return None


def _write_readme(path: Path, manifest: dict[str, Any]) -> None:
    """The generated model card of the bundle."""
    mem = manifest["memory"]
    fid = manifest["fidelity"]
    plan = " → ".join(
        f"{s['plugin']}({', '.join(f'{k}={v}' for k, v in sorted(s['options'].items()))})" for s in manifest["plan"]
    ) or "none (the original weights)"
    loader = manifest["model"]["loader"]
    how = (
        "`transformers.AutoModel.from_pretrained(\"model\")` (stock transformers) or `edgepack.load(\".\")`"
        if loader is None else f"`edgepack.load(\".\")` (the `{loader}` plugin restores its weights)"
    )
    rows = "\n".join(
        f"| {c['spec']} | {format_size(c['estimated_peak_bytes'])} | "
        f"{format_size((c.get('measured') or {}).get('peak_bytes'))} | "
        f"{(c.get('measured') or {}).get('fidelity', '-')} | {c.get('rejected_because', 'chosen' if c.get('chosen') else '-')} |"
        for c in manifest["candidates"]
    )
    text = f"""# {manifest['bundle']['name']} {manifest['bundle']['version']} for {manifest['target']['name']}

Packed by edgepack {manifest['producer']['edgepack']} on {manifest['bundle']['created']}.

- Source: `{manifest['source']['model']}` ({manifest['model']['architecture']}, {manifest['model']['num_parameters']:,} parameters)
- Task: {manifest['model']['task']}
- Plan: {plan}
- Budget: {format_size(mem['budget_bytes'])} per device ({manifest['budget']['source']} bound)
- Peak memory: predicted {format_size(mem['predicted_peak_bytes'])}, measured {format_size(mem['measured_peak_bytes'])}
  (scope: {mem['scope']})
- Fidelity: {fid['metric']} {fid['value']} (floor {fid['floor']}, worst input {fid.get('worst')})
- Workload: batch {manifest['workload']['batch_size']}, sequence length {manifest['workload']['seq_len']}

Load with {how}. Check before release with `edgepack verify <this directory>`.

## Candidates considered

| plan | est. peak | measured peak | fidelity | outcome |
|---|---|---|---|---|
{rows}
"""
    path.write_text(text, encoding="utf-8")


def _progress_default(message: str) -> None:
    pass


def pack(
    model: str | Path,
    *,
    target: str = "cpu",
    out: str | Path = "dist",
    budget: str | int | None = None,
    apply: Sequence[str] = (),
    batch_size: int = 1,
    seq_len: int = 128,
    cache_len: int | None = None,
    min_fidelity: float | None = None,
    version: str = "0.1.0",
    samples: str | Path | None = None,
    devices: int | None = None,
    archive: bool = False,
    name: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = _progress_default,
    registry: Any = None,
) -> PackResult:
    """Pack a model for one target under a memory budget and write a verified bundle.

    :param model: a local Hugging Face model directory (or a hub id already in the local cache).
    :param target: target name (``cpu``, ``cuda``, ...).
    :param out: directory the bundle ``<name>-<version>-<target>`` is written into.
    :param budget: bytes per device (``30MB``, ``1.5GiB``); defaults to the target's capacity.
    :param apply: fixed plan as ``PLUGIN[:KEY=VALUE,...]`` specs, applied in order; when empty
        the planner picks the plan.
    :param min_fidelity: floor for the fidelity metric (default per task: see DEFAULT_FLOOR).
    :param samples: file of smoke sample texts (JSON list or one per line).
    :raises UsageError: bad input (exit 2); NoPlanFits: nothing fits (exit 3);
        VerificationError: a fixed plan misses the fidelity floor (exit 1).
    """
    from edgepack.host import load_registry
    from edgepack.model import ModelSource
    from edgepack.smoke import DEFAULT_SAMPLES, read_samples

    if not _SEMVER.match(version):
        raise UsageError(f"--version {version!r} is not a semantic version such as 0.1.0")
    for flag, value in (("--batch", batch_size), ("--seq-len", seq_len)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if min_fidelity is not None and not 0.0 <= min_fidelity <= 1.0:
        raise UsageError(f"--min-fidelity must be between 0 and 1, got {min_fidelity}")
    user_budget = parse_size(budget, "--budget") if budget is not None else None
    sample_texts = read_samples(samples) if samples is not None else list(DEFAULT_SAMPLES)

    registry = registry or load_registry()
    tgt = registry.target(target)
    probe = tgt.probe()
    if devices is not None and devices != max(1, len(probe.devices)) and probe.present:
        raise UsageError(f"--devices {devices}: target {target} has {len(probe.devices)} device(s) here")

    progress(f"reading {model}")
    source = ModelSource.open(model)
    facts = source.facts
    if facts.max_positions and seq_len > facts.max_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {facts.max_positions}")
    workload = Workload(batch_size, seq_len, cache_len if facts.is_decoder else None)
    if facts.is_decoder and workload.cache_len is None:
        from edgepack.smoke import DEFAULT_NEW_TOKENS

        workload = Workload(batch_size, seq_len, seq_len + DEFAULT_NEW_TOKENS)
    floor = DEFAULT_FLOOR[facts.task] if min_fidelity is None else min_fidelity
    negotiated = negotiate(user_budget, tgt, probe)
    progress(negotiated.describe())

    if apply:
        steps = fixed_plan(registry, apply, probe)
        candidates = [build_candidate(steps, facts, workload, probe, negotiated)]
    else:
        candidates = search(registry, facts, workload, probe, negotiated)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        best = smallest(candidates)
        raise NoPlanFits(
            f"no plan fits the budget of {format_size(negotiated.bytes_per_device)} per device: the smallest "
            f"estimated peak is {format_size(best.estimate.peak_bytes)}, reached by {best.spec}"
        )

    bundle_name = f"{name or source.slug}-{version}-{target}"
    progress(f"loading weights of {source.path}")
    original = source.load()
    tokenizer = source.tokenizer()

    from edgepack.bundle.writer import BundleWriter
    from edgepack.smoke import EXPECTED_FILE, INPUTS_FILE, TOLERANCES_FILE, compare, run_outputs, tokenize, tolerances

    inputs = tokenize(tokenizer, sample_texts, seq_len, facts.task)
    progress(f"computing golden outputs of the original model on {len(sample_texts)} smoke inputs")
    expected = run_outputs(original, inputs, facts.task, batch_size)
    calibration = [dict(b) for b in _calibration_batches(tokenizer, seq_len, facts.task)]

    with BundleWriter(out, bundle_name, overwrite=force) as writer:
        staging = writer.staging
        assert staging is not None
        from safetensors.torch import save_file

        (staging / "smoke").mkdir()
        save_file({k: v.contiguous() for k, v in inputs.items()}, staging / INPUTS_FILE)
        save_file({k: v.contiguous() for k, v in expected.items()}, staging / EXPECTED_FILE)

        chosen: Candidate | None = None
        chosen_tol: dict[str, Any] = {}
        measured_result = None
        for index, candidate in enumerate(fitting[:MAX_MEASURED]):
            progress(f"applying plan {candidate.spec} (candidate {index + 1} of {min(len(fitting), MAX_MEASURED)})")
            model = copy.deepcopy(original)
            context = ApplyContext(tgt, probe, facts, calibration, progress)
            for compressor, options in candidate.steps:
                progress(f"  {compressor.name}: {', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}")
                model = compressor.apply(model, options, context)
            model_dir = staging / "model"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            progress("writing model weights")
            loader = _save_model(model, candidate.steps, model_dir)
            del model
            tokenizer.save_pretrained(model_dir)
            for rel in source.side_files():
                (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.path / rel, model_dir / rel)
            progress(f"loading the packed model in a fresh process and running the smoke inputs on {target}")
            try:
                from edgepack.smoke import measure_in_fresh_process

                measured_result = measure_in_fresh_process(
                    staging, task=facts.task, steps=candidate.plan, loader=loader, target=target,
                    batch_size=batch_size,
                ) if probe.present else None
            except VerificationError as exc:
                candidate.rejected_because = str(exc)
                continue
            if measured_result is None:
                raise UsageError(f"target {target} is not present on this machine; pack on a machine that has it")
            fidelity = compare(expected, measured_result.outputs, facts.task)
            candidate.measured = {
                "peak_bytes": measured_result.peak_bytes,
                "fidelity": round(fidelity.value, 6),
                "worst": round(fidelity.worst, 6),
            }
            progress(
                f"  measured peak {format_size(measured_result.peak_bytes)} "
                f"(predicted {format_size(candidate.estimate.peak_bytes)}), {fidelity.metric} {fidelity.value:.5f}"
            )
            if measured_result.peak_bytes > negotiated.bytes_per_device:
                candidate.rejected_because = (
                    f"measured peak {format_size(measured_result.peak_bytes)} exceeds the budget "
                    f"{format_size(negotiated.bytes_per_device)}"
                )
                continue
            if fidelity.value < floor:
                candidate.rejected_because = f"{fidelity.metric} {fidelity.value:.5f} is below the floor {floor}"
                continue
            chosen, chosen_tol, chosen_fidelity, chosen_loader = candidate, tolerances(fidelity, floor), fidelity, loader
            candidate.chosen = True
            break
        for candidate in fitting[MAX_MEASURED:]:
            if chosen is None:
                candidate.rejected_because = f"not measured: pack measures at most {MAX_MEASURED} candidates"

        if chosen is None:
            tried = [c for c in fitting if c.measured or c.rejected_because]
            reasons = "; ".join(f"{c.spec}: {c.rejected_because}" for c in tried[:MAX_MEASURED])
            if apply and tried and tried[0].measured and "floor" in (tried[0].rejected_because or ""):
                raise VerificationError(f"the plan {tried[0].spec} misses the fidelity floor: {tried[0].rejected_because}")
            best = smallest(candidates)
            raise NoPlanFits(
                f"no plan fits the budget of {format_size(negotiated.bytes_per_device)} with fidelity >= {floor}: "
                f"the smallest footprint is {format_size(max(best.estimate.peak_bytes, (best.measured or {}).get('peak_bytes', 0)))}, "
                f"reached by {best.spec} ({reasons})"
            )

        import json

        (staging / TOLERANCES_FILE).write_text(json.dumps(chosen_tol, indent=2, sort_keys=True) + "\n")
        manifest = _manifest(
            bundle_name=name or source.slug, version=version, source=source, target=tgt, probe=probe,
            workload=workload, budget=negotiated, candidates=candidates, chosen=chosen,
            measured=measured_result, fidelity=chosen_fidelity, floor=floor, loader=chosen_loader,
            samples=len(sample_texts),
        )
        _write_readme(staging / "README.md", manifest)
        progress("writing manifest")
        final = writer.commit(manifest)

    result = PackResult(final, writer.manifest, candidates=candidates)
    if archive:
        from edgepack.bundle.archive import create_archive

        progress("writing archive")
        result.archive = create_archive(final)
    return result


def _calibration_batches(tokenizer: Any, seq_len: int, task: str) -> list[dict[str, Any]]:
    """Calibration inputs for compressors that score importance: a text set of its own, so
    the smoke inputs stay unseen by the compression they judge."""
    from edgepack.smoke import CALIBRATION_SAMPLES, batches, tokenize

    inputs = tokenize(tokenizer, list(CALIBRATION_SAMPLES), seq_len, task)
    return list(batches(inputs, 8))


def _manifest(*, bundle_name: str, version: str, source: Any, target: Any, probe: Any, workload: Workload,
              budget: Budget, candidates: list[Candidate], chosen: Candidate, measured: Any, fidelity: Any,
              floor: float, loader: str | None, samples: int) -> dict[str, Any]:
    import torch
    import transformers

    from edgepack.bundle.manifest import FORMAT, FORMAT_VERSION
    from edgepack.smoke import DEFAULT_NEW_TOKENS, EXPECTED_FILE, INPUTS_FILE, TOLERANCES_FILE

    plugins = {c.name: c.version for c, _ in chosen.steps}
    plugins[target.name] = target.version
    required = sorted({cap for c, _ in chosen.steps for cap in c.requires})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle": {
            "name": bundle_name,
            "version": version,
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        },
        "producer": {
            "edgepack": edgepack.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "plugins": plugins,
        },
        "source": {"model": str(source.path), "sha256": source.weights_sha256()},
        "model": {
            "task": source.facts.task,
            "model_type": source.facts.model_type,
            "architecture": source.facts.architecture,
            "num_parameters": source.facts.num_parameters,
            "loader": loader,
            "stock_transformers": loader is None,
        },
        "target": {
            "name": target.name,
            "devices": max(1, len(probe.devices)),
            "capabilities": required,
            "probed": probe.to_json(),
        },
        "workload": workload.to_json(),
        "budget": budget.to_json(),
        "plan": [s.to_json() for s in chosen.plan],
        "candidates": [c.to_json() for c in candidates],
        "memory": {
            "budget_bytes": budget.bytes_per_device,
            "predicted_peak_bytes": chosen.estimate.peak_bytes,
            "predicted": chosen.estimate.to_json(),
            "measured_peak_bytes": measured.peak_bytes,
            "scope": measured.scope,
        },
        "fidelity": {**fidelity.to_json(), "floor": floor},
        "smoke": {
            "inputs": INPUTS_FILE,
            "expected": EXPECTED_FILE,
            "tolerances": TOLERANCES_FILE,
            "new_tokens": DEFAULT_NEW_TOKENS,
            "count": samples,
        },
    }
