"""The child side of the peak-memory probe (see :func:`edgepack.smoke.measure_in_fresh_process`).

The parent starts a fresh, isolated interpreter (``python -I`` in an empty working directory,
so nothing next to the bundle or the caller can shadow a library) that imports this module
and calls :func:`main` with the path of a JSON spec. The child warms the runtime up, loads and
runs the bundle once more under the target's memory meter, writes the smoke outputs where the
spec says (a spec without an ``outputs`` path wants the peak alone) and prints one JSON line:
``{"peak_bytes", "scope", "seconds", "threads"}`` and, on Linux, ``host_peak_bytes`` (the
process's own resident high-water mark in main memory, whatever the target), with
``stopped_after`` (the inputs run) when the spec's ``floor`` ended the run early
(:class:`edgepack.smoke.FloorWatch`).

Kept apart from :mod:`edgepack.smoke` because it imports :mod:`edgepack.runtime`, which
imports :mod:`edgepack.smoke` (no import cycle).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def warm_up(config: Any, task: str, inputs: dict[str, Any], batch_size: int, device: str) -> None:
    """Pay the runtime's one-time costs before the baseline: import the model's code and run a
    one-layer, small-vocabulary copy of the architecture in the bundle's dtype at the declared
    batch and sequence length (thread pools, kernel selection, lazy imports). What is measured
    after it is what the bundle itself adds to a running runtime."""
    import copy

    import torch

    from edgepack.model import auto_class, code_kwargs
    from edgepack.smoke import run_outputs

    tiny = copy.deepcopy(config)
    for attribute in ("num_hidden_layers", "n_layer"):
        if hasattr(tiny, attribute):
            setattr(tiny, attribute, 1)
    if hasattr(tiny, "quantization_config"):
        del tiny.quantization_config
    vocab = 128
    tiny.vocab_size = vocab
    for attribute in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tiny, attribute, None) is not None and getattr(tiny, attribute) >= vocab:
            setattr(tiny, attribute, 0)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), torch.float32)
    model = auto_class(task).from_config(tiny, **code_kwargs(tiny)).to(device=device, dtype=dtype).eval()
    batch = {k: v[:batch_size] for k, v in inputs.items()}
    batch["input_ids"] = batch["input_ids"] % vocab
    run_outputs(model, batch, task, batch_size, new_tokens=2, device=device)
    del model


def touch_weights(model: Any) -> None:
    """Read every weight once, so that memory-mapped weights are resident as they would be
    once every embedding row has been used (a smoke run alone touches only a few rows).
    A compiled program (no torch parameters) is left to its runtime, which reads its constants
    when it loads."""
    import torch

    if not hasattr(model, "parameters"):
        return

    def plain(tensor: Any) -> list[Any]:
        if hasattr(tensor, "__tensor_flatten__"):  # torchao tensor subclasses: their inner data
            names, _ = tensor.__tensor_flatten__()
            return [t for name in names for t in plain(getattr(tensor, name))]
        return [tensor]

    with torch.inference_mode():
        for tensor in list(model.parameters()) + list(model.buffers()):
            for data in plain(tensor):
                if data.numel() and data.device.type != "meta":
                    data.detach().reshape(-1)[:: max(1, 4096 // max(1, data.element_size()))].sum()


def fix_threads(threads: int) -> int:
    """Run torch's intra-op work on exactly ``threads`` threads (and one inter-op thread), so
    thread pools and per-thread scratch memory are the same on every run; returns the count."""
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work; then it is already fixed
        pass
    return torch.get_num_threads()


def smoke_plan(spec: dict[str, Any], inputs: dict[str, Any], batch_size: int) -> tuple[str, bool, dict[str, Any]]:
    """(batching, whether the peak is read after the first batch, the inputs to run) for a
    measuring spec: under :data:`edgepack.smoke.BATCHING_TRIMMED` the peak is the first batch's
    and the others run after it; a spec without an ``outputs`` path wants the peak alone, and
    then that batch is all there is to run."""
    from edgepack.smoke import BATCHING_PADDED, BATCHING_TRIMMED

    batching = spec.get("batching", BATCHING_PADDED)
    trimmed = batching == BATCHING_TRIMMED
    if trimmed and not spec.get("outputs"):
        inputs = {k: v[:batch_size] for k, v in inputs.items()}
    return batching, trimmed, inputs


def main(spec_path: str) -> None:
    """Measure the bundle the spec names; prints one JSON line on standard output."""
    import time

    from edgepack.environment import quiet_libraries, trim_heap
    from edgepack.memory import process_status_bytes

    quiet_libraries()

    import torch  # noqa: F401  (imported before the baseline: a fixed cost of every runtime)
    import transformers
    from safetensors.torch import load_file, save_file

    from edgepack.host import load_registry
    from edgepack.interfaces import PlanStep
    from edgepack.model import allow_code_of, code_kwargs
    from edgepack.runtime import load_model_dir
    from edgepack.smoke import EXPECTED_FILE, INPUTS_FILE, LOGITS_GENERATE, TRIMMED_SCOPE, FloorWatch, run_outputs

    spec = json.loads(Path(spec_path).read_text())
    threads = fix_threads(spec.get("threads") or 1)
    bundle_dir = Path(spec["bundle_dir"])
    registry = load_registry()
    target = registry.target(spec["target"], options=spec.get("target_options") or {})
    steps = [PlanStep(s["plugin"], s["version"], s["options"]) for s in spec["steps"]]
    inputs = load_file(bundle_dir / INPUTS_FILE)
    if spec.get("allow_code"):  # the bundle's own code, which the user allowed (--allow-code)
        allow_code_of(bundle_dir / "model")
    program = spec.get("program")  # a compiling target's program: its runtime runs it, no model code
    probe = target.probe()  # describing the machine is not part of loading the bundle
    if program is None:
        config = transformers.AutoConfig.from_pretrained(bundle_dir / "model", local_files_only=True,
                                                         **code_kwargs(bundle_dir / "model"))
        warm_up(config, spec["task"], inputs, spec["batch_size"], target.device_type)
    # A first load and one batch pay what the plan's kernels cost the process once (kernel
    # selection, lazy imports of the plugins' libraries); then everything is freed.
    load = dict(task=spec["task"], steps=steps, loader=spec["loader"], target_name=spec["target"],
                registry=registry, probe=probe, target=target, program=program)
    first, _ = load_model_dir(bundle_dir / "model", **load)
    run_outputs(first, {k: v[: spec["batch_size"]] for k, v in inputs.items()}, spec["task"],
                spec["batch_size"], 2, device=target.device_type)
    del first
    trim_heap()
    batching, trimmed, inputs = smoke_plan(spec, inputs, spec["batch_size"])
    watch = None  # pack's candidates: stop once the outputs prove the fidelity below the floor
    if spec.get("floor") is not None and spec.get("outputs"):
        watch = FloorWatch(load_file(bundle_dir / EXPECTED_FILE), spec["task"], spec["floor"])
    meter = target.memory_meter()
    peaks: list[int] = []
    started = time.perf_counter()
    meter.start()
    model, _ = load_model_dir(bundle_dir / "model", **load)
    touch_weights(model)
    outputs = run_outputs(model, inputs, spec["task"], spec["batch_size"], spec["new_tokens"],
                          device=target.device_type, logits_from=spec.get("logits_from", LOGITS_GENERATE),
                          batching=batching, after_first=(lambda: peaks.append(meter.peak_bytes())) if trimmed else None,
                          stop=watch)
    peak = peaks[0] if peaks else meter.peak_bytes()
    seconds = time.perf_counter() - started
    if spec.get("outputs"):
        save_file({k: v.contiguous() for k, v in outputs.items()}, spec["outputs"])
    scope = f"{meter.scope}{TRIMMED_SCOPE if trimmed else ''}; {threads} intra-op thread{'s' if threads != 1 else ''}"
    report = {"peak_bytes": peak, "scope": scope, "seconds": round(seconds, 3), "threads": threads}
    host_peak = process_status_bytes("VmHWM")  # the whole process's (from the meter's start where it reset it)
    if host_peak is not None:
        report["host_peak_bytes"] = host_peak
    if watch is not None and watch.done < watch.total:
        report["stopped_after"] = watch.done
    print(json.dumps(report))


def rank_main(spec_path: str) -> None:
    """One rank of a sharded bundle, started by :func:`edgepack.launch.launch_ranks` through
    torchrun: join the process group, warm up, load this rank's shard under the target's meter
    (each rank measures its own process or GPU), run the smoke inputs with the other ranks, and
    write ``rank-{r}.json`` (rank 0 also writes the outputs). Stages go to ``rank-{r}.stage.json``
    as they are reached, so a rank that hangs can be named with where it stopped."""
    import os
    import time

    from edgepack.environment import quiet_libraries, trim_heap

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    reports = Path(spec["reports"])

    def stage(name: str) -> None:
        data = json.dumps({"rank": rank, "pid": os.getpid(), "stage": name})
        tmp = reports / f"rank-{rank}.stage.json.tmp"
        tmp.write_text(data)
        tmp.replace(reports / f"rank-{rank}.stage.json")

    stage("starting")
    quiet_libraries()
    import torch
    import torch.distributed as dist
    import transformers
    from safetensors.torch import load_file, save_file

    from edgepack.host import load_registry
    from edgepack.launch import FAULT_ENV
    from edgepack.plugins.parallel import init_distributed, load_rank, smoke_outputs
    from edgepack.smoke import INPUTS_FILE, LOGITS_GENERATE, TRIMMED_SCOPE, batches

    threads = fix_threads(spec.get("threads") or 1)
    bundle_dir = Path(spec["bundle_dir"])
    model_dir = bundle_dir / "model"
    task, batch_size = spec["task"], int(spec.get("batch_size", 1))
    stage("joining the process group")
    rank, world, device = init_distributed(spec["device"], timeout=spec.get("timeout"))
    stage("reading the bundle")
    fault = os.environ.get(FAULT_ENV, "")
    if fault.partition(":")[0] == str(rank):
        if fault.endswith(":die"):
            os.kill(os.getpid(), 9)
        if fault.endswith(":hang"):
            stage("hanging (fault injected)")
            time.sleep(10**6)
    registry = load_registry()
    target = registry.target(spec["target"], options=spec.get("target_options") or {})
    if spec.get("job", "measure") != "measure":
        _rank_job(spec, model_dir, rank, world, device, target, stage)
        return
    inputs = load_file(bundle_dir / INPUTS_FILE)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    stage("warming up")
    warm_up(config, task, inputs, batch_size, device)
    first_batch = next(batches(inputs, batch_size))
    first = load_rank(model_dir, rank, world, device)
    smoke_outputs(first, first_batch, task, batch_size, 2)
    del first
    trim_heap()
    dist.barrier()
    meter = target.memory_meter()
    started = time.perf_counter()
    meter.start()
    stage("loading its shard")
    model = load_rank(model_dir, rank, world, device)
    touch_weights(model.module)
    stage("running the smoke inputs")
    batching, trimmed, inputs = smoke_plan(spec, inputs, batch_size)
    peaks: list[int] = []
    outputs = smoke_outputs(model, inputs, task, batch_size, int(spec["new_tokens"]),
                            spec.get("logits_from", LOGITS_GENERATE), batching=batching,
                            after_first=(lambda: peaks.append(meter.peak_bytes())) if trimmed else None)
    peak = peaks[0] if peaks else meter.peak_bytes()
    seconds = time.perf_counter() - started
    if rank == 0 and spec.get("outputs"):
        save_file({k: v.contiguous() for k, v in outputs.items()}, spec["outputs"])
    scope = f"{meter.scope}{TRIMMED_SCOPE if trimmed else ''}; each of {world} ranks measured in its own process; {threads} intra-op thread{'s' if threads != 1 else ''} per rank"
    report = {"rank": rank, "peak_bytes": peak, "scope": scope, "seconds": round(seconds, 3), "threads": threads,
              "device": str(device), "world_size": world, "torch": torch.__version__}
    (reports / f"rank-{rank}.json").write_text(json.dumps(report))
    stage("done")
    dist.barrier()
    dist.destroy_process_group()


def _rank_job(spec: dict[str, Any], model_dir: Path, rank: int, world: int, device: str, target: Any,
              stage: Any) -> None:
    """``run`` (outputs of the given inputs) or ``bench`` (timed runs) on every rank; rank 0
    writes the outputs, every rank its report with its peak memory."""
    import time

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from edgepack.plugins.parallel import load_rank
    from edgepack.smoke import mean_pool

    reports = Path(spec["reports"])
    inputs = load_file(spec["inputs"])
    meter = target.memory_meter()
    meter.start()
    stage("loading its shard")
    model = load_rank(model_dir, rank, world, device)
    stage("running the inputs")
    new_tokens = int(spec.get("new_tokens", 32))
    report: dict[str, Any] = {"rank": rank, "device": str(device), "world_size": world}

    def once() -> dict[str, Any]:
        if model.is_decoder:
            return {"tokens": model.generate(inputs, new_tokens).cpu()}
        hidden = model.forward(inputs)
        return {"embeddings": mean_pool(hidden, inputs["attention_mask"].to(hidden.device)).cpu()}

    def synchronize() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        dist.barrier()

    with torch.inference_mode():
        outputs = once()
        if spec["job"] == "bench":
            times = []
            for _ in range(int(spec.get("repeats", 10))):
                synchronize()
                start = time.perf_counter()
                once()
                synchronize()
                times.append(time.perf_counter() - start)
            report["seconds"] = times
    report["peak_bytes"] = meter.peak_bytes()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in outputs.items()}, spec["outputs"])
    (reports / f"rank-{rank}.json").write_text(json.dumps(report))
    stage("done")
    dist.barrier()
    dist.destroy_process_group()


def rank_entry(spec_path: str) -> int:
    """Run :func:`rank_main`; any failure is written to this rank's report as one sentence
    (the launcher names the rank with it) and the rank exits with code 1."""
    import os

    try:
        rank_main(spec_path)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the report
        if isinstance(exc, SystemExit) and not exc.code:
            return 0
        from edgepack.errors import EdgepackError

        rank = int(os.environ.get("RANK", "0"))
        text = str(exc) if isinstance(exc, EdgepackError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        try:
            reports = Path(json.loads(Path(spec_path).read_text())["reports"])
            (reports / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "error": text[:2000]}))
        except Exception:  # noqa: BLE001 - nowhere to report: the exit code still says it failed
            pass
        sys.stderr.write(f"rank {rank}: {text}\n")
        return 1
    return 0


def _entry(spec_path: str) -> int:
    """Run :func:`main`; an edgepack error is reported as its one sentence on the last line of
    standard error (the parent quotes that line), anything else with its traceback."""
    from edgepack.errors import EdgepackError

    try:
        main(spec_path)
    except EdgepackError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1]))
