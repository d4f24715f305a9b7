"""``prune``: remove attention heads and FFN neurons, or zero a fraction of every weight.

Structured (``prune:heads=RATIO,ffn=RATIO``)
    Heads and FFN neurons are really removed: the Linear layers shrink and the config is
    rewritten. Importance is FLAP's fluctuation score (An et al., AAAI 2024), measured on the
    calibration inputs with forward hooks on the output projections (padding tokens excluded):
    an input column ``j`` of ``ffn.down`` / ``attention.output`` scores
    ``Var(x_j) * ||W[:, j]||²``, how much what it adds to the residual stream varies around its
    mean; a head sums the scores of its columns. The mean contribution of what is removed is
    folded into the projection's bias where it has one (BERT, GPT-2). On MiniLM this kept the
    embeddings closer to the original than ``mean |x_j| * ||W[:, j]||`` or each head's mean
    contribution norm (ffn=0.25: cosine 0.925 against 0.869; heads=0.25: 0.921 against 0.915).

    The same number is removed in every layer (``round(ratio * n)``, the lowest-scoring ones
    of that layer), so that one ``intermediate_size`` (``n_inner`` for GPT-2) and one head count
    describe the model, and the activation estimate (``ffn_scale``, ``heads_scale``) is exact.

    Supported layouts: BERT-style encoders (``attention.self.query/key/value``,
    ``attention.output.dense``, ``intermediate.dense``, ``output.dense``: BERT, RoBERTa, ...),
    Llama-style decoders (``self_attn.q/k/v/o_proj``, ``mlp.gate/up/down_proj``: Llama, Qwen2,
    Mistral, ...) and GPT-2 (``mlp.c_fc``/``mlp.c_proj``, FFN only: its head size is derived from
    ``n_embd / n_head`` and cannot express fewer heads). Another architecture is refused.

    FFN pruning and decoder head pruning (``head_dim`` stays, ``num_attention_heads`` and
    ``num_key_value_heads`` shrink; with grouped-query attention whole KV groups go) are saved
    by stock transformers. BERT head pruning is not: transformers 5 removed ``prune_heads`` and
    the ``pruned_heads`` config key, and BERT derives its head size from
    ``hidden_size / num_attention_heads``. So a BERT model with pruned heads is written by
    :meth:`Prune.save` as ``config.json`` + ``model.pruned.safetensors`` (the new shapes in its
    metadata) and rebuilt by :meth:`Prune.restore`; the manifest then names ``prune`` as loader.
    That loader cannot follow ``quantize:scheme=int8`` (torchao tensors: save refuses with a
    UsageError); ``quantize:scheme=int4`` owns loading itself and works while its group size
    divides the pruned width (288 for MiniLM at heads=0.25: group_size 16 or 32). The planner
    is offered FFN pruning only (:meth:`Prune.candidates`), which composes with everything.

Unstructured (``prune:sparsity=RATIO,method=magnitude|wanda``)
    Zeroes ``RATIO`` of every Linear weight (not embeddings, not the LM head): ``magnitude``
    drops the smallest ``|W|`` of each tensor; ``wanda`` (Sun et al. 2023) drops, in each output
    row, the smallest ``|W_ij| * ||X_j||_2`` with input-column norms from the calibration inputs.
    Storage stays dense (the zeros are stored); the ``sparsify`` plugin stores them compactly.

Both in one step (``prune:ffn=0.25,sparsity=0.5``) are allowed: the structured part is applied
first, then the remaining weights are sparsified (Wanda statistics are collected again on the
smaller model). A second ``prune`` step is refused. A bare ``prune`` means ``prune:ffn=0.25``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import edgepack
from edgepack.errors import UsageError
from edgepack.model import float_dtype_name, replace_module, unique_tensors
from edgepack.interfaces import (
    ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe,
)

PRUNED_FILE = "model.pruned.safetensors"
PRUNED_FORMAT = "edgepack.prune/1"

#: ``prune`` with no ratio at all means this.
DEFAULT_FFN = 0.25
DEFAULT_METHOD = "wanda"

#: Share of a typical transformer layer's Linear parameters in attention and in the FFN
#: (4h² against 2h·4h for BERT/GPT-2, against 3h·2.7h for Llama): used by :meth:`Prune.estimate`
#: when it is not given the model's facts.
_ATTENTION_SHARE = 1.0 / 3.0
_FFN_SHARE = 2.0 / 3.0

#: Plugins whose output prune cannot work on (weights no longer plain float tensors).
_BEFORE = ("quantize", "sparsify", "parallel")

#: Model types whose layout :func:`_layers` knows (for ``candidates``; apply checks structure).
_KNOWN_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "camembert", "electra",
    "llama", "qwen2", "qwen3", "mistral", "gpt2",
})


# ---------------------------------------------------------------------------------------------
# Options


def _ratio(options: Mapping[str, Any], key: str) -> float:
    return float(options.get(key) or 0.0)


def _structured(options: Mapping[str, Any]) -> bool:
    return _ratio(options, "heads") > 0 or _ratio(options, "ffn") > 0


# ---------------------------------------------------------------------------------------------
# Layer layouts


@dataclass
class _Layer:
    """The modules of one transformer layer that pruning touches."""

    name: str
    layout: str  # "bert" | "llama" | "gpt2"
    q: Any = None
    k: Any = None
    v: Any = None
    o: Any = None
    attention: Any = None  # the module holding head-count attributes
    ffn_in: list[Any] = field(default_factory=list)  # neurons are their outputs
    ffn_out: Any = None  # neurons are its inputs


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


def _layers(model: Any) -> list[_Layer]:
    """The transformer layers of ``model`` in a layout this plugin knows; [] when none."""
    found: list[_Layer] = []
    for name, m in model.named_modules():
        attn = getattr(m, "attention", None)
        sa = getattr(attn, "self", None)
        if (sa is not None and all(hasattr(sa, a) for a in ("query", "key", "value"))
                and hasattr(getattr(attn, "output", None), "dense")
                and hasattr(getattr(m, "intermediate", None), "dense") and hasattr(getattr(m, "output", None), "dense")):
            found.append(_Layer(name, "bert", sa.query, sa.key, sa.value, attn.output.dense, sa,
                                [m.intermediate.dense], m.output.dense))
            continue
        at, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if (at is not None and mlp is not None and all(hasattr(at, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj"))):
            found.append(_Layer(name, "llama", at.q_proj, at.k_proj, at.v_proj, at.o_proj, at,
                                [mlp.gate_proj, mlp.up_proj], mlp.down_proj))
            continue
        if (hasattr(getattr(m, "attn", None), "c_attn") and mlp is not None
                and _is_conv1d(getattr(mlp, "c_fc", None)) and _is_conv1d(getattr(mlp, "c_proj", None))):
            found.append(_Layer(name, "gpt2", attention=m.attn, ffn_in=[mlp.c_fc], ffn_out=mlp.c_proj))
    return found


def _architecture(model: Any) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return f"{archs[0]} (model_type {getattr(model.config, 'model_type', '?')})"


def _head_numbers(model: Any, layer: _Layer) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of one layer as it is now."""
    config = model.config
    if layer.layout == "bert":
        d = layer.attention.attention_head_size
        return layer.q.out_features // d, layer.k.out_features // d, d
    d = getattr(layer.attention, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layer.q.out_features // d, layer.k.out_features // d, d


# ---------------------------------------------------------------------------------------------
# Slicing Linear and Conv1D modules


def _keep_outputs(module: Any, index: Any) -> None:
    """Keep only the output features ``index`` of a Linear (rows) or Conv1D (columns)."""
    import torch

    with torch.no_grad():
        if _is_conv1d(module):
            module.weight = torch.nn.Parameter(module.weight[:, index].clone(), requires_grad=False)
            module.nf = len(index)
        else:
            module.weight = torch.nn.Parameter(module.weight[index].clone(), requires_grad=False)
            module.out_features = len(index)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias[index].clone(), requires_grad=False)


def _keep_inputs(module: Any, index: Any) -> None:
    """Keep only the input features ``index`` of a Linear (columns) or Conv1D (rows)."""
    import torch

    with torch.no_grad():
        if _is_conv1d(module):
            module.weight = torch.nn.Parameter(module.weight[index].clone(), requires_grad=False)
        else:
            module.weight = torch.nn.Parameter(module.weight[:, index].clone(), requires_grad=False)
            module.in_features = len(index)


def _out_in(module: Any) -> Any:
    """The weight as (out, in): a view for Linear, the transpose for Conv1D."""
    return module.weight.t() if _is_conv1d(module) else module.weight


# ---------------------------------------------------------------------------------------------
# Calibration statistics


class _Stats:
    """Runs the calibration inputs through the model with pre-forward hooks on chosen modules
    and accumulates, per module and input column, over non-padding tokens: the sum of ``x``
    (``sum``) and of ``x²`` (``sq_sum``)."""

    def __init__(self) -> None:
        self.sum: dict[int, Any] = {}
        self.sq_sum: dict[int, Any] = {}
        self.tokens: dict[int, int] = {}
        self._mask: Any = None

    def _rows(self, x: Any) -> Any:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        mask = self._mask
        if mask is not None and mask.numel() == flat.shape[0]:
            flat = flat[mask.reshape(-1).bool()]
        return flat

    def run(self, model: Any, calibration: Sequence[Mapping[str, Any]], modules: Sequence[Any]) -> None:
        """Collect the statistics of the inputs of ``modules``."""
        import torch

        def hook_for(module: Any):
            key = id(module)

            def hook(mod: Any, args: tuple[Any, ...]) -> None:
                rows = self._rows(args[0])
                self.tokens[key] = self.tokens.get(key, 0) + rows.shape[0]
                for table, value in ((self.sum, rows.sum(0)), (self.sq_sum, rows.pow(2).sum(0))):
                    table[key] = value if key not in table else table[key] + value

            return hook

        unique = list({id(m): m for m in modules}.values())
        handles = [m.register_forward_pre_hook(hook_for(m)) for m in unique]
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                for batch in calibration:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    self._mask = batch.get("attention_mask")
                    model(**batch)
        finally:
            for h in handles:
                h.remove()
            self._mask = None
            model.train(was_training)

    def has(self, module: Any) -> bool:
        return id(module) in self.sum

    def mean(self, module: Any) -> Any:
        """Mean input per column."""
        return self.sum[id(module)] / max(1, self.tokens[id(module)])

    def variance(self, module: Any) -> Any:
        """Variance of the input per column (the "fluctuation" of FLAP)."""
        n = max(1, self.tokens[id(module)])
        return (self.sq_sum[id(module)] / n - self.mean(module) ** 2).clamp(min=0)

    def norm(self, module: Any) -> Any:
        """L2 norm of the input per column over all tokens (Wanda's ||X_j||)."""
        return self.sq_sum[id(module)].sqrt()


def _fluctuation(stats: _Stats, module: Any) -> Any:
    """FLAP's score of each input column of ``module``: Var(x_j) * ||W[:, j]||², the variance
    of what the column adds to the output around its mean (the mean is compensated)."""
    column_norm = _out_in(module).detach().float().norm(dim=0)
    if not stats.has(module):  # no calibration: the weights alone
        return column_norm ** 2
    return stats.variance(module) * column_norm ** 2


def _calibration(context: ApplyContext) -> list[Mapping[str, Any]]:
    return list(context.calibration or [])


# ---------------------------------------------------------------------------------------------
# Structured pruning


def _compensate(stats: _Stats, module: Any, keep: Any) -> None:
    """Fold the mean contribution of the input columns about to be removed into the bias
    (FLAP's bias compensation); modules without a bias (Llama) are left as they are."""
    import torch

    if module.bias is None or not stats.has(module):
        return
    mean = stats.mean(module)
    drop = torch.ones(mean.shape[0], dtype=torch.bool)
    drop[keep] = False
    w = _out_in(module).detach().float()
    with torch.no_grad():
        module.bias += (w[:, drop] @ mean[drop]).to(module.bias.dtype)


def _keep_top(scores: Any, n_remove: int) -> Any:
    """Indices (ascending) of the ``len(scores) - n_remove`` highest scores."""
    import torch

    keep = len(scores) - n_remove
    return torch.sort(torch.topk(scores, keep).indices).values


def _prune_structured(model: Any, layers: list[_Layer], options: Mapping[str, Any], context: ApplyContext) -> dict[str, Any]:
    """Remove heads and FFN neurons in place; returns what was removed per layer."""
    import torch

    heads_ratio, ffn_ratio = _ratio(options, "heads"), _ratio(options, "ffn")
    arch = _architecture(model)
    if heads_ratio > 0 and any(l.layout == "gpt2" for l in layers):
        raise UsageError(
            f"prune:heads is not supported for {arch}: its head size is n_embd / n_head, so fewer "
            "heads cannot be stored in its config; use prune:ffn= or prune:sparsity="
        )
    layouts = {l.layout for l in layers}
    ffn_sizes = {(_out_in(l.ffn_out).shape[1]) for l in layers}
    if ffn_ratio > 0 and len(ffn_sizes) != 1:
        raise UsageError(f"prune:ffn needs one FFN width in every layer; {arch} has {sorted(ffn_sizes)}")
    numbers = {_head_numbers(model, l) for l in layers} if heads_ratio > 0 else set()
    if heads_ratio > 0 and len(numbers) != 1:
        raise UsageError(f"prune:heads needs the same heads in every layer; {arch} has {sorted(numbers)}")

    calibration = _calibration(context)
    stats = _Stats()
    if calibration:
        context.progress(f"  prune: scoring heads and neurons on {len(calibration)} calibration batches")
        stats.run(model, calibration, ([l.ffn_out for l in layers] if ffn_ratio > 0 else [])
                  + ([l.o for l in layers] if heads_ratio > 0 else []))

    removed: dict[str, Any] = {"ffn": 0, "heads": 0, "kv_heads": 0}
    if ffn_ratio > 0:
        width = ffn_sizes.pop()
        n_remove = min(width - 1, int(round(ffn_ratio * width)))
        for l in layers:
            keep = _keep_top(_fluctuation(stats, l.ffn_out), n_remove)
            _compensate(stats, l.ffn_out, keep)
            for m in l.ffn_in:
                _keep_outputs(m, keep)
            _keep_inputs(l.ffn_out, keep)
        removed["ffn"] = n_remove
        new_width = width - n_remove
        if "gpt2" in layouts:
            model.config.n_inner = new_width
        else:
            model.config.intermediate_size = new_width

    if heads_ratio > 0:
        n_heads, n_kv, d = numbers.pop()
        group = n_heads // n_kv  # query heads per key/value head (1 without GQA)
        n_remove_kv = min(n_kv - 1, int(round(heads_ratio * n_kv)))
        for l in layers:
            scores = _fluctuation(stats, l.o).reshape(n_heads, d).sum(1)
            kv_keep = _keep_top(scores.reshape(n_kv, group).sum(1), n_remove_kv)
            q_keep_heads = (kv_keep[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
            q_rows = (q_keep_heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
            kv_rows = (kv_keep[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
            _keep_outputs(l.q, q_rows)
            _keep_outputs(l.k, kv_rows if group > 1 else q_rows)
            _keep_outputs(l.v, kv_rows if group > 1 else q_rows)
            _compensate(stats, l.o, q_rows)
            _keep_inputs(l.o, q_rows)
            kept = len(q_keep_heads)
            if l.layout == "bert":
                l.attention.num_attention_heads = kept
                l.attention.all_head_size = kept * d
            else:
                for attr, value in (("num_heads", kept), ("num_key_value_heads", len(kv_keep))):
                    if hasattr(l.attention, attr):
                        setattr(l.attention, attr, value)
        removed["heads"] = n_remove_kv * group
        removed["kv_heads"] = n_remove_kv
        if "llama" in layouts:
            config = model.config
            config.head_dim = d
            config.num_attention_heads = n_heads - n_remove_kv * group
            config.num_key_value_heads = n_kv - n_remove_kv
        else:  # BERT: the config cannot say it; save() records the shapes
            model._edgepack_pruned_heads = {
                l.name: n_heads - n_remove_kv * group for l in layers
            }
    return removed


# ---------------------------------------------------------------------------------------------
# Unstructured pruning


def _sparsity_targets(model: Any) -> list[Any]:
    """Every Linear / Conv1D module but the LM head."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for _, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or _is_conv1d(m)) and m is not head]


def _prune_unstructured(model: Any, options: Mapping[str, Any], context: ApplyContext) -> int:
    """Zero ``sparsity`` of every target weight in place; returns the number of modules."""
    import torch

    sparsity, method = _ratio(options, "sparsity"), options.get("method") or DEFAULT_METHOD
    targets = _sparsity_targets(model)
    stats = _Stats()
    if method == "wanda":
        calibration = _calibration(context)
        if not calibration:
            raise UsageError("prune:method=wanda needs calibration inputs; use method=magnitude without them")
        context.progress(f"  prune: collecting input norms for wanda on {len(calibration)} calibration batches")
        stats.run(model, calibration, targets)
    with torch.no_grad():
        for m in targets:
            w = _out_in(m)  # (out, in); a view, so writes reach the weight
            if method == "wanda" and stats.has(m):
                k = int(round(sparsity * w.shape[1]))
                if k == 0:
                    continue
                score = w.detach().float().abs() * stats.norm(m)[None, :]
                index = torch.topk(score, k, dim=1, largest=False).indices
                w.scatter_(1, index, 0.0)
            else:
                k = int(round(sparsity * w.numel()))
                if k == 0:
                    continue
                flat = w.detach().abs().reshape(-1).float()
                index = torch.topk(flat, k, largest=False).indices
                rows, cols = index // w.shape[1], index % w.shape[1]
                w[rows, cols] = 0.0
    return len(targets)


# ---------------------------------------------------------------------------------------------
# Estimation helpers


def removed_linear_params(options: Mapping[str, Any], linear_params: int, facts: ModelFacts | None = None) -> int:
    """Linear parameters structured pruning removes.

    With ``facts``: exact arithmetic on the layer shapes (biases aside, under 0.2%). Without:
    the ratios times the typical attention (1/3) and FFN (2/3) shares of the Linear weights,
    within 1% of the real count on BERT-style models.
    """
    heads, ffn = _ratio(options, "heads"), _ratio(options, "ffn")
    if facts is None or not facts.num_layers:
        return int(linear_params * (heads * _ATTENTION_SHARE + ffn * _FFN_SHARE))
    h, n_layers, f = facts.hidden_size, facts.num_layers, facts.intermediate_size
    n_heads, n_kv, d = facts.num_attention_heads, facts.num_key_value_heads, facts.head_dim
    ffn_mats = sum(1 for o, i in facts.linear_shapes if (o, i) in ((f, h), (h, f)))
    per_layer_ffn_mats = max(2, round(ffn_mats / n_layers)) if ffn_mats else 2
    n_kv_removed = min(n_kv - 1, int(round(heads * n_kv)))
    n_q_removed = n_kv_removed * (n_heads // n_kv)
    n_ffn_removed = min(f - 1, int(round(ffn * f)))
    attention = (2 * n_q_removed + 2 * n_kv_removed) * d * h
    return n_layers * (attention + per_layer_ffn_mats * n_ffn_removed * h)


# ---------------------------------------------------------------------------------------------
# The plugin


class Prune(Compressor):
    """Structured (heads, FFN neurons) or unstructured (magnitude, Wanda) pruning."""

    name = "prune"
    kind = "prune"
    version = edgepack.__version__
    description = "remove attention heads / FFN neurons (structured) or zero weights (magnitude, wanda)"
    options = (
        Option("heads", float, (), None, minimum=0.0, maximum=0.9,
               help="fraction of attention heads removed in every layer"),
        Option("ffn", float, (), None, minimum=0.0, maximum=0.9,
               help=f"fraction of FFN neurons removed in every layer (bare prune: {DEFAULT_FFN})"),
        Option("sparsity", float, (), None, minimum=0.0, maximum=0.95,
               help="fraction of every Linear weight zeroed (dense storage; see sparsify)"),
        Option("method", str, ("magnitude", "wanda"), None,
               help=f"how sparsity= picks the weights (default {DEFAULT_METHOD})"),
    )

    # -- options and checks ----------------------------------------------------------------

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults: a bare ``prune`` is ``ffn=0.25``; ``sparsity=`` alone uses ``method=wanda``."""
        parsed = super().parse_options(raw)
        ratios = ("heads", "ffn", "sparsity")
        if not any(k in parsed for k in ratios):
            if "method" in parsed:
                raise UsageError("option prune:method applies to unstructured pruning; give prune:sparsity=RATIO too")
            parsed["ffn"] = DEFAULT_FFN
        if not any(parsed.get(k) for k in ratios):
            raise UsageError("prune removes nothing: give prune:heads=, prune:ffn= or prune:sparsity= above 0")
        if parsed.get("sparsity"):
            parsed.setdefault("method", DEFAULT_METHOD)
        elif "method" in parsed:
            raise UsageError("option prune:method applies to unstructured pruning; give prune:sparsity=RATIO too")
        return parsed

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """One prune step, before any step that changes how weights are stored."""
        if any(step.plugin == self.name for step in previous):
            return "prune is already in the plan"
        late = [step.plugin for step in previous if step.plugin in _BEFORE]
        if late:
            return f"apply prune before {late[0]}: it needs plain float weights"
        return super().check(options, probe, previous)

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """FFN pruning at 25% and 50% for layouts prune knows (stock-loadable, composes with
        quantize); head pruning and sparsity only on request."""
        if facts.model_type not in _KNOWN_TYPES:
            return []
        return [{"ffn": 0.25}, {"ffn": 0.5}]

    # -- planning --------------------------------------------------------------------------

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe,
                 facts: ModelFacts | None = None) -> Footprint:
        """Structured: fewer linear parameters, smaller ``ffn_scale`` / ``heads_scale``.
        Unstructured: weights unchanged (dense storage)."""
        facts = facts or footprint.facts
        notes = []
        groups = footprint.weights
        heads, ffn = _ratio(options, "heads"), _ratio(options, "ffn")
        ffn_scale, heads_scale = footprint.ffn_scale, footprint.heads_scale
        if heads > 0 or ffn > 0:
            linear = next((g for g in groups if g.kind == "linear"), None)
            removed = removed_linear_params(options, linear.params if linear else 0, facts)
            groups = tuple(dataclasses.replace(g, params=max(0, g.params - removed)) if g.kind == "linear" else g
                           for g in groups)
            ffn_scale *= 1.0 - ffn
            heads_scale *= 1.0 - heads
            parts = [f"{k} -{_ratio(options, k):.0%}" for k in ("heads", "ffn") if _ratio(options, k) > 0]
            notes.append(f"structured pruning ({', '.join(parts)}): {removed:,} linear weights removed")
        if _ratio(options, "sparsity") > 0:
            density = 1.0 - _ratio(options, "sparsity")
            groups = tuple(dataclasses.replace(g, density=g.density * density) if g.kind == "linear" else g
                           for g in groups)
            notes.append(f"{_ratio(options, 'sparsity'):.0%} of linear weights zeroed "
                         f"({options.get('method') or DEFAULT_METHOD}), stored dense")
        return dataclasses.replace(footprint, weights=groups, ffn_scale=ffn_scale, heads_scale=heads_scale,
                                   notes=footprint.notes + tuple(notes))

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """A prior on 1 - mean cosine, fitted to MiniLM measurements (one-shot, calibrated on
        CALIBRATION_SAMPLES, judged on 20 other sentences; /tmp/prune_eval/measure.py in the
        report): ffn 0.1/0.25/0.5 lost 0.023/0.075/0.177, heads 0.25/0.5 lost 0.079/0.168,
        both at 0.25 lost 0.154 (the terms add), sparsity 0.3/0.5/0.7 lost 0.026/0.144/0.367
        with wanda and 0.069/0.258 (0.3/0.5) with magnitude. Decoders are assumed alike."""
        heads, ffn, sparsity = _ratio(options, "heads"), _ratio(options, "ffn"), _ratio(options, "sparsity")
        cost = 0.36 * heads ** 1.1 + 0.42 * ffn ** 1.25
        if sparsity:
            if (options.get("method") or DEFAULT_METHOD) == "wanda":
                cost += 1.15 * sparsity ** 3
            else:
                cost += 1.55 * sparsity ** 2.6
        return min(1.0, cost)

    # -- apply, save, restore --------------------------------------------------------------

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Structured part first (heads, FFN neurons), then the unstructured part."""
        if _structured(options):
            layers = _layers(model)
            if not layers:
                raise UsageError(
                    f"prune:heads/ffn does not support {_architecture(model)}: it knows BERT-style encoders, "
                    "Llama-style decoders (gate/up/down MLP) and GPT-2 (FFN only); "
                    "prune:sparsity= works on any model"
                )
            removed = _prune_structured(model, layers, options, context)
            context.progress(
                f"  prune: removed {removed['heads']} heads and {removed['ffn']} FFN neurons in each of {len(layers)} layers"
            )
        if _ratio(options, "sparsity") > 0:
            count = _prune_unstructured(model, options, context)
            context.progress(f"  prune: zeroed {_ratio(options, 'sparsity'):.0%} of {count} Linear weights")
        return model

    def writes_own_file(self, options: Mapping[str, Any]) -> bool:
        """No: head pruning writes ``model.pruned.safetensors`` (BERT; other models save stock) in
        shards of ``--shard-size``, as stock saving does."""
        return False

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """BERT with pruned heads: ``config.json`` + ``model.pruned.safetensors`` whose metadata
        gives each shrunk module's shape. Anything else: stock saving (returns False)."""
        import torch
        from edgepack.model import save_safetensors

        heads = getattr(model, "_edgepack_pruned_heads", None)
        if not heads:
            return False
        odd = [n for n, p in model.named_parameters() if type(p.data) is not torch.Tensor]
        if odd:
            raise UsageError(
                f"prune:heads on {_architecture(model)} needs its own loader and cannot save the weights "
                f"a later step changed ({odd[0]}); apply quantize without prune:heads, or prune:ffn only"
            )
        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        shapes = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                shapes[name] = [module.out_features, module.in_features]
        tensors = unique_tensors(model)
        metadata = {
            "format": PRUNED_FORMAT,
            "heads": json.dumps(heads, sort_keys=True),
            "linear_shapes": json.dumps(shapes, sort_keys=True),
            "dtype": float_dtype_name(model),
        }
        save_safetensors(tensors, model_dir / PRUNED_FILE, metadata=metadata, sharded=True)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild a BERT model with pruned heads: stock skeleton without weights, shrunk
        Linear layers and head counts from the metadata, then the saved tensors."""
        import torch
        from accelerate import init_empty_weights

        from edgepack.model import assign_weights, empty_model, load_safetensors, read_format_metadata

        file = model_dir / PRUNED_FILE
        meta = read_format_metadata(file, PRUNED_FORMAT)
        heads = json.loads(meta["heads"])
        shapes = json.loads(meta["linear_shapes"])
        dtype = getattr(torch, meta.get("dtype", "float32"))
        model = empty_model(model_dir, dtype)
        with init_empty_weights(include_buffers=False):
            for name, (out_f, in_f) in shapes.items():
                module = model.get_submodule(name)
                if (module.out_features, module.in_features) != (out_f, in_f):
                    replace_module(model, name, torch.nn.Linear(in_f, out_f, bias=module.bias is not None, dtype=dtype))
        for layer in _layers(model):
            if layer.name in heads and layer.layout == "bert":
                layer.attention.num_attention_heads = heads[layer.name]
                layer.attention.all_head_size = heads[layer.name] * layer.attention.attention_head_size
        model = assign_weights(model, load_safetensors(file, device=device), file)
        model._edgepack_pruned_heads = heads
        return model


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``prune`` compressor."""
    register(Prune)
