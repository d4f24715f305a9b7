"""The ``sparsify`` plugin: bitmask packing, sizes, round trips, 2:4, checks, estimates."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgepack.errors import UsageError  # noqa: E402
from edgepack.host import collect, make_plugin_manager  # noqa: E402
from edgepack.interfaces import ApplyContext, PlanStep, Probe  # noqa: E402
from edgepack.memory import initial_footprint  # noqa: E402
from edgepack.planner import fixed_plan  # noqa: E402
from edgepack.plugins import sparsify as sp  # noqa: E402
from edgepack.plugins.sparsify import SPARSE_FILE, SparseLinear, Sparsify  # noqa: E402

CPU = Probe("cpu", True, (), frozenset({"fp32", "int8"}))
WITH_24 = Probe("cuda", True, (), frozenset({"fp32", "fp16", "bf16", "2:4"}))


def _context(probe: Probe = CPU) -> ApplyContext:
    return ApplyContext(None, probe, None, [])  # sparsify uses neither target nor facts


def _header(file: Path) -> tuple[int, dict]:
    """(bytes before the tensor data, parsed JSON header) of a safetensors file."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return 8 + size, json.loads(handle.read(size))


def _state_bytes(model) -> int:
    """Bytes of every tensor in the model's state dict, shared ones once."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _inputs(batch: int = 4, seq: int = 16) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def _linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@pytest.fixture(scope="module")
def minilm(model_dir):
    """The fp32 MiniLM model (do not modify: deepcopy it)."""
    import transformers

    return transformers.AutoModel.from_pretrained(model_dir, dtype="auto").eval()


@pytest.fixture(scope="module")
def sparse_minilm(minilm, tmp_path_factory):
    """MiniLM sparsified 50% by sparsify itself, and the directory its save() wrote."""
    plugin = Sparsify()
    options = plugin.parse_options({"sparsity": "0.5"})
    model = plugin.apply(copy.deepcopy(minilm), options, _context())
    out = tmp_path_factory.mktemp("sparse") / "model"
    assert plugin.save(model, out, options) is True
    return model, out, options


# ---------------------------------------------------------------------------------------------
# bitmask arithmetic


def test_pack_unpack_and_expand_round_trip_on_random_tensors():
    gen = torch.Generator().manual_seed(1234)
    shapes = [(1, 1), (1, 8), (3, 7), (5, 9), (16, 384), (7, 1001), (64, 63)]
    for case in range(60):
        rows, cols = shapes[case % len(shapes)]
        density = [0.0, 1.0, 0.5, 0.01, 0.9][case % 5] if case < 10 else torch.rand(1, generator=gen).item()
        dtype = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
        weight = torch.randn(rows, cols, generator=gen).to(dtype)
        keep = torch.rand(rows, cols, generator=gen) < density
        weight = torch.where(keep, weight, torch.zeros((), dtype=dtype))
        mask = weight != 0

        packed = sp.pack_bitmask(mask)
        assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(cols / 8))
        assert torch.equal(sp.unpack_bitmask(packed, cols), mask)
        # bit j of byte k is column 8k + j; padding bits are clear
        assert int(packed.to(torch.int64).sum()) == sum(
            int(b) << (c % 8) for r in range(rows) for c, b in enumerate(mask[r].tolist()) if b
        )
        bitmask, values = sp.compress(weight)
        assert torch.equal(bitmask, packed)
        assert values.dtype == dtype and values.numel() == int(mask.sum())
        restored = sp.expand(bitmask, values, cols)
        assert restored.dtype == dtype and restored.is_contiguous()
        assert torch.equal(restored.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           weight.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_magnitude_and_two_four_masks():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(32, 64, generator=gen)
    keep = sp.magnitude_mask(weight, 0.3)
    assert int((~keep).sum()) == round(0.3 * weight.numel())
    assert weight[~keep].abs().max() <= weight[keep].abs().min()

    keep24 = sp.two_four_mask(weight).view(32, 16, 4)
    assert torch.all(keep24.sum(-1) == 2)
    groups = weight.abs().view(32, 16, 4)
    assert torch.all(groups.masked_fill(~keep24, float("inf")).amin(-1) >= groups.masked_fill(keep24, 0).amax(-1))


# ---------------------------------------------------------------------------------------------
# MiniLM: size and round trip


def test_bitmask_bundle_is_smaller_by_the_expected_bytes(minilm, sparse_minilm):
    model, out, _ = sparse_minilm
    linears = _linears(minilm)
    saved = 0
    for _, module in linears:
        rows, cols = module.weight.shape
        numel = rows * cols
        nnz = numel - round(0.5 * numel)
        saved += numel * 4 - (rows * math.ceil(cols / 8) + nnz * 4)

    file = out / SPARSE_FILE
    data_start, header = _header(file)
    data_bytes = file.stat().st_size - data_start
    assert data_bytes == _state_bytes(minilm) - saved
    # 10.6M linear weights at 17 instead of 32 bits: about 20 MB off MiniLM's 90.9 MB
    assert saved > 19_000_000
    assert data_bytes < 0.80 * _state_bytes(minilm)
    meta = header["__metadata__"]
    assert meta["format"] == sp.SPARSE_FORMAT and meta["dtype"] == "float32"
    sparse = json.loads(meta["sparse"])
    assert len(sparse) == len(linears) == 37  # 6 layers x 6 Linears + the pooler
    assert "embeddings.word_embeddings.weight" in header  # embeddings stay dense
    assert header["encoder.layer.0.intermediate.dense.bitmask"]["dtype"] == "U8"
    assert not any(k.endswith(".weight") and k.replace(".weight", "") in sparse for k in header)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SPARSE_FILE]


def test_restore_gives_bitwise_identical_outputs(sparse_minilm):
    model, out, options = sparse_minilm
    zeros = [float((m.weight == 0).float().mean()) for _, m in _linears(model)]
    assert all(abs(z - 0.5) < 1e-3 for z in zeros)
    with torch.inference_mode():
        expected = model(**_inputs()).last_hidden_state
    plugin = Sparsify()
    for runtime in ("compressed", "dense"):
        restored = plugin.restore(out, {**options, "runtime": runtime}, "cpu")
        kinds = {type(m) for _, m in restored.named_modules() if isinstance(m, (SparseLinear, torch.nn.Linear))}
        assert kinds == ({SparseLinear} if runtime == "compressed" else {torch.nn.Linear})
        restored = plugin.prepare(restored, options, "cpu")
        with torch.inference_mode():
            actual = restored(**_inputs()).last_hidden_state
        assert torch.equal(actual, expected), runtime
    query = restored.encoder.layer[0].attention.self.query
    assert torch.equal(query.weight, model.encoder.layer[0].attention.self.query.weight)


def test_precision_before_sparsify_stores_cast_values(minilm, tmp_path):
    plugin = Sparsify()
    options = plugin.parse_options({"sparsity": 0.3})
    assert plugin.check(options, CPU, [PlanStep("precision", "1", {"dtype": "bf16"})]) is None
    model = copy.deepcopy(minilm).to(torch.bfloat16)
    model = plugin.apply(model, options, _context())
    plugin.save(model, tmp_path, options)
    _, header = _header(tmp_path / SPARSE_FILE)
    assert header["encoder.layer.0.output.dense.values"]["dtype"] == "BF16"
    restored = plugin.restore(tmp_path, options, "cpu")
    assert restored.encoder.layer[0].output.dense.values.dtype == torch.bfloat16
    with torch.inference_mode():
        assert torch.equal(restored(**_inputs()).last_hidden_state, model(**_inputs()).last_hidden_state)


def test_bare_sparsify_keeps_zeros_a_prune_step_made(minilm):
    """Without sparsity=, weights that are already sparse keep exactly their zeros."""
    model = copy.deepcopy(minilm)
    with torch.no_grad():
        for _, module in _linears(model):
            module.weight.masked_fill_(~sp.magnitude_mask(module.weight, 0.3), 0)
    before = [m.weight.clone() for _, m in _linears(model)]
    plugin = Sparsify()
    options = plugin.parse_options({})
    assert plugin.check(options, CPU, [PlanStep("prune", "1", {"sparsity": 0.3, "method": "wanda"})]) is None
    plugin.apply(model, options, _context())
    assert all(torch.equal(b, m.weight) for b, (_, m) in zip(before, _linears(model)))

    alone = plugin.apply(copy.deepcopy(minilm), options, _context())  # dense weights: 50% by default
    zeros = sum(int((m.weight == 0).sum()) for _, m in _linears(alone))
    total = sum(m.weight.numel() for _, m in _linears(alone))
    assert abs(zeros / total - sp.DEFAULT_SPARSITY) < 1e-3


# ---------------------------------------------------------------------------------------------
# 2:4


def test_two_four_pattern_on_a_probe_with_the_capability(minilm, tmp_path):
    plugin = Sparsify()
    options = plugin.parse_options({"format": "2:4"})
    assert plugin.check(options, WITH_24, []) is None
    model = plugin.apply(copy.deepcopy(minilm), options, _context(WITH_24))
    for name, module in _linears(model):
        rows, cols = module.weight.shape
        zeros_per_group = (module.weight.view(rows, cols // 4, 4) == 0).sum(-1)
        assert torch.all(zeros_per_group >= 2), name
    # storage is the bitmask format; on a CPU the restored model runs it as such
    plugin.save(model, tmp_path, options)
    restored = plugin.restore(tmp_path, options, "cpu")
    restored = plugin.prepare(restored, options, "cpu")  # no 2:4 kernels on a CPU: unchanged
    with torch.inference_mode():
        assert torch.equal(restored(**_inputs()).last_hidden_state, model(**_inputs()).last_hidden_state)


def test_two_four_refused_without_the_capability():
    plugin = Sparsify()
    reason = plugin.check(plugin.parse_options({"format": "2:4"}), CPU, [])
    assert reason and "2:4" in reason and "target cpu lacks" in reason and "format=bitmask" in reason
    reason = plugin.check(plugin.parse_options({"format": "2:4", "sparsity": 0.7}), WITH_24, [])
    assert reason and "sparsity=0.7" in reason
    assert plugin.check(plugin.parse_options({"format": "bitmask"}), CPU, []) is None


def test_refusals_after_quantize_prune_and_itself():
    plugin = Sparsify()
    options = plugin.parse_options({})
    reason = plugin.check(options, CPU, [PlanStep("quantize", "1", {"scheme": "int8"})])
    assert reason and reason.startswith("sparsify must come before quantize; ")
    reason = plugin.check(plugin.parse_options({"sparsity": 0.5}), CPU,
                          [PlanStep("prune", "1", {"sparsity": 0.5, "method": "magnitude"})])
    assert reason and "drop sparsify's sparsity=" in reason
    # structured pruning leaves no zeros: sparsify may zero weights itself after it
    assert plugin.check(plugin.parse_options({"sparsity": 0.5}), CPU, [PlanStep("prune", "1", {"ffn": 0.25})]) is None
    assert plugin.check(options, CPU, [PlanStep("sparsify", "1", {})]) == "sparsify is already in the plan"


def test_registered_through_its_hook_and_refused_by_apply_specs():
    pm = make_plugin_manager(entrypoints=False)
    pm.register(sp, name="sparsify")
    registry = collect(pm, disabled=())
    assert registry.compressor("sparsify").kind == "sparsify"
    with pytest.raises(UsageError, match=r"--apply sparsify:format=2:4: format=2:4 needs"):
        fixed_plan(registry, ["sparsify:format=2:4"], CPU)
    with pytest.raises(UsageError, match=re.escape("is not one of bitmask|2:4")):
        fixed_plan(registry, ["sparsify:format=csr"], CPU)
    steps = fixed_plan(registry, ["sparsify:sparsity=0.4"], CPU)
    assert steps[0][1] == {"format": "bitmask", "sparsity": 0.4, "runtime": "compressed"}


# ---------------------------------------------------------------------------------------------
# planning arithmetic


def test_estimate_and_quality_cost(model_dir):
    from edgepack.model import ModelSource

    facts = ModelSource.open(model_dir).facts
    start = initial_footprint(facts)
    linear = next(g for g in start.weights if g.kind == "linear")
    plugin = Sparsify()

    half = plugin.estimate(start, plugin.parse_options({"sparsity": 0.5}), CPU)
    group = next(g for g in half.weights if g.kind == "linear")
    assert group.bits == pytest.approx(0.5 * 32 + 1)
    assert start.weights_bytes - half.weights_bytes == pytest.approx(linear.params * 15 / 8, abs=2)
    assert [g for g in half.weights if g.kind != "linear"] == [g for g in start.weights if g.kind != "linear"]

    bare = plugin.estimate(start, plugin.parse_options({}), CPU)
    assert next(g for g in bare.weights if g.kind == "linear").bits == pytest.approx(17)
    assert "assumed 50%" in bare.notes[-1]

    sixteen = start.with_groups(("linear",), 16, "bf16")  # precision before sparsify
    after = plugin.estimate(sixteen, plugin.parse_options({"sparsity": 0.25}), CPU)
    assert next(g for g in after.weights if g.kind == "linear").bits == pytest.approx(0.75 * 16 + 1)

    dense_runtime = plugin.estimate(start, plugin.parse_options({"runtime": "dense"}), CPU)
    assert dense_runtime.weights == start.weights

    costs = [plugin.quality_cost(plugin.parse_options({"sparsity": s}), facts) for s in (0.1, 0.3, 0.5)]
    assert 0 < costs[0] < costs[1] < costs[2] < 1
    assert plugin.quality_cost(plugin.parse_options({"format": "2:4"}), facts) > costs[2]


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_four_uses_semi_structured_kernels_on_cuda(minilm, tmp_path):
    major, _ = torch.cuda.get_device_capability(0)
    if major < 8:
        pytest.skip("2:4 kernels need compute capability 8.0")
    from torch.sparse import SparseSemiStructuredTensor

    plugin = Sparsify()
    options = plugin.parse_options({"format": "2:4"})
    model = plugin.apply(copy.deepcopy(minilm).half(), options, _context(WITH_24))
    plugin.save(model, tmp_path, options)
    restored = plugin.prepare(plugin.restore(tmp_path, options, "cuda"), options, "cuda").to("cuda")
    query = restored.encoder.layer[0].attention.self.query
    assert isinstance(query.weight, SparseSemiStructuredTensor)
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    with torch.inference_mode():
        expected = model.cuda()(**inputs).last_hidden_state.float()
        actual = restored(**inputs).last_hidden_state.float()
    assert torch.nn.functional.cosine_similarity(expected.flatten(1), actual.flatten(1)).min() > 0.999


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_linear_compiles_whole_and_matches_eager(dtype, monkeypatch):
    """run/bench --compile: a SparseLinear (bitmask expanded per call) compiles into one graph
    (torch reached directly once loaded, not through the lazy import proxy), its lookup tables
    built inside the graph as for a freshly loaded bundle, with eager's outputs."""
    from torch._dynamo.testing import CompileCounter

    from edgepack.plugins import sparsify

    sparsify._define_modules()
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 48, generator=gen) * sparsify.magnitude_mask(torch.randn(64, 48, generator=gen), 0.5)).to(dtype)
    layer = sparsify.SparseLinear(48, 64, *sparsify.compress(weight), torch.randn(64, generator=gen).to(dtype))
    monkeypatch.setattr(sparsify, "_TABLES", {})  # as in a process that has expanded nothing yet
    counter = CompileCounter()
    step = torch.compile(layer, fullgraph=True, backend=counter)
    x = torch.randn(3, 48, generator=gen).to(dtype)
    with torch.inference_mode():
        compiled, eager = step(x), layer(x)
    assert counter.frame_count == 1
    assert torch.equal(compiled, eager)
    assert torch.allclose(eager.float(), torch.nn.functional.linear(x, weight, layer.bias).float(), atol=1e-2)
