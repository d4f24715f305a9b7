"""ModelSource: facts read from safetensors headers match the model's real modules."""

from __future__ import annotations

import pytest

from edgepack.errors import UsageError
from edgepack.model import ModelSource, auto_class, count_parameters, safetensors_header


def _skeleton_counts(source):
    import torch

    with torch.device("meta"):
        skeleton = auto_class(source.facts.task).from_config(source.config)
    return count_parameters(skeleton)


def test_minilm_facts_match_its_modules(model_dir):
    source = ModelSource.open(model_dir)
    counts, shapes = _skeleton_counts(source)
    assert dict(source.facts.parameters_by_kind) == counts
    assert source.facts.num_parameters == 22_713_216
    assert sorted(source.facts.linear_shapes) == sorted(shapes)
    assert source.facts.dtype == "float32"
    assert source.facts.task == "feature-extraction"
    assert (source.facts.hidden_size, source.facts.num_layers, source.facts.num_attention_heads) == (384, 6, 12)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_facts_match_their_modules(kind, tmp_path):
    from edgepack.testing import build_decoder

    source = ModelSource.open(build_decoder(kind, tmp_path / kind))
    counts, _ = _skeleton_counts(source)
    assert dict(source.facts.parameters_by_kind) == counts
    assert source.facts.task == "text-generation"


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match="not a safetensors file"):
        safetensors_header(bad)
