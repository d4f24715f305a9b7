"""``precision``: cast a model's floating-point weights and compute to bf16 or fp16.

Modules the model class declares must stay in fp32 (transformers' ``_keep_in_fp32_modules``,
for example T5's ``wo`` projections, which overflow in fp16) are left in fp32, and stock
``from_pretrained`` honours the same list when it loads the bundle.

Before ``quantize`` (other than ``scheme=mixed``) the Linear weights are not cast here: they stay
the memory-mapped source's, marked, and quantize casts each just before it quantizes it (or a
layer when it first runs it, :func:`cast_deferred`), so packing does not hold the whole model in
16 bits beside its source.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import edgepack
from edgepack.interfaces import ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe

_CAPABILITY = {"bf16": "bf16", "fp16": "fp16"}


class Precision(Compressor):
    """Cast floating-point weights and activations to a 16-bit dtype (half the bytes)."""

    name = "precision"
    kind = "precision"
    version = edgepack.__version__
    description = "cast weights and compute to bf16 or fp16 (keeps fp32 where the model needs it)"
    options = (Option("dtype", str, ("bf16", "fp16"), "bf16", help="16-bit dtype to cast to"),)

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """Refuse a dtype the target cannot compute in, or a second cast."""
        dtype = options["dtype"]
        if _CAPABILITY[dtype] not in probe.capabilities:
            return f"target {probe.target} cannot compute in {dtype} (its capabilities: {', '.join(sorted(probe.capabilities))})"
        if any(step.plugin == self.name for step in previous):
            return "precision is already in the plan"
        if any(step.plugin == "quantize" for step in previous):
            return "apply precision before quantize: casting would change the quantized weights' dtype"
        return super().check(options, probe, previous)

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """bf16 and fp16, where the target computes in them."""
        return [{"dtype": d} for d in ("bf16", "fp16") if _CAPABILITY[d] in probe.capabilities]

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """Float weights and activations at 16 bits; already-quantized groups unchanged."""
        import dataclasses

        groups = tuple(
            dataclasses.replace(g, bits=16) if g.bits > 16 else g for g in footprint.weights
        )
        return dataclasses.replace(
            footprint,
            weights=groups,
            activation_bits=min(footprint.activation_bits, 16),
            notes=footprint.notes + (f"weights and activations in {options['dtype']}",),
        )

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """Measured on MiniLM: bf16 loses 5e-5 mean cosine, fp16 1e-6; fp16's narrow range can
        overflow in other models, so it ranks a little behind bf16."""
        return 0.0002 if options["dtype"] == "bf16" else 0.0003

    def pack_held_bytes(self, footprint: Footprint, options: Mapping[str, Any], later: Sequence[PlanStep]) -> int:
        """Before ``quantize`` the Linear weights stay the memory-mapped source's until quantize
        casts each (see :meth:`apply`): the pack holds the rest only."""
        if _defers(later):
            return sum(g.bytes for g in footprint.weights if g.kind != "linear")
        return footprint.weights_bytes

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Cast the model, keeping ``_keep_in_fp32_modules`` in fp32. When the next step is
        ``quantize``, the weights of Linear layers are only marked (:func:`cast_deferred`):
        quantize casts each just before it quantizes it and the rest when it is done, so the
        model never exists whole in 16 bits beside its source; the result is the same."""
        import torch

        from edgepack.model import module_kind

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[options["dtype"]]
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        deferring = _defers(getattr(context, "later", ()))
        for name, module in model.named_modules():
            kept = bool(keep) and any(part in keep for part in name.split("."))
            lazy = module.weight if deferring and not kept and module_kind(module) == "linear" else None
            # kept modules back in fp32, as ``model.to(dtype)`` then ``module.float()`` left them
            cast = (lambda t: t.to(dtype).float()) if kept else (lambda t: t.to(dtype))
            module._apply(lambda t: t if t is lazy or not t.is_floating_point() else cast(t), recurse=False)
            if lazy is not None:  # cast when quantize reaches it, or when it first runs
                module.__dict__["_edgepack_cast_to"] = dtype
                module.__dict__["_edgepack_cast_hook"] = module.register_forward_pre_hook(
                    lambda m, args: cast_deferred(m))
        return model


def _defers(later: Sequence[PlanStep]) -> bool:
    """Whether precision leaves the Linear weights to the next step: ``quantize`` casts them,
    except ``scheme=mixed``, which first runs the whole model to measure each module's
    sensitivity (every weight cast at once)."""
    return bool(later) and later[0].plugin == "quantize" and later[0].options.get("scheme") != "mixed"


def cast_deferred(root: Any) -> None:
    """Cast the weights precision left to the next step (see :meth:`Precision.apply`) of every
    module inside ``root``. That step calls it for a module before it reads the module's weight,
    and for the whole model when it is done; a module that runs first casts itself (a forward
    pre-hook, removed here)."""
    import torch

    for module in root.modules():
        dtype = module.__dict__.pop("_edgepack_cast_to", None)
        if dtype is not None:
            module.__dict__.pop("_edgepack_cast_hook").remove()
            with torch.inference_mode(False):  # plain tensors, as precision's own casts
                module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t, recurse=False)


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``precision`` compressor."""
    register(Precision)
