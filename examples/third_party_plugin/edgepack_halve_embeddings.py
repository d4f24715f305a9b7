"""``halve-embeddings``: a third-party edgepack compressor that stores embedding tables in fp16.

In small encoders the embedding tables are a large share of the weights (in all-MiniLM-L6-v2
the word embeddings alone are half of all parameters), yet only a few rows are read per input.
This plugin keeps every embedding table in float16 and every other weight as it is; at run time
only the rows looked up are cast back to the model's dtype.

It shows the whole plugin interface:

* ``estimate``: pure arithmetic on the footprint, the embedding group at 16 bits;
* ``quality_cost``: a prior from MiniLM (fp16 rounding of the tables costs less than 1e-6 of
  mean cosine);
* ``apply``: swaps each ``nn.Embedding`` for :class:`HalfEmbedding`;
* ``save`` / ``restore``: stock ``transformers`` would cast a mixed-dtype checkpoint to one
  dtype at load time, so the plugin writes ``config.json`` and its own safetensors file (no
  pickle) and rebuilds the model from them.

Install the package (``pip install examples/third_party_plugin``) and it is discovered through
the ``edgepack`` entry-point group::

    edgepack plugins
    edgepack pack ./all-MiniLM-L6-v2 --target cpu --budget 90MB --apply halve-embeddings --out dist/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import edgepack
from edgepack.errors import UsageError
from edgepack.model import replace_module, unique_tensors
from edgepack.interfaces import ApplyContext, Compressor, Footprint, ModelFacts, Option, PlanStep, Probe

__version__ = "0.1.0"

#: The edgepack plugin API this module was written for; edgepack skips it, saying what to
#: upgrade, when it offers another.
EDGEPACK_PLUGIN_API = 1

WEIGHTS_FILE = "model.halfemb.safetensors"
FORMAT = "edgepack-halve-embeddings/1"

try:  # torch is only needed to apply or restore; registering the class must stay cheap
    import torch
    from torch import nn

    _Module = nn.Module
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]
    _Module = object  # type: ignore[misc,assignment]


class HalfEmbedding(_Module):
    """An embedding table stored in float16; looked-up rows come back in ``out_dtype``.

    The table is a parameter named ``weight`` (as in ``nn.Embedding``), so state-dict keys and
    code that reads ``embedding.weight`` keep working.
    """

    def __init__(self, weight: Any, padding_idx: int | None, out_dtype: Any) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(weight.detach().to(torch.float16), requires_grad=False)

    def forward(self, ids: Any) -> Any:
        return nn.functional.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored=float16, out={self.out_dtype}"


class HalveEmbeddings(Compressor):
    """Store embedding tables in float16; everything else unchanged."""

    name = "halve-embeddings"
    kind = "other"
    version = __version__
    description = "store embedding tables in fp16 (only looked-up rows are cast back)"
    options = (
        Option("keep", str, (), None, help="comma-separated module-name fragments left in their dtype"),
    )

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """Run first and alone: earlier steps either already store the tables in 16 bits
        (precision), replace them (quantize) or write their own weight file (prune, sparsify)."""
        if previous:
            return (f"halve-embeddings writes its own weight file and cannot follow {previous[0].plugin}; "
                    "use it as the only step")
        return super().check(options, probe, previous)

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """The embedding group at 16 bits (kept modules are not modelled); nothing else changes."""
        import dataclasses

        groups = tuple(dataclasses.replace(g, bits=16) if g.kind == "embedding" and g.bits > 16 else g
                       for g in footprint.weights)
        return dataclasses.replace(footprint, weights=groups,
                                   notes=footprint.notes + ("embedding tables in fp16",))

    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """Measured on MiniLM: fp16 tables lose less than 1e-6 of mean cosine. The prior ranks it
        after a lossless plan and before a whole-model cast to 16 bits (precision, 2e-4)."""
        return 0.00005

    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Swap every ``nn.Embedding`` (not kept) for a :class:`HalfEmbedding`."""
        keep = [k.strip() for k in (options.get("keep") or "").split(",") if k.strip()]
        tied = set()  # an input table shared with the output head stays as it is: the head computes with it
        if getattr(model.config, "tie_word_embeddings", False) and getattr(model, "get_output_embeddings", None):
            if model.get_output_embeddings() is not None:
                tied.add(id(model.get_input_embeddings()))
        chosen = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.Embedding) and id(module) not in tied
                  and not any(k in name for k in keep)]
        if not chosen:
            raise UsageError("halve-embeddings found no embedding tables to store in fp16 (check keep=)")
        for name, module in chosen:
            replace_module(model, name, HalfEmbedding(module.weight, module.padding_idx, module.weight.dtype))
        return model

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """Write ``config.json`` and ``model.halfemb.safetensors`` (tied tensors stored once)."""
        from edgepack.model import save_safetensors

        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        halves = {name: {"padding_idx": m.padding_idx, "dtype": str(m.out_dtype).replace("torch.", "")}
                  for name, m in model.named_modules() if isinstance(m, HalfEmbedding)}
        tensors = unique_tensors(model)
        save_safetensors(tensors, model_dir / WEIGHTS_FILE,
                  metadata={"format": FORMAT, "embeddings": json.dumps(halves, sort_keys=True)})
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild the model :meth:`save` wrote: a skeleton without weights, then the tensors
        (edgepack.model has the helpers that every plugin with its own format needs)."""
        from safetensors.torch import load_file

        from edgepack.model import assign_weights, empty_model, read_format_metadata

        file = model_dir / WEIGHTS_FILE
        halves = json.loads(read_format_metadata(file, FORMAT)["embeddings"])
        model = empty_model(model_dir, None)
        tensors = load_file(file, device=device)
        for name, info in halves.items():
            weight = tensors.pop(f"{name}.weight")
            replace_module(model, name, HalfEmbedding(weight, info["padding_idx"], getattr(torch, info["dtype"])))
        return assign_weights(model, tensors, file)


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register ``halve-embeddings`` with edgepack."""
    register(HalveEmbeddings)
