"""Budget negotiation and plan search (DESIGN section 4).

Inputs: model facts, the declared workload, the target's probe and capacity, the user's budget.
Every composition of registered compressors' candidate options that the target supports is
estimated (no weights touched); plans that fit are ranked by quality cost, then peak size.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from edgepack.errors import NoPlanFits, UsageError
from edgepack.interfaces import Compressor, ModelFacts, PlanStep, Probe, Target, Workload, parse_spec
from edgepack.memory import (
    PeakEstimate, activation_bytes, estimate_plan, format_size, kv_cache_bytes, parse_size, process_status_bytes,
    step_footprints,
)
from edgepack.smoke import golden_batch

if TYPE_CHECKING:  # pragma: no cover
    from edgepack.model import ModelSource

#: Order in which kinds of compression compose: shapes first, storage formats last.
KIND_ORDER = ("prune", "precision", "sparsify", "quantize", "other", "parallel")

#: Default fidelity floor per task, used when --min-fidelity is not given.
DEFAULT_FLOOR = {"feature-extraction": 0.99, "text-generation": 0.75}


@dataclass(frozen=True)
class Budget:
    """The negotiated memory budget per device.

    :param user_bytes: what the user asked for with ``--budget`` (None when not given).
    :param capacity_bytes: what the target can offer (None when it is not present here).
    """

    user_bytes: int | None
    capacity_bytes: int | None

    @property
    def bytes_per_device(self) -> int:
        """The effective budget: the smaller of the user's budget and the capacity."""
        values = [v for v in (self.user_bytes, self.capacity_bytes) if v is not None]
        return min(values)

    @property
    def source(self) -> str:
        """``user`` when the user's budget binds, else ``target``."""
        if self.user_bytes is None:
            return "target"
        if self.capacity_bytes is None or self.user_bytes <= self.capacity_bytes:
            return "user"
        return "target"

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest."""
        return {
            "bytes_per_device": self.bytes_per_device,
            "source": self.source,
            "user_bytes": self.user_bytes,
            "capacity_bytes": self.capacity_bytes,
        }

    def describe(self) -> str:
        """One line: both numbers and which one binds."""
        user = format_size(self.user_bytes) if self.user_bytes is not None else "not given"
        cap = format_size(self.capacity_bytes) if self.capacity_bytes is not None else "unknown (target absent)"
        return f"budget {format_size(self.bytes_per_device)} per device (user: {user}; target capacity: {cap}; bound by {self.source})"


def negotiate(user_bytes: int | None, target: Target, probe: Probe) -> Budget:
    """The effective budget per device: min(user budget, target capacity)."""
    capacity = target.capacity(probe) if probe.devices else None  # known: present, or described
    if user_bytes is None and capacity is None:
        raise UsageError(
            f"target {target.name} is not present on this machine, so its capacity is unknown; give --budget "
            f"or describe it (--target {target.name}:memory=SIZE)"
        )
    return Budget(user_bytes, capacity)


@dataclass
class Candidate:
    """One plan considered: its steps, estimate, rank and (when measured) its result."""

    steps: list[tuple[Compressor, dict[str, Any]]]
    estimate: PeakEstimate
    quality_cost: float
    fits: bool
    rejected_because: str | None = None
    measured: dict[str, Any] | None = None
    chosen: bool = False
    notes: tuple[str, ...] = ()
    #: what packing it costs (:func:`pack_cost`), when pack estimated it
    pack_cost: "PackCost | None" = None

    @property
    def plan(self) -> list[PlanStep]:
        """The steps as PlanStep records."""
        return [PlanStep(c.name, c.version, opts) for c, opts in self.steps]

    @property
    def spec(self) -> str:
        """``prune:ffn=0.25 + quantize:scheme=int8``, or ``(none)`` for the plain model."""
        return " + ".join(s.spec() for s in self.plan) or "(none)"

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest's ``candidates`` and ``plan --json``."""
        data: dict[str, Any] = {
            "plan": [s.to_json() for s in self.plan],
            "spec": self.spec,
            "estimated_peak_bytes": self.estimate.peak_bytes,
            "estimate": self.estimate.to_json(),
            "quality_cost": round(self.quality_cost, 6),
            "fits": self.fits,
            "chosen": self.chosen,
        }
        if self.pack_cost is not None:
            data["pack_cost"] = self.pack_cost.to_json()
        if self.measured is not None:
            data["measured"] = self.measured
        if self.rejected_because:
            data["rejected_because"] = self.rejected_because
        return data


def parse_apply(spec: str) -> tuple[str, dict[str, str]]:
    """``quantize:scheme=int4,group_size=64`` → (``quantize``, {scheme: int4, group_size: 64}).

    A list value is bracketed: ``quantize:keep=[layer.0.,layer.5.]``."""
    return parse_spec(spec, "--apply", "plugin")


def build_candidate(steps: list[tuple[Compressor, dict[str, Any]]], facts: ModelFacts, workload: Workload,
                    probe: Probe, budget: Budget, target: Target | None = None) -> Candidate:
    """Estimate one plan (as ``target`` runs it) and rank it."""
    footprint, estimate = estimate_plan(facts, workload, steps, probe, target)
    cost = sum(c.quality_cost(o, facts) for c, o in steps)
    fits = estimate.peak_bytes <= budget.bytes_per_device
    reason = None if fits else (
        f"estimated peak {format_size(estimate.peak_bytes)} exceeds the budget {format_size(budget.bytes_per_device)}"
    )
    return Candidate(list(steps), estimate, cost, fits, reason, notes=footprint.notes)


def step_problem(compressor: Compressor, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep],
                 target: Target | None = None) -> str | None:
    """Why a step cannot be planned: the compressor's own check (capabilities, the steps before
    it), then what the target says it cannot run (:meth:`Target.refuses`); None when it can."""
    reason = compressor.check(options, probe, previous)
    if reason is None and target is not None:
        refused = target.refuses(compressor, options)
        if refused:
            reason = f"target {target.name} cannot run it: {refused}"
    return reason


def fixed_plan(registry: Any, specs: Sequence[str | Mapping[str, Any]], probe: Probe,
               target: Target | None = None) -> list[tuple[Compressor, dict[str, Any]]]:
    """The steps named by ``--apply`` flags, options parsed and checked against the target and
    the steps before them; UsageError names the option or the incompatibility."""
    steps: list[tuple[Compressor, dict[str, Any]]] = []
    for spec in specs:
        if isinstance(spec, Mapping):  # a recipe's table: {plugin = "quantize", keep = [...]}
            raw = {k: v for k, v in spec.items() if k != "plugin"}
            name = spec.get("plugin")
            if not isinstance(name, str) or not name:
                raise UsageError(f"apply entry {dict(spec)!r} needs a 'plugin' name")
            spec = PlanStep(name, "", raw).spec()
        else:
            name, raw = parse_apply(spec)
        compressor = registry.compressor(name)
        if steps and steps[-1][0].kind == "parallel":
            raise UsageError(f"--apply {spec}: comes after {steps[-1][0].name}, which splits the model into "
                             f"shards; give {steps[-1][0].name} last")
        options = compressor.complete(compressor.parse_options(raw), probe)
        previous = [PlanStep(c.name, c.version, o) for c, o in steps]
        reason = step_problem(compressor, options, probe, previous, target)
        if reason:
            raise UsageError(f"--apply {spec}: {reason}")
        steps.append((compressor, options))
    if len(probe.devices) > 1 and not any(c.kind == "parallel" for c, _ in steps) and "parallel" in registry.compressors:
        # a target of several devices runs a sharded model: split it with the defaults
        compressor = registry.compressor("parallel")
        options = compressor.complete(compressor.parse_options({}), probe)
        reason = compressor.check(options, probe, [PlanStep(c.name, c.version, o) for c, o in steps])
        if reason:
            raise UsageError(f"target {probe.target} has {len(probe.devices)} devices, so the plan needs parallel: {reason}")
        steps.append((compressor, options))
    return steps


def choose_parallel_mode(steps: list[tuple[Compressor, dict[str, Any]]], facts: ModelFacts, workload: Workload,
                         probe: Probe, budget: Budget) -> list[tuple[Compressor, dict[str, Any]]]:
    """A fixed plan's ``parallel`` step without a mode gets the mode (among those its plugin
    offers for this model) whose worst rank has the smaller estimated peak."""
    out = list(steps)
    for index, (compressor, options) in enumerate(out):
        if compressor.kind != "parallel" or options.get("mode") is not None:
            continue
        best = None
        for raw in compressor.candidates(facts, probe):
            try:
                trial = compressor.complete(compressor.parse_options({**raw, **{k: v for k, v in options.items() if v is not None}}), probe)
            except UsageError:
                continue
            plan = out[:index] + [(compressor, trial)] + out[index + 1:]
            peak = build_candidate(plan, facts, workload, probe, budget).estimate.peak_bytes
            if best is None or peak < best[0]:
                best = (peak, trial)
        if best is not None:
            out[index] = (compressor, best[1])
    return out


def enumerate_plans(registry: Any, facts: ModelFacts, probe: Probe, limit: int = 2000,
                    target: Target | None = None) -> Iterable[list[tuple[Compressor, dict[str, Any]]]]:
    """Every composition (at most one option set per compressor, in KIND_ORDER) the target
    supports (``target``: also what it says it can run), the empty plan first. Third-party
    compressors take part on equal terms."""
    compressors = sorted(
        (registry.compressor(name) for name in registry.compressors),
        key=lambda c: (KIND_ORDER.index(c.kind) if c.kind in KIND_ORDER else len(KIND_ORDER), c.name),
    )
    choices = []
    for compressor in compressors:
        if compressor.kind == "parallel" and len(probe.devices) < 2:
            continue
        option_sets = []
        for raw in compressor.candidates(facts, probe):
            try:
                option_sets.append(compressor.complete(compressor.parse_options(raw), probe))
            except UsageError:
                continue
        choices.append([None] + [(compressor, opts) for opts in option_sets])
    # a target of several devices runs a sharded model: every plan splits it
    sharded = len(probe.devices) > 1 and any(c.kind == "parallel" for c in compressors)
    count = 0
    for combo in itertools.product(*choices):
        steps: list[tuple[Compressor, dict[str, Any]]] = []
        ok = True
        for item in combo:
            if item is None:
                continue
            compressor, options = item
            previous = [PlanStep(c.name, c.version, o) for c, o in steps]
            if step_problem(compressor, options, probe, previous, target):
                ok = False
                break
            steps.append(item)
        if sharded and not any(c.kind == "parallel" for c, _ in steps):
            ok = False
        if ok:
            yield steps
            count += 1
            if count >= limit:
                return


def search(registry: Any, facts: ModelFacts, workload: Workload, probe: Probe, budget: Budget,
           target: Target | None = None) -> list[Candidate]:
    """All candidate plans (``target``: only steps it can run), fitting ones first, each group
    by quality cost then peak."""
    candidates = [build_candidate(steps, facts, workload, probe, budget, target)
                  for steps in enumerate_plans(registry, facts, probe, target=target)]
    candidates.sort(key=lambda c: (not c.fits, c.quality_cost, c.estimate.peak_bytes))
    return candidates


def smallest(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate with the smallest estimated (or measured, when larger) peak."""
    def peak(c: Candidate) -> int:
        measured = (c.measured or {}).get("peak_bytes") or 0
        return max(c.estimate.peak_bytes, measured)

    return min(candidates, key=peak)


def format_measured_fidelity(measured: dict[str, Any] | None) -> str:
    """A candidate's measured fidelity as people read it: the value, ``<= bound`` for one whose
    measuring stopped once it was proven below the floor, or ``-``."""
    measured = measured or {}
    if "fidelity" in measured:
        return str(measured["fidelity"])
    if "fidelity_at_most" in measured:
        return f"<= {measured['fidelity_at_most']} ({measured.get('inputs_run', '?')} inputs run)"
    return "-"


def explain(candidates: Sequence[Candidate], budget: Budget) -> str:
    """The human table of ``edgepack plan``."""
    rows = [("plan", "est. peak", "weights", "fits", "quality cost", "packing needs", "measured", "chosen")]
    for c in candidates:
        measured = "-"
        if c.measured:
            measured = f"{format_size(c.measured.get('peak_bytes'))} / {format_measured_fidelity(c.measured)}"
        fits = "yes" if c.fits and not c.rejected_because else ("no" if not c.fits else "no: --work-memory")
        rows.append((
            c.spec, format_size(c.estimate.peak_bytes), format_size(c.estimate.weights_bytes),
            fits, f"{c.quality_cost:.4f}", format_size(c.pack_cost.peak_bytes) if c.pack_cost else "-",
            measured, "*" if c.chosen else "",
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [budget.describe(), ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plan_model(model: "str | ModelSource", *, target: str = "cpu", budget: int | str | None = None, batch_size: int = 1,
               seq_len: int = 128, cache_len: int | None = None, registry: Any = None,
               work_memory: int | str | None = None) -> tuple[Budget, list[Candidate]]:
    """Steps 1–3 of the negotiation for ``edgepack plan``: budget and ranked candidates, from
    the model's config alone (meta device, no weights loaded). ``model`` is a path, or a
    :class:`~edgepack.model.ModelSource` the caller has opened already. Each fitting candidate
    gets its packing cost; with ``work_memory`` those that could not be packed within it are
    marked, as :func:`packable` marks them for ``pack``."""
    from edgepack.host import load_registry
    from edgepack.model import ModelSource
    from edgepack.smoke import DEFAULT_NEW_TOKENS

    registry = registry or load_registry()
    tgt = registry.target(target)
    probe = tgt.planning_probe()
    source = model if isinstance(model, ModelSource) else ModelSource.open(model)
    facts = source.facts
    if facts.is_decoder:
        workload = Workload(batch_size, seq_len, cache_len or seq_len + DEFAULT_NEW_TOKENS)
    else:
        workload = Workload(batch_size, seq_len)
    user = parse_size(budget, "--budget") if budget is not None else None
    negotiated = negotiate(user, tgt, probe)
    candidates = search(registry, facts, workload, probe, negotiated, target=tgt)
    try:
        kept = packable([c for c in candidates if c.fits], facts, workload, probe, work_memory=work_memory,
                        max_shard_bytes=DEFAULT_SHARD_SIZE)
    except NoPlanFits:
        kept = []  # every fitting plan is marked with what packing it needs
    if kept:
        kept[0].chosen = True  # the plan pack would measure first
    return negotiated, candidates


#: The largest weights file stock saving writes (``--shard-size``); larger models get shards.
DEFAULT_SHARD_SIZE = 10**9

#: Resident memory of a fresh measuring process before it loads a bundle (torch and
#: transformers imported; measured 170 MB anonymous on torch 2.13), rounded up.
FRESH_PROCESS_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PackCost:
    """What packing one candidate needs resident in memory the pack owns, by phase (bytes).
    The source's weights are not in it: they are memory-mapped from its safetensors, page
    cache the kernel shrinks to fit and reads again when needed.

    :param base_bytes: the pack process's own memory before it starts (libraries, tokenizer).
    :param apply_bytes: the pack process while it computes the golden outputs (the source's
        activations and KV cache at :func:`edgepack.smoke.golden_batch`), applies the plan and
        writes the weights: the model the last step was given and the one it returns, the
        step's scratch (:meth:`Compressor.pack_scratch_bytes`), then the weights and one file's bytes.
    :param measure_bytes: the pack process and the fresh process(es) measuring the packed
        model (each rank's estimated peak, for a multi-device plan).
    """

    base_bytes: int
    apply_bytes: int
    measure_bytes: int

    @property
    def peak_bytes(self) -> int:
        """The larger phase."""
        return max(self.apply_bytes, self.measure_bytes)

    def to_json(self) -> dict[str, int]:
        """Plain-JSON form (``candidates[i].pack_cost`` of ``pack --json`` and the manifest)."""
        return {"base_bytes": self.base_bytes, "apply_bytes": self.apply_bytes, "measure_bytes": self.measure_bytes,
                "peak_bytes": self.peak_bytes}


def packable(fitting: list[Candidate], facts: ModelFacts, workload: Workload, probe: Probe, *,
             work_memory: int | str | None, max_shard_bytes: int,
             progress: Any = lambda message: None) -> list[Candidate]:
    """Estimate what packing each fitting candidate costs (:func:`pack_cost`, with this
    process's own memory as the base); with ``work_memory`` (``--work-memory``), mark those that
    need more as rejected, with the figures, and return the others. NoPlanFits when none is
    left. ``plan`` and ``pack`` both decide this way."""
    base = process_status_bytes("RssAnon") or 0
    for candidate in fitting:
        candidate.pack_cost = pack_cost(candidate, facts, workload, probe, base_bytes=base,
                                        max_shard_bytes=max_shard_bytes)
    if work_memory is None:
        return fitting
    work = parse_size(work_memory, "--work-memory")

    def needs(cost: PackCost) -> str:
        return (f"needs about {format_size(cost.peak_bytes)} (golden outputs, applying and writing "
                f"{format_size(cost.apply_bytes)}, measuring {format_size(cost.measure_bytes)})")

    kept = [c for c in fitting if c.pack_cost.peak_bytes <= work]  # type: ignore[union-attr]
    for candidate in fitting:
        if candidate not in kept:
            candidate.rejected_because = f"packing it {needs(candidate.pack_cost)}, more than --work-memory {format_size(work)}"
            if kept:
                progress(f"refused {candidate.spec}: {candidate.rejected_because}")
    if not kept:
        cheapest = min(fitting, key=lambda c: c.pack_cost.peak_bytes)  # type: ignore[union-attr]
        raise NoPlanFits(f"no plan can be packed within --work-memory {format_size(work)}: the cheapest to pack, "
                         f"{cheapest.spec}, {needs(cheapest.pack_cost)}")
    return kept


def pack_cost(candidate: Candidate, facts: ModelFacts, workload: Workload, probe: Probe, *, base_bytes: int,
              max_shard_bytes: int) -> PackCost:
    """Estimate what packing ``candidate`` costs (see :class:`PackCost`); ``base_bytes`` is
    the pack process's own resident memory before it starts."""
    steps = [(c, o) for c, o in candidate.steps if c.kind != "parallel"]
    split = [o for c, o in candidate.steps if c.kind == "parallel"]
    ranks = int(split[0].get("ranks") or max(1, len(probe.devices))) if split else 1
    footprints = step_footprints(facts, steps, probe)  # the source's, then each step's
    weights_after = [f.weights_bytes for f in footprints]
    plan = [PlanStep(c.name, c.version, o) for c, o in steps]
    held = 0  # the first step is given the memory-mapped source: nothing of the pack's own
    apply = 0
    for index, ((compressor, options), footprint) in enumerate(zip(steps, footprints[1:])):
        after = compressor.pack_held_bytes(footprint, options, plan[index + 1:])
        apply = max(apply, held + after + compressor.pack_scratch_bytes(facts, options))
        held = after
    # safetensors serialises a file in memory: one shard with stock saving; a plugin that saves
    # a format of its own for these options (Compressor.writes_own_file) writes one whole file
    own_format = any(c.writes_own_file(o) for c, o in candidate.steps)
    weights = held or weights_after[0]
    apply = max(apply, held + (weights if own_format else min(weights, max_shard_bytes)))
    # the golden outputs run first, on the memory-mapped source, at a batch of their own
    golden = dataclasses.replace(workload, batch_size=golden_batch(workload.batch_size, workload.seq_len))
    apply = max(apply, activation_bytes(facts, golden, footprints[0]) + kv_cache_bytes(facts, golden, footprints[0]))
    measure = ranks * (FRESH_PROCESS_BYTES + candidate.estimate.peak_bytes)
    return PackCost(base_bytes, base_bytes + apply, base_bytes + measure)
