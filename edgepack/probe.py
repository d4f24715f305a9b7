"""The child side of the peak-memory probe (see :func:`edgepack.smoke.measure_in_fresh_process`).

The parent starts a fresh, isolated interpreter (``python -I`` in an empty working directory,
so nothing next to the bundle or the caller can shadow a library) that imports this module
and calls :func:`main` with the path of a JSON spec. The child warms the runtime up, loads and
runs the bundle once more under the target's memory meter, writes the smoke outputs where the
spec says and prints one JSON line: ``{"peak_bytes", "scope", "seconds", "threads"}``.

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

    from edgepack.model import auto_class
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
    model = auto_class(task).from_config(tiny).to(device=device, dtype=dtype).eval()
    batch = {k: v[:batch_size] for k, v in inputs.items()}
    batch["input_ids"] = batch["input_ids"] % vocab
    run_outputs(model, batch, task, batch_size, new_tokens=2, device=device)
    del model


def touch_weights(model: Any) -> None:
    """Read every weight once, so that memory-mapped weights are resident as they would be
    once every embedding row has been used (a smoke run alone touches only a few rows)."""
    import torch

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


def main(spec_path: str) -> None:
    """Measure the bundle the spec names; prints one JSON line on standard output."""
    import time

    from edgepack.environment import quiet_libraries, trim_heap

    quiet_libraries()

    import torch  # noqa: F401  (imported before the baseline: a fixed cost of every runtime)
    import transformers
    from safetensors.torch import load_file, save_file

    from edgepack.host import load_registry
    from edgepack.interfaces import PlanStep
    from edgepack.runtime import load_model_dir
    from edgepack.smoke import INPUTS_FILE, run_outputs

    spec = json.loads(Path(spec_path).read_text())
    threads = fix_threads(spec.get("threads") or 1)
    bundle_dir = Path(spec["bundle_dir"])
    registry = load_registry()
    target = registry.target(spec["target"])
    steps = [PlanStep(s["plugin"], s["version"], s["options"]) for s in spec["steps"]]
    inputs = load_file(bundle_dir / INPUTS_FILE)
    config = transformers.AutoConfig.from_pretrained(bundle_dir / "model", local_files_only=True)
    probe = target.probe()  # describing the machine is not part of loading the bundle
    warm_up(config, spec["task"], inputs, spec["batch_size"], target.device_type)
    # A first load and one batch pay what the plan's kernels cost the process once (kernel
    # selection, lazy imports of the plugins' libraries); then everything is freed.
    first, _ = load_model_dir(bundle_dir / "model", task=spec["task"], steps=steps, loader=spec["loader"],
                              target_name=spec["target"], registry=registry, probe=probe)
    run_outputs(first, {k: v[: spec["batch_size"]] for k, v in inputs.items()}, spec["task"],
                spec["batch_size"], 2, device=target.device_type)
    del first
    trim_heap()
    meter = target.memory_meter()
    started = time.perf_counter()
    meter.start()
    model, _ = load_model_dir(bundle_dir / "model", task=spec["task"], steps=steps, loader=spec["loader"],
                              target_name=spec["target"], registry=registry, probe=probe)
    touch_weights(model)
    outputs = run_outputs(model, inputs, spec["task"], spec["batch_size"], spec["new_tokens"],
                          device=target.device_type)
    peak = meter.peak_bytes()
    seconds = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in outputs.items()}, spec["outputs"])
    scope = f"{meter.scope}; {threads} intra-op thread{'s' if threads != 1 else ''}"
    print(json.dumps({"peak_bytes": peak, "scope": scope, "seconds": round(seconds, 3), "threads": threads}))


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
