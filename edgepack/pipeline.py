"""pack(): load → plan → apply → measure → write (DESIGN section 1)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import edgepack
from edgepack.errors import EdgepackError, NoPlanFits, UsageError, VerificationError
from edgepack.interfaces import ApplyContext, Compressor, PlanStep, Workload, format_option_value
from edgepack.card import step_effects, write_card
from edgepack.memory import format_size, main_memory, parse_size
from edgepack.smoke import BATCHING_PADDED, BATCHING_TRIMMED, LOGITS_FORWARD, LOGITS_GENERATE
from edgepack.planner import (
    DEFAULT_FLOOR, DEFAULT_SHARD_SIZE, Budget, Candidate, build_candidate, choose_parallel_mode, fixed_plan, negotiate,
    packable, search, smallest,
)

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:[-+][0-9A-Za-z.+-]+)?$")

#: How many fitting candidates pack measures before giving up.
MAX_MEASURED = 4

#: shards smaller than this would only multiply files
MIN_SHARD_SIZE = 10**6

# Pack keeps a plan only if its measured peak leaves a margin under the budget for the
# run-to-run variation of the measurement (edgepack.smoke.margin_bytes: max(1 MiB, 5% of the
# peak, twice the spread of repeated measurements); close calls are measured three times), so
# that verify, measuring again on the same machine, passes. Verify checks the budget exactly.


@dataclass
class PackResult:
    """The outcome of :func:`pack`."""

    bundle: Path
    manifest: dict[str, Any]
    archive: Path | None = None
    candidates: list[Candidate] = field(default_factory=list)
    #: The fingerprint of the key that signed the bundle (``--sign``), None when unsigned.
    signed_by: str | None = None
    #: How long each phase took (golden outputs; apply, save and measure of each candidate
    #: measured; write), in order.
    phases: list[dict[str, Any]] = field(default_factory=list)

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
            "signed_by": self.signed_by,
            "content_digest": self.manifest["content"]["digest"],
            "plan": self.manifest["plan"],
            "memory": {k: memory[k] for k in ("budget_bytes", "predicted_peak_bytes", "measured_peak_bytes")},
            "fidelity": {k: self.manifest["fidelity"][k] for k in ("metric", "value", "floor")},
            "size_bytes": self.size_bytes,
            "weights_bytes": sum(f["size"] for f in self.manifest["files"] if f["path"].endswith(".safetensors") and f["path"].startswith("model/")),
            "phases": self.phases,
        }


def _save_model(model: Any, steps: Sequence[tuple[Compressor, dict[str, Any]]], model_dir: Path,
                max_shard_bytes: int = 0) -> str | None:
    """Write the model's weights and config; return the plugin that owns loading, if any.
    Stock saving writes shards of at most ``max_shard_bytes`` (0: DEFAULT_SHARD_SIZE) with a
    ``model.safetensors.index.json`` when there is more than one (Hugging Face's convention):
    saving holds one shard's bytes at a time, and loading streams shard by shard; plugins that
    save a format of their own shard it the same way (``save_safetensors(sharded=True)``). Every
    safetensors file's metadata is put in a fixed order (safetensors writes it in a random
    one), so the same plan gives the same bytes."""
    from edgepack.model import normalize_safetensors, shard_limit

    loader = None
    limit = max_shard_bytes or DEFAULT_SHARD_SIZE
    with shard_limit(limit):  # for save_safetensors(sharded=True)
        for compressor, options in reversed(steps):
            if compressor.save(model, model_dir, options):
                loader = compressor.name
                break
        else:
            model.save_pretrained(model_dir, safe_serialization=True, max_shard_size=limit)
    for path in sorted(model_dir.rglob("*.safetensors")):
        if path.is_file() and not path.is_symlink():  # the bundle writer refuses links later
            normalize_safetensors(path)
    return loader


def _progress_default(message: str) -> None:
    pass


@dataclass
class SourceSession:
    """A model opened once for packing: facts now; tokenizer, smoke inputs, golden outputs and
    calibration inputs on first use, shared by every target packed from it (the weights are
    loaded, memory-mapped, by each use of :attr:`original`)."""

    source: Any
    samples: list[str]
    batch_size: int
    seq_len: int
    cache_len: int | None
    progress: Callable[[str], None] = _progress_default
    #: where a decoder's smoke logits come from (edgepack.smoke.LOGITS_FROM): the first step of
    #: generation, or, rebuilding a bundle packed before smoke.logits_from existed, a forward
    logits_from: str = LOGITS_GENERATE
    #: how smoke runs batch their inputs (edgepack.smoke.BATCHINGS, the manifest's smoke.batching):
    #: trimmed after the first batch, or, rebuilding a bundle packed before the key, all padded
    batching: str = BATCHING_TRIMMED
    #: how long each phase of packing took, in order: {phase, [bundle, target, candidate,] seconds}
    phases: list[dict[str, Any]] = field(default_factory=list)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def facts(self) -> Any:
        """The model's facts (no weights loaded)."""
        return self.source.facts

    @property
    def workload(self) -> Workload:
        """The declared workload; decoders get a KV-cache length covering the smoke generation."""
        if not self.facts.is_decoder:
            return Workload(self.batch_size, self.seq_len)
        from edgepack.smoke import DEFAULT_NEW_TOKENS

        return Workload(self.batch_size, self.seq_len, self.cache_len or self.seq_len + DEFAULT_NEW_TOKENS)

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def original(self) -> Any:
        """The original model in fp32, loaded afresh on each use and held by nobody else.
        Its weights are memory-mapped from the source's safetensors (copy-on-write: changing
        them never touches the file), so a load costs page cache the kernel can drop, not
        memory of the pack's own; each candidate starts from one instead of a copy of the
        whole model."""
        self.progress(f"loading weights of {self.source.path}")
        return self.source.load()

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        return self._get("tokenizer", self.source.tokenizer)

    @property
    def inputs(self) -> dict[str, Any]:
        """Smoke inputs, padded to the declared sequence length."""
        from edgepack.smoke import tokenize

        def make() -> dict[str, Any]:
            inputs = tokenize(self.tokenizer, self.samples, self.seq_len, self.facts.task)
            check_smoke_tokens(self.tokenizer, inputs, self.facts.vocab_size, self.source.path)
            return inputs
        return self._get("inputs", make)

    @property
    def expected(self) -> dict[str, Any]:
        """Golden outputs of the original model on the smoke inputs."""
        from edgepack.smoke import golden_batch, run_outputs

        def make() -> dict[str, Any]:
            inputs, original = self.inputs, self.original
            # trimmed: the very batches the bundle runs; padded: more rows at once, which changes no row's outputs
            rows = self.batch_size if self.batching == BATCHING_TRIMMED else golden_batch(self.batch_size, self.seq_len)
            with self.timed("golden outputs"):
                self.progress(f"computing golden outputs of the original model on {len(self.samples)} smoke inputs")
                return run_outputs(original, inputs, self.facts.task, rows, logits_from=self.logits_from,
                                   batching=self.batching)
        return self._get(f"expected, {self.batching}, {self.logits_from}", make)

    @contextlib.contextmanager
    def timed(self, phase: str, **about: Any) -> Iterator[None]:
        """Record how long ``phase`` took in :attr:`phases` (``pack --json`` reports them)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.phases.append({"phase": phase, **about, "seconds": round(seconds, 3)})
            if seconds >= 1.0:
                self.progress(f"  {phase} took {seconds:.1f} s")

    @property
    def calibration(self) -> list[dict[str, Any]]:
        """Calibration batches (a text set of their own, never the smoke inputs)."""
        return self._get("calibration", lambda: _calibration_batches(self.tokenizer, self.seq_len, self.facts.task))


#: Smoke inputs are refused when more of their tokens than this are the unknown token: the
#: outputs would compare the model on nothing.
MAX_UNKNOWN_FRACTION = 0.5


def check_smoke_tokens(tokenizer: Any, inputs: dict[str, Any], vocab_size: int, where: Path) -> None:
    """UsageError when a smoke input holds a token id past the model's vocabulary, or when most
    of their tokens are the tokenizer's unknown token (a tokenizer that does not belong to the
    model, or samples in a script it cannot read)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    top = int(ids.max()) if ids.numel() else 0
    if top >= vocab_size:
        raise UsageError(
            f"{where}: the smoke inputs hold token {tokenizer.convert_ids_to_tokens(top)!r} (id {top}), past "
            f"config.json's vocab_size {vocab_size}; the tokenizer does not match the model"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return  # byte-level tokenizers have no unknown token
    special = set(getattr(tokenizer, "all_special_ids", [])) - {unk}
    text = mask.clone()
    for token in special:
        text &= ids != token
    total = int(text.sum())
    unknown = int(((ids == unk) & text).sum())
    if total and unknown / total > MAX_UNKNOWN_FRACTION:
        raise UsageError(
            f"{where}: {unknown} of the smoke inputs' {total} tokens are the unknown token "
            f"{tokenizer.unk_token!r}; the tokenizer does not read these samples (is it the model's own?)"
        )


def open_source(model: str | Path, *, samples: str | Path | None = None, batch_size: int = 1, seq_len: int = 128,
                cache_len: int | None = None, progress: Callable[[str], None] = _progress_default,
                allow_code: bool = False) -> SourceSession:
    """Open a model for packing and check the workload against it (UsageError on bad input).

    :param allow_code: run the model directory's own code when its config asks for it (see
        :meth:`edgepack.model.ModelSource.open`); it is then copied into the bundle."""
    from edgepack.environment import release_large_blocks
    from edgepack.model import ModelSource
    from edgepack.smoke import DEFAULT_SAMPLES, read_samples

    release_large_blocks()  # a weight's freed temporaries go back to the OS, not into the heap
    for flag, value in (("--batch", batch_size), ("--seq-len", seq_len), ("--cache-len", cache_len or 1)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    sample_texts = read_samples(samples) if samples is not None else list(DEFAULT_SAMPLES)
    progress(f"reading {model}")
    source = ModelSource.open(model, allow_code=allow_code)
    if source.code:
        progress(f"running the model's own code, as --allow-code allows: {', '.join(sorted(source.code))}")
    ignored = source.ignored_files()
    if ignored:
        progress(f"reading the safetensors weights; ignoring {', '.join(ignored)} (edgepack never unpickles)")
    facts = source.facts
    if facts.max_positions and seq_len > facts.max_positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {facts.max_positions}")
    session = SourceSession(source, sample_texts, batch_size, seq_len, cache_len, progress)
    session.tokenizer  # refuse a missing or foreign tokenizer before any work
    return session


_BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_bundle_name(name: str, what: str = "--name") -> None:
    """UsageError unless ``name`` is one safe path component: letters, digits, ``.``, ``_``,
    ``-``, starting with a letter or digit, at most 100 characters (so ``../x`` or ``a/b``
    cannot place a bundle outside ``--out``)."""
    if not isinstance(name, str) or not _BUNDLE_NAME.match(name) or ".." in name:
        raise UsageError(
            f"{what} {name!r} is not a valid bundle name: use letters, digits, '.', '_' and '-' "
            "(one path component, starting with a letter or digit, at most 100 characters)"
        )


@dataclass(frozen=True)
class PackRequest:
    """What to pack for one target: everything but the model and its workload.

    :param target: target name (``cpu``, ``cuda``, ...).
    :param out: directory the bundle ``<name>-<version>-<target>`` is written into.
    :param budget: bytes per device (``30MB``, ``1.5GiB``, or an int); None: the target's capacity.
    :param apply: a fixed plan, applied in order: ``PLUGIN[:KEY=VALUE,...]`` strings, or
        mappings ``{"plugin": NAME, KEY: VALUE, ...}`` (recipes); empty: the planner chooses.
    :param min_fidelity: floor for the fidelity metric (default per task: DEFAULT_FLOOR).
    :param version: semantic version of the bundle.
    :param devices: how many devices a multi-device target has.
    :param archive: also write a deterministic ``.tar.gz``.
    :param name: bundle name (default: the model directory's name).
    :param force: replace an existing bundle of the same name.
    :param sign: a private key file (``edgepack keygen``): the bundle is signed before it is
        published (``manifest.sig.json``, see :mod:`edgepack.bundle.signing`).
    :param shard_size: the largest weights file of stock saving (``500MB``; default
        :data:`DEFAULT_SHARD_SIZE`); bigger weights are written as shards with an index.
    :param work_memory: the memory packing may use (``3GB``): candidates whose packing is
        estimated to need more (:func:`edgepack.planner.pack_cost`) are refused before any work.
    """

    target: str = "cpu"
    out: str | Path = "dist"
    budget: str | int | None = None
    apply: Sequence[Any] = ()
    min_fidelity: float | None = None
    version: str = "0.1.0"
    devices: int | None = None
    archive: bool = False
    name: str | None = None
    force: bool = False
    sign: str | Path | None = None
    shard_size: str | int | None = None
    work_memory: str | int | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "PackRequest":
        """A request from pack() keyword settings; UsageError names an unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UsageError(f"unknown pack setting {unknown[0]!r}; valid settings: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in settings.items() if v is not None})

    def check(self) -> None:
        """Refuse bad settings before any work: version, floor, name, budget, SOURCE_DATE_EPOCH."""
        created_time()
        if not _SEMVER.match(str(self.version)):
            raise UsageError(f"--version {self.version!r} is not a semantic version such as 0.1.0")
        if self.min_fidelity is not None and not 0.0 <= self.min_fidelity <= 1.0:
            raise UsageError(f"--min-fidelity must be between 0 and 1, got {self.min_fidelity}")
        if self.name is not None:
            check_bundle_name(self.name)
        if self.budget is not None:
            parse_size(self.budget, "--budget")
        if self.work_memory is not None:
            parse_size(self.work_memory, "--work-memory")
        if self.shard_size is not None and self.max_shard_bytes < MIN_SHARD_SIZE:
            raise UsageError(f"--shard-size must be at least {format_size(MIN_SHARD_SIZE)}, got {self.shard_size}")
        if self.sign is not None:  # a bad key is refused before any work, not after packing
            from edgepack.bundle.signing import load_private_key

            load_private_key(self.sign, "--sign")

    @property
    def max_shard_bytes(self) -> int:
        """``shard_size`` in bytes."""
        return DEFAULT_SHARD_SIZE if self.shard_size is None else parse_size(self.shard_size, "--shard-size")

    @property
    def target_name(self) -> str:
        """The target's name without its options (``cuda`` of ``cuda:memory=8GB``)."""
        from edgepack.interfaces import parse_spec

        return parse_spec(self.target, "--target", "target")[0]

    def bundle_name(self, slug: str) -> str:
        """``<name>-<version>-<target>``, checked to be one safe path component."""
        bundle = f"{self.name or slug}-{self.version}-{self.target_name}"
        check_bundle_name(bundle, "bundle name")
        return bundle


def pack(model: str | Path, *, batch_size: int = 1, seq_len: int = 128, cache_len: int | None = None,
         samples: str | Path | None = None, progress: Callable[[str], None] = _progress_default,
         registry: Any = None, allow_code: bool = False, **settings: Any) -> PackResult:
    """Pack a model for one target under a memory budget and write a verified bundle.

    :param model: a local Hugging Face model directory (or a hub id already in the local cache).
    :param batch_size: declared batch size; ``seq_len``: declared sequence length; ``cache_len``:
        decoders' KV-cache length.
    :param samples: file of smoke sample texts (JSON list or one per line).
    :param allow_code: run (and copy into the bundle) the model directory's own code when its
        config asks for it (``--allow-code``); refused otherwise.
    :param settings: the fields of :class:`PackRequest` (target, out, budget, apply, ...).
    :raises UsageError: bad input (exit 2); NoPlanFits: nothing fits (exit 3);
        VerificationError: a fixed plan misses the fidelity floor (exit 1).
    """
    request = PackRequest.from_settings(settings)
    request.check()
    session = open_source(model, samples=samples, batch_size=batch_size, seq_len=seq_len,
                          cache_len=cache_len, progress=progress, allow_code=allow_code)
    return pack_target(session, request, progress=progress, registry=registry)


@dataclass
class TargetOutcome:
    """One target of a multi-target recipe: its bundle, or the error that stopped it."""

    target: str
    result: PackResult | None = None
    error: EdgepackError | None = None


class PackFailed(EdgepackError):
    """Packing one target failed in a way that is neither bad input nor a missed budget: a
    plugin or library raised (exit 1)."""

    exit_code = 1


def pack_many(model: str | Path, targets: Sequence[PackRequest | dict[str, Any]], *, batch_size: int = 1,
              seq_len: int = 128, cache_len: int | None = None, samples: str | Path | None = None,
              progress: Callable[[str], None] = _progress_default, registry: Any = None,
              allow_code: bool = False, **shared: Any) -> list[TargetOutcome]:
    """Pack one model for several targets in one run: the golden outputs and the calibration
    inputs are computed once.

    Each entry of ``targets`` is a :class:`PackRequest`, or a dict of its fields that is laid
    over ``shared`` (an entry's own setting wins over a shared one). Every setting is checked
    before any work; then a target that cannot be packed fails alone, with its reason, whatever
    the error."""
    from edgepack.host import load_registry

    requests = [t if isinstance(t, PackRequest) else PackRequest.from_settings({**shared, **t}) for t in targets]
    for request in requests:
        request.check()
    registry = registry or load_registry()
    session = open_source(model, samples=samples, batch_size=batch_size, seq_len=seq_len,
                          cache_len=cache_len, progress=progress, allow_code=allow_code)
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        bundle = request.bundle_name(session.source.slug)
        if bundle in seen:
            raise UsageError(f"targets[{seen[bundle]}] and targets[{index}] would both write bundle {bundle}; "
                             f"give one of them its own 'name'")
        seen[bundle] = index
    outcomes = []
    for request in requests:
        progress(f"— target {request.target} —")
        try:
            outcomes.append(TargetOutcome(request.target, result=pack_target(session, request, progress=progress,
                                                                             registry=registry)))
        except EdgepackError as exc:
            progress(f"target {request.target} failed: {exc}")
            outcomes.append(TargetOutcome(request.target, error=exc))
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one target's crash must not cost the others their bundles
            error = PackFailed(f"packing for target {request.target} failed: {type(exc).__name__}: {exc}")
            progress(str(error))
            outcomes.append(TargetOutcome(request.target, error=error))
    return outcomes


def step_contexts(steps: Sequence[tuple[Compressor, Mapping[str, Any]]],
                  context: ApplyContext) -> Iterator[tuple[Compressor, Mapping[str, Any], ApplyContext]]:
    """Each ``(compressor, options)`` step of a plan with the context its ``apply`` gets:
    ``context`` with ``later`` set to the plan's steps after it."""
    plan = tuple(PlanStep(c.name, c.version, options) for c, options in steps)
    for position, (compressor, options) in enumerate(steps):
        yield compressor, options, dataclasses.replace(context, later=plan[position + 1:])


def pack_target(session: SourceSession, request: PackRequest, *, progress: Callable[[str], None] = _progress_default,
                registry: Any = None) -> PackResult:
    """Pack an opened model for one target: negotiate, plan, apply, measure, write."""
    from edgepack.host import load_registry

    request.check()
    target, budget, apply, devices = request.target, request.budget, request.apply, request.devices
    min_fidelity, version, name = request.min_fidelity, request.version, request.name
    registry = registry or load_registry()
    tgt = target_with_devices(registry, target, devices)
    target = tgt.name
    probe = tgt.planning_probe()  # this machine's device, or the one the target's options describe
    if devices is not None and probe.present and devices != max(1, len(probe.devices)):
        raise UsageError(f"--devices {devices}: target {target} has {len(probe.devices)} device(s) here")
    user_budget = parse_size(budget, "--budget") if budget is not None else None
    source, facts, workload = session.source, session.facts, session.workload
    floor = DEFAULT_FLOOR[facts.task] if min_fidelity is None else min_fidelity
    if tgt.program and not probe.present:  # a compiling target needs its toolchain here to export
        raise UsageError(f"--target {target}: {probe.detail.get('reason') or 'not available on this machine'}")
    negotiated = negotiate(user_budget, tgt, probe)
    progress(negotiated.describe())

    if apply:
        steps = choose_parallel_mode(fixed_plan(registry, apply, probe, tgt), facts, workload, probe, negotiated)
        candidates = [build_candidate(steps, facts, workload, probe, negotiated, tgt)]
    else:
        candidates = search(registry, facts, workload, probe, negotiated, target=tgt)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        best = smallest(candidates)
        raise NoPlanFits(
            f"no plan fits the budget of {format_size(negotiated.bytes_per_device)} per device: the smallest "
            f"estimated peak is {format_size(best.estimate.peak_bytes)}, reached by {best.spec}"
        )
    fitting = packable(fitting, facts, workload, probe, work_memory=request.work_memory,
                       max_shard_bytes=request.max_shard_bytes, progress=progress)

    bundle_name = request.bundle_name(source.slug)

    from edgepack.bundle.writer import BundleWriter, disk_full
    from edgepack.environment import trim_heap
    from edgepack.smoke import (
        EXPECTED_FILE, INPUTS_FILE, PACK_REPEATS, TOLERANCES_FILE, acceptance_limit, best_possible, close_call, compare,
        concurrent_repeats, margin_bytes, measure_in_fresh_process, tolerances,
    )

    # An absent target (a CUDA bundle built on a CPU box) is measured for fidelity on this
    # machine's CPU; its memory is measured by verify on the target itself.
    probe_target = target if probe.present else "cpu"
    signature: dict[str, Any] = {}  # filled by the signer when --sign is given
    # an existing bundle: refused now; then the source's hashes begin
    with BundleWriter(request.out, bundle_name, overwrite=request.force) as writer, _hashing(source, request):
        staging = writer.staging
        assert staging is not None
        tokenizer, inputs, expected = session.tokenizer, session.inputs, session.expected  # golden outputs: seconds
        calibration = session.calibration
        from safetensors.torch import save_file

        (staging / "smoke").mkdir()
        save_file({k: v.contiguous() for k, v in inputs.items()}, staging / INPUTS_FILE)
        save_file({k: v.contiguous() for k, v in expected.items()}, staging / EXPECTED_FILE)

        chosen: Candidate | None = None
        measured_result = None
        for index, candidate in enumerate(fitting[:MAX_MEASURED]):
            if source.code and sharded_as(candidate.steps) is not None:
                reason = "a sharded plan cannot run the model's own code (--allow-code): its ranks load stock classes"
                if apply:
                    raise UsageError(f"plan {candidate.spec}: {reason}")
                candidate.rejected_because = reason
                continue
            progress(f"applying plan {candidate.spec} (candidate {index + 1} of {min(len(fitting), MAX_MEASURED)})")
            about = {"bundle": bundle_name, "target": target, "candidate": candidate.spec}
            model = session.original  # afresh, memory-mapped: no copy of the whole model
            context = ApplyContext(tgt, probe, facts, calibration, progress)
            model_dir = staging / "model"
            if model_dir.exists():
                shutil.rmtree(model_dir)
            stage = "saving"
            try:
                with session.timed("apply", **about):
                    for compressor, options, step_context in step_contexts(candidate.steps, context):
                        stage = f"plugin {compressor.name!r} ({registry.compressors[compressor.name].distribution})"
                        progress(f"  {compressor.name}: {', '.join(f'{k}={format_option_value(v)}' for k, v in options.items()) or 'defaults'}")
                        model = compressor.apply(model, options, step_context)
                stage = "saving"
                program = None
                with session.timed("save", **about):
                    if tgt.program:  # a compiling target: the bundle holds its program, not weights
                        stage = f"exporting for target {tgt.name!r}"
                        program = tgt.export(model, model_dir, task=facts.task, workload=workload,
                                             example=inputs, progress=progress)
                        loader = tgt.name
                    else:
                        progress("writing model weights")
                        loader = _save_model(model, candidate.steps, model_dir, request.max_shard_bytes)
            except UsageError as exc:
                if apply:  # the user's own plan: their mistake to hear about
                    raise
                candidate.rejected_because = f"could not be applied: {exc}"
                continue
            except (MemoryError, OSError):  # the machine's trouble (disk full), not the plan's
                raise
            except Exception as exc:  # a plugin's bug rejects its candidate, not the whole pack
                if disk_full(exc):  # a library's error for a full disk (safetensors): not the plan's
                    raise
                reason = f"{stage} failed: {type(exc).__name__}: {exc}"
                if apply:
                    raise PackFailed(f"plan {candidate.spec}: {reason}") from exc
                progress(f"  rejected: {reason}")
                candidate.rejected_because = reason
                continue
            finally:
                del model
                trim_heap()  # the model is in reference cycles (its quantizer): free it before measuring
            tokenizer.save_pretrained(model_dir)
            for rel in source.side_files():
                (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source.path / rel, model_dir / rel)
            for name in source.code:  # the model's own code, as read (save_pretrained may copy it too)
                shutil.copyfile(source.path / name, model_dir / name)
            sharding = sharded_as(candidate.steps)
            where = probe_target if sharding is None else (
                f"{sharding[0]} ranks ({rank_device(tgt, probe)}, launched with torchrun)")
            progress(f"loading the packed model in a fresh process and running the smoke inputs on {where}")
            measure = dict(task=facts.task, steps=candidate.plan, loader=loader,
                           target=target if program is not None else probe_target,
                           batch_size=session.batch_size, target_options=dict(tgt.settings),
                           logits_from=session.logits_from, batching=session.batching)
            if program is not None:
                measure["program"] = program
            if source.code:
                measure["allow_code"] = True
            if sharding is not None:
                measure.update(ranks=sharding[0], device=rank_device(tgt, probe))
            try:
                with session.timed("measure", **about):
                    # a candidate whose first outputs prove it below the floor stops there
                    measured_result = measure_in_fresh_process(
                        staging, **measure, floor=floor if sharding is None and floor > 0 else None)
                    if probe.present and measured_result.stopped_after is None \
                            and close_call(negotiated.bytes_per_device, measured_result):
                        progress(f"  measured peak {format_size(measured_result.peak_bytes)} is close to the budget: "
                                 f"measuring {PACK_REPEATS - 1} more times")
                        measured_result = measured_result.with_more(measure_in_fresh_process(
                            staging, repeats=PACK_REPEATS - 1, peak_only=True, **measure,
                            at_once=concurrent_repeats(measured_result, PACK_REPEATS - 1, tgt.device_type)))
            except VerificationError as exc:
                candidate.rejected_because = str(exc)
                continue
            peak = measured_result.peak_bytes if probe.present else None
            done = measured_result.stopped_after
            fidelity = compare({k: v[:done] for k, v in expected.items()}, measured_result.outputs, facts.task)
            if done is not None:  # proven below the floor on the first inputs: the rest were not run
                total = next(iter(expected.values())).shape[0]
                at_most = best_possible(fidelity.value, done, total)
                candidate.measured = {"peak_bytes": peak, "fidelity_at_most": round(at_most, 6), "inputs_run": done}
                progress(f"  measured peak {format_size(peak)} (predicted {format_size(candidate.estimate.peak_bytes)}), "
                         f"{fidelity.metric} {fidelity.value:.5f} on the first {done} of {total} smoke inputs: "
                         f"at most {at_most:.5f} on all, below the floor {floor}")
                candidate.rejected_because = (f"{fidelity.metric} at most {at_most:.5f} (the first {done} of {total} "
                                              f"smoke inputs scored {fidelity.value:.5f}), below the floor {floor}")
                continue
            candidate.measured = {"peak_bytes": peak, "fidelity": round(fidelity.value, 6),
                                  "worst": round(fidelity.worst, 6)}
            if probe.present and len(measured_result.peaks) > 1:
                candidate.measured["peaks"] = list(measured_result.peaks)
            if probe.present and measured_result.rank_peaks is not None:
                candidate.measured["rank_peaks"] = list(measured_result.rank_peaks)
            per_rank = "" if measured_result.rank_peaks is None or not probe.present else (
                " per rank " + ", ".join(format_size(p) for p in measured_result.rank_peaks) + "; worst")
            progress(
                f"  measured peak{per_rank} {format_size(peak)} (predicted {format_size(candidate.estimate.peak_bytes)}), "
                f"{fidelity.metric} {fidelity.value:.5f}"
            )
            if peak is not None and peak > acceptance_limit(negotiated.bytes_per_device, measured_result):
                candidate.rejected_because = (
                    f"measured peak {format_size(peak)} exceeds the budget {format_size(negotiated.bytes_per_device)} "
                    f"less a margin of {format_size(margin_bytes(measured_result))} for run-to-run variation"
                )
                continue
            if fidelity.value < floor:
                candidate.rejected_because = f"{fidelity.metric} {fidelity.value:.5f} is below the floor {floor}"
                continue
            chosen, chosen_fidelity, chosen_loader, chosen_program = candidate, fidelity, loader, program
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
                f"the smallest footprint is {format_size(max(best.estimate.peak_bytes, (best.measured or {}).get('peak_bytes') or 0))}, "
                f"reached by {best.spec} ({reasons})"
            )

        import json

        (staging / TOLERANCES_FILE).write_text(json.dumps(tolerances(chosen_fidelity, floor), indent=2, sort_keys=True) + "\n")
        scope = measured_result.scope if probe.present else (
            f"not measured: target {target} is not present on the packing machine; verify on the target measures it"
        )
        measured_peak: Any = chosen.measured["peak_bytes"]
        if measured_peak is not None and chosen.measured.get("rank_peaks"):
            measured_peak = list(chosen.measured["rank_peaks"])  # one entry per rank (DESIGN section 5)
        # what each step's apply decided beyond its options (a mixed allocation ...)
        details = [compressor.details(staging / "model", options) for compressor, options in chosen.steps]
        manifest = _manifest(
            registry=registry, bundle_name=name or source.slug, version=version, source=source, target=tgt, probe=probe,
            workload=workload, budget=negotiated, candidates=candidates, chosen=chosen,
            measured_peak=measured_peak, scope=scope, fidelity=chosen_fidelity, floor=floor,
            loader=chosen_loader, samples=len(session.samples), details=details,
            max_shard_bytes=request.max_shard_bytes, program=chosen_program, logits_from=session.logits_from,
            batching=session.batching,
        )
        sharding = sharded_as(chosen.steps)
        if sharding is not None:
            manifest["parallel"] = parallel_section(sharding, manifest["bundle"], tgt.name, rank_device(tgt, probe))
        write_card(staging, manifest, step_effects(chosen.steps, facts, probe), warn=progress)
        progress("writing manifest")
        with session.timed("write", bundle=bundle_name, target=target):
            final = writer.commit(manifest, finish=_signer(request.sign, signature, progress))

    result = PackResult(final, writer.manifest, candidates=candidates, signed_by=signature.get("key"),
                        phases=[p for p in session.phases if p.get("bundle", bundle_name) == bundle_name])
    if request.archive:
        from edgepack.bundle.archive import create_archive

        progress("writing archive")
        try:
            result.archive = create_archive(final)
        except OSError as exc:
            raise UsageError(f"bundle {final} was written, but its archive {final.name}.tar.gz could not be: "
                             f"{exc.strerror or exc}") from None
    return result


@contextlib.contextmanager
def _hashing(source: Any, request: PackRequest) -> Iterator[None]:
    """Hash the source's weights for the manifest in the background while the pack computes
    (:meth:`ModelSource.hash_in_background`), stopped if the pack fails. Not under
    ``--work-memory``, nor when the weights do not fit twice in available memory: reading them
    again could push out pages the golden outputs or the measuring still need."""
    if request.work_memory is None and 2 * sum(p.stat().st_size for p in source.weight_files) <= main_memory()[1]:
        source.hash_in_background()
    try:
        yield
    except BaseException:
        source.stop_hashing()
        raise


def _signer(key_file: str | Path | None, signature: dict[str, Any],
            progress: Callable[[str], None]) -> Callable[[Path], None] | None:
    """For ``--sign KEY``: the writer's ``finish`` step, which signs the staged manifest before
    the bundle is published (its content goes into ``signature``); None without a key."""
    if key_file is None:
        return None
    from edgepack.bundle.signing import load_private_key, write_signature

    key = load_private_key(key_file, "--sign")

    def sign_staged(staging: Path) -> None:
        progress("signing the manifest")
        signature.update(write_signature(staging, key))

    return sign_staged


def target_with_devices(registry: Any, spec: str, devices: int | None) -> Any:
    """The target ``spec`` names, with ``--devices N`` as its ``devices=N`` option when it has
    one (``--devices 4`` is the short form of ``--target multi-gpu:devices=4``)."""
    from edgepack.interfaces import parse_spec

    name, raw = parse_spec(spec, "--target", "target")
    if devices is not None and name in registry.targets:
        if any(o.name == "devices" for o in registry.targets[name].cls.options):
            if "devices" in raw and str(raw["devices"]).strip() != str(devices):
                raise UsageError(f"--devices {devices} contradicts --target {spec}")
            return registry.target(spec, options={"devices": devices})
    return registry.target(spec)


def sharded_as(steps: Sequence[tuple[Compressor, dict[str, Any]]]) -> tuple[int, str] | None:
    """(ranks, mode) when the plan splits the model into shards (a ``parallel``-kind step with
    two or more ranks), else None."""
    for compressor, options in steps:
        if compressor.kind == "parallel" and int(options.get("ranks") or 1) > 1:
            return int(options["ranks"]), str(options.get("mode") or "tensor")
    return None


def rank_device(target: Any, probe: Any) -> str:
    """The device each rank of a sharded bundle computes on here: ``cuda`` or ``cpu`` (gloo)."""
    pick = getattr(target, "rank_device", None)
    return pick(probe) if callable(pick) else target.device_type


def parallel_section(sharding: tuple[int, str], bundle: dict[str, Any], target: str, device: str) -> dict[str, Any]:
    """The manifest's ``parallel`` object: world size, mode, one shard directory per rank, and
    how to launch the ranks."""
    from edgepack.launch import launch_command

    ranks, mode = sharding
    return {
        "world_size": ranks,
        "mode": mode,
        "shards": [f"model/rank-{r}" for r in range(ranks)],
        "backend": "nccl" if device == "cuda" else "gloo",
        "launch": launch_command(ranks),
        "verify": f"edgepack verify {bundle['name']}-{bundle['version']}-{target}",
    }


def created_time() -> str:
    """The bundle's ``created`` time: ``SOURCE_DATE_EPOCH`` (seconds since 1970, UTC) when set, as
    reproducible builds do, else now; ISO 8601 in UTC, whole seconds. UsageError when the
    variable is not a whole number of seconds."""
    import os

    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or not raw.strip():
        moment = _dt.datetime.now(_dt.timezone.utc)
    else:
        try:
            moment = _dt.datetime.fromtimestamp(int(raw.strip()), _dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds since 1970") from None
    return moment.replace(microsecond=0).isoformat()


def _calibration_batches(tokenizer: Any, seq_len: int, task: str) -> list[dict[str, Any]]:
    """Calibration inputs for compressors that score importance: a text set of its own, so
    the smoke inputs stay unseen by the compression they judge."""
    from edgepack.smoke import CALIBRATION_SAMPLES, batches, tokenize

    inputs = tokenize(tokenizer, list(CALIBRATION_SAMPLES), seq_len, task)
    return list(batches(inputs, 8))


def _manifest(*, registry: Any, bundle_name: str, version: str, source: Any, target: Any, probe: Any, workload: Workload,
              budget: Budget, candidates: list[Candidate], chosen: Candidate, measured_peak: int | list[int] | None, scope: str,
              fidelity: Any, floor: float, loader: str | None, samples: int,
              details: Sequence[dict[str, Any] | None] = (), max_shard_bytes: int = DEFAULT_SHARD_SIZE,
              program: dict[str, Any] | None = None, logits_from: str = LOGITS_GENERATE,
              batching: str = BATCHING_TRIMMED) -> dict[str, Any]:
    import torch
    import transformers

    from edgepack.bundle.manifest import FORMAT, FORMAT_VERSION
    from edgepack.smoke import DEFAULT_NEW_TOKENS, EXPECTED_FILE, INPUTS_FILE, TOLERANCES_FILE

    plugins = {c.name: c.version for c, _ in chosen.steps}
    plugins[target.name] = target.version
    entries = [registry.compressors.get(c.name) for c, _ in chosen.steps] + [registry.targets.get(target.name)]
    # what to install to load this bundle: verify names it when a plugin is missing or older
    requires = {e.cls.name: e.requirement() for e in entries if e is not None and e.requirement()}
    required = sorted({cap for c, _ in chosen.steps for cap in c.requires})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle": {
            "name": bundle_name,
            "version": version,
            "created": created_time(),
        },
        "producer": {
            "edgepack": edgepack.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "plugins": plugins,
            "requires": requires,
        },
        "source": {"model": str(source.path), "sha256": source.weights_sha256(),
                   **({"code": dict(source.code)} if source.code else {})},
        "model": {
            "task": source.facts.task,
            "model_type": source.facts.model_type,
            "architecture": source.facts.architecture,
            "num_parameters": source.facts.num_parameters,
            "loader": loader,
            "stock_transformers": loader is None and not source.code,
            "max_shard_bytes": max_shard_bytes,  # what rebuild needs to write the same files
            # a compiling target's program (model/model.pte ...): what runs it and its methods
            **({"program": program} if program is not None else {}),
            # the model's own Python files (--allow-code): loading runs them
            **({"code": [f"model/{name}" for name in sorted(source.code)]} if source.code else {}),
        },
        "target": {
            "name": target.name,
            "devices": max(1, len(probe.devices)),
            "capabilities": required,
            "options": dict(target.settings),
            "probed": probe.to_json(),
        },
        "workload": workload.to_json(),
        "budget": budget.to_json(),
        "plan": [dict(s.to_json(), **({"details": d} if d else {}))
                 for s, d in zip(chosen.plan, list(details) + [None] * len(chosen.plan))],
        "candidates": [c.to_json() for c in candidates],
        "memory": {
            "budget_bytes": budget.bytes_per_device,
            "predicted_peak_bytes": chosen.estimate.peak_bytes,
            "predicted": chosen.estimate.to_json(),
            "measured_peak_bytes": measured_peak,
            "scope": scope,
        },
        "fidelity": {**fidelity.to_json(), "floor": floor},
        "smoke": {
            "inputs": INPUTS_FILE,
            "expected": EXPECTED_FILE,
            "tolerances": TOLERANCES_FILE,
            "new_tokens": DEFAULT_NEW_TOKENS,
            "count": samples,
            # absent: a forward's logits, as in bundles packed before the key existed
            **({"logits_from": logits_from} if logits_from != LOGITS_FORWARD else {}),
            # absent: every smoke batch padded to the declared length, as in bundles packed before the key
            **({"batching": batching} if batching != BATCHING_PADDED else {}),
        },
    }


# ---------------------------------------------------------------------------------------------
# Rebuild: pack the recorded plan again and compare the content


@dataclass
class RebuildResult:
    """The outcome of :func:`rebuild`: the bundle's content digest beside the rebuild's, and
    where their content differs (empty when the digests are equal)."""

    bundle: str
    recorded: str
    rebuilt: str
    differences: list[tuple[str, str]]
    #: Files the comparison covered (those of ``model/`` and ``smoke/``).
    compared_files: int
    #: Where the rebuilt bundle was kept (``out``), None when it was removed.
    kept: Path | None = None

    @property
    def identical(self) -> bool:
        """Whether the rebuild has the bundle's content digest."""
        return self.recorded == self.rebuilt

    def to_json(self) -> dict[str, Any]:
        """``rebuild --json`` output."""
        return {"bundle": self.bundle, "identical": self.identical, "recorded_digest": self.recorded,
                "rebuilt_digest": self.rebuilt, "compared_files": self.compared_files,
                "differences": [{"key": key, "detail": detail} for key, detail in self.differences],
                "kept": str(self.kept) if self.kept else None}


def rebuild_request(manifest: dict[str, Any], out: str | Path) -> PackRequest:
    """The pack request that re-runs a bundle's recorded plan: its target with the recorded
    options, its plan as a fixed plan, its name, version and fidelity floor, and its budget
    when the user chose it (a budget negotiated from the packing machine's memory is
    negotiated afresh here; it does not shape the content of a fixed plan)."""
    target = manifest["target"]
    options = target.get("options") or {}
    spec = target["name"] + (":" + ",".join(f"{k}={format_option_value(v)}" for k, v in sorted(options.items()))
                             if options else "")
    budget = manifest["budget"]
    return PackRequest(
        target=spec, out=out, apply=[{"plugin": step["plugin"], **step["options"]} for step in manifest["plan"]],
        budget=budget["bytes_per_device"] if budget.get("source") == "user" else None,
        min_fidelity=manifest["fidelity"]["floor"], version=manifest["bundle"]["version"],
        name=manifest["bundle"]["name"], devices=target["devices"] if target["devices"] > 1 else None,
        shard_size=manifest["model"].get("max_shard_bytes"),
    )


def rebuild(bundle: str | Path, model: str | Path, *, samples: str | Path | None = None,
            out: str | Path | None = None, progress: Callable[[str], None] = _progress_default,
            registry: Any = None, allow_code: bool = False) -> RebuildResult:
    """Pack ``model`` again with the plan, target, workload, name and version that ``bundle``
    records, and compare the rebuild's content with the bundle's, field by field and file by
    file (see :func:`edgepack.bundle.manifest.content_differences`).

    Reproducible packing gives the same content digest for the same source, options and
    edgepack and plugin versions; a difference names what changed. The rebuild is written to
    a temporary directory and removed, or kept in ``out``.

    :param samples: the smoke samples file the bundle was packed with, if it was (its smoke
        inputs differ otherwise).
    :raises VerificationError: the bundle fails its integrity check, or ``model`` is not the
        source it was packed from (exit 1); UsageError: bad input (exit 2).
    """
    import tempfile

    from edgepack.bundle.manifest import content_differences, content_view, recorded_digest
    from edgepack.bundle.reader import read_verified
    from edgepack.runtime import plan_steps

    root, manifest = read_verified(bundle)
    recorded = recorded_digest(manifest)
    workload = manifest["workload"]
    session = open_source(model, samples=samples, batch_size=workload["batch_size"], seq_len=workload["seq_len"],
                          cache_len=workload.get("cache_len"), progress=progress, allow_code=allow_code)
    session.logits_from = manifest["smoke"].get("logits_from", LOGITS_FORWARD)
    session.batching = manifest["smoke"].get("batching", BATCHING_PADDED)
    actual = session.source.weights_sha256()
    if actual != manifest["source"]["sha256"]:
        raise VerificationError(
            f"{model} is not the source bundle {root.name} was packed from: its weight files' sha256 "
            f"({_digests(actual)}) differ from the recorded source.sha256 ({_digests(manifest['source']['sha256'])})")
    workdir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="edgepack-rebuild-"))
    try:
        request = rebuild_request(manifest, workdir)
        progress(f"rebuilding {root.name}: plan {', '.join(s.spec() for s in plan_steps(manifest)) or 'none'} "
                 f"for {request.target}")
        result = pack_target(session, request, progress=progress, registry=registry)
        rebuilt = result.manifest
        differences = content_differences(manifest, rebuilt)
        compared = len(content_view(rebuilt)["files"])
        return RebuildResult(str(bundle), recorded, rebuilt["content"]["digest"], differences, compared,
                             kept=result.bundle if out is not None else None)
    finally:
        if out is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _digests(sha: dict[str, str]) -> str:
    return ", ".join(f"{name} {digest[:12]}..." for name, digest in sorted(sha.items())) or "no weight files"
