"""``quantize``: store Linear and Embedding weights as int8 or int4.

Schemes:

``int8``
    weight-only, symmetric, one scale per output channel (per token for embeddings), through
    torchao's ``Int8WeightOnlyConfig``. The word embeddings are quantized too: in MiniLM they
    are half of all parameters. Saved by stock transformers (``TorchAoConfig``), so
    ``AutoModel.from_pretrained(model/)`` loads it where torchao is installed.
``int8-dynamic``
    int8 weights and int8 activations quantized per token at run time (torchao's
    ``Int8DynamicActivationInt8WeightConfig``) for Linear layers; embeddings int8 weight-only.
    Also saved by stock transformers. On CPU edgepack runs these Linears itself
    (:meth:`QuantLinear._forward_dynamic`, the same products): torchao's path quantizes the
    activations in many small steps and multiplies with ``torch._int_mm``, which on CPUs
    without VNNI or AMX is tens of times slower than an fp32 GEMM.
``int4``
    weight-only, asymmetric, group-wise (``group_size`` columns share a scale and an offset),
    with the clipping range searched per group to minimise the squared error. torchao 0.18
    has no int4 CPU kernel that saves memory, so edgepack stores the packed nibbles itself in
    ``model.int4.safetensors`` (in shards with an index beyond pack's ``--shard-size``) and
    rebuilds the model with :meth:`Quantize.restore`; the
    manifest names this plugin as the loader.

``mixed``
    int8 and int4 modules in one model, chosen per module to meet ``bits=`` (average stored bits
    per quantized weight, scales included): every Linear and Embedding starts at int8, the
    output error of the model with that module alone at int4 is measured on the calibration
    inputs (its sensitivity), and the modules that lose least per byte saved go to int4
    (GPTQ-rounded for Linears) until the average is at most ``bits``. Stored like int4, with
    each module's bits and sensitivity in the file's metadata (``Quantize.allocation``).

``keep=`` lists module-name fragments kept in higher precision (for example ``keep=word_embeddings``
or ``keep=[layer.0.,layer.5.]``).

At run time int8 and int4 weights stay packed in memory (:class:`QuantLinear`,
:class:`QuantEmbedding`; embeddings dequantize only the rows looked up). Which kernel a Linear
runs in is chosen when the bundle is loaded, by the machine and the shape of the call, and is
stored nowhere in the bundle (the stored layout is portable):

* int8 on an x86 CPU with AVX2 or AVX-512: inputs of at most :data:`FUSED_MAX_ROWS` rows (decoding
  steps) run in torch's fused weight-only kernel ``_weight_int8pack_mm`` with bf16 activations
  (for rows of a multiple of 16 and a 16-byte aligned weight: :meth:`QuantLinear.use_int8_kernel`);
  larger inputs dequantize the weight once per call and run one GEMM, a slice of rows at a time
  for large weights and inputs of at most a few hundred rows (:data:`CHUNKS`, :func:`dequantized_matmul`).
  int8-dynamic does the same with the activations' int8 codes (exact in bf16) in place of the
  activations, and scales the result per row (its weight whole), except on CPUs where torch's
  int8 x int8 matmul ``torch._int_mm`` was measured fast (the probe's ``int8-gemm``: VNNI or
  AMX): there every int8-dynamic call runs in it, torchao's own products (its exact results for
  fp32 activations), about 4x faster than an fp32 matmul.
* int4 in a decoder on such a CPU: every call runs in torch's fused ``_weight_int4pack_mm_for_cpu``
  (bf16 activations), after the nibbles are repacked at load time into the layout that kernel
  wants on this CPU (:func:`pack_int4_for_cpu`; the layout differs between AVX2 and AVX-512, so
  it is never stored). The repacked weight replaces the portable one: memory stays the same.
* everywhere else: dequantize to the activations' dtype (bf16 with ``compute=auto`` on CPUs with
  native bf16), then one matmul (on a CPU, large weights a slice of rows at a time, as above).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import (
    ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe, ScratchChunks,
)

#: int8 Linear inputs of at most this many rows (a decoding step at small batch) run in torch's
#: fused int8 weight-only CPU kernel; larger ones (prefill, encoder batches) dequantize the
#: weight once per call and run one GEMM, which is faster there
#: (``python examples/benchmark_speed.py --kernels``).
FUSED_MAX_ROWS = 32

#: On CPU, a Linear whose weight has at least ``min_elements`` elements (an 8 MB fp32 weight)
#: dequantizes it ``rows`` rows at a time (:func:`dequantized_matmul`) for inputs of at most
#: ``max_input_rows`` rows, where that is up to 2x faster than dequantizing it whole; smaller
#: weights, and larger inputs, which spread the cost of one dequantization over more rows,
#: dequantize whole (``python examples/benchmark_speed.py --kernels``).
CHUNKS = ScratchChunks(rows=256, min_elements=1 << 21, max_input_rows=256)

#: torch's fused int8 CPU kernel is correct only for rows of a multiple of this many elements
#: and 16-byte aligned weights (:meth:`QuantLinear.use_int8_kernel`); other int8 Linears dequantize.
INT8_KERNEL_WIDTH = 16

#: Group sizes torch's CPU int4 kernel accepts; int4 bundles at other group sizes dequantize.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)

#: torch CPU kernel builds (``torch.backends.cpu.get_cpu_capability()``) on which the fused
#: weight-only kernels were measured to beat dequantize-then-matmul; elsewhere (no AVX2, other
#: architectures) the portable dequantizing path runs.
FUSED_CAPABILITIES = ("AVX2", "AVX512")

INT4_FILE = "model.int4.safetensors"
INT4_FORMAT = "edgepack.int4/1"

from edgepack.lazy import LazyModule
from edgepack.model import float_dtype_name, replace_module, unique_tensors
from edgepack.plugins.precision import cast_deferred

# Imported on first use: registering the plugin must not import torch (fast --help).
torch = LazyModule("torch")
nn = LazyModule("torch.nn")


# ---------------------------------------------------------------------------------------------
# Quantization arithmetic


def quantize_int8_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 with one fp32 scale per row: (qdata int8 [R, C], scale fp32 [R, 1])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(weight: Any, group_size: int) -> tuple[Any, Any, Any]:
    """Asymmetric int4 per group of ``group_size`` columns, rounded to nearest, with the
    clipping range searched per group (see :func:`_int4_group_params`).

    :returns: (packed uint8 [R, C/2], scale fp16 [R, C/g], offset fp16 [R, C/g]) with
        ``w ≈ q * scale + offset``, q in 0..15.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    g = w.reshape(rows, cols // group_size, group_size)
    scale, lo = _int4_group_params(g)
    q = torch.clamp(torch.round((g - lo) / scale), 0, 15).to(torch.uint8).reshape(rows, cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.squeeze(-1).half(), lo.squeeze(-1).half()


def _int4_group_params(g: Any, grid: int = 20, chunk: int = 1 << 16) -> tuple[Any, Any]:
    """Scale and offset of int4 groups ``g`` [R, G, g]: the range [min, max] is shrunk by
    factors 1.0, 0.985, ... and the factor with the least squared error wins (data-free clipping
    as in HQQ/AWQ). fp16 rounding of the stored scale and offset is part of the error.

    The search runs over about ``chunk`` weights at a time, in place in one buffer: a whole
    large weight's temporaries do not fit in the CPU's caches, and the same arithmetic on
    cache-sized pieces runs about 6x faster (same results, bit for bit)."""
    rows, groups, size = g.shape
    flat = g.reshape(rows * groups, size)
    best_scale = torch.zeros(rows * groups, 1, device=g.device)
    best_lo = torch.zeros(rows * groups, 1, device=g.device)
    step_rows = max(1, chunk // size)
    buffer = torch.empty(step_rows, size, device=g.device)
    for start in range(0, flat.shape[0], step_rows):
        x = flat[start:start + step_rows]
        work = buffer[: x.shape[0]]
        lo_full, hi_full = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        best_err = torch.full_like(lo_full, float("inf"))
        scale_c, lo_c = best_scale[start:start + step_rows], best_lo[start:start + step_rows]
        for step in range(grid):
            shrink = 1.0 - 0.015 * step
            lo, hi = lo_full * shrink, hi_full * shrink
            scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
            lo = lo.half().float()
            torch.sub(x, lo, out=work).div_(scale).round_().clamp_(0, 15).mul_(scale).add_(lo).sub_(x).square_()
            err = work.sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale_c.copy_(torch.where(better, scale, scale_c))
            lo_c.copy_(torch.where(better, lo, lo_c))
    return best_scale.reshape(rows, groups, 1), best_lo.reshape(rows, groups, 1)


def _upper_cholesky_of_inverse(hessian: Any, perm: Any, damp: float) -> Any:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) that GPTQ needs, in fp32, for
    ``H`` the Hessian with its rows and columns in the order ``perm``, a zero diagonal entry (an
    input never seen) set to 1, and ``damp`` times the mean diagonal added to the diagonal.

    With ``J`` the reversal of rows and columns and ``L`` the lower Cholesky factor of ``JHJ``,
    ``U = J L⁻¹ J``: one factorization and one triangular solve, where inverting ``H`` and
    factoring the inverse takes two factorizations and an inversion. In fp32, as GPTQ's
    implementations compute it (in fp64 when fp32 cannot factor ``H``), and never more than
    three matrices of its size alive at once: the widest Linear of a 1 B model has a 5632-wide
    ``H``, 127 MB in fp32."""
    for dtype in (torch.float32, torch.float64):
        h = hessian.to(dtype)[perm][:, perm]
        diagonal = h.diagonal()
        diagonal[diagonal == 0] = 1.0
        diagonal += damp * diagonal.mean()
        h = h.flip(0, 1)
        low, info = torch.linalg.cholesky_ex(h)
        del h
        if int(info) == 0:
            eye = torch.eye(low.shape[0], dtype=dtype, device=low.device)
            inverse = torch.linalg.solve_triangular(low, eye, upper=False)
            del eye
            del low
            return inverse.flip(0, 1).float()
        del low
    raise torch.linalg.LinAlgError("GPTQ: the layer's Hessian is not positive definite, even damped")


def gptq_int4(weight: Any, hessian: Any, group_size: int, damp: float = 0.01, block: int = 128) -> tuple[Any, Any, Any]:
    """GPTQ (Frantar et al. 2022) for group-wise asymmetric int4: columns are quantized one by
    one, most important first (largest Hessian diagonal, "act-order"), and each one's rounding
    error is spread over the columns not yet quantized, weighted by the inverse Hessian
    ``H = 2 XᵀX`` of the layer's calibration inputs. Group scales and offsets are fixed up
    front from the original weights ("static groups"), so act-order keeps the plain group
    layout. Same output format as :func:`quantize_int4_groups`.

    The weight is worked on transposed, so that each column is contiguous, and the error
    updates are BLAS rank-1 and rank-``block`` updates in place."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    groups = cols // group_size
    scale_g, lo_g = _int4_group_params(w.reshape(rows, groups, group_size))
    scale_g, lo_g = scale_g.squeeze(-1), lo_g.squeeze(-1)  # [rows, groups]
    diagonal = torch.diag(hessian).double()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(diagonal, descending=True)
    group_of = (perm // group_size).tolist()  # group of each permuted column
    hinv = _upper_cholesky_of_inverse(hessian, perm, damp)
    wt = w.t()[perm].contiguous()  # [cols, rows]: permuted columns as rows
    del w
    scale_t, lo_t = scale_g.t().contiguous(), lo_g.t().contiguous()
    codes = torch.empty(cols, rows, dtype=torch.uint8, device=wt.device)
    q, err = torch.empty(rows, device=wt.device), torch.empty(rows, device=wt.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]
        err1 = torch.empty(i2 - i1, rows, device=wt.device)
        for i in range(i2 - i1):
            scale, lo = scale_t[group_of[i1 + i]], lo_t[group_of[i1 + i]]
            torch.sub(w1[i], lo, out=q).div_(scale).round_().clamp_(0, 15)
            codes[i1 + i] = q
            torch.mul(q, scale, out=err).add_(lo).neg_().add_(w1[i]).div_(h1[i, i])
            w1[i + 1:].addr_(h1[i, i + 1:], err, alpha=-1)
            err1[i] = err
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    codes = codes[torch.argsort(perm)].t()  # back to the original column order, [rows, cols]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), scale_g.half(), lo_g.half()


def awq_scales(weight: Any, hessian: Any, group_size: int, grid: int = 11) -> Any:
    """AWQ's per-input-channel scales (Lin et al. 2023), searched on the layer's Hessian.

    Channels whose inputs are large matter more to the output: scaling weight column ``j`` up by
    ``s_j`` (and the input down by it, which :class:`QuantLinear` does with ``input_scale``)
    gives them a finer share of their group's int4 grid. ``s = a ** alpha`` with ``a`` the RMS of
    each input channel (from ``diag(H) = 2 E[x_j²]``); ``alpha`` is chosen on a grid of
    ``grid`` points in [0, 1] to minimise the output error ``tr(ΔW H ΔWᵀ)`` of round-to-nearest
    int4, ``ΔW`` being the effective weight's error. ``alpha = 0`` is plain int4, so the search
    never picks scales that do worse on the calibration inputs. Returns fp32 scales [in]."""
    w = weight.detach().float()
    h = hessian.float()
    rms = torch.diag(h).clamp_min(0).sqrt()
    # channels (nearly) silent on the calibration inputs count for nothing in the error, so the
    # search would let their columns be scaled down without limit, and any input they get
    # later magnified: their activation is taken as at least a tenth of the median's
    rms = rms.clamp_min(max(float(rms.median()) * 0.1, 1e-8))
    best, best_scale = None, torch.ones_like(rms)
    for alpha in torch.linspace(0, 1, grid).tolist():
        scale = rms ** alpha
        scale = scale / (scale.max() * scale.min()).sqrt()  # centred: the grid is not pushed to one end
        packed, q_scale, q_offset = quantize_int4_groups(w * scale, group_size)
        error = _output_error(w, h, dequantize(packed, q_scale, q_offset, 4, torch.float32) / scale)
        if best is None or error < best:
            best, best_scale = error, scale
    return best_scale


def _output_error(weight: Any, hessian: Any, effective: Any) -> float:
    """``tr(ΔW H ΔWᵀ)``: the squared output error of a layer whose weight ``weight`` is replaced
    by ``effective``, on the inputs whose Hessian is ``hessian``."""
    delta = effective.float() - weight.detach().float()
    return float(((delta @ hessian.float()) * delta).sum())


def input_hessians(model: Any, modules: list[tuple[str, Any]], calibration: list[dict[str, Any]]) -> dict[str, Any]:
    """``2 XᵀX / n`` of each Linear's inputs over the calibration batches, padding excluded,
    from passes of the whole model (every module's statistics at once)."""
    with _InputStatistics(modules) as statistics, torch.inference_mode():
        for batch in calibration:
            statistics.mask = batch.get("attention_mask")
            model(**batch)
    return statistics.hessians()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it wanted are captured."""


def _repeated_layers(model: Any, names: set[str]) -> tuple[str, list[Any]] | None:
    """The model's stack of repeated layers (``model.layers``, ``encoder.layer``, ``h``): the
    ModuleList holding most of ``names``, as (its name, its layers); None when there is none."""
    best: tuple[str, list[Any]] | None = None
    count = 0
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        inside = sum(1 for n in names if n.startswith(prefix + "."))
        if inside > count:
            best, count = (prefix, list(module)), inside
    return best


class _InputStatistics:
    """Forward pre-hooks adding up ``XᵀX`` of each module's inputs (padding excluded, by
    :attr:`mask`); :meth:`hessians` gives ``2 XᵀX / n``. Modules called one after another on
    the very same tensor (q, k and v; gate and up) get one product and, for as long as they
    get the same inputs, one matrix: the same statistics, computed and held once. (A Linear's
    input is kept for its weight's gradient, so a model that trains never changes it in place
    between two such calls.) A module that gets an input the others sharing its matrix do not
    gets a copy of its own."""

    def __init__(self, modules: list[tuple[str, Any]]) -> None:
        self.modules = modules
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.mask: Any = None
        self._pending: tuple[Any, Any, list[str]] | None = None  # an input and the modules it went to
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in modules]

    def __enter__(self) -> "_InputStatistics":
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook_for(self, name: str) -> Any:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            if self._pending is not None and self._pending[0] is args[0] and name not in self._pending[2]:
                self._pending[2].append(name)
                return
            self._add_pending()
            self._pending = (args[0], self.mask, [name])
        return hook

    def _add_pending(self) -> None:
        """Add the pending input's ``XᵀX`` to the matrix of the modules it went to."""
        if self._pending is None:
            return
        x, mask, names = self._pending
        self._pending = None
        x = x.detach()
        x = x[mask.bool()] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
        x = x.double()
        sums, counts = self.sums, self.counts
        with torch.inference_mode(False):  # plain tensors, normalised after the passes
            product = x.T @ x
            matrix = sums.get(names[0])
            if matrix is not None and all(sums.get(n) is matrix for n in names) \
                    and not any(total is matrix for other, total in sums.items() if other not in names):
                matrix += product  # these modules, and only they, share this matrix
            elif all(n not in sums for n in names):  # their first input: one matrix for all of them
                for n in names:
                    sums[n], counts[n] = product, 0
            else:  # their inputs differ from now on: each its own copy
                for n in names:
                    mine = sums.get(n)
                    if mine is None:
                        sums[n], counts[n] = product.clone(), 0
                        continue
                    if any(total is mine for other, total in sums.items() if other != n):
                        mine = sums[n] = mine.clone()
                    mine += product
        for n in names:
            counts[n] += x.shape[0]

    def hessians(self) -> dict[str, Any]:
        """``2 XᵀX / n`` of every module, normalised in place (a shared matrix once); zeros for
        a module that saw no input."""
        self._add_pending()
        out: dict[str, Any] = {}
        finished: set[int] = set()
        for name, module in self.modules:
            total = self.sums.get(name)
            if total is None:
                total = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
            elif id(total) not in finished:
                total.mul_(2).div_(max(self.counts[name], 1))
                finished.add(id(total))
            out[name] = total
        self.sums.clear()
        return out


def layerwise_hessians(model: Any, modules: list[tuple[str, Any]], calibration: list[dict[str, Any]],
                       progress: Any = None) -> Iterator[dict[str, Any]]:
    """``2 XᵀX / n`` of the Linears' inputs (the same as :func:`input_hessians`), one layer of
    the model's repeated stack at a time, as GPTQ implementations do: the calibration inputs of
    the first layer are captured once, then each layer runs alone on its inputs, which gives
    its statistics and the next layer's inputs, and its statistics are yielded for the caller
    to quantize that layer. Only one layer's statistics are alive at a time (the whole model's
    would be ``Σ 8·in²`` bytes: 10 GB for a 1.1 B Llama). Each layer sees the outputs of the
    original layers before it, as the whole-model pass does (feeding it the quantized layers'
    outputs instead measured worse on all-MiniLM-L6-v2 int4: mean cosine 0.9762 against
    0.9778). Modules outside the stack (an output head) come last, from one pass of the whole
    model."""
    import time

    names = {name for name, _ in modules}
    stack = _repeated_layers(model, names)
    groups: list[list[tuple[str, Any]]] = []
    if stack is not None:
        prefix, layers = stack
        groups = [[(n, m) for n, m in modules if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    rest = [(n, m) for n, m in modules if not any((n, m) in g for g in groups)]
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None and use_cache is not None:
        config.use_cache = False  # no KV cache: calibration passes generate nothing
    try:
        with torch.inference_mode():
            if stack is not None and any(groups):
                captured: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

                def catch(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                    captured.append((args, kwargs, None))
                    raise _Stop

                handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
                try:
                    for batch in calibration:
                        try:
                            model(**batch)
                        except _Stop:
                            args, kwargs, _ = captured[-1]
                            captured[-1] = (args, kwargs, batch.get("attention_mask"))
                finally:
                    handle.remove()
                start = time.perf_counter()
                for index, (layer, group) in enumerate(zip(layers, groups)):
                    # statistics, and the inputs of the next layer (before this one is quantized)
                    with _InputStatistics(group) as statistics:
                        for i, (args, kwargs, mask) in enumerate(captured):
                            statistics.mask = mask
                            out = layer(*args, **kwargs)
                            out = out[0] if isinstance(out, tuple) else out
                            captured[i] = ((out, *args[1:]), kwargs, mask)
                    if group:
                        yield statistics.hessians()
                    del statistics
                    if progress is not None and group:
                        done = time.perf_counter() - start
                        left = done / (index + 1) * (len(layers) - index - 1)
                        progress(f"  GPTQ: layer {index + 1} of {len(layers)} ({done:.0f} s, about {left:.0f} s left)")
                del captured
            if rest:
                yield input_hessians(model, rest, calibration)
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


def unpack_int4(packed: Any) -> Any:
    """uint8 [..., C/2] → uint8 [..., C] with values 0..15 (low nibble first)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(qdata: Any, scale: Any, offset: Any | None, bits: int, dtype: Any, out: Any | None = None) -> Any:
    """Rows of weights back in ``dtype`` from int8 (per-row scale) or packed int4 (groups),
    written into ``out`` (contiguous, of the weight's shape) when given."""
    # In-place arithmetic: one weight-sized temporary per call, not three.
    if bits == 8:
        if out is None:
            return qdata.to(dtype).mul_(scale.to(dtype))
        return out.copy_(qdata).mul_(scale.to(dtype))
    # int4: each nibble plane is written straight into its interleaved place in the output
    # (cast on copy), with no unpacked uint8 copy in between
    rows, half = qdata.shape[:-1], qdata.shape[-1]
    w = torch.empty(*rows, half, 2, dtype=dtype, device=qdata.device) if out is None else out.view(*rows, half, 2)
    w[..., 0].copy_(qdata & 0xF)
    w[..., 1].copy_(qdata >> 4)
    groups = scale.shape[-1]
    w = w.view(*rows, groups, 2 * half // groups)
    w.mul_(scale.to(dtype).unsqueeze(-1)).add_(offset.to(dtype).unsqueeze(-1))
    return w.view(*rows, 2 * half)


def dequantized_matmul(rows: Any, qdata: Any, scale: Any, offset: Any | None, bits: int,
                       chunk_rows: int | None = CHUNKS.rows) -> Any:
    """``rows @ W.T`` for a stored weight W (2-D ``rows`` in the compute dtype), without the
    whole dequantized W: ``chunk_rows`` rows of W at a time are dequantized into one buffer,
    reused within the call, and multiplied into their slice of the (transposed) result. On CPU
    that is up to 2x faster than dequantizing the whole weight and multiplying once, and needs
    ``chunk_rows`` rows of scratch instead of the weight
    (``python examples/benchmark_speed.py --kernels``). ``chunk_rows=None`` dequantizes it whole."""
    out_features = qdata.shape[0]
    if chunk_rows is None or chunk_rows >= out_features:
        return rows @ dequantize(qdata, scale, offset, bits, rows.dtype).T
    in_features = rows.shape[-1]
    result = torch.empty(out_features, rows.shape[0], dtype=rows.dtype, device=rows.device)
    buffer = torch.empty(chunk_rows, in_features, dtype=rows.dtype, device=rows.device)
    columns = rows.T
    for start in range(0, out_features, chunk_rows):
        end = min(out_features, start + chunk_rows)
        weight = dequantize(qdata[start:end], scale[start:end], None if offset is None else offset[start:end],
                            bits, rows.dtype, out=buffer[: end - start])
        torch.mm(weight, columns, out=result[start:end])
    return result.T.contiguous()


def fused_kernels_available() -> bool:
    """Whether this torch build and CPU run the fused int8/int4 weight-only kernels fast."""
    return (torch.backends.cpu.get_cpu_capability() in FUSED_CAPABILITIES
            and hasattr(torch.ops.aten, "_weight_int8pack_mm")
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def _aligned(tensor: Any) -> Any:
    """``tensor``, or a contiguous copy of it where it is not contiguous from a 64-byte aligned
    start (torch's allocator aligns what it allocates; views and memory-mapped files need not)."""
    if tensor.is_contiguous() and tensor.data_ptr() % 64 == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def quantize_activation_rows(rows: Any) -> tuple[Any, Any]:
    """Activations ``[rows, in]`` as int8 codes per row, as torchao's dynamic int8 activations
    (symmetric, scale ``max |x| / 127.5``, at least fp32's eps; codes in [-128, 127]): returns
    the codes (as fp32, which holds them exactly) and the scales ``[rows, 1]``."""
    rows = rows.float()
    if rows.shape[0] <= FUSED_MAX_ROWS:  # decoding steps: fewer calls (each costs microseconds)
        largest = rows.abs().amax(-1, keepdim=True)
    else:  # larger inputs: no |x| copy
        largest = torch.maximum(rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True).neg_())
    scale = largest.div_(127.5).clamp_(min=torch.finfo(torch.float32).eps)
    # reciprocal() is torchao's 1.0 / scale without its multiplication by 1.0
    return (rows * scale.reciprocal()).round_().clamp_(-128, 127), scale


def _dynamic_rows(weight: Any) -> bool:
    """Whether torchao's int8 weight with dynamic activations is the kind
    :meth:`QuantLinear._forward_dynamic` computes: symmetric per-row weights and activations,
    no static activation scale, pre-scale or reduced range."""
    kwargs = getattr(weight, "act_quant_kwargs", None)
    if kwargs is None or getattr(kwargs, "reduce_range", False):
        return False
    try:
        from torchao.quantization import PerRow
        from torchao.quantization.quant_primitives import MappingType
    except ImportError:
        return False
    zero = getattr(weight, "zero_point", None)
    return (isinstance(kwargs.granularity, PerRow) and kwargs.mapping_type == MappingType.SYMMETRIC
            and getattr(weight, "act_pre_scale", None) is None and getattr(weight, "act_quant_scale", None) is None
            and (zero is None or not bool(zero.any()))
            and list(weight.block_size) == [1, weight.qdata.shape[-1]])


def pack_int4_for_cpu(qdata: Any, scale: Any, offset: Any, chunk_rows: int = 256) -> tuple[Any, Any]:
    """Repack portable int4 (:func:`quantize_int4_groups`'s layout) for
    ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on this CPU.

    The kernel computes ``w = (q - 8) * scale + zero`` from a ``[K/g, N, 2]`` table of (scale,
    zero) pairs; ours is ``w = q * scale + offset``, so ``zero = offset + 8 * scale`` (rounded to
    bf16, the kernel's dtype). Rows are converted ``chunk_rows`` at a time (a multiple of the
    kernel's 64-row block, so the bytes are those of one whole conversion) so that the int32
    codes the converter takes never exist for the whole matrix at once.

    :returns: (packed uint8 [N, K/2] in this CPU's layout, scale_and_zero bf16 [K/g, N, 2])
    """
    rows = qdata.shape[0]
    packed = torch.empty_like(qdata)
    for start in range(0, rows, chunk_rows):
        codes = unpack_int4(qdata[start:start + chunk_rows]).to(torch.int32)
        packed[start:start + chunk_rows] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale32 = scale.float()
    zero = offset.float() + 8 * scale32
    return packed, torch.stack((scale32.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()


def _define_modules() -> None:
    """Define QuantLinear, QuantEmbedding, ProgramEmbedding on first use (subclassing nn.Module
    needs torch)."""
    global QuantLinear, QuantEmbedding, ProgramEmbedding, torch, nn
    if "QuantLinear" in globals():
        return
    import torch as real_torch

    # torch is loaded now: the lazy proxies (kept so that registering the plugin imports no
    # torch) cost microseconds per lookup, dozens of times per decoding step, and torch.compile
    # cannot trace through them
    torch, nn = real_torch, real_torch.nn

    class QuantLinear(nn.Module):
        """A Linear whose weight stays int8 or packed int4: dequantized per call, or run in a
        fused kernel that never materialises the dequantized weight (see the module docstring)."""

        def __init__(self, in_features: int, out_features: int, bits: int, qdata: Any, scale: Any,
                     offset: Any | None = None, bias: Any | None = None, input_scale: Any | None = None) -> None:
            super().__init__()
            self.in_features, self.out_features, self.bits = in_features, out_features, bits
            self.register_buffer("qdata", qdata)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)
            #: AWQ: the inputs are multiplied by this per channel (1/s for weight columns stored times s)
            self.register_buffer("input_scale", input_scale)
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
            #: dtype of the matmul; None means the activations' dtype (see Quantize.prepare)
            self.compute_dtype = None
            #: int8 on CPU: inputs of at most this many rows (decoding steps) go through torch's
            #: fused weight-only kernel, which never materialises the dequantized weight; 0 = off
            #: (see Quantize.prepare)
            self.fused_rows = 0
            self._fused_scale = None
            #: int4 repacked for torch's CPU kernel by :meth:`use_int4_kernel` (then every call
            #: runs fused and the portable buffers are gone); None otherwise
            self.int4_group = None
            #: int8-dynamic: the activations are quantized to int8 per row at every call
            #: (:func:`quantize_activation_rows`) and multiplied with the int8 weight
            self.dynamic = False
            #: int8-dynamic on a CPU whose ``torch._int_mm`` is fast (the probe's ``int8-gemm``):
            #: the integer products run in it (see Quantize.prepare)
            self.int_mm = False

        def forward(self, x: Any) -> Any:
            if self.input_scale is not None:  # in fp32, as the rounding assumed, then back
                x = (x.float() * self.input_scale).to(x.dtype)
            if self.int4_group is not None:
                return self._forward_int4(x)
            if self.dynamic:
                return self._forward_dynamic(x)
            if self.fused_rows and x.numel() <= self.fused_rows * self.in_features and x.device.type == "cpu":
                return self._forward_fused(x)
            dtype = self.compute_dtype or x.dtype
            if x.device.type == "cpu" and CHUNKS.applies(self.out_features, self.in_features,
                                                         x.numel() // self.in_features):
                y = dequantized_matmul(x.reshape(-1, self.in_features).to(dtype), self.qdata, self.scale,
                                       self.offset, self.bits)
                if self.bias is not None:
                    y.add_(self.bias.to(dtype))
                return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            weight = dequantize(self.qdata, self.scale, self.offset, self.bits, dtype)
            bias = self.bias.to(dtype) if self.bias is not None else None
            return nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)

        def _forward_fused(self, x: Any) -> Any:
            """int8 weights times bf16 activations in torch's fused CPU kernel
            (``_weight_int8pack_mm``: per-row scales applied in the kernel, fp32 accumulation);
            its fp32-input variant is several times slower than an fp32 matmul, so the
            activations go in as bf16."""
            y = self._int8pack_mm(x.reshape(-1, self.in_features)).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)

        def _forward_dynamic(self, x: Any) -> Any:
            """int8 activations (per row) times int8 weights (per output channel), the product of
            torchao's ``Int8DynamicActivationInt8WeightConfig``. The integer products run in a
            float matmul: int8 values are exact in bf16 and fp32, and an fp32 sum of them is exact
            up to 2**24. torchao's own path runs ``torch._int_mm``, which on CPU is a plain loop
            tens of times slower than an fp32 GEMM unless the CPU has VNNI or AMX; there
            (``int_mm``) it runs in ``torch._int_mm`` too, elsewhere decoding steps run in the
            fused ``_weight_int8pack_mm`` and larger inputs in one GEMM, as for ``int8``."""
            codes, row_scale = quantize_activation_rows(x.reshape(-1, self.in_features))
            if self.int_mm and x.device.type == "cpu":  # exact int32 sums, then torchao's scaling
                y = torch._int_mm(codes.to(torch.int8), self.qdata.T).float()
                y.mul_(row_scale).mul_(self.scale.reshape(1, -1))
            elif self.fused_rows and codes.shape[0] <= self.fused_rows and x.device.type == "cpu":
                y = self._int8pack_mm(codes).float().mul_(row_scale)
            else:  # in torchao's order: the integer products, the row scales, the channel scales
                dtype = self.compute_dtype or torch.float32
                y = nn.functional.linear(codes.to(dtype), self.qdata.to(dtype)).float()
                y.mul_(row_scale).mul_(self.scale.reshape(1, -1))
            if self.bias is not None:
                y.add_(self.bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

        def _int8pack_mm(self, rows: Any) -> Any:
            """``rows`` (2-D) times the int8 weight and its scales in torch's fused CPU kernel, in
            bf16 (scales set by :meth:`use_int8_kernel`). A decoding step calls this for every
            Linear: alignment is checked only of rows it did not copy. A compiled graph (``run
            --compile``) cannot read a data pointer: there bf16 rows are made contiguous, and
            their alignment is that of inductor's buffers (allocator-aligned)."""
            copied = rows.to(torch.bfloat16, memory_format=torch.contiguous_format)  # fresh, aligned, unless bf16
            if copied is rows:
                copied = rows.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() \
                    else _aligned(rows)
            return torch.ops.aten._weight_int8pack_mm(copied, self.qdata, self._fused_scale)

        def use_int8_kernel(self) -> bool:
            """Let decoding-sized inputs of this int8 Linear run in torch's fused kernel; False (and
            nothing changed) where the kernel would read it wrongly. torch 2.13's AVX-512 kernel
            loads the weight 16 bytes and the activations 32 bytes at a time with aligned loads,
            16 columns per step: rows whose width is not a multiple of 16 give wrong values or
            a crash, and so does a weight that does not start 16-byte aligned (measured on an
            avx512_vnni Xeon), as a weight memory-mapped from a safetensors file may not. Such a
            weight is not copied (that would hold it twice in memory); it dequantizes per call.
            Activations are copied per call where they are not aligned (:func:`_aligned`)."""
            if self.bits != 8 or self.in_features % INT8_KERNEL_WIDTH or self.qdata.data_ptr() % 16 \
                    or not self.qdata.is_contiguous():
                return False
            self.fused_rows = FUSED_MAX_ROWS
            self._fused_scale = self.scale.reshape(-1).to(torch.bfloat16)  # now: set in a compiled step, it recompiles
            return True

        def use_int4_kernel(self) -> bool:
            """Repack this int4 Linear for torch's fused CPU kernel, in place; False (and nothing
            changed) when its shape or group size is one the kernel does not take."""
            if self.bits != 4 or self.int4_group is not None:
                return False
            group = self.in_features // self.scale.shape[-1]
            if group not in INT4_KERNEL_GROUPS or self.out_features % 16 or self.in_features % 2:
                return False
            from edgepack.environment import drop_file_pages

            stored = (self.qdata, self.scale, self.offset)
            packed, scale_zero = pack_int4_for_cpu(*stored)
            self.qdata, self.scale, self.offset = packed, scale_zero, None
            self.int4_group = group
            # the stored codes and scales, memory-mapped from the bundle, are read once here and
            # not again: else they would stay resident beside their repacked copy (twice the weights)
            for tensor in stored:
                drop_file_pages(tensor)
            return True

        def _forward_int4(self, x: Any) -> Any:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qdata, self.int4_group, self.scale).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            kernel = ", kernel=int4pack" if self.int4_group else (", kernel=int8pack" if self.fused_rows else "")
            awq = ", awq" if self.input_scale is not None else ""
            dynamic = (", int8 activations" + (", kernel=int_mm" if self.int_mm else "")) if self.dynamic else ""
            return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
                    f"{kernel}{awq}{dynamic}")

    class QuantEmbedding(nn.Module):
        """An Embedding whose table stays int8 or packed int4; only looked-up rows are dequantized."""

        def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, qdata: Any, scale: Any,
                     offset: Any | None = None, padding_idx: int | None = None, dtype: Any = None) -> None:
            super().__init__()
            self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
            self.padding_idx = padding_idx
            self.out_dtype = dtype or torch.float32
            self.register_buffer("qdata", qdata)
            self.register_buffer("scale", scale)
            self.register_buffer("offset", offset)

        @property
        def weight(self) -> Any:
            """The dequantized table (for code that reads ``embedding.weight``, e.g. tied heads)."""
            return dequantize(self.qdata, self.scale, self.offset, self.bits, self.out_dtype)

        def forward(self, ids: Any) -> Any:
            rows = nn.functional.embedding(ids, self.qdata)
            scale = nn.functional.embedding(ids, self.scale)
            offset = nn.functional.embedding(ids, self.offset) if self.offset is not None else None
            return dequantize(rows, scale, offset, self.bits, self.out_dtype)

        def extra_repr(self) -> str:
            return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"

    class ProgramEmbedding(nn.Module):
        """An int8 Embedding (one fp32 scale per row) for an ExecuTorch program: exported as
        ExecuTorch's ``quantized_decomposed::embedding_byte``, which only dequantizes the rows
        looked up (registered by ``executorch.exir.passes._quant_patterns_and_replacements``)."""

        def __init__(self, qdata: Any, scale: Any) -> None:
            super().__init__()
            self.num_embeddings, self.embedding_dim = qdata.shape
            self.register_buffer("weight", qdata)
            self.register_buffer("scales", scale)

        def forward(self, ids: Any) -> Any:
            # the real torch module, not the lazy proxy: torch.export's strict tracer runs this
            return real_torch.ops.quantized_decomposed.embedding_byte.dtype(
                self.weight, self.scales, None, -128, 127, ids, dtype=real_torch.float32)

        def extra_repr(self) -> str:
            return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def __getattr__(name: str) -> Any:
    if name in ('QuantLinear', 'QuantEmbedding', 'ProgramEmbedding'):
        _define_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Module selection


#: Model types whose projections are transformers' ``Conv1D`` (weight stored in x out), not
#: ``nn.Linear``: quantize replaces Linear modules only, so these keep their projections as they
#: are (their embeddings, and with ``head=true`` their output head, are quantized). The stored
#: weights' names and shapes do not tell a Conv1D from a Linear, hence the list.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def _output_head(model: Any) -> Any:
    """The model's output head (its output embeddings), or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _targets(model: Any, embeddings: bool, keep: Sequence[str], head: bool = False) -> list[tuple[str, Any]]:
    """(name, module) of every Linear (and Embedding) to quantize, skipping kept ones and, unless
    ``head``, the output head (the layer whose quantization hurts greedy decoding most; with
    ``head`` it is quantized to int8 per channel, whatever the scheme, and decoding runs it in
    the fused int8 kernel). UsageError when ``head`` is asked of a head tied to the input
    embedding, or of a model without an output head (an encoder)."""
    skip = set()
    head_weight = None
    output = _output_head(model)
    if head and output is None:
        raise UsageError("quantize:head=true quantizes a decoder's output head, but this model has none")
    if output is not None:
        head_weight = getattr(output, "weight", None)
        tied = head_weight is not None and any(
            getattr(m, "weight", None) is head_weight for m in model.modules() if m is not output)
        if head and tied:
            raise UsageError("quantize:head=true needs an output head of its own, but this model's head "
                             "shares its weights with the input embedding (tie_word_embeddings)")
        if not head:
            skip.add(id(output))
    chosen = []
    for name, module in model.named_modules():
        if any(fragment in name for fragment in keep) or id(module) in skip:
            continue
        if not head and head_weight is not None and getattr(module, "weight", None) is head_weight \
                and id(module) not in skip:
            continue  # an input embedding tied to the output head stays shared and unquantized
        if isinstance(module, nn.Linear) or (embeddings and isinstance(module, nn.Embedding)):
            chosen.append((name, module))
    return chosen


def _quantize_module(model: Any, name: str, module: Any, bits: int, group: int, hessian: Any = None,
                     gptq: bool = True, awq: bool = False) -> None:
    """Replace ``module`` by its int4 or int8 form. With the layer's Hessian, an int4 Linear is
    GPTQ-rounded (``gptq``) and, with ``awq``, its columns scaled by :func:`awq_scales` first."""
    cast_deferred(module)
    weight = module.weight
    offset = input_scale = None
    if bits == 4:
        round_ = gptq_int4 if hessian is not None and gptq else (lambda w, h, g: quantize_int4_groups(w, g))
        packed, scale, offset = round_(weight, hessian, group)
        if awq and hessian is not None and isinstance(module, nn.Linear):
            columns = awq_scales(weight, hessian, group)
            scaled = round_(weight.detach().float() * columns,
                            hessian / torch.outer(columns, columns).to(hessian.dtype), group)  # inputs x / s
            # the scales were searched for round-to-nearest; GPTQ's rounding of the scaled weight
            # is kept only where it does better on this layer's inputs than GPTQ's of the plain one
            if _output_error(weight, hessian, dequantize(*scaled, 4, torch.float32) / columns) < \
                    _output_error(weight, hessian, dequantize(packed, scale, offset, 4, torch.float32)):
                (packed, scale, offset), input_scale = scaled, 1.0 / columns  # fp32: the rounding assumed it exact
    else:
        packed, scale = quantize_int8_rows(weight)
    if isinstance(module, nn.Embedding):
        new = QuantEmbedding(module.num_embeddings, module.embedding_dim, bits, packed, scale, offset,
                             module.padding_idx, weight.dtype)
    else:
        bias = module.bias.detach() if module.bias is not None else None
        new = QuantLinear(module.in_features, module.out_features, bits, packed, scale, offset, bias, input_scale)
    replace_module(model, name, new)


def _quantize_modules(model: Any, chosen: list[tuple[str, Any]], bits: Mapping[str, int], group: int,
                      options: Mapping[str, Any], context: ApplyContext | None) -> None:
    """Quantize each chosen module to its ``bits``; with calibration inputs, the int4 Linears
    are quantized layer by layer on their inputs' statistics (:func:`layerwise_hessians`):
    GPTQ-rounded with ``method=gptq``, and AWQ-scaled first with ``awq=true``."""
    done: set[str] = set()
    calibration = list(context.calibration or []) if context is not None else []
    gptq, awq = options.get("method", "gptq") == "gptq", bool(options.get("awq"))
    if awq and not calibration:
        raise UsageError("quantize:awq=true needs calibration inputs to search its scales")
    if (gptq or awq) and calibration:
        linears = [(n, m) for n, m in chosen if bits[n] == 4 and isinstance(m, nn.Linear)]
        if linears:
            progress = context.progress if context is not None else None
            if progress:
                how = " + ".join(x for x, on in (("AWQ scales", awq), ("GPTQ", gptq)) if on)
                progress(f"  {how}: collecting input statistics of {len(linears)} Linear layers, layer by layer")
            by_name = dict(linears)
            for hessians in layerwise_hessians(model, linears, calibration, progress):
                for name in list(hessians):
                    _quantize_module(model, name, by_name[name], 4, group, hessians.pop(name), gptq=gptq, awq=awq)
                    done.add(name)
    for name, module in chosen:
        if name not in done:
            _quantize_module(model, name, module, bits[name], group)


def _flatten_without_copies(quantizer: Any) -> None:
    """Make ``save_pretrained`` of a torchao-quantized model write the quantized tensors' own
    data. Stock saving flattens them with torchao's ``flatten_tensor_state_dict``, which
    clones every one: for a moment the whole quantized model twice (0.8 GB more of a 0.9 B
    decoder's int8). Here each tensor is flattened alone and its parts are the tensor's own
    (a clone stays where a part is not found by name, or shares memory with one before it,
    which safetensors refuses); the file is the same."""
    try:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    except ImportError:  # an older torchao: stock saving as it is
        return

    def get_state_dict_and_metadata(model: Any) -> tuple[dict[str, Any], dict[str, str]]:
        data: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        names: list[str] = []
        seen: set[int] = set()  # storages already handed over
        for name, tensor in model.state_dict().items():
            flat, meta = flatten_tensor_state_dict({name: tensor})
            names += json.loads(meta.pop("tensor_names"))
            metadata.update(meta)
            prefix = "{}._{}_".format(*name.rsplit(".", 1)) if "." in name else None
            for key, value in flat.items():
                own = getattr(tensor, key[len(prefix):], None) if prefix and key.startswith(prefix) else None
                if isinstance(own, torch.Tensor) and own.dtype == value.dtype and own.shape == value.shape \
                        and own.is_contiguous() and own.untyped_storage().data_ptr() not in seen:
                    value = own.detach()
                if isinstance(value, torch.Tensor) and value.numel():
                    seen.add(value.untyped_storage().data_ptr())
                data[key] = value
        metadata["tensor_names"] = json.dumps(names)
        return data, metadata

    quantizer.get_state_dict_and_metadata = get_state_dict_and_metadata


# ---------------------------------------------------------------------------------------------
# The plugin


def _group_size(options: Mapping[str, Any]) -> int:
    return options.get("group_size") or 32


def _embeddings(options: Mapping[str, Any]) -> bool:
    return options.get("embeddings") is not False


def _head(options: Mapping[str, Any]) -> bool:
    return options.get("head") is True


def _numel(header: dict[str, Any], name: str) -> int:
    """Weights in quantized module ``name`` of an int4-format file's header (its packed codes
    hold two per byte at 4 bits, one at 8)."""
    info = header[f"{name}.qdata"]
    count = 1
    for dim in info["shape"]:
        count *= dim
    return count * 2 if info["dtype"] == "U8" else count


def _int4_bits(options: Mapping[str, Any]) -> float:
    """Stored bits per int4 weight at the options' group size (scale and offset included)."""
    return Quantize.bits_per_weight({**options, "scheme": "int4"}, 0)


def _mixed_bits(options: Mapping[str, Any]) -> float:
    return float(options.get("bits") or 6.5)


#: Calibration batches the sensitivity of each module is measured on (scheme=mixed).
SENSITIVITY_BATCHES = 2

#: tokens of edgepack's calibration set at the longest sequence length (16 texts × 128)
CALIBRATION_TOKENS = 16 * 128

#: what importing torchao's quantization adds to a process (measured 92 MB on torchao 0.18)
TORCHAO_IMPORT_BYTES = 100 * 2**20


def allocate(modules: list[tuple[str, Any]], eligible: Sequence[str], sensitivity: Mapping[str, float],
             bits: float, int4_bits: float) -> tuple[set[str], float]:
    """scheme=mixed's allocation: from all int8, the ``eligible`` modules that lose least per
    stored bit saved go to int4 (at ``int4_bits`` per weight) until the average stored bits per
    weight is at most ``bits``. Returns (the int4 modules, the average reached)."""
    high = {n: Quantize.bits_per_weight({"scheme": "int8"}, m.weight.shape[1]) for n, m in modules}
    sizes = {n: m.weight.numel() for n, m in modules}
    total = sum(sizes.values()) or 1
    stored = sum(sizes[n] * high[n] for n in sizes)
    to_int4: set[str] = set()
    for name in sorted(eligible, key=lambda n: (sensitivity[n] / (sizes[n] * (high[n] - int4_bits)), n)):
        if stored <= bits * total:
            break
        to_int4.add(name)
        stored -= sizes[name] * (high[name] - int4_bits)
    return to_int4, stored / total


#: Version of the sensitivity measurement: part of the cache key.
SENSITIVITY_VERSION = "edgepack-sensitivity/1"


def sensitivity_cache_dir() -> Path:
    """Where measured sensitivities are kept: ``$EDGEPACK_CACHE_DIR/sensitivity``, else
    ``$XDG_CACHE_HOME/edgepack/sensitivity`` (``~/.cache/edgepack/sensitivity``)."""
    import os

    root = os.environ.get("EDGEPACK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "edgepack")
    return Path(root) / "sensitivity"


def sensitivity_key(model: Any, modules: list[tuple[str, Any]], group_size: int,
                    calibration: list[dict[str, Any]]) -> str:
    """sha256 of what the sensitivities depend on: the measurement's version, the group size,
    the modules measured, every tensor of the model and every calibration tensor."""
    import hashlib

    digest = hashlib.sha256(f"{SENSITIVITY_VERSION}|{group_size}|{[n for n, _ in modules]}".encode())

    def add(name: str, tensor: Any) -> None:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")

    for name, tensor in model.state_dict().items():
        add(name, tensor)
    for i, batch in enumerate(calibration):
        for key in sorted(batch):
            add(f"calibration[{i}].{key}", batch[key])
    return digest.hexdigest()


def cached_sensitivities(model: Any, modules: list[tuple[str, Any]], group_size: int,
                         calibration: list[dict[str, Any]], progress: Any = None) -> dict[str, float]:
    """:func:`module_sensitivities`, kept on disk (:func:`sensitivity_cache_dir`) under
    :func:`sensitivity_key`: measured once per model, calibration set and group size. A cache
    file that is unreadable or does not hold a finite value for every module is measured anew;
    one that cannot be written is no error."""
    import math
    import os
    import tempfile

    key = sensitivity_key(model, modules, group_size, calibration)
    file = sensitivity_cache_dir() / f"{key}.json"
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and all(isinstance(cached.get(n), float) and math.isfinite(cached[n])
                                            for n, _ in modules):
            return {n: cached[n] for n, _ in modules}
    except (OSError, ValueError):
        pass
    result = module_sensitivities(model, modules, group_size, calibration, progress)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sensitivity-", dir=file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(result, handle, sort_keys=True)
        os.replace(tmp, file)
    except OSError:
        pass
    return result


def module_sensitivities(model: Any, modules: list[tuple[str, Any]], group_size: int,
                         calibration: list[dict[str, Any]], progress: Any = None) -> dict[str, float]:
    """Each module's sensitivity to int4: the relative squared error of the model's output
    (logits, or the last hidden state) on ``calibration`` when that module alone has its
    weight rounded to int4 (group-wise, round to nearest), every other module as it is.
    ``progress`` gets a line every few seconds: module i of n, elapsed and remaining."""
    import time

    trimmed = []
    for batch in calibration:  # padding to the calibration length costs time and tells nothing
        mask = batch.get("attention_mask")
        length = int(mask.sum(dim=1).max()) if mask is not None and mask.dim() == 2 else None
        trimmed.append({k: v[:, :length] if length and getattr(v, "dim", lambda: 0)() == 2 else v
                        for k, v in batch.items()})

    def outputs() -> list[Any]:
        with torch.inference_mode():
            results = []
            for batch in trimmed:
                out = model(**batch)
                results.append((out.logits if getattr(out, "logits", None) is not None else out[0]).float())
            return results

    # 16-bit weights (after precision) are measured in fp32: CPUs without native bf16 run bf16
    # matmuls many times slower, and the casts there and back are exact
    stored = {(module, kind, key): tensor.dtype for module in model.modules()
              for kind in ("_parameters", "_buffers") for key, tensor in getattr(module, kind).items()
              if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32}
    lowered = bool(stored)
    if lowered:
        model.float()
    try:
        reference = outputs()
        norm = sum(float((r ** 2).sum()) for r in reference) or 1.0
        result = {}
        started = last = time.monotonic()
        for index, (name, module) in enumerate(modules):
            now = time.monotonic()
            if index == 1:
                warm = now  # the first module pays one-time costs: the rate is taken after it
            if progress is not None and index > 1 and now - last >= 3:
                last = now
                left = (now - warm) / (index - 1) * (len(modules) - index)
                progress(f"  sensitivity: module {index + 1} of {len(modules)} ({now - started:.0f} s, "
                         f"about {left:.0f} s left)")
            original = module.weight.data
            packed, scale, offset = quantize_int4_groups(original, group_size)
            module.weight.data = dequantize(packed, scale, offset, 4, original.dtype)
            try:
                result[name] = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs(), reference)) / norm
            finally:
                module.weight.data = original
    finally:
        for (module, kind, key), dtype in stored.items():  # each tensor back in its own dtype
            tensor = getattr(module, kind)[key]
            if kind == "_parameters":
                tensor.data = tensor.data.to(dtype)
            else:
                module._buffers[key] = tensor.to(dtype)
    return result


class Quantize(Compressor):
    """int8 / int8-dynamic / int4 quantization of Linear and Embedding weights."""

    name = "quantize"
    kind = "quantize"
    version = edgepack.__version__
    description = "int8 (torchao, stock-loadable), int8-dynamic, or group-wise int4 weights"
    options = (
        Option("scheme", str, ("int8", "int8-dynamic", "int4", "mixed"), "int8",
               help="storage scheme (mixed: int8 and int4 modules, chosen by measured sensitivity)"),
        Option("group_size", int, (16, 32, 64, 128), None, help="int4: columns sharing a scale (default 32)"),
        Option("embeddings", bool, (), None, help="quantize embedding tables too (default true)"),
        Option("keep", list, (), None, help="module-name fragments kept unquantized, as keep=[layer.0.,layer.5.]"),
        Option("method", str, ("gptq", "rtn"), None,
               help="int4 rounding: gptq (error-compensating, uses calibration inputs; default) or rtn"),
        Option("head", bool, (), None,
               help="quantize the output head too, int8 per channel whatever the scheme (decoders with a "
                    "head of their own; not int8-dynamic; default false)"),
        Option("compute", str, ("auto", "input"), None,
               help="matmul dtype: auto = bf16 on CPUs with native bf16 (default), input = the activations' dtype"),
        Option("bits", float, (), None, minimum=4.25, maximum=9.0,
               help="mixed: average stored bits per quantized weight, scales included (default 6.5)"),
        Option("awq", bool, (), None,
               help="int4 and mixed: activation-aware per-channel scales (AWQ), searched on the calibration "
                    "inputs, before the rounding (default false)"),
    )

    # -- checks and planning ---------------------------------------------------------------

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """One quantize step; int8-dynamic needs int8 compute; precision must come first."""
        if any(step.plugin == self.name for step in previous):
            return "quantize is already in the plan"
        for step in previous:
            if step.plugin == "prune" and float(step.options.get("heads") or 0) > 0 and options["scheme"] not in ("int4", "mixed"):
                # BERT-style head pruning cannot be written into a stock config, so prune owns the
                # weight file; the torchao schemes need stock saving.
                return "int8 schemes cannot follow prune:heads (both would own the weight file); use scheme=int4 or mixed"
            if step.plugin == "sparsify":
                return "quantize cannot follow sparsify: no storage format combines both yet"
        if _head(options) and options["scheme"] == "int8-dynamic":
            return "head=true needs scheme=int8, int4 or mixed (the head decodes in the int8 weight-only kernel)"
        if options.get("awq") and options["scheme"] not in ("int4", "mixed"):
            return "awq=true scales int4 weights: it needs scheme=int4 or mixed"
        if options.get("bits") is not None and options["scheme"] != "mixed":
            return "bits= sets the average of scheme=mixed; other schemes have fixed bits"
        if options["scheme"] == "mixed" and _mixed_bits(options) < _int4_bits(options):
            return (f"bits={_mixed_bits(options)} is below int4's {_int4_bits(options):.2f} "
                    f"bits at group_size={_group_size(options)}")
        if options["scheme"] == "int8-dynamic" and "int8" not in probe.capabilities:
            return f"int8-dynamic needs int8 compute, which target {probe.target} lacks"
        return super().check(options, probe, previous)

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """int8; int8-dynamic where int8 compute exists; mixed at 7 and 6 bits; int4 at group
        sizes 32 and 128; for decoders with a head of their own, int8 and int4 g32 with the head
        quantized too."""
        sets: list[dict[str, Any]] = [{"scheme": "int8"}]
        if "int8" in probe.capabilities:
            sets.append({"scheme": "int8-dynamic"})
        sets += [{"scheme": "mixed", "bits": 7.0}, {"scheme": "mixed", "bits": 6.0},
                 {"scheme": "int4", "group_size": 32}, {"scheme": "int4", "group_size": 128}]
        if facts.is_decoder and facts.parameters_by_kind.get("other", 0) >= facts.vocab_size * facts.hidden_size:
            # an untied head of its own
            sets += [{"scheme": "int8", "head": True}, {"scheme": "int4", "group_size": 32, "head": True}]
        return sets

    def _kinds(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        kinds = ("linear", "embedding") if _embeddings(options) else ("linear",)
        return kinds + (("other",) if _head(options) else ())  # output heads are counted as "other"

    @staticmethod
    def bits_per_weight(options: Mapping[str, Any], row_width: int) -> float:
        """Stored bits per weight, scales and offsets included, for rows of ``row_width``."""
        if options["scheme"] == "int4":
            return 4 + 32 / _group_size(options)  # fp16 scale + fp16 offset per group
        if options["scheme"] == "mixed":
            return _mixed_bits(options)  # the allocation's upper bound
        return 8 + (32 + 8) / row_width  # fp32 scale and int8 zero point per row

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """Linear (and embedding) groups at the scheme's bits; kept modules are not modelled."""
        bits = self.bits_per_weight(options, footprint.row_width)
        kinds = self._kinds(options)
        if footprint.facts is not None and footprint.facts.model_type in CONV1D_MODEL_TYPES:
            kinds = tuple(k for k in kinds if k != "linear")  # their projections are Conv1D: kept as they are
        if "executorch" in target.capabilities and options["scheme"] == "int4" and "embedding" in kinds:
            # a program's embeddings are int8 rows whatever the Linear layers' scheme (_apply_program)
            footprint = footprint.with_groups(("embedding",), self.bits_per_weight({"scheme": "int8"}, footprint.row_width),
                                              "int8 embedding rows (ExecuTorch)")
            kinds = tuple(k for k in kinds if k != "embedding")
        if options["scheme"] == "int4" and _head(options):  # the head (counted as "other") is int8 rows
            footprint = footprint.with_groups(("other",), self.bits_per_weight({"scheme": "int8"}, footprint.row_width),
                                              "int8 output head")
            kinds = tuple(k for k in kinds if k != "other")
        result = footprint.with_groups(kinds, bits, f"{options['scheme']} weights ({bits:.2f} bits)")
        act_bytes = footprint.activation_bits / 8
        if options["scheme"] == "int8-dynamic" and "int8-gemm" in target.capabilities:
            # torch._int_mm needs no dequantized weight: what remains are the activations'
            # codes, the int32 results and oneDNN's own buffers (fitted as above, on an
            # avx512_vnni Xeon at MiniLM's default workload only: MiniLM predicted
            # 27.4 and 27.6 MB against 27.0 and 27.3 MB measured, fp32 and bf16)
            scratch = 1.0 if act_bytes >= 4 else 2.0
        elif options["scheme"] == "int8-dynamic":
            # QuantLinear._forward_dynamic: the int8 weight as fp32 (bf16 on CPUs with native
            # bf16) for one matmul; 16-bit activations also get fp32 codes and fp32 results
            # beside them (measured on MiniLM, fp32 and bf16, under the fixed-allocator probe)
            scratch = 4.0 if act_bytes >= 4 else 6.0
        elif options["scheme"] in ("int4", "mixed"):
            # unpacked codes and the weight dequantized for one matmul (in place); refitted as above
            scratch = act_bytes + 1
        else:
            # the weight dequantized for one matmul (and, for fp32 activations on a native-bf16
            # CPU, its bf16 copy); 16-bit activations dequantize straight into their dtype
            scratch = act_bytes + 2 if act_bytes > 2 else act_bytes
        if options["scheme"] != "int8-dynamic" and target.target == "cpu" and scratch >= result.weight_scratch:
            # QuantLinear on a CPU dequantizes large weights a slice of rows at a time (CHUNKS)
            result = dataclasses.replace(result, scratch_chunks=dataclasses.replace(CHUNKS, scratch=scratch))
        return dataclasses.replace(result, weight_scratch=max(result.weight_scratch, scratch))

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """Priors from MiniLM measurements (1 - mean cosine): int8 6.5e-4, int8-dynamic 3.5e-3,
        int4 at group 32 about 3e-2, growing with the group size; a quantized head adds 1e-2."""
        scheme = options["scheme"]
        # the head decides greedy tokens: quantizing it ranks each scheme after itself without
        head = 0.01 if _head(options) else 0.0
        if scheme == "int8":
            return 0.0007 + head
        if scheme == "int8-dynamic":
            return 0.004
        int4 = 0.03 * (_group_size(options) / 32) ** 0.5
        if scheme == "mixed":
            # the least sensitive bytes go to int4 first, so the loss grows faster than the bits
            # saved: between int8's and int4's priors, quadratic in the share of bits saved
            full, low = 8.1, _int4_bits(options)
            share = min(1.0, max(0.0, (full - _mixed_bits(options)) / (full - low)))
            return 0.0007 + (int4 - 0.0007) * share ** 2 + head
        return int4 + head

    # -- apply, save, restore --------------------------------------------------------------

    def pack_scratch_bytes(self, facts: ModelFacts, options: Mapping[str, Any]) -> int:
        """int8 loads torchao; GPTQ holds one layer's float64 ``XᵀX`` at a time
        (:func:`layerwise_hessians`); mixed also holds two calibration batches' outputs
        (reference and trial)."""
        scratch = super().pack_scratch_bytes(facts, options)
        if options["scheme"] in ("int8", "int8-dynamic"):
            scratch += TORCHAO_IMPORT_BYTES
        if options["scheme"] in ("int4", "mixed") and options.get("method", "gptq") == "gptq" and facts.linear_shapes:
            # one layer's float64 statistics at a time, GPTQ's three fp32 working copies of the
            # widest one's (_upper_cholesky_of_inverse), and the calibration hidden states in
            # and out of a layer
            stack = [i for o, i in facts.linear_shapes if o != facts.vocab_size]
            scratch += (sum(8 * i * i for i in stack) // max(1, facts.num_layers)
                        + 3 * 4 * max(stack or [facts.hidden_size]) ** 2
                        + 2 * CALIBRATION_TOKENS * facts.hidden_size * 4)
        if options["scheme"] == "mixed":
            width = facts.vocab_size if facts.is_decoder else facts.hidden_size
            scratch += 2 * SENSITIVITY_BATCHES * 8 * 128 * width * 4
        return scratch

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Quantize the selected modules in place."""
        keep = list(options.get("keep") or ())
        chosen = _targets(model, _embeddings(options), keep, head=_head(options))
        if not chosen:
            raise UsageError("quantize found no Linear or Embedding modules to quantize (check keep=)")
        # a precision step just before left the Linear weights to cast (cast_deferred): each is
        # cast as it is quantized (or as it first runs), and those left unquantized at the end
        probe = getattr(context, "probe", None)
        try:
            if probe is not None and "executorch" in probe.capabilities:  # a program: what its backend runs
                cast_deferred(model)  # before torchao's program configs see the weights
                return self._apply_program(model, chosen, options)
            if options["scheme"] == "int4":
                return self._apply_int4(model, chosen, options, context)
            if options["scheme"] == "mixed":
                return self._apply_mixed(model, chosen, options, context)
            return self._apply_torchao(model, chosen, options)
        finally:
            cast_deferred(model)

    def _apply_torchao(self, model: Any, chosen: list[tuple[str, Any]], options: Mapping[str, Any]) -> Any:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_,
        )
        from transformers import TorchAoConfig
        from transformers.quantizers.auto import AutoHfQuantizer

        ids = {id(m) for _, m in chosen}

        def chosen_as(kind: type) -> Callable[[Any, str], bool]:
            def chosen(module: Any, fqn: str) -> bool:  # torchao quantizes the module right after
                if id(module) in ids and isinstance(module, kind):
                    cast_deferred(module)
                    return True
                return False
            return chosen

        # set_inductor_config=False: quantizing must not change torch.compile's global settings
        weight_only = Int8WeightOnlyConfig(set_inductor_config=False)
        linear_cfg = (Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
                      if options["scheme"] == "int8-dynamic" else weight_only)
        quantize_(model, linear_cfg, filter_fn=chosen_as(nn.Linear))
        quantize_(model, weight_only, filter_fn=chosen_as(nn.Embedding))
        # Stock save_pretrained serialises torchao tensors only with a quantizer attached.
        qconfig = TorchAoConfig(linear_cfg, include_input_output_embeddings=_embeddings(options) or _head(options))
        model.config.quantization_config = qconfig
        model.hf_quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        _flatten_without_copies(model.hf_quantizer)
        return model

    def _apply_program(self, model: Any, chosen: list[tuple[str, Any]], options: Mapping[str, Any]) -> Any:
        """The forms an ExecuTorch program runs (the executorch target exports the result):
        Linear layers through torchao's ExecuTorch-ready ``Int8DynamicActivationIntxWeightConfig``
        (int8 weights per output channel, or int4 in groups of ``group_size``; activations
        quantized per token at run time), which XNNPACK lowers to its dynamically quantized
        kernels; Embeddings as int8 rows with one scale each, looked up by ExecuTorch's
        ``quantized_decomposed::embedding_byte``. Rounding is to nearest."""
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        importlib.import_module("executorch.exir.passes._quant_patterns_and_replacements")  # registers embedding_byte

        int4 = options["scheme"] == "int4"
        group = _group_size(options)
        linears = {id(m) for _, m in chosen if isinstance(m, nn.Linear) and (not int4 or m.weight.shape[1] % group == 0)}
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4 if int4 else torch.int8,
            weight_granularity=PerGroup(group) if int4 else PerAxis(0))
        quantize_(model, config, filter_fn=lambda m, fqn: id(m) in linears)
        _define_modules()
        for name, module in chosen:
            if isinstance(module, nn.Embedding):
                qdata, scale = quantize_int8_rows(module.weight.detach().float())
                replace_module(model, name, ProgramEmbedding(qdata, scale.reshape(-1)))
        return model

    def _apply_int4(self, model: Any, chosen: list[tuple[str, Any]], options: Mapping[str, Any],
                    context: ApplyContext | None) -> Any:
        """int4 in groups (GPTQ for Linears with calibration inputs); with ``head=true`` the
        output head int8 per row. Modules whose width is not a multiple of the group stay as
        they are."""
        _define_modules()
        group = _group_size(options)
        head = _output_head(model) if _head(options) else None
        chosen = [(n, m) for n, m in chosen if m is head or m.weight.shape[1] % group == 0]
        _quantize_modules(model, chosen, {n: 8 if m is head else 4 for n, m in chosen}, group, options, context)
        return model

    def _apply_mixed(self, model: Any, chosen: list[tuple[str, Any]], options: Mapping[str, Any],
                     context: ApplyContext | None) -> Any:
        """Measure each module's sensitivity, allocate int4 to the cheapest bytes until the
        average is at most ``bits``, then quantize: int4 (GPTQ for Linears with calibration
        inputs) and int8 per row. With ``head=true`` the output head is int8 per row, counted
        in the average."""
        _define_modules()
        group = _group_size(options)
        target = _mixed_bits(options)
        low = _int4_bits(options)
        calibration = list(context.calibration or [])[:SENSITIVITY_BATCHES] if context is not None else []
        if not calibration:
            raise UsageError("quantize:scheme=mixed needs calibration inputs to measure sensitivity")
        head = _output_head(model) if _head(options) else None
        eligible = [(n, m) for n, m in chosen if m is not head and m.weight.shape[1] % group == 0]
        if context is not None and context.progress:
            context.progress(f"  measuring the sensitivity of {len(eligible)} modules to int4 on "
                             f"{len(calibration)} calibration batch(es)")
        sensitivity = cached_sensitivities(model, eligible, group, calibration,
                                           context.progress if context is not None else None)
        to_int4, reached = allocate(chosen, [n for n, _ in eligible], sensitivity, target, low)
        if reached > target:
            raise UsageError(f"quantize:scheme=mixed,bits={target}: {reached:.2f} bits per weight is the least this "
                             f"model reaches (modules whose width is not a multiple of group_size={group} stay int8"
                             + (", and so does the output head with head=true)" if head is not None else ")"))
        bits = {n: 4 if n in to_int4 else 8 for n, _ in chosen}
        _quantize_modules(model, chosen, bits, group, options, context)
        model._edgepack_allocation = {n: {"bits": bits[n], "sensitivity": float(f"{sensitivity[n]:.4g}") if n in sensitivity else None}
                                      for n, _ in chosen}
        return model

    @staticmethod
    def allocation(model_dir: Path) -> dict[str, dict[str, Any]]:
        """A mixed bundle's per-module formats: ``{module: {"bits", "sensitivity"}}`` (empty
        for other schemes)."""
        from edgepack.model import read_format_metadata, safetensors_saved

        file = Path(model_dir) / INT4_FILE
        if not safetensors_saved(file):
            return {}
        quantized = json.loads(read_format_metadata(file, INT4_FORMAT)["quantized"])
        return {name: {"bits": info.get("bits", 4), "sensitivity": info.get("sensitivity")}
                for name, info in quantized.items() if "sensitivity" in info}

    def details(self, model_dir: Path, options: Mapping[str, Any]) -> dict[str, Any] | None:
        """scheme=mixed: the allocation, one entry per quantized module: its format (``int4``
        or ``int8``), the bytes it is stored in (codes, scales and offsets, read from the
        file's header) and its measured sensitivity."""
        from edgepack.model import safetensors_saved, stored_layout

        if options["scheme"] != "mixed" or not safetensors_saved(Path(model_dir) / INT4_FILE):
            return None  # (a bundle split across devices has its weights in its rank directories)
        header = stored_layout(Path(model_dir) / INT4_FILE)

        def stored(name: str) -> int:
            spans = [header[f"{name}.{part}"]["data_offsets"] for part in ("qdata", "scale", "offset")
                     if f"{name}.{part}" in header]
            return sum(end - start for start, end in spans)

        modules = {name: {"format": f"int{info['bits']}", "bytes": stored(name), "sensitivity": info["sensitivity"]}
                   for name, info in self.allocation(model_dir).items()}
        return {"bits": round(8 * sum(m["bytes"] for m in modules.values())
                              / max(1, sum(_numel(header, n) for n in modules)), 3),
                "modules": modules}

    def writes_own_file(self, options: Mapping[str, Any]) -> bool:
        """No: int4 and mixed write ``model.int4.safetensors`` in shards of ``--shard-size``, as
        stock saving (which the int8 schemes use) does."""
        return False

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """int4 and mixed: write config.json and ``model.int4.safetensors`` (packed nibbles and
        int8 rows, their scales and offsets, other tensors as they are; each module's bits, and
        for mixed its sensitivity, in the metadata), in shards with an index when larger than
        ``--shard-size``. int8 schemes: stock saving (returns False)."""
        _define_modules()
        if options["scheme"] not in ("int4", "mixed"):
            return False
        allocation = getattr(model, "_edgepack_allocation", {})
        from edgepack.model import save_safetensors

        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        quantized = {}
        for name, module in model.named_modules():
            if isinstance(module, (QuantLinear, QuantEmbedding)):
                quantized[name] = {"kind": "embedding" if isinstance(module, QuantEmbedding) else "linear",
                                   "shape": [module.num_embeddings, module.embedding_dim] if isinstance(module, QuantEmbedding)
                                   else [module.out_features, module.in_features],
                                   "padding_idx": getattr(module, "padding_idx", None),
                                   "bits": module.bits, **({"sensitivity": allocation[name]["sensitivity"]}
                                                           if name in allocation else {})}
        tensors = unique_tensors(model)
        metadata = {
            "format": INT4_FORMAT,
            "group_size": str(_group_size(options)),
            "quantized": json.dumps(quantized, sort_keys=True),
            "dtype": float_dtype_name(model),
        }
        save_safetensors(tensors, model_dir / INT4_FILE, metadata=metadata, sharded=True)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild an int4 bundle's model: skeleton without weights, then packed tensors."""
        _define_modules()
        from edgepack.model import assign_weights, empty_model, load_safetensors, read_format_metadata

        file = model_dir / INT4_FILE
        meta = read_format_metadata(file, INT4_FORMAT)
        quantized = json.loads(meta["quantized"])
        dtype = getattr(torch, meta.get("dtype", "float32"))
        model = empty_model(model_dir, dtype)
        tensors = load_safetensors(file, device=device)
        for name, info in quantized.items():
            p = f"{name}." if name else ""
            bits = info.get("bits", 4)
            if bits not in (4, 8):
                raise UsageError(f"{file}: module {name!r} has {bits} bits; this edgepack reads 4 and 8")
            q, s, o = tensors.pop(p + "qdata"), tensors.pop(p + "scale"), tensors.pop(p + "offset", None)
            if info["kind"] == "embedding":
                new = QuantEmbedding(info["shape"][0], info["shape"][1], bits, q, s, o, info["padding_idx"], dtype)
            else:
                new = QuantLinear(info["shape"][1], info["shape"][0], bits, q, s, o, tensors.pop(p + "bias", None),
                                  tensors.pop(p + "input_scale", None))
            replace_module(model, name, new)
        return assign_weights(model, tensors, file)

    def prepare(self, model: Any, options: Mapping[str, Any], device: str, probe: Probe | None = None) -> Any:
        """After loading: swap torchao's int8 weight-only tensors for :class:`QuantEmbedding`
        (only the rows looked up are dequantized; torchao dequantizes the whole table per call)
        and :class:`QuantLinear`, sharing the same int8 data (on CPU, int8-dynamic ones quantize
        their activations per row, as torchao does; elsewhere, and for torchao int8-dynamic
        weights of another kind, torchao's int8 x int8 kernels stay: they are fast on GPUs). With ``compute=auto`` on a CPU with native bf16 (AMX,
        avx512_bf16), matmuls run in bf16: dequantizing to bf16 and a bf16 matmul cost less than
        the fp32 matmul the weights came from. On CPUs where torch's fused weight-only kernels
        are fast (:func:`fused_kernels_available`), int8 decoding steps run in
        ``_weight_int8pack_mm`` and the int4 Linears of decoders are repacked for
        ``_weight_int4pack_mm_for_cpu``; where the probe measured ``torch._int_mm`` fast
        (``int8-gemm``), int8-dynamic Linears run every call in it (see the module docstring)."""
        _define_modules()
        if options["scheme"] not in ("int4", "mixed"):
            model = self._swap_torchao(model, options, device)
        if (options.get("compute") or "auto") == "auto" and device == "cpu" and probe is not None \
                and "bf16-native" in probe.capabilities:
            for module in model.modules():
                if isinstance(module, QuantLinear):
                    module.compute_dtype = torch.bfloat16
        if device == "cpu" and probe is not None and "int8-gemm" in probe.capabilities:
            for module in model.modules():
                if isinstance(module, QuantLinear) and module.dynamic:
                    module.int_mm = True
        if device == "cpu" and fused_kernels_available():
            decoder = bool(getattr(model, "can_generate", lambda: False)())
            for module in model.modules():
                if isinstance(module, QuantLinear) and module.bits == 8:
                    if not module.int_mm:  # int8-dynamic's int_mm path runs every call itself
                        module.use_int8_kernel()
                elif isinstance(module, QuantLinear) and decoder:
                    # decoding is a long run of one-row calls, where the fused kernel reads 4-bit
                    # weights in place of dequantizing them; encoders' large batches keep the GEMM
                    module.use_int4_kernel()
        return model

    def _swap_torchao(self, model: Any, options: Mapping[str, Any], device: str = "cpu") -> Any:
        try:
            from torchao.quantization import Int8Tensor
        except ImportError:
            return model
        for name, module in list(model.named_modules()):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Int8Tensor):
                continue
            qdata, scale = weight.qdata, weight.scale.reshape(-1, 1).float()
            if isinstance(module, nn.Embedding):
                new = QuantEmbedding(module.num_embeddings, module.embedding_dim, 8, qdata, scale, None,
                                     module.padding_idx, weight.dtype)
            elif isinstance(module, nn.Linear) and (
                    options["scheme"] == "int8" or (device == "cpu" and _dynamic_rows(weight))):
                bias = module.bias.detach() if module.bias is not None else None
                new = QuantLinear(module.in_features, module.out_features, 8, qdata, scale, None, bias)
                new.dynamic = options["scheme"] == "int8-dynamic"
            else:
                continue
            replace_module(model, name, new)
        return model


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``quantize`` compressor."""
    register(Quantize)


@edgepack.hookimpl
def edgepack_register_commands(cli):
    """``edgepack sensitivity MODEL``: the per-module sensitivity ranking and the allocations
    scheme=mixed would make, before anything is packed."""
    import click

    @cli.command()
    @click.argument("model")
    @click.option("--bits", "levels", type=click.FloatRange(4.25, 9.0), multiple=True,
                  help="Average stored bits of a mixed allocation to show; repeat.  [default: 7.0 and 6.0]")
    @click.option("--group-size", type=click.Choice(["16", "32", "64", "128"]), default="32", show_default=True,
                  help="int4 group size.")
    @click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
                  help="Calibration sequence length.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")
    def sensitivity(model: str, levels: tuple[float, ...], group_size: str, seq_len: int, as_json: bool) -> None:
        """Rank MODEL's Linear and Embedding modules by their sensitivity to int4, and show
        which go to int4 in quantize:scheme=mixed at each --bits.

        The sensitivity is the model's relative output error on the calibration inputs with
        that module alone rounded to int4 (cached: measured once per model and calibration set).

        \b
        Example:
          edgepack sensitivity ./all-MiniLM-L6-v2 --bits 7 --bits 6
        """
        from edgepack.environment import progress_printer
        from edgepack.memory import format_size
        from edgepack.model import ModelSource
        from edgepack.pipeline import _calibration_batches

        progress = progress_printer(as_json)
        group = int(group_size)
        levels = levels or (7.0, 6.0)
        source = ModelSource.open(model)
        progress(f"loading weights of {source.path}")
        loaded = source.load()
        calibration = _calibration_batches(source.tokenizer(), seq_len, source.facts.task)[:SENSITIVITY_BATCHES]
        chosen = _targets(loaded, True, [])
        eligible = [(n, m) for n, m in chosen if m.weight.shape[1] % group == 0]
        progress(f"measuring the sensitivity of {len(eligible)} modules to int4 (cached after the first time)")
        measured = cached_sensitivities(loaded, eligible, group, calibration, progress)
        low = _int4_bits({"group_size": group})
        plans = {bits: allocate(chosen, [n for n, _ in eligible], measured, bits, low) for bits in levels}
        rows = [{"module": n, "shape": list(m.weight.shape), "params": m.weight.numel(),
                 "sensitivity": measured.get(n),
                 "formats": {str(b): ("int4" if n in plans[b][0] else "int8") for b in levels}}
                for n, m in sorted(chosen, key=lambda nm: -(measured.get(nm[0]) or 0))]
        if as_json:
            click.echo(json.dumps({"model": str(source.path), "group_size": group, "modules": rows,
                                   "allocations": {str(b): {"int4": sorted(plans[b][0]), "bits": round(plans[b][1], 3)}
                                                   for b in levels}}, sort_keys=True))
            return
        params = sum(r["params"] for r in rows)
        click.echo(f"{len(rows)} modules of {source.path.name}, most sensitive first (relative output error with "
                   f"that module alone at int4, group {group}):")
        header = "".join(f"{'bits=' + str(b):>10}" for b in levels)
        click.echo(f"  {'module':<48}{'params':>10}{'sensitivity':>13}{header}")
        for r in rows:
            formats = "".join(f"{r['formats'][str(b)]:>10}" for b in levels)
            shown = f"{r['sensitivity']:.3g}" if r["sensitivity"] is not None else "-"
            click.echo(f"  {r['module']:<48}{r['params']:>10}{shown:>13}{formats}")
        for b in levels:
            to_int4, reached = plans[b]
            click.echo(f"bits={b}: {len(to_int4)} of {len(rows)} modules int4, {reached:.2f} bits per weight, "
                       f"{format_size(int(reached * params / 8))} of quantized weights")
