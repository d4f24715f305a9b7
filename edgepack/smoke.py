"""Smoke tests: sample inputs, golden outputs of the original model, and their comparison.

For encoders (``feature-extraction``) the outputs are mean-pooled, L2-normalised sentence
embeddings and the metric is their cosine similarity to the original model's. For decoders
(``text-generation``) they are the next-token logits of every prompt and the greedy
continuation; the metric is top-1 agreement of the continuation with the original's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgepack.errors import UsageError

#: Built-in smoke sentences: varied length, domain, punctuation, numbers and casing.
DEFAULT_SAMPLES = (
    "An edge device has little memory.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps 32-bit floats to 8-bit integers with a per-channel scale.",
    "What time does the last train to Edinburgh leave on Sundays?",
    "She sold 1,250 shares at $43.17 each on 3 March 2024.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "ERROR: connection refused (errno 111) while contacting the license server",
    "I loved the film, although the ending felt rushed and a little predictable.",
    "Pour the batter into a greased tin and bake for 35 minutes at 180 degrees.",
    "The court held that the contract was void for lack of consideration.",
    "def add(a, b): return a + b",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Mitochondria are the powerhouse of the cell.",
    "Please reset my password; I no longer have access to the old e-mail address.",
    "Transformers use self-attention to mix information across all positions of a sequence.",
    "ok",
)

DEFAULT_NEW_TOKENS = 8

INPUTS_FILE = "smoke/inputs.safetensors"
EXPECTED_FILE = "smoke/expected.safetensors"
TOLERANCES_FILE = "smoke/tolerances.json"


def read_samples(path: str | Path) -> list[str]:
    """Sample texts from a file: a JSON list of strings, or one text per line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"samples file {file} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"samples file {file} is not UTF-8 text") from None
    if file.suffix == ".json":
        try:
            samples = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"samples file {file} is not valid JSON: {exc}") from None
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise UsageError(f"samples file {file} must hold a JSON list of strings")
    else:
        samples = [line.strip() for line in text.splitlines() if line.strip()]
    if not samples:
        raise UsageError(f"samples file {file} holds no samples")
    return samples


def tokenize(tokenizer: Any, samples: list[str], seq_len: int, task: str) -> dict[str, Any]:
    """Tokenize samples padded to exactly ``seq_len`` tokens, so a smoke run has the declared
    workload's shape (and so its memory)."""
    if task == "text-generation":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation continues from the right edge
    encoded = tokenizer(
        samples, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    keys = ("input_ids", "attention_mask") if task == "text-generation" else ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in encoded.items() if k in keys}


def batches(inputs: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    """Split input tensors into consecutive batches of ``batch_size`` rows."""
    rows = next(iter(inputs.values())).shape[0]
    for start in range(0, rows, batch_size):
        yield {k: v[start : start + batch_size] for k, v in inputs.items()}


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of token states over the attention mask, L2-normalised (sentence-transformers style)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def run_outputs(model: Any, inputs: dict[str, Any], task: str, batch_size: int,
                new_tokens: int = DEFAULT_NEW_TOKENS, device: str = "cpu") -> dict[str, Any]:
    """Run the model over the smoke inputs in batches and return its outputs (fp32, on CPU)."""
    import torch

    collected: dict[str, list[Any]] = {}
    with torch.inference_mode():
        for batch in batches(inputs, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            if task == "text-generation":
                try:  # only the last position's logits: a full [batch, seq, vocab] is not needed
                    out = model(**batch, logits_to_keep=1)
                except TypeError:
                    out = model(**batch)
                logits = out.logits[:, -1, :].float().cpu()
                generated = model.generate(
                    **batch, max_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=model.config.pad_token_id or model.config.eos_token_id or 0,
                )
                parts = {"logits": logits, "tokens": generated[:, batch["input_ids"].shape[1]:].cpu()}
            else:
                out = model(**batch)
                parts = {"embeddings": mean_pool(out.last_hidden_state, batch["attention_mask"]).cpu()}
            for key, value in parts.items():
                collected.setdefault(key, []).append(value)
    return {k: torch.cat(v) for k, v in collected.items()}


@dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model's outputs follow the original's.

    :param metric: ``mean_cosine`` (encoders) or ``top1_agreement`` (decoders).
    :param value: the metric over all smoke inputs.
    :param worst: the worst single input (row cosine, or row agreement).
    :param extra: other figures, such as the maximum logit error.
    """

    metric: str
    value: float
    worst: float
    extra: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest."""
        return {"metric": self.metric, "value": round(self.value, 6), "worst": round(self.worst, 6), **self.extra}


def compare(expected: dict[str, Any], actual: dict[str, Any], task: str) -> Fidelity:
    """Fidelity of ``actual`` outputs to ``expected`` (golden) ones."""
    import torch

    if task == "text-generation":
        agree = (expected["tokens"] == actual["tokens"]).float().mean(dim=1)
        logit_err = (expected["logits"] - actual["logits"]).abs().max().item()
        top1 = (expected["logits"].argmax(-1) == actual["logits"].argmax(-1)).float().mean().item()
        return Fidelity(
            "top1_agreement", agree.mean().item(), agree.min().item(),
            {"next_token_top1": round(top1, 6), "max_logit_error": round(logit_err, 6)},
        )
    cos = torch.nn.functional.cosine_similarity(expected["embeddings"], actual["embeddings"], dim=-1)
    return Fidelity("mean_cosine", cos.mean().item(), cos.min().item(), {})


def tolerances(fidelity: Fidelity, floor: float) -> dict[str, Any]:
    """Tolerances verify applies: the floor for the metric, and a bound per input a little
    below the worst input measured at pack time (so a different CPU's rounding passes but a
    broken runtime does not)."""
    worst_floor = fidelity.worst - max(0.002, 0.5 * (1.0 - fidelity.worst))
    return {"metric": fidelity.metric, "min_value": floor, "min_worst": round(max(0.0, worst_floor), 6)}


def check(fidelity: Fidelity, tol: dict[str, Any]) -> list[str]:
    """Sentences describing each tolerance that ``fidelity`` misses (empty when all hold)."""
    problems = []
    if fidelity.value < tol["min_value"]:
        problems.append(f"{fidelity.metric} {fidelity.value:.6f} is below the floor {tol['min_value']}")
    if fidelity.worst < tol["min_worst"]:
        problems.append(f"worst input scored {fidelity.worst:.6f}, below its tolerance {tol['min_worst']}")
    return problems


# ---------------------------------------------------------------------------------------------
# The peak-memory probe: load and run a bundle in a fresh process, so nothing loaded before
# counts, and the same definition serves pack and verify.


@dataclass
class ProbeResult:
    """What a fresh process measured: the peak memory, its scope, and the smoke outputs."""

    peak_bytes: int
    scope: str
    outputs: dict[str, Any]
    seconds: float


def measure_in_fresh_process(bundle_dir: Path, *, task: str, steps: list[Any], loader: str | None,
                             target: str, batch_size: int, new_tokens: int = DEFAULT_NEW_TOKENS) -> ProbeResult:
    """Load ``bundle_dir/model`` in a fresh Python process, run ``smoke/inputs.safetensors``,
    and return the target meter's peak with the outputs. Raises VerificationError when the
    bundle cannot be loaded or run there."""
    import os
    import subprocess
    import sys
    import tempfile

    from safetensors.torch import load_file

    from edgepack.errors import VerificationError

    with tempfile.TemporaryDirectory(prefix="edgepack-probe-") as tmp:
        spec = {
            "bundle_dir": str(bundle_dir),
            "task": task,
            "steps": [s.to_json() for s in steps],
            "loader": loader,
            "target": target,
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "outputs": str(Path(tmp) / "outputs.safetensors"),
        }
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "edgepack.smoke", str(spec_path)],
            capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
        )
        if proc.returncode != 0:
            lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            raise VerificationError(f"the bundle could not be loaded and run in a fresh process: {reason}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        outputs = load_file(spec["outputs"])
    return ProbeResult(report["peak_bytes"], report["scope"], outputs, report["seconds"])


def warm_up(config: Any, task: str, inputs: dict[str, Any], batch_size: int, device: str) -> None:
    """Pay the runtime's one-time costs before the baseline: import the model's code and run a
    one-layer, small-vocabulary copy of the architecture in the bundle's dtype at the declared
    batch and sequence length (thread pools, kernel selection, lazy imports). What is measured
    after it is what the bundle itself adds to a running runtime."""
    import copy

    import torch

    from edgepack.model import auto_class

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


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so
    that memory freed before a measurement is not silently reused inside it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the measurement can only over-count


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


def _probe_main(spec_path: str) -> None:
    """Child side of :func:`measure_in_fresh_process`; prints one JSON line."""
    import gc
    import time

    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from edgepack.host import load_registry
    from edgepack.interfaces import PlanStep
    from edgepack.runtime import load_model_dir

    spec = json.loads(Path(spec_path).read_text())
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
    release_free_memory()
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
    print(json.dumps({"peak_bytes": peak, "scope": meter.scope, "seconds": round(seconds, 3)}))



#: Calibration texts for compressors that score importance or gather statistics; kept apart
#: from the smoke inputs so that fidelity is judged on inputs the compression never saw.
CALIBRATION_SAMPLES = (
    "A small language model can run on a phone if its weights are compressed.",
    "The museum opens at nine and closes at five, except on public holidays.",
    "Researchers measured the boiling point of water at different altitudes.",
    "Can you recommend a good book about the history of mathematics?",
    "The invoice total was 4,820 euros, due within thirty days.",
    "Heavy rain caused flooding in several villages along the river.",
    "SELECT name, email FROM users WHERE active = 1 ORDER BY name;",
    "My flight was delayed by three hours because of a technical problem.",
    "The patient reported mild headaches and occasional dizziness.",
    "Neural networks learn representations by adjusting millions of parameters.",
    "Der Zug nach Berlin fährt um halb acht vom Hauptbahnhof ab.",
    "He scored twice in the second half and the team won the cup.",
    "Store the container in a cool, dry place away from direct sunlight.",
    "The committee postponed its decision until the next quarterly meeting.",
    "Why is the sky blue during the day but red at sunset?",
    "Version 2.3 fixes a memory leak in the image decoder.",
)


if __name__ == "__main__":
    import sys

    from edgepack.cli import quiet_libraries

    quiet_libraries()
    _probe_main(sys.argv[1])
