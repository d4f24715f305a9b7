"""Loading a bundle's model onto this machine's device(s).

:func:`load` checks the bundle's integrity first (hashes, schema), then rebuilds the model the
way the manifest says: stock ``transformers`` where the plan allows, or the ``restore`` hook of
the plugin that saved the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from edgepack.errors import UsageError, VerificationError
from edgepack.interfaces import PlanStep


def plan_steps(manifest: dict[str, Any]) -> list[PlanStep]:
    """The manifest's plan as PlanStep objects (options as stored; :func:`load_model_dir`
    checks them with each plugin's ``parse_options`` before use)."""
    return [PlanStep(s["plugin"], s["version"], s.get("options", {})) for s in manifest["plan"]]


def checked_steps(steps: Sequence[PlanStep], registry: Any) -> list[PlanStep]:
    """The plan with every step's options parsed by its plugin, so a hand-edited manifest cannot
    hand ``restore``/``prepare`` values the plugin never accepts; VerificationError names the
    step at fault, or the plugin that is not installed here."""
    checked = []
    for index, step in enumerate(steps):
        where = f"manifest.json:plan[{index}]"
        if step.plugin not in registry.compressors:
            raise VerificationError(
                f"{where}: the bundle needs compression plugin {step.plugin!r} {step.version}, "
                "which is not installed here"
            )
        try:
            options = registry.compressor(step.plugin).parse_options(dict(step.options))
        except UsageError as exc:
            raise VerificationError(f"{where}.options: {exc}") from None
        checked.append(PlanStep(step.plugin, step.version, options))
    return checked


def requirement_problems(manifest: dict[str, Any], registry: Any) -> list[tuple[str, str]]:
    """(manifest key, sentence) for each plugin the bundle needs that is missing here or older
    than the one that packed it; each sentence says what to install."""
    requires = manifest.get("producer", {}).get("requires") or {}
    needed = [(f"manifest.json:plan[{i}]", s["plugin"], "compression plugin", registry.compressors)
              for i, s in enumerate(manifest.get("plan", []))]
    needed.append(("manifest.json:target.name", manifest["target"]["name"], "target", registry.targets))
    problems = []
    for key, name, what, table in needed:
        requirement = requires.get(name)
        install = f": install {requirement}" if requirement else ""
        if name not in table:
            problems.append((key, f"the bundle needs {what} {name!r}, which is not installed here{install}"))
            continue
        installed = table[name].installed_by
        if requirement and installed and _older(installed[1], requirement.partition(">=")[2]):
            problems.append((key, f"the bundle needs {what} {name!r} from {requirement}, but "
                                  f"{installed[0]} {installed[1]} is installed here{install}"))
    return problems


def _older(installed: str, needed: str) -> bool:
    """Whether version ``installed`` is older than ``needed`` (PEP 440; False when unreadable)."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging comes with transformers
        return False
    try:
        return Version(installed) < Version(needed)
    except InvalidVersion:
        return False


def refuse_pickles(model_dir: Path) -> None:
    """VerificationError when ``model_dir`` holds a pickled checkpoint: bundles hold safetensors
    and JSON only, and nothing is ever unpickled."""
    from edgepack.model import pickled_files

    found = pickled_files(model_dir) if model_dir.is_dir() else []
    if found:
        raise VerificationError(
            f"{found[0]} is a pickled checkpoint; bundles hold safetensors and JSON only and edgepack never unpickles"
        )


def load_model_dir(model_dir: Path, *, task: str, steps: Sequence[PlanStep], loader: str | None,
                   target_name: str, registry: Any = None, probe: Any = None, target: Any = None,
                   program: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """Load ``model_dir`` as the plan stored it and place it on the target.

    :param loader: name of the plugin whose ``restore`` rebuilds the model, or None for stock
        ``transformers`` loading; for a compiling target's bundle, the target's name.
    :param program: the manifest's ``model.program`` (a compiling target's bundle): the
        target's runtime runs the program it names, and no model code is loaded.
    :param probe: the target's probe, when the caller has it already.
    :param target: the target built with the bundle's options (default: ``target_name`` without options).
    :returns: (model in eval mode on the target's device, the target's probe)
    """
    from edgepack.host import load_registry
    from edgepack.model import auto_class, code_kwargs

    registry = registry or load_registry()
    target = target or registry.target(target_name)
    probe = probe or target.probe()
    if not probe.present:
        raise UsageError(f"target {target_name!r} is not present on this machine: {probe.detail.get('reason', '')}".rstrip(": "))
    steps = checked_steps(steps, registry)
    refuse_pickles(model_dir)
    if program is not None:
        if not target.program or loader != target.name:
            raise VerificationError(f"the manifest's model.program is for loader {loader!r}, but target "
                                    f"{target.name} does not compile models")
        return target.load_program(model_dir, program, task), probe
    if loader:
        step = next((s for s in steps if s.plugin == loader), None)
        if step is None:
            raise VerificationError(f"manifest names loader {loader!r}, which is not in its plan")
        model = registry.compressor(loader).restore(model_dir, step.options, target.device_type)
    else:
        model = auto_class(task).from_pretrained(model_dir, dtype="auto", local_files_only=True, use_safetensors=True,
                                                 **code_kwargs(model_dir))
    for step in steps:
        model = registry.compressor(step.plugin).prepare(model, step.options, target.device_type, probe)
    model = target.place(model, probe)
    return model.eval(), probe


@dataclass
class Session:
    """A loaded bundle: its manifest, model and tokenizer, ready to run inputs."""

    path: Path
    manifest: dict[str, Any]
    model: Any
    tokenizer: Any
    device: str
    #: the encoder's forward pass compiled (:func:`compiled_forward`), made at the first
    #: ``embed(compiled=True)`` and kept: a new torch.compile wrapper would compile again
    compiled_model: Any = field(default=None, repr=False, compare=False)

    @property
    def task(self) -> str:
        """``feature-extraction`` or ``text-generation``."""
        return self.manifest["model"]["task"]

    def embed(self, texts: list[str], compiled: bool = False) -> Any:
        """Mean-pooled, L2-normalised embeddings of ``texts`` (encoders); with ``compiled``, the
        forward pass runs compiled (:func:`compiled_forward`)."""
        import torch

        from edgepack.smoke import mean_pool

        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        encoded = {k: v.to(self.device) for k, v in encoded.items()
                   if k in ("input_ids", "attention_mask", "token_type_ids")}
        if compiled and getattr(self.compiled_model, "_orig_mod", None) is not self.model:
            self.compiled_model = compiled_forward(self.model)
        model = self.compiled_model if compiled else self.model
        with torch.inference_mode(), _compiling(compiled):
            hidden = model(**encoded).last_hidden_state
        return mean_pool(hidden, encoded["attention_mask"]).cpu()

    def generate(self, texts: list[str], max_new_tokens: int = 32, compiled: bool = False) -> list[str]:
        """Greedy continuations of ``texts`` (decoders); with ``compiled``, the decoding steps run
        compiled (:func:`compiled_decoding`)."""
        import torch

        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        encoded = tok(texts, padding=True, return_tensors="pt")
        encoded = {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
        extra = compiled_decoding(self.model) if compiled else {}
        with torch.inference_mode(), _compiling(compiled):
            out = self.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id, **extra)
        if compiled and max_new_tokens > 1:
            _check_compiled(self.model)
        return tok.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def compile_refusal(manifest: dict[str, Any], name: str) -> str | None:
    """Why ``--compile`` cannot run the bundle ``name``, read from its manifest before anything
    loads (one sentence); None when it can (a transformers model in this process)."""
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if isinstance(manifest.get("parallel"), dict):
        why = "it is split across devices, one process per rank"
    elif model.get("program"):
        why = "its model is a compiled program already"
    else:
        return None
    return f"--compile compiles a transformers model in this process: {name} cannot, {why}"


def compiled_forward(model: Any, what: str = "the bundle's model") -> Any:
    """``model`` with its forward pass compiled by ``torch.compile`` (inductor), sharing its
    weights: an encoder's ``run --compile`` and ``bench --compile``. One graph per input shape
    (``dynamic=False``): the first call of a shape compiles (tens of seconds on a CPU, a C++
    compiler needed there), later calls of that shape reuse it. Float operations are fused and
    reordered, so outputs differ from eager ones in the last bits. Nothing of it is stored in a
    bundle: ``verify`` and the smoke tests run eager. UsageError, naming ``what``, for a model
    that is not a torch module (a compiled program)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--compile compiles a transformers model; {what} is not one (a compiled program already)")
    return torch.compile(model, dynamic=False)


def compiled_decoding(model: Any, what: str = "the bundle's model") -> dict[str, Any]:
    """``generate`` arguments that run a decoder's decoding steps compiled: a static KV cache
    (fixed shapes from step to step) and ``torch.compile`` (inductor) of the model's forward,
    which transformers otherwise does only on accelerators. The prompt's forward pass stays
    eager. The first ``generate`` of a batch and length compiles (tens of seconds on a CPU, a C++
    compiler needed there); later ones reuse it. Float operations are fused and reordered, so
    late greedy tokens can differ from eager decoding's where two logits are nearly tied.
    Nothing of it is stored in a bundle: ``verify`` and the smoke tests run eager.
    UsageError, naming ``what``, for a model that cannot decode so."""
    if not getattr(model, "can_generate", lambda: False)():  # (an ExecuTorch program has no such method)
        raise UsageError(f"--compile compiles a transformers decoder's decoding steps; {what} is not one "
                         "(a compiled program already)")
    import transformers

    config = transformers.CompileConfig()
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return {"cache_implementation": "static", "compile_config": config}


def _check_compiled(model: Any, what: str = "the bundle's model") -> None:
    """UsageError when transformers decoded eager after all: it skips compiling, with a logged
    warning only, for models and caches it cannot compile."""
    if getattr(model, "_compiled_call", None) is None:
        raise UsageError(f"--compile: transformers decoded {what} eager: its conditions for compiling were not met "
                         "(compiling disabled in the generation config, weights offloaded, or a model type it never "
                         "compiles)")


@contextlib.contextmanager
def _compiling(compiled: bool) -> Iterator[None]:
    """Turn a failure of torch.compile itself (no C++ compiler, an operation dynamo or inductor
    cannot take) into one UsageError that says so; other errors pass as they are."""
    if not compiled:
        yield
        return
    from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException, TorchRuntimeError
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, LoweringException

    try:
        yield
    except (TorchDynamoException, CppCompileError, InvalidCxxCompiler, LoweringException) as exc:
        if isinstance(exc, TorchRuntimeError):  # the model's own error, met while tracing: eager meets it too
            raise
        cause: BaseException = exc
        while isinstance(cause, BackendCompilerFailed) and getattr(cause, "inner_exception", None) is not None:
            cause = cause.inner_exception  # the compiler's own error, not dynamo's wrapper ("backend=... raised:")
        text = str(cause).strip()
        first = text.splitlines()[0] if text else ""
        raise UsageError(f"--compile: compiling the model failed ({type(cause).__name__}: {first[:300]}); "
                         "without --compile the model runs eager") from exc


def run_sharded(bundle: str | Path, texts: list[str] | None = None, *, tensors: dict[str, Any] | None = None,
                max_new_tokens: int = 32, job: str = "run", repeats: int = 10, progress: Any = None,
                keys: Sequence[Any] = ()) -> dict[str, Any]:
    """Run a sharded (multi-device) bundle on ``texts``: integrity and signature first (``keys``
    as in :func:`open_bundle`), then every rank
    through torchrun (:mod:`edgepack.launch`), each reading only its own shard. Returns
    ``{"embeddings" | "texts", "rank_peak_bytes", "seconds"?, "device", "world_size"}``;
    ``job="bench"`` times ``repeats`` runs after one warm-up."""
    import tempfile

    import transformers
    from safetensors.torch import load_file, save_file

    from edgepack.bundle.reader import read_verified
    from edgepack.host import load_registry
    from edgepack.launch import launch_ranks
    from edgepack.pipeline import rank_device
    from edgepack.smoke import probe_threads, probe_timeout

    path, manifest = read_verified(bundle, keys)
    parallel = manifest.get("parallel")
    if not isinstance(parallel, dict):
        raise UsageError(f"{path} is not a sharded bundle")
    registry = load_registry()
    problems = requirement_problems(manifest, registry)
    if problems:
        raise VerificationError(f"{problems[0][0]}: {problems[0][1]}")
    target = registry.target(manifest["target"]["name"], options=manifest["target"].get("options") or {})
    probe = target.probe()
    if not probe.present:
        raise UsageError(f"target {target.name!r} is not present on this machine: {probe.detail.get('reason', '')}")
    world = int(parallel["world_size"])
    task = manifest["model"]["task"]
    tok = transformers.AutoTokenizer.from_pretrained(path / "model", local_files_only=True)
    if task == "text-generation":
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    encoded = tensors if tensors is not None else tok(texts, padding=True, truncation=True, return_tensors="pt")
    keep = ("input_ids", "attention_mask") + (() if task == "text-generation" else ("token_type_ids",))
    device = rank_device(target, probe)
    if progress:
        progress(f"launching {world} ranks with torchrun ({device})")
    with tempfile.TemporaryDirectory(prefix="edgepack-run-") as tmp:
        save_file({k: v.contiguous() for k, v in encoded.items() if k in keep}, Path(tmp) / "inputs.safetensors")
        spec = {"bundle_dir": str(path.resolve()), "job": job, "task": task, "target": target.name,
                "target_options": manifest["target"].get("options") or {}, "device": device,
                "inputs": str(Path(tmp) / "inputs.safetensors"), "outputs": str(Path(tmp) / "outputs.safetensors"),
                "new_tokens": max_new_tokens, "repeats": repeats}
        threads = max(1, probe_threads() // world)
        result = launch_ranks(spec, world, timeout=probe_timeout(), threads=threads, workdir=Path(tmp))
        outputs = load_file(spec["outputs"])
    reports = sorted(result.reports, key=lambda r: r["rank"])
    out: dict[str, Any] = {"world_size": world, "device": device,
                           "rank_peak_bytes": [int(r["peak_bytes"]) for r in reports]}
    if "seconds" in reports[0]:
        out["seconds"] = reports[0]["seconds"]
    if "tokens" in outputs:
        out["texts"] = tok.batch_decode(outputs["tokens"], skip_special_tokens=True)
        out["tokens"] = outputs["tokens"]
    else:
        out["embeddings"] = outputs["embeddings"]
    return out


def open_bundle(bundle: str | Path, *, keys: Sequence[Any] = (), allow_code: bool = False) -> Session:
    """Check a bundle's integrity and signature (with trusted ``keys``: signed by one of them;
    see :func:`edgepack.bundle.reader.read_verified`), then load its model and tokenizer on
    this machine. A bundle holding the model's own code (``model.code``) is refused unless
    ``allow_code``, which lets that code run."""
    import transformers

    from edgepack.bundle.reader import read_verified

    from edgepack.host import load_registry

    path, manifest = read_verified(bundle, keys)
    if isinstance(manifest.get("parallel"), dict):
        world = manifest["parallel"]["world_size"]
        raise UsageError(
            f"{path} is split into {world} shards that run as one process per rank: use edgepack run / bench / "
            f"verify (they launch the ranks with torchrun) or launch them yourself: {manifest['parallel']['launch']}"
        )
    code = manifest["model"].get("code") or []
    if code and not allow_code:
        raise UsageError(f"{path} holds the model's own Python code ({', '.join(code)}), which loading it would "
                         "run; pass --allow-code (allow_code=True) once you have read that code")
    if code:
        from edgepack.model import allow_code_of

        allow_code_of(path / "model")
    registry = load_registry()
    problems = requirement_problems(manifest, registry)
    if problems:
        raise VerificationError(f"{problems[0][0]}: {problems[0][1]}")
    target = registry.target(manifest["target"]["name"], options=manifest["target"].get("options") or {})
    model, probe = load_model_dir(
        path / "model",
        task=manifest["model"]["task"],
        steps=plan_steps(manifest),
        loader=manifest["model"].get("loader"),
        target_name=manifest["target"]["name"], registry=registry, target=target,
        program=manifest["model"].get("program"),
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path / "model", local_files_only=True)
    device = target.device_type if manifest["model"].get("program") else str(next(model.parameters()).device)
    return Session(path, manifest, model, tokenizer, device)


def load(bundle: str | Path, *, keys: Sequence[Any] = (), allow_code: bool = False) -> Any:
    """The bundle's model, integrity and signature checked first (``keys``: trusted public
    keys, one of which must have signed it), in eval mode on this machine's device
    (``allow_code``: see :func:`open_bundle`)."""
    return open_bundle(bundle, keys=keys, allow_code=allow_code).model


def benchmark(bundle: str | Path, *, repeats: int = 10, source: str | Path | None = None,
              allow_code: bool = False, compare_source: bool = True, compiled: bool = False,
              progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Speed and memory of the bundle at its declared workload, beside its source model.

    After one unmeasured load and batch (what a process pays once), the bundle is loaded, its
    weights read once and one batch of its smoke inputs run under the target's memory meter
    (``load_s``, ``peak_bytes``: what that added to this process; the batch is also the
    warm-up); then ``repeats`` timed runs over that batch give the latency's
    ``p50_ms`` and ``p95_ms`` and the ``throughput_per_s`` (sequences per second at the
    declared batch size).
    Decoders also get batch-1 prefill latency and decode tokens/s; with ``compiled``, decoding
    runs compiled (:func:`compiled_decoding`), the source's too, and ``compile_s`` says what
    compiling cost each (the batch latencies stay eager; the prefill is eager too, into a
    static cache, so ``prefill_ms`` differs from an eager run's). An encoder's timed batches
    run compiled with ``compiled`` (:func:`compiled_forward`), the source's too, with
    ``compile_s`` for each (its first compiled batch less a later one's time); their
    ``peak_bytes`` stay those of the eager batch under the meter.

    :param source: the source model directory. Without it, the manifest's source path is used
        when it still holds the weights the bundle was packed from (same sha256), unless
        ``compare_source`` is False. It is loaded as stored (stock transformers, safetensors
        only) on the same device and measured the same way, its timed runs interleaved with
        the bundle's so that ``result["source"]`` and the speed-ups compare like with like on a
        noisy machine; ``result["source_skipped"]`` says why a recorded source was not used.
    :param allow_code: run the bundle's (and the source's) own code, as :func:`open_bundle`.
    :param progress: called with one line per phase (warm-up, loads, timed runs, decoding)."""
    import time

    import torch
    from safetensors.torch import load_file

    from edgepack.bundle.reader import read_verified
    from edgepack.environment import trim_heap
    from edgepack.host import load_registry
    from edgepack.probe import touch_weights

    path, manifest = read_verified(bundle)
    refusal = compile_refusal(manifest, path.name) if compiled else None
    if refusal:
        raise UsageError(refusal)
    if isinstance(manifest.get("parallel"), dict):
        if source is not None:
            raise UsageError("bench --source is not supported for sharded bundles yet")
        return _benchmark_sharded(path, manifest, repeats)
    skipped = None
    if source is None and compare_source:
        source, skipped = _recorded_source(manifest)
    target = load_registry().target(manifest["target"]["name"], options=manifest["target"].get("options") or {})
    meter = target.memory_meter()

    def load_and_run(load: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Load under the meter, read every weight once (memory-mapped weights count in full,
        as at pack time) and run one batch, also the warm-up: (what loaded, figures)."""
        meter.start()
        start = time.perf_counter()
        loaded = load()
        load_s = time.perf_counter() - start
        model = loaded.model if isinstance(loaded, Session) else loaded
        touch_weights(model)
        with torch.inference_mode():
            model(**batch_for(loaded))
        return loaded, {"load_s": round(load_s, 3), "peak_bytes": int(meter.peak_bytes())}

    batch: dict[str, Any] = {}

    def batch_for(loaded: Any) -> dict[str, Any]:
        if not batch:  # the smoke inputs' first batch, on the bundle's device
            stored = load_file(path / manifest["smoke"]["inputs"])
            rows = next(iter(stored.values())).shape[0]
            index = torch.arange(int(manifest["workload"]["batch_size"])) % rows  # repeat samples if needed
            batch.update({k: v[index].to(loaded.device) for k, v in stored.items()})
        return batch

    # what the first load of a process pays once (imports, kernel selection, thread pools) is
    # not the bundle's: load it and run a batch once before anything is measured
    progress(f"warming up: loading {path.name} and running one batch, unmeasured")
    load_and_run(lambda: open_bundle(bundle, allow_code=allow_code))
    trim_heap()

    progress("loading the bundle and running one batch under the memory meter")
    session, figures = load_and_run(lambda: open_bundle(bundle, allow_code=allow_code))
    reference = None
    if source is not None:
        progress(f"loading the source {source} and running one batch under the memory meter")
        reference, source_figures = load_and_run(lambda: _load_source(source, session, allow_code))
    workload = session.manifest["workload"]
    batch_size = int(workload["batch_size"])
    decode = session.task == "text-generation"
    models = {"bundle": session.model} | ({"source": reference} if reference is not None else {})
    runners, compile_s = dict(models), {}
    if compiled and not decode:  # an encoder's batches, compiled (a decoder's decoding is, below)
        runners = {name: compiled_forward(model, "the bundle's model" if name == "bundle" else f"--source {source}")
                   for name, model in models.items()}  # (each refused, if it is, before anything compiles)
        progress("compiling each model's forward pass at the batch's shape (tens of seconds per model)")
        with torch.inference_mode(), _compiling(True):
            for name in models:
                first = _timed(lambda: runners[name](**batch), session.device)
                compile_s[name] = round(max(0.0, first - _timed(lambda: runners[name](**batch), session.device)), 2)
    times: dict[str, list[float]] = {name: [] for name in models}
    progress(f"timing {repeats} run{'s' if repeats != 1 else ''}" + (" of each, interleaved" if reference is not None else ""))
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in runners.items():
                times[name].append(_timed(lambda: run(**batch), session.device) * 1000)

    def summary(samples: list[float]) -> dict[str, float]:
        samples = sorted(samples)
        p50 = percentile(samples, 50)
        return {"p50_ms": p50, "p95_ms": percentile(samples, 95), "throughput_per_s": batch_size * 1000 / p50}

    result = {
        "bundle": str(session.path), "device": session.device, "batch_size": batch_size,
        "seq_len": int(workload["seq_len"]), "repeats": repeats, **summary(times["bundle"]), **figures,
    }
    if compile_s:
        result["compile_s"] = compile_s["bundle"]
    if decode:
        progress("timing batch-1 prefill and decoding" + (", compiled (compiling first: tens of seconds per model)"
                                                          if compiled else ""))
    speeds = _decode_speeds(models, {k: v[:1] for k, v in batch.items()}, repeats, session.device,
                            compiled) if decode else {}
    result.update(speeds.get("bundle", {}))
    if reference is not None:
        result["source"] = {"model": str(source), **summary(times["source"]), **source_figures, **speeds.get("source", {}),
                            **({"compile_s": compile_s["source"]} if compile_s else {})}
        result["speedup"] = result["source"]["p50_ms"] / result["p50_ms"]
        result["memory_ratio"] = result["peak_bytes"] / max(1, result["source"]["peak_bytes"])
        if decode:
            result["decode_speedup"] = result["tokens_per_s"] / result["source"]["tokens_per_s"]
    elif skipped:
        result["source_skipped"] = skipped
    return result


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted samples, interpolated between the nearest ranks (the
    definition numpy and statistics.quantiles(method="inclusive") use)."""
    if not sorted_samples:
        raise ValueError("no samples")
    rank = (len(sorted_samples) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(sorted_samples) - 1)
    return sorted_samples[low] + (sorted_samples[high] - sorted_samples[low]) * (rank - low)


def _recorded_source(manifest: dict[str, Any]) -> tuple[Path | None, str | None]:
    """The manifest's source directory when it still holds the weights the bundle was packed
    from: (path, None); else (None, why not)."""
    from edgepack.model import ModelSource

    recorded = (manifest.get("source") or {}).get("model")
    if not recorded or not Path(recorded).is_dir():
        return None, f"the recorded source {recorded} is not here; give --source MODEL to compare"
    try:
        now = ModelSource.open(recorded).weights_sha256()
    except (UsageError, OSError) as exc:
        return None, f"the recorded source {recorded} cannot be read: {exc}"
    if now != manifest["source"].get("sha256"):
        return None, f"the recorded source {recorded} has changed since the bundle was packed; give --source MODEL to compare"
    return Path(recorded), None


def _load_source(source: str | Path, session: Session, allow_code: bool = False) -> Any:
    """The model to compare with for ``bench --source``: another bundle (a directory holding
    a manifest: loaded as :func:`open_bundle` loads it, integrity checked first), or a model
    directory loaded by stock transformers, safetensors only, in its stored dtype, on the
    bundle's device; UsageError for a path that is neither."""
    from edgepack.model import ModelSource, auto_class, code_kwargs

    if (Path(source) / "manifest.json").is_file():
        other = open_bundle(source, allow_code=allow_code)
        if other.task != session.task:
            raise UsageError(f"--source {source} is a {other.task} bundle, but the bundle is {session.task}")
        return other.model

    opened = ModelSource.open(source, allow_code=allow_code)  # refuses pickles, and own code unless allowed
    if opened.facts.task != session.task:
        raise UsageError(f"--source {source} is a {opened.facts.task} model, but the bundle is {session.task}")
    model = auto_class(session.task).from_pretrained(opened.path, dtype="auto", local_files_only=True,
                                                     use_safetensors=True, **code_kwargs(opened.path))
    return model.to(session.device).eval()


def _timed(fn: Callable[[], Any], device: str) -> float:
    """Seconds ``fn`` takes, the device's queue drained."""
    import time

    import torch

    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


#: Tokens generated per timed run when ``bench`` measures decoding.
DECODE_TOKENS = 32


def _decode_speeds(models: dict[str, Any], row: dict[str, Any], repeats: int, device: str,
                   compiled: bool = False) -> dict[str, dict[str, Any]]:
    """Batch-1 greedy decoding from one smoke prompt, per model: decode tokens/s (the time of
    generating DECODE_TOKENS tokens less that of generating one, i.e. without the prefill; fewer
    when a compiled program's KV cache holds fewer after the prompt) and the prefill latency;
    medians of ``max(3, repeats // 2)`` runs after a warm-up, the models' runs interleaved.
    With ``compiled``, every model decodes compiled (:func:`compiled_decoding`), and its warm-up,
    which compiles, is timed (``compile_s``: the first generate less a later one's time)."""
    import statistics

    import torch

    from edgepack.smoke import pad_id

    prompt = int(row["attention_mask"].sum()) if "attention_mask" in row else row["input_ids"].shape[1]
    rooms = [m.cache_len - prompt for m in models.values() if isinstance(getattr(m, "cache_len", None), int)]
    tokens_run = max(2, min([DECODE_TOKENS] + rooms))

    what = {"bundle": "the bundle's model", "source": "the --source model"}
    extra = {name: compiled_decoding(model, what.get(name, name)) if compiled else {} for name, model in models.items()}

    def run(name: str, tokens: int) -> float:
        model = models[name]
        return _timed(lambda: model.generate(**row, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                             pad_token_id=pad_id(model), **extra[name]), device)

    runs = max(3, repeats // 2)
    first: dict[str, list[float]] = {name: [] for name in models}
    full: dict[str, list[float]] = {name: [] for name in models}
    warm: dict[str, float] = {}
    with torch.inference_mode(), _compiling(compiled):
        for name in models:  # warm-up; compiled, at the timed runs' length (the static cache's shape)
            warm[name] = run(name, tokens_run if compiled else 2)
            if compiled:
                _check_compiled(models[name], what.get(name, name))
        for _ in range(runs):
            for name in models:
                first[name].append(run(name, 1))
                full[name].append(run(name, tokens_run))
    out = {}
    for name in models:
        one, whole = statistics.median(first[name]), statistics.median(full[name])
        out[name] = {"prefill_ms": one * 1000, "new_tokens": tokens_run,
                     "tokens_per_s": (tokens_run - 1) / max(whole - one, 1e-9)}
        if compiled:
            out[name]["compile_s"] = round(max(0.0, warm[name] - whole), 2)
    return out


def _benchmark_sharded(path: Path, manifest: dict[str, Any], repeats: int) -> dict[str, Any]:
    """:func:`benchmark` of a sharded bundle: every rank through torchrun, timed on rank 0
    between barriers (encoders: one forward; decoders: generating the smoke run's tokens)."""
    import torch
    from safetensors.torch import load_file

    workload = manifest["workload"]
    batch_size = int(workload["batch_size"])
    inputs = load_file(path / manifest["smoke"]["inputs"])
    rows = next(iter(inputs.values())).shape[0]
    index = torch.arange(batch_size) % rows
    batch = {k: v[index] for k, v in inputs.items()}
    new_tokens = int(manifest["smoke"].get("new_tokens", 8))
    result = run_sharded(path, tensors=batch, job="bench", repeats=repeats, max_new_tokens=new_tokens)
    times = sorted(t * 1000 for t in result["seconds"])
    out = {
        "bundle": str(path), "device": f"{result['world_size']} ranks ({result['device']})",
        "batch_size": batch_size, "seq_len": int(workload["seq_len"]), "repeats": repeats,
        "p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95),
        "throughput_per_s": batch_size * 1000 / percentile(times, 50), "rank_peak_bytes": result["rank_peak_bytes"],
    }
    if manifest["model"]["task"] == "text-generation":
        out["new_tokens"] = new_tokens
        out["tokens_per_s"] = batch_size * new_tokens / (out["p50_ms"] / 1000)
    return out
