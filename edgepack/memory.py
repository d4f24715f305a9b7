"""Footprint estimation: pure arithmetic on model facts, no weights touched.

The estimate counts the same thing the meters measure (DESIGN section 5, ``memory.scope``): the
peak memory of a fresh process while it loads the bundle and runs the smoke inputs, above the
baseline after importing the runtime. It has four terms:

* weights in their stored format (scales and zero points included);
* activations at the declared batch size and sequence length;
* the KV cache of decoders at the declared cache length (grouped-query attention counted);
* a runtime workspace: a fixed term for allocator slack and bookkeeping, a small fraction of
  the weights, and the per-call scratch memory of the plan's kernels (``Footprint.workspace_bytes``,
  added by each compressor's ``estimate``, for example a weight dequantized for one matmul).
  The coefficients were fitted to measurements (``examples/benchmark_memory.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from edgepack.errors import UsageError
from edgepack.interfaces import WEIGHT_KINDS, Footprint, ModelFacts, WeightGroup, Workload

# Fitted with `python examples/benchmark_memory.py` on the CPU target (see the README): with
# the runtime warmed up, an fp32 MiniLM measures its weights plus its activations plus ~1 MB.
WORKSPACE_FIXED_BYTES = 2**20 // 2
WORKSPACE_WEIGHT_FRACTION = 0.03
# generate()'s loop beyond its logits (counted in the activations' logits phase), refitted under
# the measuring process's allocator (``python examples/benchmark_memory.py --models
# llama,qwen2,gpt2``): decoders measure nothing above the other terms.
GENERATION_WORKSPACE_BYTES = 0
#: vocabulary-sized fp32 rows per sequence while generate() picks a greedy token: the last
#: position's logits and generate's fp32 copy of them (not measured: at the workloads measured
#: the attention phase is larger)
LOGITS_COPIES = 2

_DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}


#: Sizes above this are refused: no device has an exabyte, and larger numbers only overflow.
MAX_SIZE_BYTES = 10**18


def parse_size(text: str | int, what: str = "SIZE") -> int:
    """Bytes from ``30MB``, ``1.5GiB``, ``512kb`` or a whole number of bytes.

    Decimal units (kB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024.
    A fraction needs a unit (``1.5`` alone would be one and a half bytes).
    """
    from decimal import Decimal

    if isinstance(text, bool):
        raise UsageError(f"{what} must be a size such as 30MB, got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"{what} must be positive, got {text}")
        if text > MAX_SIZE_BYTES:
            raise UsageError(f"{what} {text} is larger than any device ({MAX_SIZE_BYTES} bytes at most)")
        return text
    full = str(text)
    raw = full if len(full) <= 40 else full[:20] + "..." + full[-8:]  # echoed in messages
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", full)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(
            f"{what} {raw!r} is not a size; use bytes or a unit, e.g. 30MB, 512MiB, 1.5GiB"
        )
    number = Decimal(match.group(1))
    if unit in ("", "b") and number != number.to_integral_value():
        raise UsageError(f"{what} {raw!r} is a fraction of a byte; give whole bytes or a unit, e.g. 1.5GB")
    value = number * _UNITS[unit]
    if value < 1:
        raise UsageError(f"{what} {raw!r} must be at least one byte")
    if value > MAX_SIZE_BYTES:
        raise UsageError(f"{what} {raw!r} is larger than any device ({MAX_SIZE_BYTES} bytes at most)")
    return int(value)


def format_size(n: int | float | None) -> str:
    """Human-readable bytes in decimal units: ``22.7 MB``."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_peak(value: int | list[int] | None) -> str:
    """A measured peak as people read it: one size, or for a sharded bundle one per rank
    (``23.1 MB, 23.0 MB per rank``)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(format_size(v) for v in value) + " per rank"
    return format_size(value)


def initial_footprint(facts: ModelFacts) -> Footprint:
    """The footprint of the model as it is: every weight at its current dtype."""
    bits = _DTYPE_BITS.get(facts.dtype, 32)
    groups = tuple(WeightGroup(kind, int(facts.parameters_by_kind.get(kind, 0)), bits) for kind in WEIGHT_KINDS)
    return Footprint(weights=groups, activation_bits=bits, row_width=facts.hidden_size, facts=facts)


@dataclass(frozen=True)
class PeakEstimate:
    """The estimated peak memory of one plan, by component (bytes)."""

    weights_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int

    @property
    def peak_bytes(self) -> int:
        """The total: what must fit in the budget."""
        return self.weights_bytes + self.activation_bytes + self.kv_cache_bytes + self.workspace_bytes

    def to_json(self) -> dict[str, int]:
        """Plain-JSON form, total included."""
        return {
            "weights_bytes": self.weights_bytes,
            "activation_bytes": self.activation_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "workspace_bytes": self.workspace_bytes,
            "peak_bytes": self.peak_bytes,
        }


def activation_bytes(facts: ModelFacts, workload: Workload, footprint: Footprint) -> int:
    """Peak live activations of one forward pass at the declared batch and sequence length,
    with the per-call scratch of the weights in use.

    Inference frees each layer's tensors before the next, so the peak is one phase of one
    layer on top of the residual stream: attention (q/k/v and the attention output, scores and
    their softmax, the scratch of an attention weight) or the MLP (its expanded hidden state
    and activation, the scratch of an FFN weight); decoders also have the logits phase (the
    last position's fp32 logits and generate's fp32 copy of them: :data:`LOGITS_COPIES`).
    Elements count 4 bytes even in bf16/fp16 models: CPU kernels keep reductions such as
    softmax and layer norm in fp32, and half-precision MiniLM measures the same activations as
    fp32.
    """
    b, s = workload.batch_size, workload.seq_len
    elem = 4
    hidden = facts.hidden_size
    heads = max(1, round(facts.num_attention_heads * footprint.heads_scale))
    kv_heads = max(1, min(heads, round(facts.num_key_value_heads * footprint.heads_scale)))
    head_dim = facts.head_dim
    ffn = int(facts.intermediate_size * footprint.ffn_scale)

    def scratch(out_features: int, in_features: int) -> float:
        """Per-call scratch of one matmul with an ``out_features x in_features`` weight."""
        chunks = footprint.scratch_chunks
        if chunks is not None and footprint.weight_scratch <= chunks.scratch \
                and chunks.applies(out_features, in_features, b * s):
            return footprint.weight_scratch * chunks.rows * in_features + b * s * out_features * elem
        return footprint.weight_scratch * out_features * in_features

    def square(a: int, c: int) -> float:  # a weight and its transpose (up and down projections)
        return max(scratch(a, c), scratch(c, a))

    residual = 3 * b * s * hidden * elem  # input, output, normalised copy
    attention = (b * s * (heads + 2 * kv_heads) * head_dim + b * s * heads * head_dim) * elem
    scores = 2 * b * heads * s * s * elem
    attention_phase = attention + scores + square(heads * head_dim, hidden)
    mlp = (3 if facts.is_decoder else 2) * b * s * ffn * elem  # gated MLPs: gate and up side by side
    mlp_phase = mlp + square(ffn, hidden)
    phases = [attention_phase, mlp_phase]
    if facts.is_decoder:
        phases.append(LOGITS_COPIES * b * facts.vocab_size * 4)
    return int(residual + max(phases))


def kv_cache_bytes(facts: ModelFacts, workload: Workload, footprint: Footprint) -> int:
    """Keys and values of every layer a device runs at the declared cache length (0 for encoders)."""
    if not facts.is_decoder:
        return 0
    cache_len = workload.cache_len or workload.seq_len
    kv_heads = max(1, round(facts.num_key_value_heads * footprint.heads_scale))
    elem = footprint.activation_bits / 8
    layers = max(1.0, facts.num_layers * footprint.layer_scale)
    return int(2 * layers * workload.batch_size * kv_heads * facts.head_dim * cache_len * elem)


def estimate_peak(footprint: Footprint, facts: ModelFacts, workload: Workload) -> PeakEstimate:
    """The peak memory of a plan: weights + activations + KV cache + workspace."""
    weights = footprint.weights_bytes
    workspace = WORKSPACE_FIXED_BYTES + WORKSPACE_WEIGHT_FRACTION * weights + footprint.workspace_bytes
    if facts.is_decoder:
        workspace += GENERATION_WORKSPACE_BYTES if footprint.generation_workspace is None else footprint.generation_workspace
    workspace = int(workspace)
    return PeakEstimate(
        weights_bytes=weights,
        activation_bytes=activation_bytes(facts, workload, footprint),
        kv_cache_bytes=kv_cache_bytes(facts, workload, footprint),
        workspace_bytes=workspace,
    )


def step_footprints(facts: ModelFacts, steps: Sequence[tuple[Any, dict]], probe: Any) -> list[Footprint]:
    """The footprint of the model as it is, then after each of ``steps`` ((compressor,
    options) pairs) in turn: one more entry than there are steps."""
    footprints = [initial_footprint(facts)]
    for compressor, options in steps:
        footprints.append(compressor.estimate(footprints[-1], options, probe))
    return footprints


def estimate_plan(facts: ModelFacts, workload: Workload, steps: list[tuple[Any, dict]], probe: Any,
                  target: Any = None) -> tuple[Footprint, PeakEstimate]:
    """Footprint and peak estimate after applying ``steps`` ((compressor, options) pairs), as
    ``target`` runs the result (:meth:`Target.estimate`; None: eager PyTorch)."""
    footprint = step_footprints(facts, steps, probe)[-1]
    peak = estimate_peak(footprint, facts, workload)
    if target is not None:
        peak = target.estimate(peak, footprint, facts, workload)
    return footprint, peak


def process_status_bytes(key: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of a process's /proc/PID/status (VmRSS, VmHWM, RssAnon; this process by
    default) in bytes, or None off Linux or when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def main_memory() -> tuple[int, int]:
    """(total, available) bytes of main memory (Linux /proc/meminfo; elsewhere the physical
    memory, for both)."""
    import os

    try:
        fields = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages
