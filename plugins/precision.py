"""``precision``: cast a model's floating-point weights and compute to bf16 or fp16.

Modules the model class declares must stay in fp32 (transformers' ``_keep_in_fp32_modules``,
for example T5's ``wo`` projections, which overflow in fp16) are left in fp32, and stock
``from_pretrained`` honours the same list when it loads the bundle.
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

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Cast the model, keeping ``_keep_in_fp32_modules`` in fp32."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[options["dtype"]]
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        model.to(dtype)
        if keep:
            for name, module in model.named_modules():
                if any(part in keep for part in name.split(".")):
                    module.to(torch.float32)
        return model


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``precision`` compressor."""
    register(Precision)
