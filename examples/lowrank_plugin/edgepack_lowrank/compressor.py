"""``lowrank``: Linear layers factorised by truncated SVD, where the two factors are smaller.

A weight W (out × in) with singular value decomposition U·S·Vᵀ is replaced by two factors of
rank r, ``u = U_r·S_r^½`` (out × r) and ``v = S_r^½·V_rᵀ`` (r × in), and the layer computes
``x·vᵀ·uᵀ + bias`` (:class:`LowRankLinear`). A layer is factorised only where that stores fewer
numbers: ``r·(in + out) < in·out``; every other layer stays as it is. The rank is either fixed
(``rank=R``, capped by the layer's own rank) or chosen per layer by ``energy=E``: the fewest
singular values whose squares reach the fraction E of the total (``max_rank=R`` caps it).
Output heads, and layers whose name contains a ``keep=`` fragment, are never factorised.

The factors are stored in the weight's dtype in ``model.lowrank.safetensors`` with the format
tag :data:`FORMAT` and the list of factorised layers in its metadata (tensors and JSON only,
never pickle); the bundle's manifest names ``lowrank`` as its loader, and ``restore`` rebuilds
the model from a weightless skeleton.

How much a factorisation costs depends on how fast the weights' singular values fall, which
the planner cannot see: trained transformer weights are close to full rank (all-MiniLM-L6-v2
keeps only 90-96% of the squared singular values of a layer at the rank where factorising
starts to save bytes), so ``quality_cost`` is a prior measured there and is high; a model
whose layers really are of low rank (distilled, or with merged low-rank adapters) loses far
less than the prior says, which ``pack`` measures.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe

from edgepack_lowrank import __version__

#: The edgepack plugin API this module was written for.
EDGEPACK_PLUGIN_API = 1

WEIGHTS_FILE = "model.lowrank.safetensors"
FORMAT = "edgepack-lowrank/1"

#: ``energy`` when neither ``rank=`` nor ``energy=`` is given.
DEFAULT_ENERGY = 0.95

#: Steps lowrank may follow: they leave plain float ``nn.Linear`` weights that stock
#: transformers loads (structured FFN pruning only shrinks the layers).
COMPOSES_AFTER = ("precision", "prune")

# Fitted by calibrate_minilm.py (see quality_cost): 1 - mean cosine ≈ RANK_SLOPE·D for a rank,
# D being the parameter-weighted share of singular values dropped, and ≈ ENERGY_SLOPE·(1 - E)
# for an energy E (least squares over the measured rows).
_RANK_SLOPE = 0.88
_ENERGY_SLOPE = 3.0


# ---------------------------------------------------------------------------------------------
# The factorised layer (torch is imported on first use: registering the plugin stays cheap)


@functools.lru_cache(maxsize=None)
def _layer_class() -> type:
    from torch import nn

    class LowRankLinear(nn.Module):
        """A Linear layer of rank ``rank``: ``y = x·vᵀ·uᵀ + bias``.

        :param u: U_r·S_r^½, shape (out_features, rank).
        :param v: S_r^½·V_rᵀ, shape (rank, in_features).
        :param bias: the original layer's bias, or None.
        """

        def __init__(self, u: Any, v: Any, bias: Any = None) -> None:
            super().__init__()
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
                raise UsageError(f"lowrank factors of shapes {tuple(u.shape)} and {tuple(v.shape)} do not multiply")
            self.out_features, self.rank = int(u.shape[0]), int(u.shape[1])
            self.in_features = int(v.shape[1])
            self.u = nn.Parameter(u.detach(), requires_grad=False)
            self.v = nn.Parameter(v.detach(), requires_grad=False)
            self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

        def forward(self, x: Any) -> Any:
            return nn.functional.linear(nn.functional.linear(x, self.v), self.u, self.bias)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                    f"bias={self.bias is not None}")

    LowRankLinear.__module__ = __name__
    LowRankLinear.__qualname__ = "LowRankLinear"
    return LowRankLinear


def __getattr__(name: str) -> Any:
    if name == "LowRankLinear":
        return _layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Arithmetic shared by estimate, quality_cost and apply


def saves_bytes(rank: int, out_features: int, in_features: int) -> bool:
    """Whether two factors of ``rank`` store fewer numbers than the (out × in) weight."""
    return rank * (out_features + in_features) < out_features * in_features


def rank_for_energy(singular_values: Any, energy: float) -> int:
    """The fewest leading singular values whose squares reach ``energy`` of the total (at least
    1). ``energy=1.0`` gives the numerical rank: squares below 1e-12 of the total count as zero."""
    import torch

    squares = singular_values.double() ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    share = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1, squares.numel())


def factorize(weight: Any, *, rank: int | None = None, energy: float | None = None,
              max_rank: int | None = None) -> tuple[Any, Any] | None:
    """Factors ``(u, v)`` of ``weight`` (out × in) with ``u @ v`` its truncated SVD, in the
    weight's dtype, or None where factorising at the chosen rank saves no bytes.

    The SVD runs in float64 and each singular pair's sign is fixed (the largest entry of each
    left singular vector positive), so the factors are the same on every machine up to rounding.
    """
    import torch

    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    left, values, right = torch.linalg.svd(w, full_matrices=False)
    if rank is not None:
        r = min(int(rank), values.numel())
    else:
        r = rank_for_energy(values, float(energy if energy is not None else DEFAULT_ENERGY))
        if max_rank is not None:
            r = min(r, int(max_rank))
    if not saves_bytes(r, out_f, in_f):
        return None
    left, values, right = left[:, :r], values[:r], right[:r]
    pivot = left.abs().argmax(dim=0)
    signs = torch.sign(left[pivot, torch.arange(r)])
    signs[signs == 0] = 1
    root = values.sqrt() * signs  # the sign goes to both factors, so u @ v is unchanged
    u = left * root
    v = root[:, None] * right
    return u.to(weight.dtype).contiguous(), v.to(weight.dtype).contiguous()


def _layer_ranks(shapes: Sequence[tuple[int, int]], options: Mapping[str, Any]) -> list[tuple[int, int, int | None]]:
    """(out, in, rank bound) of each Linear shape: the fixed rank, or ``max_rank`` for an
    energy (None: the energy's rank is unknown before the weights are read)."""
    bound = options.get("rank") if options.get("rank") is not None else options.get("max_rank")
    return [(o, i, None if bound is None else min(int(bound), o, i)) for o, i in shapes]


def _planned_shapes(footprint: Footprint) -> list[tuple[int, int]]:
    """The model's Linear shapes after earlier steps: FFN dimensions scaled by ``ffn_scale``
    (structured FFN pruning)."""
    facts = footprint.facts
    if facts is None:
        return []
    ffn = facts.intermediate_size
    kept = max(1, int(ffn * footprint.ffn_scale)) if footprint.ffn_scale < 1.0 else ffn

    def scaled(dim: int) -> int:
        return kept if dim == ffn else dim

    return [(scaled(o), scaled(i)) for o, i in facts.linear_shapes]


# ---------------------------------------------------------------------------------------------
# The plugin


def _keep(options: Mapping[str, Any]) -> list[str]:
    return list(options.get("keep") or ())


def _describe(options: Mapping[str, Any]) -> str:
    if options.get("rank") is not None:
        return f"rank {options['rank']}"
    text = f"energy {options.get('energy', DEFAULT_ENERGY)}"
    return text + (f", rank at most {options['max_rank']}" if options.get("max_rank") is not None else "")


class LowRank(Compressor):
    """Factorise Linear layers into two smaller ones by truncated SVD, where that saves bytes."""

    name = "lowrank"
    kind = "other"
    version = __version__
    description = "factorise Linear layers by truncated SVD (rank= or energy=) where two factors are smaller"
    options = (
        Option("rank", int, minimum=1, help="keep this many singular values in every factorised layer"),
        Option("energy", float, minimum=0.01, maximum=1.0,
               help=f"keep the fewest singular values whose squares reach this share, per layer (default {DEFAULT_ENERGY})"),
        Option("max_rank", int, minimum=1, help="with energy=: at most this many per layer (bounds the size estimate)"),
        Option("keep", list, help="module-name fragments left dense, as keep=[layer.0.,pooler]"),
    )

    # -- options and checks ----------------------------------------------------------------

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The options checked one by one, then together: ``rank=`` or ``energy=`` (default
        energy), ``max_rank=`` only with an energy."""
        options = super().parse_options(raw)
        if options.get("rank") is not None and options.get("energy") is not None:
            raise UsageError(f"plugin 'lowrank' takes rank= or energy=, not both (got rank={options['rank']}, "
                             f"energy={options['energy']})")
        if options.get("max_rank") is not None and options.get("rank") is not None:
            raise UsageError("option lowrank:max_rank caps energy=; with rank= give the rank alone")
        if options.get("rank") is None and options.get("energy") is None:
            options["energy"] = DEFAULT_ENERGY
        return options

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """Once, after nothing but precision and structured FFN pruning: it needs plain float
        Linear weights and owns the weight file, so quantized, sparse or head-pruned weights
        (whose plugins own theirs) cannot come before it."""
        for step in previous:
            if step.plugin == self.name:
                return "lowrank is already in the plan"
            if step.plugin not in COMPOSES_AFTER:
                return (f"lowrank cannot follow {step.plugin}: it factorises plain float Linear weights and "
                        f"writes its own weight file; apply it after {' or '.join(COMPOSES_AFTER)} only")
            if step.plugin == "prune":
                if step.options.get("sparsity"):
                    return "lowrank cannot follow prune:sparsity: a factorisation fills in the zeros prune made"
                if step.options.get("heads"):
                    return ("lowrank cannot follow prune:heads: both would own the weight file "
                            "(head-pruned BERT layers need prune's own loader)")
        return super().check(options, probe, previous)

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """Ranks of 2/3, 1/3 and 1/6 of the hidden size, and energy 0.9 capped at 2/3 of it;
        only those that shrink at least one of the model's Linear layers."""
        hidden = facts.hidden_size
        ranks = sorted({max(8, 8 * round(hidden * share / 8)) for share in (2 / 3, 1 / 3, 1 / 6)}, reverse=True)
        sets: list[dict[str, Any]] = [{"rank": r} for r in ranks]
        sets.append({"energy": 0.9, "max_rank": ranks[0]})

        def shrinks(opts: dict[str, Any]) -> bool:
            return any(r is not None and saves_bytes(r, o, i) for o, i, r in _layer_ranks(facts.linear_shapes, opts))

        return [s for s in sets if shrinks(s)]

    # -- planning --------------------------------------------------------------------------

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """The linear group loses, for every Linear shape the model facts list (FFN sizes after
        earlier pruning), ``in·out - r·(in + out)`` parameters where that is positive; the
        factors keep the weights' bits per parameter. Exact for ``rank=``. For ``energy=`` the
        rank of a layer is known only once its weights are read, so the estimate is an upper
        bound: with ``max_rank=R`` every layer keeps at most R, without it no saving is counted.
        Modules named by ``keep=`` are not modelled (the facts carry shapes, not names), nor is
        the output head, which the facts do not count as linear."""
        shapes = _planned_shapes(footprint)
        saved = sum(o * i - r * (o + i) for o, i, r in _layer_ranks(shapes, options)
                    if r is not None and saves_bytes(r, o, i))
        factorised = sum(1 for o, i, r in _layer_ranks(shapes, options) if r is not None and saves_bytes(r, o, i))
        if options.get("rank") is None and options.get("max_rank") is None:
            note = f"lowrank {_describe(options)}: no saving assumed (the rank follows the weights; give max_rank= to bound it)"
        else:
            bound = "" if options.get("rank") is not None else " at most"
            note = f"lowrank {_describe(options)}: {factorised} of {len(shapes)} Linear layers factorised,{bound} {saved} fewer parameters"
        groups = tuple(dataclasses.replace(g, params=max(0, g.params - saved)) if g.kind == "linear" else g
                       for g in footprint.weights)
        return dataclasses.replace(footprint, weights=groups, notes=footprint.notes + (note,))

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """A prior on 1 - mean cosine of sentence embeddings, measured on all-MiniLM-L6-v2 with
        ``python examples/lowrank_plugin/calibrate_minilm.py`` (this plugin's ``apply`` on the fp32
        model; cosine on edgepack's 16 smoke sentences, what ``pack`` judges; 20 held-out
        sentences measure up to 0.05 less):

        ========================================  ============  ==========  =====
        options                                   linear saved  1 - cosine  prior
        ========================================  ============  ==========  =====
        rank=300                                  0.015         0.141       0.127
        rank=256                                  0.110         0.215       0.193
        rank=190                                  0.254         0.412       0.445
        rank=160                                  0.372         0.498       0.513
        rank=128                                  0.498         0.614       0.587
        rank=64                                   0.749         0.729       0.733
        energy=0.99                               (no layer: refused)
        energy=0.97                               0.001         0.003       0.090
        energy=0.95                               0.035         0.164       0.150
        energy=0.9                                0.193         0.304       0.300
        energy=0.9,max_rank=256                   0.197         0.307       0.300
        rank=128,keep=[intermediate,output.dense,value]  0.059  0.047       0.587
        ========================================  ============  ==========  =====

        For ``rank=`` the prior is ``0.88·D``, D being the share of singular values dropped,
        weighted by each Linear layer's parameters, over the layers the rank shrinks (rank 256
        on MiniLM: D = 0.22). For ``energy=E`` it is ``3·(1 - E)`` (each factorised layer keeps
        the share E, whatever its size), and with ``max_rank`` the larger of that and the prior
        of ``rank=max_rank``. Both slopes are least-squares fits to the rows above. ``keep=`` is
        not modelled (the facts carry no module names), so a prior with it is pessimistic (last
        row). These are one-shot factorisations without fine-tuning of weights that are close to
        full rank: the prior ranks lowrank behind int8 quantization (6.5e-4 measured) and
        structured FFN pruning (0.075 at 25%), which also save more bytes, and pack measures
        the real fidelity of the model at hand."""
        shapes = list(facts.linear_shapes)
        costs = []
        if options.get("rank") is not None or options.get("max_rank") is not None:
            total = sum(o * i for o, i in shapes) or 1
            dropped = sum(o * i * (1 - r / min(o, i)) for o, i, r in _layer_ranks(shapes, options)
                          if r is not None and saves_bytes(r, o, i)) / total
            costs.append(_RANK_SLOPE * dropped)
        if options.get("energy") is not None:
            costs.append(_ENERGY_SLOPE * (1 - float(options["energy"])))
        return min(1.0, max(costs))

    # -- transformation --------------------------------------------------------------------

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext | None) -> Any:
        """Replace every chosen Linear layer (GPT-2's Conv1D included) whose factors are smaller
        by a :class:`LowRankLinear`; UsageError when no layer qualifies."""
        from edgepack.model import replace_module

        layer = _layer_class()
        chosen = _linears(model, _keep(options))
        if not chosen:
            raise UsageError("lowrank found no Linear layers to factorise (check keep=)")
        before = after = done = 0
        for name, module, weight in chosen:
            before += weight.numel()
            factors = factorize(weight, rank=options.get("rank"), energy=options.get("energy"),
                                max_rank=options.get("max_rank"))
            if factors is None:
                after += weight.numel()
                continue
            u, v = factors
            bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
            replace_module(model, name, layer(u, v, bias))
            after += u.numel() + v.numel()
            done += 1
        if not done:
            raise UsageError(
                f"lowrank {_describe(options)} factorises none of the {len(chosen)} Linear layers: each would need "
                f"a rank r at which two factors are no smaller than the weight (r·(in+out) >= in·out); "
                f"lower energy= or rank="
            )
        if context is not None:
            context.progress(f"  lowrank: {done} of {len(chosen)} Linear layers factorised, "
                             f"{before} -> {after} weight parameters")
        return model

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """Write ``config.json`` and ``model.lowrank.safetensors``: every tensor of the model
        (tied ones once), the factors as ``NAME.u`` / ``NAME.v``, and in the metadata the format
        tag, the float dtype and each factorised layer's shape and rank (keys sorted, so the
        same model gives the same bytes)."""
        import torch
        from edgepack.model import save_safetensors

        from edgepack.model import float_dtype_name, unique_tensors

        layer = _layer_class()
        factorised = {name: {"in": m.in_features, "out": m.out_features, "rank": m.rank, "bias": m.bias is not None}
                      for name, m in model.named_modules() if isinstance(m, layer)}
        tensors = unique_tensors(model)
        odd = [key for key, tensor in tensors.items() if type(tensor) is not torch.Tensor]
        if odd:
            raise UsageError(f"lowrank cannot store {odd[0]}: a step after lowrank changed it into "
                             f"{type(tensors[odd[0]]).__name__}; apply lowrank last (or only precision after it)")
        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        metadata = {"format": FORMAT, "dtype": float_dtype_name(model),
                    "factorised": json.dumps(factorised, sort_keys=True)}
        save_safetensors(tensors, model_dir / WEIGHTS_FILE, metadata=metadata)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild what :meth:`save` wrote: a weightless skeleton from ``config.json``, a
        :class:`LowRankLinear` at every factorised layer, then the remaining tensors; a file
        whose tensors disagree with its metadata is refused with the layer named."""
        import torch
        from safetensors.torch import load_file

        from edgepack.model import assign_weights, empty_model, read_format_metadata, replace_module

        file = model_dir / WEIGHTS_FILE
        meta = read_format_metadata(file, FORMAT)
        try:
            factorised = json.loads(meta["factorised"])
            dtype = getattr(torch, meta.get("dtype", "float32"))
        except (KeyError, ValueError, AttributeError):
            raise UsageError(f"{file} has no valid list of factorised layers in its metadata") from None
        layer = _layer_class()
        model = empty_model(model_dir, dtype)
        tensors = load_file(file, device=device)
        for name, info in factorised.items():
            u, v = tensors.pop(f"{name}.u", None), tensors.pop(f"{name}.v", None)
            bias = tensors.pop(f"{name}.bias", None)
            want = ((info["out"], info["rank"]), (info["rank"], info["in"]))
            if u is None or v is None or (tuple(u.shape), tuple(v.shape)) != want or (bias is None) == info["bias"]:
                raise UsageError(f"{file}: the factors of {name} do not match its metadata "
                                 f"(u {want[0]}, v {want[1]}, bias {info['bias']})")
            replace_module(model, name, layer(u, v, bias))
        return assign_weights(model, tensors, file)


def _linears(model: Any, keep: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """(name, module, weight as out × in) of every Linear layer (and GPT-2 Conv1D) to consider:
    not the output head, not a layer sharing the head's weight, none named by ``keep``."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    chosen = []
    for name, module in model.named_modules():
        if module is head or any(fragment in name for fragment in keep):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or (head_weight is not None and weight is head_weight):
            continue
        if isinstance(module, nn.Linear):
            chosen.append((name, module, weight))
        elif type(module).__name__ == "Conv1D" and weight.dim() == 2:  # GPT-2 stores (in, out)
            chosen.append((name, module, weight.t()))
    return chosen


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register ``lowrank`` with edgepack."""
    register(LowRank)
