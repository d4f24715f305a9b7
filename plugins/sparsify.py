"""``sparsify``: store sparse Linear weights compactly, as a bitmask plus the nonzero values.

Formats:

``bitmask``
    unstructured sparsity. Each Linear weight (embeddings are left dense) is stored as a packed
    bitmask (uint8, one bit per element, row by row, low bit first) and only its nonzero values,
    in the weight's dtype (fp32, or bf16/fp16 when ``precision`` came first). At density ``d``
    a weight of ``b``-bit values costs ``d*b + 1`` bits per element: 17 bits instead of 32 at
    50% sparsity in fp32.
``2:4``
    semi-structured sparsity: in every group of 4 consecutive input weights only the 2 largest
    magnitudes are kept. Needs the target capability ``2:4`` (NVIDIA compute capability 8.0 or
    later), where :meth:`Sparsify.prepare` hands the weights to
    ``torch.sparse.to_sparse_semi_structured`` for the sparse tensor-core kernels. It is stored
    in the same bitmask format (2:4 is 50% sparse).

Where the zeros come from: with ``sparsity=RATIO`` sparsify zeroes that fraction of each Linear
weight by magnitude itself, so it is useful alone. Without it, the zeros already in the weights
are stored (``prune:sparsity=...,method=...`` before it chose them); weights that hold no zeros
(no unstructured prune step before) are made 50% sparse by magnitude (:data:`DEFAULT_SPARSITY`).

Bundles: :meth:`Sparsify.save` writes config.json and ``model.sparse.safetensors`` (bitmasks,
values, and every other tensor as it is; JSON metadata in the header; in shards with an index
beyond pack's ``--shard-size``), and the manifest names this plugin as the loader. Saving
compresses every Linear before writing, so pack's memory estimate counts the whole file.

At run time (``runtime=compressed``, the default) each Linear keeps the compressed form and
expands its weight per call (:class:`SparseLinear`), so the weights take about their stored
bytes in memory too: that is what lets sparsify help a plan fit a memory budget. The price is a
fixed expansion cost per forward pass, whatever the batch: on MiniLM with 2 CPU threads about
25-30 ms (+30% at batch 32 x 32 tokens, 3.4x at batch 1). ``runtime=dense`` expands once at load
instead: dense speed, a smaller bundle, but no memory saved (the estimate says so).

Composition: ``precision`` before sparsify is fine (values are stored in the cast dtype).
``quantize`` writes its own weight format, which cannot hold the bitmask: ``check`` refuses
sparsify after quantize, and quantize after sparsify needs a combined format that does not exist
yet (quantize's own check should refuse it).
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import edgepack
from edgepack.environment import trim_heap
from edgepack.errors import UsageError
from edgepack.interfaces import ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe

SPARSE_FILE = "model.sparse.safetensors"
SPARSE_FORMAT = "edgepack.sparse/1"

#: Fraction zeroed by magnitude when neither ``sparsity=`` nor an earlier prune says otherwise.
DEFAULT_SPARSITY = 0.5
#: Below this fraction of exact zeros the Linear weights count as dense (no prune before).
ALREADY_SPARSE = 0.05

from edgepack.lazy import LazyModule
from edgepack.model import float_dtype_name, replace_module, safetensors_layout, shard_map, unique_tensors

# Imported on first use: registering the plugin must not import torch (fast --help).
torch = LazyModule("torch")
nn = LazyModule("torch.nn")


# ---------------------------------------------------------------------------------------------
# Bitmask arithmetic

_TABLES: dict[str, tuple[Any, Any, Any]] = {}


def _tables(device: Any) -> tuple[Any, Any, Any]:
    """Per-byte lookup tables on ``device``: shifts 0..7 (uint8), the population count of each
    byte value (int32 [256]), and the 1-based rank of each set bit among the set bits of its
    byte, with a large negative number for clear bits (int32 [256, 8])."""
    key = str(device)
    if key not in _TABLES:
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        bits = ((torch.arange(256, dtype=torch.int32, device=device).unsqueeze(-1) >> shifts.int()) & 1).bool()
        rank = torch.where(bits, torch.cumsum(bits.int(), 1, dtype=torch.int32),
                           torch.tensor(-(2**30), dtype=torch.int32, device=device))
        _TABLES[key] = (shifts, bits.sum(1, dtype=torch.int32), rank.to(torch.int32).contiguous())
    return _TABLES[key]


def pack_bitmask(mask: Any) -> Any:
    """bool [R, C] → uint8 [R, ceil(C/8)]: bit ``j`` of byte ``k`` is column ``8k + j``; the
    padding bits of the last byte of a row are 0."""
    rows, cols = mask.shape
    pad = (-cols) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(rows, pad)], dim=1)
    shifts = _tables(mask.device)[0]
    return (mask.reshape(rows, -1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: Any, cols: int) -> Any:
    """uint8 [R, ceil(C/8)] → bool [R, C]; the inverse of :func:`pack_bitmask`."""
    shifts = _tables(packed.device)[0]
    bits = ((packed.unsqueeze(-1) >> shifts) & 1).bool()
    return bits.reshape(packed.shape[0], -1)[:, :cols]


def compress(weight: Any) -> tuple[Any, Any]:
    """A 2-D weight as (packed bitmask of its nonzeros, the nonzero values in row-major order)."""
    w = weight.detach()
    mask = w != 0
    return pack_bitmask(mask), w[mask].contiguous()


def expand(bitmask: Any, values: Any, cols: int) -> Any:
    """The dense [R, C] weight from its bitmask and nonzero values.

    Vectorised without a serial scan over elements: the position of each set bit among the
    values is the number of set bits in the bytes before it (a cumulative sum over bytes, 8x
    shorter than the weight) plus its rank within its byte (a lookup table); clear bits index
    a zero put in front of the values (a copy of the nonzeros only, cheap next to the rest).
    """
    rows = bitmask.shape[0]
    padded_values = torch.cat([values.new_zeros(1), values])
    _, popcount, rank = _tables(bitmask.device)
    itype = torch.int32
    if bitmask.numel() * 8 >= 2**30:  # the int32 sentinel would no longer stay negative
        itype, popcount = torch.int64, popcount.long()
        rank = torch.where(rank < 0, torch.tensor(-(2**62), device=rank.device), rank.long())
    flat = bitmask.reshape(-1).to(itype)
    pop = popcount.index_select(0, flat)
    start = pop.cumsum(0, dtype=itype).sub_(pop)
    index = rank.index_select(0, flat).add_(start.unsqueeze(1)).clamp_(min=0)
    dense = padded_values.index_select(0, index.reshape(-1)).reshape(rows, -1)
    return dense if dense.shape[1] == cols else dense[:, :cols].contiguous()


def magnitude_mask(weight: Any, sparsity: float) -> Any:
    """bool mask keeping all but the ``round(sparsity * numel)`` smallest magnitudes (exactly
    that many are dropped, ties broken arbitrarily; existing zeros go first)."""
    flat = weight.detach().abs().reshape(-1)
    drop = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=weight.device)
    if drop > 0:
        keep[torch.topk(flat.float(), drop, largest=False, sorted=False).indices] = False
    return keep.reshape(weight.shape)


def two_four_mask(weight: Any) -> Any:
    """bool mask keeping, in every group of 4 consecutive input weights, the 2 largest magnitudes."""
    rows, cols = weight.shape
    groups = weight.detach().abs().float().reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# The run-time module


def _define_modules() -> None:
    """Define SparseLinear on first use (subclassing nn.Module needs torch)."""
    global SparseLinear, torch, nn
    if "SparseLinear" in globals():
        return
    import torch as real_torch

    # torch is loaded now: the lazy proxies (kept so that registering the plugin imports no
    # torch) cannot be traced by torch.compile (run/bench --compile)
    torch, nn = real_torch, real_torch.nn

    class SparseLinear(nn.Module):
        """A Linear whose weight stays compressed (bitmask + nonzero values); expanded per call.

        The expanded weight has the same bits as the dense weight it came from, so outputs equal a
        dense Linear's with that weight exactly. The buffers are the tensors as loaded (no copy is
        kept), so a memory-mapped bundle stays memory-mapped.
        """

        def __init__(self, in_features: int, out_features: int, bitmask: Any, values: Any,
                     bias: Any | None = None) -> None:
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("bitmask", bitmask)
            self.register_buffer("values", values)
            self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

        @property
        def weight(self) -> Any:
            """The dense weight (for code that reads ``linear.weight``); built on each access."""
            return expand(self.bitmask, self.values, self.in_features)

        @property
        def density(self) -> float:
            """Fraction of weight elements stored."""
            return self.values.numel() / (self.in_features * self.out_features)

        def forward(self, x: Any) -> Any:
            return nn.functional.linear(x, self.weight, self.bias)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.3f}"


def __getattr__(name: str) -> Any:
    if name in ('SparseLinear',):
        _define_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Module selection


def _targets(model: Any, two_four: bool) -> list[tuple[str, Any]]:
    """(name, Linear) of every Linear to sparsify: not the output head (edgepack's estimates
    count it as left alone, and pruning it hurts decoding most), and for 2:4 only widths that
    groups of 4 divide."""
    tied = set()
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            tied.add(id(head))
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) not in tied
        and not (two_four and module.in_features % 4)
    ]


_SAFETENSORS_DTYPES = {"U8": "uint8", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _read_tensors(file: Path, keys: Sequence[str]) -> dict[str, Any]:
    """Tensors of a safetensors file (whole or in shards) read with plain reads into private
    memory, not through a memory map: pages read this way do not stay in the process's resident
    set after the tensors are freed (a map's touched pages do, as long as any tensor of the file
    is alive)."""
    where = shard_map(file)
    out = {}
    for part in sorted({where.get(key, file) for key in keys}):
        header, base = safetensors_layout(part)
        with open(part, "rb") as handle:
            for key in keys:
                if where.get(key, file) != part:
                    continue
                info = header[key]
                start, end = info["data_offsets"]
                handle.seek(base + start)
                data = bytearray(end - start)
                handle.readinto(data)
                dtype = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
                out[key] = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(info["shape"])
    return out


def _prune_sparsity(previous: Sequence[PlanStep]) -> float | None:
    """The unstructured sparsity an earlier ``prune`` step set, if any."""
    for step in previous:
        if step.plugin == "prune" and step.options.get("sparsity") is not None:
            return float(step.options["sparsity"])
    return None


# ---------------------------------------------------------------------------------------------
# The plugin


class Sparsify(Compressor):
    """Store sparse Linear weights as a bitmask plus nonzero values (unstructured or 2:4)."""

    name = "sparsify"
    kind = "sparsify"
    version = edgepack.__version__
    description = "store sparse Linear weights as bitmask + nonzero values; 2:4 uses sparse GPU kernels"
    options = (
        Option("format", str, ("bitmask", "2:4"), "bitmask", help="unstructured bitmask, or 2:4 semi-structured"),
        Option("sparsity", float, (), None, minimum=0.0, maximum=0.99,
               help="fraction of each Linear weight zeroed by magnitude (alone: default 0.5; "
                    "after prune:sparsity= leave it unset)"),
        Option("runtime", str, ("compressed", "dense"), "compressed",
               help="keep weights compressed and expand per call, or expand once at load"),
    )

    # -- checks and planning ---------------------------------------------------------------

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """Refuse 2:4 without the kernels, a second sparsify, sparsify after quantize, and a
        sparsity ratio that contradicts 2:4 or an earlier prune."""
        if any(step.plugin == self.name for step in previous):
            return "sparsify is already in the plan"
        if any(step.plugin == "quantize" for step in previous):
            return ("sparsify must come before quantize; quantize stores its own weight format, which "
                    "cannot hold sparsify's bitmask (apply prune/sparsify first, then quantize)")
        fmt, sparsity = options.get("format", "bitmask"), options.get("sparsity")
        if fmt == "2:4":
            if "2:4" not in probe.capabilities:
                return (f"format=2:4 needs semi-structured 2:4 sparse kernels (capability 2:4: NVIDIA "
                        f"compute capability 8.0 or later), which target {probe.target} lacks; use format=bitmask")
            if sparsity is not None and sparsity != 0.5:
                return f"format=2:4 keeps exactly 2 of every 4 weights (sparsity 0.5), not sparsity={sparsity}"
        if sparsity is not None and _prune_sparsity(previous) is not None:
            return ("sparsity= is for sparsify alone: the prune step before it already chose the zeros, "
                    "which sparsify stores; drop sparsify's sparsity=")
        return super().check(options, probe, previous)

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """Bitmask at the default (50%, or prune's zeros), at 10% and 30%; 2:4 where the target has it."""
        sets: list[dict[str, Any]] = [
            {"format": "bitmask"}, {"format": "bitmask", "sparsity": 0.1}, {"format": "bitmask", "sparsity": 0.3},
        ]
        if "2:4" in probe.capabilities:
            sets.append({"format": "2:4"})
        return sets

    @staticmethod
    def density(options: Mapping[str, Any], footprint: Footprint | None = None) -> tuple[float, str]:
        """Fraction of Linear weights stored, and where that figure comes from."""
        if options.get("format") == "2:4":
            return 0.5, "2:4"
        if options.get("sparsity") is not None:
            return 1.0 - float(options["sparsity"]), f"sparsity={options['sparsity']}"
        # An earlier prune may say how sparse it left the weights (WeightGroup.density, if the
        # interface carries it); else the default applies, which is also 50%.
        group = next((g for g in (footprint.weights if footprint else ()) if g.kind == "linear"), None)
        density = getattr(group, "density", None)
        if density is not None and density < 1.0:
            return float(density), "prune's zeros"
        return 1.0 - DEFAULT_SPARSITY, "assumed 50% sparse (alone: the default; after prune the footprint does not say)"

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """Linear weights at ``density * value_bits + 1`` bits (values plus the bitmask); with
        ``runtime=dense`` the bundle shrinks but memory does not, so the footprint is unchanged."""
        density, source = self.density(options, footprint)
        group = next((g for g in footprint.weights if g.kind == "linear"), None)
        if group is None:
            return footprint
        bits = density * group.bits + 1
        if options.get("runtime") == "dense":
            return footprint.with_groups((), 0, f"sparsify {options.get('format')}: dense at run time "
                                                  f"(stored {bits:.2f} bits per Linear weight, {source})")
        result = footprint.with_groups(("linear",), bits, f"sparse Linear weights, {options.get('format')} "
                                                          f"at density {density:.2f} ({bits:.2f} bits; {source})")
        # Expanding one weight per call: the dense weight, the unpacked mask and positions of the
        # nonzeros (6 + 1.5 value-sized bytes per element, refitted on MiniLM at 10-50% sparsity,
        # fp32 and bf16, under the fixed-allocator probe: large temporaries go back to the system
        # as soon as they are freed, so fewer of them are live at the peak).
        scratch = 6 + 1.5 * footprint.activation_bits / 8
        return dataclasses.replace(result, weight_scratch=max(result.weight_scratch, scratch))

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """A prior growing with sparsity, fitted to MiniLM (1 - mean cosine of embeddings after
        per-layer magnitude pruning: 0.004 at 10%, 0.024 at 20%, 0.065 at 30%, 0.14 at 40%,
        0.25 at 50%; 2:4 0.37). Without ``sparsity=`` the 50% default is assumed, so after a
        prune step (whose zeros sparsify only stores, losslessly) this over-counts: the
        interface gives quality_cost no view of the earlier steps."""
        density, _ = self.density(options)
        cost = 1.45 * (1.0 - density) ** 2.5
        return cost * 1.45 if options.get("format") == "2:4" else cost

    # -- apply, save, restore --------------------------------------------------------------

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Zero Linear weights (by magnitude, or the 2:4 pattern) in place; modules stay
        ``nn.Linear``, so later steps such as ``precision`` see an ordinary model."""
        _define_modules()
        two_four = options.get("format") == "2:4"
        chosen = _targets(model, two_four)
        if not chosen:
            raise UsageError("sparsify found no Linear modules to sparsify")
        sparsity = options.get("sparsity")
        if sparsity is None and not two_four:
            zeros = sum(int((m.weight == 0).sum()) for _, m in chosen)
            total = sum(m.weight.numel() for _, m in chosen)
            if zeros / total >= ALREADY_SPARSE:
                context.progress(f"  sparsify: storing the zeros already there ({zeros / total:.1%} of Linear weights)")
            else:
                sparsity = DEFAULT_SPARSITY
                context.progress(f"  sparsify: Linear weights hold no zeros; zeroing {sparsity:.0%} by magnitude")
        with torch.no_grad():
            for _, module in chosen:
                weight = module.weight
                if two_four:
                    keep = two_four_mask(weight)
                elif sparsity:
                    keep = magnitude_mask(weight, sparsity)
                else:
                    keep = weight != 0
                # multiplying would leave -0.0; a zero fill gives +0.0, which the bitmask restores
                weight.masked_fill_(~keep | (weight == 0), 0)
        model._edgepack_sparse = {"format": options.get("format", "bitmask"), "modules": [n for n, _ in chosen]}
        return model

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """Write config.json and ``model.sparse.safetensors``: for each sparsified Linear its
        ``bitmask`` (uint8 [out, ceil(in/8)]) and ``values`` (nonzeros, the weight's dtype),
        every other tensor as it is; in shards with an index when larger than ``--shard-size``.
        Always returns True (this plugin owns loading)."""
        _define_modules()
        from edgepack.model import save_safetensors

        info = getattr(model, "_edgepack_sparse", None)
        if info is None:
            raise UsageError("sparsify.save needs a model that sparsify.apply transformed")
        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        names = set(info["modules"])
        tensors: dict[str, Any] = {}
        sparse: dict[str, Any] = {}
        for name, module in model.named_modules():
            if name not in names:
                continue
            if isinstance(module, SparseLinear):
                bitmask, values = module.bitmask, module.values
            else:
                bitmask, values = compress(module.weight)
            prefix = f"{name}." if name else ""
            tensors[prefix + "bitmask"] = bitmask.contiguous()
            tensors[prefix + "values"] = values.contiguous()
            sparse[name] = {"shape": [module.out_features, module.in_features], "nnz": int(values.numel())}
        skip = {f"{n}.weight" if n else "weight" for n in names} | set(tensors)
        tensors.update(unique_tensors(model, skip))
        metadata = {
            "format": SPARSE_FORMAT,
            "sparse_format": info["format"],
            "sparse": json.dumps(sparse, sort_keys=True),
            "dtype": float_dtype_name(model),
        }
        save_safetensors(tensors, model_dir / SPARSE_FILE, metadata=metadata, sharded=True)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild the model: a skeleton without weights, :class:`SparseLinear` modules from the
        bitmasks (or dense Linears with ``runtime=dense``), the other tensors assigned."""
        _define_modules()
        from edgepack.model import assign_weights, empty_model, load_safetensors, read_format_metadata

        file = model_dir / SPARSE_FILE
        meta = read_format_metadata(file, SPARSE_FORMAT)
        sparse = json.loads(meta["sparse"])
        dtype = getattr(torch, meta.get("dtype", "float32"))
        model = empty_model(model_dir, dtype)
        tensors = load_safetensors(file, device=device)  # memory-mapped: pages count once touched
        dense = options.get("runtime") == "dense"
        if dense:  # expanded once: read the compressed form privately so that it can be freed
            keys = [f"{n}.{part}" if n else part for n in sparse for part in ("bitmask", "values")]
            tensors.update({k: v.to(device) for k, v in _read_tensors(file, keys).items()})
        for name, info in sparse.items():
            prefix = f"{name}." if name else ""
            out_features, in_features = info["shape"]
            bitmask, values = tensors.pop(prefix + "bitmask"), tensors.pop(prefix + "values")
            if bitmask.shape != (out_features, (in_features + 7) // 8) or values.numel() != info["nnz"]:
                raise UsageError(f"{file}: {name} has a bitmask or values of the wrong size")
            bias = tensors.pop(prefix + "bias", None)
            if dense:
                module = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
                module.weight = nn.Parameter(expand(bitmask, values, in_features), requires_grad=False)
                if bias is not None:
                    module.bias = nn.Parameter(bias, requires_grad=False)
            else:
                module = SparseLinear(in_features, out_features, bitmask, values, bias)
            replace_module(model, name, module)
        model = assign_weights(model, tensors, file)
        if dense:
            trim_heap()  # the freed compressed tensors leave holes between the dense weights
        model._edgepack_sparse = {"format": meta.get("sparse_format", "bitmask"), "modules": list(sparse)}
        return model

    def prepare(self, model: Any, options: Mapping[str, Any], device: str, probe: Probe | None = None) -> Any:
        """2:4 on CUDA: swap the sparsified Linears for Linears whose weight is a
        ``torch.sparse`` semi-structured tensor (sparse tensor-core kernels). Layers the kernels
        cannot take (dtype, shape) stay as they are. Elsewhere nothing changes."""
        _define_modules()
        if options.get("format") != "2:4" or not str(device).startswith("cuda") or not torch.cuda.is_available():
            return model
        from torch.sparse import to_sparse_semi_structured

        names = (getattr(model, "_edgepack_sparse", None) or {}).get("modules", [])
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, (nn.Linear, SparseLinear)):
                continue  # a later step (quantize) replaced it
            weight = module.weight.detach().to("cuda")
            try:
                semi = to_sparse_semi_structured(weight)
            except (RuntimeError, ValueError, TypeError):
                continue
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(semi, requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.detach().to("cuda"), requires_grad=False)
            replace_module(model, name, linear)
        return model


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``sparsify`` compressor."""
    register(Sparsify)
