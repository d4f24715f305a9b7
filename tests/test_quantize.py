"""The ``quantize`` plugin: int8 and int4 bundles of MiniLM (two packs, shared by the tests of
this module), the quantization arithmetic on random tensors, and the plans it refuses."""

from __future__ import annotations

import dataclasses
import importlib
import unittest.mock

import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.host import collect, make_plugin_manager
from edgepack.interfaces import DeviceInfo, PlanStep, Probe
from edgepack.planner import fixed_plan
from edgepack.smoke import CALIBRATION_SAMPLES, DEFAULT_SAMPLES, HELD_OUT_SAMPLES

torch = pytest.importorskip("torch")

from edgepack.plugins.quantize import (  # noqa: E402
    INT4_FILE, QuantEmbedding, QuantLinear, Quantize, dequantize, fused_kernels_available, gptq_int4, input_hessians,
    layerwise_hessians, quantize_int4_groups, quantize_int8_rows, unpack_int4,
)

#: Sentences for fidelity: neither smoke nor calibration samples.
HELD_OUT = list(HELD_OUT_SAMPLES)

#: A probe with every capability the built-ins ask for, so refusals come from the plan alone.
FULL_PROBE = Probe("cpu", True, (DeviceInfo(0, "cpu", 2**34, 2**33),),
                   frozenset({"fp32", "bf16", "fp16", "int8"}))


def builtin_registry():
    """The built-in compressors and the cpu target only (no other installed plugins)."""
    pm = make_plugin_manager(entrypoints=False)
    pm.register(importlib.import_module("edgepack.targets.cpu"), name="cpu")
    for name in ("precision", "quantize", "prune", "sparsify"):
        pm.register(importlib.import_module(f"edgepack.plugins.{name}"), name=name)
    return collect(pm, disabled=())


def embed(model, tokenizer, texts):
    from edgepack.smoke import mean_pool

    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    return mean_pool(hidden, enc["attention_mask"])


# ---------------------------------------------------------------------------------------------
# packed bundles, shared by this module


@pytest.fixture(scope="module")
def int8(model_dir, tmp_path_factory):
    return edgepack.pack(str(model_dir), target="cpu", budget="200MB", apply=["quantize:scheme=int8"],
                         out=str(tmp_path_factory.mktemp("int8")), registry=builtin_registry())


@pytest.fixture(scope="module")
def int4(model_dir, tmp_path_factory):
    # int4 at group size 32 measures about 0.978 mean cosine on MiniLM: below the default
    # floor for encoders (0.99), so the floor is set for this pack.
    return edgepack.pack(str(model_dir), target="cpu", budget="200MB", apply=["quantize:scheme=int4"],
                         min_fidelity=0.95, out=str(tmp_path_factory.mktemp("int4")), registry=builtin_registry())


@pytest.fixture(scope="module")
def original(model_dir):
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


def test_held_out_sentences_are_unseen():
    assert not set(HELD_OUT) & (set(DEFAULT_SAMPLES) | set(CALIBRATION_SAMPLES))


# ---------------------------------------------------------------------------------------------
# int8


def test_int8_weight_file_is_small(int8):
    weights = int8.bundle / "model" / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= 26_000_000
    assert not (int8.bundle / "model" / INT4_FILE).exists()
    assert int8.manifest["plan"][0]["options"]["scheme"] == "int8"


def test_int8_loads_with_stock_transformers(int8):
    assert int8.manifest["model"]["loader"] is None
    assert int8.manifest["model"]["stock_transformers"] is True
    import transformers

    model = transformers.AutoModel.from_pretrained(int8.bundle / "model", local_files_only=True)
    weight = model.encoder.layer[0].attention.self.query.weight
    assert getattr(weight, "qdata", None) is not None and weight.qdata.dtype == torch.int8  # really int8


def test_int8_fidelity_on_held_out_sentences(int8, original):
    import transformers

    reference_model, tokenizer = original
    stock = transformers.AutoModel.from_pretrained(int8.bundle / "model", local_files_only=True).eval()
    reference = embed(reference_model, tokenizer, HELD_OUT)
    got = embed(stock, tokenizer, HELD_OUT)
    cosines = (reference * got).sum(-1)
    assert cosines.mean().item() >= 0.995, cosines
    # edgepack.load swaps in its own int8 modules over the same data: the same outputs
    loaded = edgepack.load(int8.bundle)
    assert any(isinstance(m, QuantLinear) and m.bits == 8 for m in loaded.modules())
    if fused_kernels_available():  # the bundle's int8 weights are stored aligned for the fused kernel
        assert all(m.fused_rows for m in loaded.modules() if isinstance(m, QuantLinear))
    via_edgepack = embed(loaded, tokenizer, HELD_OUT)
    assert (via_edgepack * got).sum(-1).min().item() >= 0.9999


# ---------------------------------------------------------------------------------------------
# int4


def test_int4_weight_file_is_small_and_owned_by_quantize(int4):
    model_dir = int4.bundle / "model"
    weights = model_dir / INT4_FILE
    assert weights.is_file() and weights.stat().st_size <= 16_000_000
    assert not (model_dir / "model.safetensors").exists()
    assert int4.manifest["model"]["loader"] == "quantize"
    assert int4.manifest["model"]["stock_transformers"] is False
    assert int4.manifest["fidelity"]["floor"] == 0.95
    assert int4.manifest["fidelity"]["value"] >= 0.95


def test_int4_round_trips_to_the_pack_time_smoke_outputs(int4):
    from safetensors.torch import load_file

    from edgepack.smoke import compare, run_outputs

    model = edgepack.load(int4.bundle)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 4 for m in layers)
    assert any(isinstance(m, QuantEmbedding) for m in model.modules())
    inputs = load_file(int4.bundle / "smoke" / "inputs.safetensors")
    expected = load_file(int4.bundle / "smoke" / "expected.safetensors")
    outputs = run_outputs(model, inputs, "feature-extraction", int4.manifest["workload"]["batch_size"])
    fidelity = compare(expected, outputs, "feature-extraction")
    recorded = int4.manifest["fidelity"]
    assert fidelity.value == pytest.approx(recorded["value"], abs=2e-6)
    assert fidelity.worst == pytest.approx(recorded["worst"], abs=2e-6)


def test_stock_transformers_refuses_the_int4_model_dir(int4):
    import transformers

    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModel.from_pretrained(int4.bundle / "model", local_files_only=True)


# ---------------------------------------------------------------------------------------------
# the arithmetic, without packing


def test_unpack_int4_inverts_the_nibble_packing():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 64), generator=gen, dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(unpack_int4(packed), codes)
    assert unpack_int4(packed.unsqueeze(0)).shape == (1, 5, 64)


@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_int4_group_round_trip_error_is_bounded(group_size):
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn(48, 256, generator=gen) * 0.05
    w[3, 7] = 1.0  # an outlier in one group
    packed, scale, offset = quantize_int4_groups(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert scale.dtype == offset.dtype == torch.float16 and scale.shape == (48, 256 // group_size)
    codes = unpack_int4(packed)
    assert int(codes.max()) <= 15
    back = dequantize(packed, scale, offset, 4, torch.float32)
    assert back.shape == w.shape
    groups = w.reshape(48, -1, group_size)
    err = (back - w).reshape(48, -1, group_size)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # round-to-nearest step of each group
    # the searched clipping range never does worse than plain round-to-nearest over the full range
    mse = (err ** 2).mean(-1)
    assert (mse <= (step / 2) ** 2 * 1.05 + 1e-10).all()
    assert (err.abs().amax(-1) <= 0.3 * (groups.amax(-1) - groups.amin(-1)) + 1e-4).all()
    # and it is far better than nothing: relative error of the whole matrix
    assert ((back - w).norm() / w.norm()).item() < 0.15


def test_int8_row_round_trip_error_is_half_a_step():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 96, generator=gen)
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (32, 1)
    back = dequantize(q, scale, None, 8, torch.float32)
    assert ((back - w).abs() <= scale * 0.5 + 1e-6).all()


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, group = 64, 256, 32
    weight = torch.randn(out_f, in_f, generator=gen) * 0.05
    mixing = torch.randn(24, in_f, generator=gen)  # inputs live near a 24-dimensional subspace

    def inputs(n: int):
        return torch.randn(n, 24, generator=gen) @ mixing + 0.05 * torch.randn(n, in_f, generator=gen)

    calibration = inputs(2048)
    hessian = 2 * calibration.double().T @ calibration.double() / calibration.shape[0]
    rtn = dequantize(*quantize_int4_groups(weight, group), 4, torch.float32)
    gptq = dequantize(*gptq_int4(weight, hessian, group), 4, torch.float32)
    held_out = inputs(1024)  # unseen inputs from the same distribution
    err_rtn = (held_out @ (weight - rtn).T).pow(2).mean().item()
    err_gptq = (held_out @ (weight - gptq).T).pow(2).mean().item()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    # same grid: round-to-nearest is optimal per weight, GPTQ trades weight error for output error
    assert (weight - gptq).pow(2).mean() >= (1 - 1e-6) * (weight - rtn).pow(2).mean()


def test_gptq_arithmetic_pieces_match_their_plain_definitions():
    """The fast pieces of GPTQ compute what their plain definitions do: the clipping search over
    cache-sized chunks (a ragged last chunk included) is bit for bit the search over the whole
    tensor at once, and the factor of the inverse Hessian is upper triangular with
    ``UᵀU = H⁻¹``; a Hessian that is not positive definite is refused."""
    from edgepack.plugins.quantize import _int4_group_params, _upper_cholesky_of_inverse

    gen = torch.Generator().manual_seed(4)
    g = torch.randn(37, 6, 32, generator=gen) * torch.rand(37, 6, 1, generator=gen)
    g[0, 0] = 0.0  # a group of zeros: the clamped scale
    scale, lo = _int4_group_params(g, chunk=32 * 10)  # 222 groups in chunks of 10
    lo_full, hi_full = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    best = torch.full_like(lo_full, float("inf"))
    want_scale, want_lo = torch.zeros_like(lo_full), torch.zeros_like(lo_full)
    for step in range(20):
        low, high = lo_full * (1.0 - 0.015 * step), hi_full * (1.0 - 0.015 * step)
        s, offset = ((high - low) / 15).clamp(min=1e-8).half().float(), low.half().float()
        err = ((torch.clamp(torch.round((g - offset) / s), 0, 15) * s + offset - g) ** 2).sum(-1, keepdim=True)
        better = err < best
        best, want_scale, want_lo = (torch.where(better, err, best), torch.where(better, s, want_scale),
                                     torch.where(better, offset, want_lo))
    assert torch.equal(scale, want_scale) and torch.equal(lo, want_lo)

    x = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    x[:, 7] = 0.0  # an input never seen: its diagonal entry becomes 1
    h = 2 * x.T @ x / 300
    perm = torch.randperm(40, generator=gen)
    upper = _upper_cholesky_of_inverse(h, perm, 0.01).double()
    damped = h.clone()
    damped[7, 7] = 1.0
    damped += 0.01 * damped.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    want = torch.linalg.inv(damped[perm][:, perm])
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper.T @ upper, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        _upper_cholesky_of_inverse(-h - torch.eye(40, dtype=torch.float64), perm, 0.01)


@pytest.mark.parametrize("kind", ["llama", "encoder"])
def test_layerwise_statistics_equal_the_whole_model_pass_one_layer_at_a_time(kind, tmp_path):
    """GPTQ's statistics are collected a layer at a time (only one layer's alive), and they are
    the ones a pass of the whole model gives; modules outside the layer stack come last."""
    from edgepack.pipeline import open_source
    from edgepack.testing import build_decoder, build_encoder

    path = build_decoder("llama", tmp_path / "m") if kind == "llama" else build_encoder(tmp_path / "m")
    session = open_source(path, seq_len=32)
    model = session.original
    use_cache = getattr(model.config, "use_cache", None)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    whole = input_hessians(model, linears, session.calibration)
    seen = []
    for hessians in layerwise_hessians(model, linears, session.calibration):
        seen.append(sorted(hessians))
        for name, h in hessians.items():
            torch.testing.assert_close(h, whole[name], rtol=1e-9, atol=1e-9)
    layers = model.config.num_hidden_layers
    stack = "model.layers." if kind == "llama" else "encoder.layer."
    assert all(len({n.split(".")[len(stack.split(".")) - 1] for n in group}) == 1 for group in seen[:layers])
    assert all(n.startswith(stack) for group in seen[:layers] for n in group)
    assert sorted(n for group in seen for n in group) == sorted(whole)
    assert len(seen) == layers + (1 if any(not n.startswith(stack) for n in whole) else 0)
    assert getattr(model.config, "use_cache", None) == use_cache  # set back after the passes without a cache
    if kind == "llama":  # modules called on one tensor share one matrix, the one each would have alone
        first, modules = "model.layers.0.", dict(linears)
        assert whole[first + "self_attn.q_proj"] is whole[first + "self_attn.k_proj"] is whole[first + "self_attn.v_proj"]
        assert whole[first + "mlp.gate_proj"] is whole[first + "mlp.up_proj"]
        assert whole[first + "self_attn.o_proj"] is not whole[first + "self_attn.q_proj"]
        for name in (first + "self_attn.v_proj", first + "mlp.up_proj"):
            alone = input_hessians(model, [(name, modules[name])], session.calibration)[name]
            torch.testing.assert_close(alone, whole[name], rtol=1e-9, atol=1e-9)


def test_modules_share_statistics_only_while_they_get_the_same_inputs():
    """Two Linears called on one tensor share a matrix; when one of them later gets an input
    the other does not (either order), each ends with the statistics it would have alone."""
    gen = torch.Generator().manual_seed(0)

    class Pair(torch.nn.Module):
        def __init__(self, pattern):
            super().__init__()
            self.a, self.b, self.pattern = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4), pattern

        def forward(self, x, other):
            for name, which in self.pattern:
                getattr(self, name)(x if which == "x" else other)

    for pattern in ([("a", "x"), ("b", "x"), ("b", "y")], [("a", "x"), ("b", "x"), ("a", "y")],
                    [("a", "x"), ("a", "x"), ("b", "x")], [("a", "x"), ("b", "x")]):
        model = Pair(pattern)
        batches = [{"x": torch.randn(5, 8, generator=gen), "other": torch.randn(3, 8, generator=gen)} for _ in range(2)]
        both = input_hessians(model, [("a", model.a), ("b", model.b)], batches)
        for name in ("a", "b"):
            alone = input_hessians(model, [(name, getattr(model, name))], batches)[name]
            torch.testing.assert_close(both[name], alone, rtol=1e-12, atol=1e-12)
        assert (both["a"] is both["b"]) == (len(pattern) == 2), pattern


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_embedding_gathers_the_rows_of_the_dequantized_table(bits):
    gen = torch.Generator().manual_seed(bits)
    table = torch.randn(50, 64, generator=gen)
    if bits == 4:
        packed, scale, offset = quantize_int4_groups(table, 32)
    else:
        (packed, scale), offset = quantize_int8_rows(table), None
    emb = QuantEmbedding(50, 64, bits, packed, scale, offset, padding_idx=0, dtype=torch.float32)
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    rows = emb(ids)
    assert rows.shape == (3, 7, 64) and rows.dtype == torch.float32
    full = emb.weight
    assert torch.equal(rows, full[ids])
    assert torch.equal(full, dequantize(packed, scale, offset, bits, torch.float32))
    assert ((full - table).norm() / table.norm()).item() < (0.15 if bits == 4 else 0.01)


def test_quant_linear_matches_a_linear_with_the_dequantized_weight():
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    packed, scale, offset = quantize_int4_groups(weight, 16)
    layer = QuantLinear(64, 40, 4, packed, scale, offset, bias)
    x = torch.randn(5, 64, generator=gen)
    expected = torch.nn.functional.linear(x, dequantize(packed, scale, offset, 4, torch.float32), bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_int4_estimate_counts_scales_and_offsets(model_dir):
    from edgepack.memory import initial_footprint
    from edgepack.model import ModelSource

    facts = ModelSource.open(model_dir).facts
    q = Quantize()
    plain = initial_footprint(facts)
    for group in (32, 128):
        options = q.parse_options({"scheme": "int4", "group_size": str(group)})
        after = q.estimate(plain, options, FULL_PROBE)
        params = facts.parameters_by_kind["linear"] + facts.parameters_by_kind["embedding"]
        expected = params * (4 + 32 / group) / 8 + facts.parameters_by_kind["norm"] * 4
        assert after.weights_bytes == pytest.approx(expected, rel=1e-6)


def test_int4_round_trips_a_decoder_with_tied_embeddings(tmp_path):
    import transformers

    from edgepack.testing import decoder_config

    config = decoder_config("gpt2", 1000, tie_word_embeddings=True)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    q = Quantize()
    options = q.parse_options({"scheme": "int4", "method": "rtn"})
    model = q.apply(model, options, None)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    assert q.save(model, tmp_path, options)
    restored = q.restore(tmp_path, options, "cpu")
    with torch.inference_mode():
        after = restored(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def registry():
    return builtin_registry()


def test_quantize_after_sparsify_is_refused(registry):
    for scheme in ("int8", "int4"):
        with pytest.raises(UsageError, match=rf"--apply quantize:scheme={scheme}: quantize cannot follow sparsify"):
            fixed_plan(registry, ["sparsify:format=bitmask,sparsity=0.5", f"quantize:scheme={scheme}"], FULL_PROBE)
    reason = Quantize().check({"scheme": "int8"}, FULL_PROBE, [PlanStep("sparsify", "1", {"format": "bitmask"})])
    assert reason and "sparsify" in reason


def test_int8_after_prune_heads_is_refused_but_int4_is_not(registry):
    for scheme in ("int8", "int8-dynamic"):
        with pytest.raises(UsageError, match=rf"--apply quantize:scheme={scheme}: .*prune:heads"):
            fixed_plan(registry, ["prune:heads=0.25", f"quantize:scheme={scheme}"], FULL_PROBE)
    steps = fixed_plan(registry, ["prune:heads=0.25", "quantize:scheme=int4"], FULL_PROBE)
    assert [c.name for c, _ in steps] == ["prune", "quantize"]
    # FFN pruning writes a stock config, so int8 may follow it
    steps = fixed_plan(registry, ["prune:ffn=0.25", "quantize:scheme=int8"], FULL_PROBE)
    assert [c.name for c, _ in steps] == ["prune", "quantize"]


def test_precision_after_quantize_is_refused(registry):
    with pytest.raises(UsageError, match=r"--apply precision:dtype=bf16: apply precision before quantize"):
        fixed_plan(registry, ["quantize:scheme=int8", "precision:dtype=bf16"], FULL_PROBE)
    steps = fixed_plan(registry, ["precision:dtype=bf16", "quantize:scheme=int8"], FULL_PROBE)
    assert [(c.name, o["dtype"] if "dtype" in o else o["scheme"]) for c, o in steps] == [
        ("precision", "bf16"), ("quantize", "int8")]


def test_second_quantize_and_int8_dynamic_without_int8_compute_are_refused(registry):
    with pytest.raises(UsageError, match="quantize is already in the plan"):
        fixed_plan(registry, ["quantize:scheme=int8", "quantize:scheme=int4"], FULL_PROBE)
    no_int8 = Probe("cpu", True, FULL_PROBE.devices, frozenset({"fp32"}))
    with pytest.raises(UsageError, match="int8-dynamic needs int8 compute"):
        fixed_plan(registry, ["quantize:scheme=int8-dynamic"], no_int8)


def test_int8_decoding_steps_run_in_the_fused_kernel():
    """Inputs of at most FUSED_MAX_ROWS rows (decoding steps) go through torch's fused int8
    kernel, bf16 activations, and agree with the dequantizing path; larger inputs keep it."""
    from edgepack.plugins.quantize import FUSED_MAX_ROWS, quantize_int8_rows

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    q, scale = quantize_int8_rows(weight)
    layer = QuantLinear(64, 48, 8, q, scale, None, bias)
    model = torch.nn.Sequential(layer)
    probe = Probe("cpu", True, (DeviceInfo(0, "cpu", 1, 1),), frozenset({"fp32", "int8"}))
    Quantize().prepare(model, {"scheme": "int8"}, "cpu", probe)
    assert layer.fused_rows == FUSED_MAX_ROWS
    calls = []
    original = layer._forward_fused
    layer._forward_fused = lambda x: calls.append(x.shape) or original(x)
    for rows in (1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1):
        x = torch.randn(rows, 64, generator=gen)
        want = x @ dequantize(q, scale, None, 8, torch.float32).T + bias
        got = layer(x.unsqueeze(0))[0]
        assert got.dtype == torch.float32
        assert (got - want).abs().max() < 0.02 * want.abs().max(), rows
    assert calls == [(1, 1, 64), (1, FUSED_MAX_ROWS, 64)]  # not the larger input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_quantized_linears_compile_whole_and_match_eager(dtype):
    """run/bench --compile: an int8 and an int4 Linear in their fused kernels, as a decoding step
    calls them (fp32 activations, or bf16 ones after precision:dtype=bf16), compile into one
    graph (no break, nothing set at the first call that would recompile the next) and give
    eager's outputs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from edgepack.plugins.quantize import quantize_int4_groups, quantize_int8_rows

    if not fused_kernels_available():
        pytest.skip("this CPU runs no fused kernels")
    import torch._dynamo

    gen = torch.Generator().manual_seed(0)
    q8, s8 = quantize_int8_rows(torch.randn(64, 64, generator=gen))
    q4, s4, o4 = quantize_int4_groups(torch.randn(64, 64, generator=gen), 32)
    int8 = QuantLinear(64, 64, 8, q8, s8, None, torch.randn(64, generator=gen).to(dtype))
    int4 = QuantLinear(64, 64, 4, q4, s4, o4)
    assert int8.use_int8_kernel() and int4.use_int4_kernel()
    model = torch.nn.Sequential(int8, torch.nn.SiLU(), int4).eval()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # tracing is the point, not code generation
    step = torch.compile(model, fullgraph=True, backend=counter)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(1, 1, 64, generator=gen).to(dtype)
            assert torch.allclose(step(x).float(), model(x).float(), atol=1e-5, rtol=0)
    assert counter.frame_count == 1


def test_the_fused_int8_kernel_gets_only_rows_and_operands_it_reads_correctly():
    """torch 2.13's ``_weight_int8pack_mm`` on AVX-512 crashes or returns wrong values for
    rows whose width is not a multiple of 16, for a weight not 16-byte aligned (one
    memory-mapped from a safetensors file of another writer may not be) and for activations not
    32-byte aligned (a bf16 input that is a view). Such weights stay on the dequantizing path (a
    copy would hold them twice); such inputs are copied, 64-byte aligned, per call. Before the
    fix this test failed (or crashed the interpreter) on an avx512_vnni Xeon."""
    from edgepack.plugins.quantize import FUSED_MAX_ROWS, quantize_int8_rows

    gen = torch.Generator().manual_seed(0)
    for width, offset in ((200, 0), (64, 4), (64, 0)):
        weight = torch.randn(48, width, generator=gen)
        q, scale = quantize_int8_rows(weight)
        backing = torch.empty(q.numel() + 64, dtype=torch.int8)
        start = next(i for i in range(64) if (backing.data_ptr() + i) % 64 == offset)
        stored = backing[start:start + q.numel()].view(q.shape)
        stored.copy_(q)
        layer = QuantLinear(width, 48, 8, stored, scale)
        fits = width % 16 == 0 and offset == 0
        assert layer.use_int8_kernel() == fits
        assert layer.fused_rows == (FUSED_MAX_ROWS if fits else 0) and layer.qdata is stored
        reference = dequantize(q, scale, None, 8, torch.float32)
        for rows in (1, 14):
            x = torch.randn(rows * width + 3, generator=gen).bfloat16()[3:].view(rows, width)  # a view off alignment
            with torch.inference_mode():
                got = layer(x).float()
            want = x.float() @ reference.T
            assert (got - want).abs().max() < 0.02 * want.abs().max(), (width, rows)


def _torchao_dynamic_linear(gen, reduce_range=False):
    """A Linear quantized by torchao's Int8DynamicActivationInt8WeightConfig, with its fp32 source."""
    import copy

    torchao = pytest.importorskip("torchao.quantization")
    source = torch.nn.Linear(64, 48)
    with torch.no_grad():
        source.weight.copy_(torch.randn(48, 64, generator=gen))
        source.bias.copy_(torch.randn(48, generator=gen))
    model = torch.nn.Sequential(copy.deepcopy(source))
    config = torchao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    torchao.quantize_(model, config)
    if reduce_range:
        model[0].weight.act_quant_kwargs = type(model[0].weight.act_quant_kwargs)(
            model[0].weight.act_quant_kwargs.granularity, model[0].weight.act_quant_kwargs.mapping_type, True)
    return source, model


def test_int8_dynamic_linears_compute_torchaos_products_without_int_mm():
    """int8-dynamic Linears are swapped for QuantLinear at load time: the same per-row int8
    activations times the same int8 weights as torchao's own path (which runs torch._int_mm,
    tens of times slower on CPU), within fp32 rounding for large inputs and within the fused
    kernel's bf16 output for decoding steps; a kind of torchao weight edgepack does not compute
    (reduced range), and any on a GPU, keep torchao's path."""
    from edgepack.plugins import quantize as quantize_module

    gen = torch.Generator().manual_seed(0)
    source, reference = _torchao_dynamic_linear(gen)
    _, swapped = _torchao_dynamic_linear(torch.Generator().manual_seed(0))
    probe = Probe("cpu", True, (DeviceInfo(0, "cpu", 1, 1),), frozenset({"fp32", "int8"}))
    Quantize().prepare(swapped, {"scheme": "int8-dynamic"}, "cpu", probe)
    layer = swapped[0]
    assert isinstance(layer, QuantLinear) and layer.dynamic and "int8 activations" in repr(layer)
    fused_calls = []
    original = layer._int8pack_mm
    layer._int8pack_mm = lambda rows: fused_calls.append(tuple(rows.shape)) or original(rows)
    for rows, dtype in ((1, torch.float32), (200, torch.float32), (200, torch.bfloat16), (5, torch.bfloat16)):
        x = (torch.randn(2, rows, 64, generator=gen) * 3).to(dtype)
        with torch.inference_mode():
            want, got, exact = reference(x), layer(x), source(x.float())
        assert got.dtype == dtype and got.shape == want.shape
        error = (got.float() - want.float()).abs().max() / want.float().abs().max()
        quantization = (want.float() - exact).abs().max() / exact.abs().max()
        large = rows * 2 > layer.fused_rows
        if dtype == torch.float32 and large:
            assert error < 1e-5, (rows, error)  # the same integer products, summed in fp32
        else:  # bf16 results: well inside int8's own error
            assert error < 0.5 * quantization + 0.01, (rows, dtype, error, quantization)
    if quantize_module.fused_kernels_available():
        assert fused_calls == [(2, 64), (10, 64)]  # decoding-sized inputs only
    _, kept = _torchao_dynamic_linear(torch.Generator().manual_seed(0), reduce_range=True)
    Quantize().prepare(kept, {"scheme": "int8-dynamic"}, "cpu", probe)
    assert isinstance(kept[0], torch.nn.Linear)
    _, on_gpu = _torchao_dynamic_linear(torch.Generator().manual_seed(0))
    Quantize().prepare(on_gpu, {"scheme": "int8-dynamic"}, "cuda", probe)
    assert isinstance(on_gpu[0], torch.nn.Linear)  # torchao's int8 x int8 kernels are fast on GPUs


def test_int8_dynamic_linears_run_int_mm_where_the_probe_measured_it_fast():
    """With the probe's ``int8-gemm`` (torch._int_mm measured fast here: VNNI or AMX), every
    int8-dynamic call runs in torch._int_mm: torchao's own products and scaling, so fp32 results
    equal torchao's bit for bit at every row count (decoding steps included, which otherwise go
    through the fused kernel's bf16 output). The same weights prepared without the capability (a
    CPU without the fast path: nothing of it is stored) give torchao's results within the fused
    kernel's bf16 rounding. _int_mm is correct on any CPU, only slow on some, so this runs
    everywhere."""
    gen = torch.Generator().manual_seed(0)
    _, reference = _torchao_dynamic_linear(gen)
    fast = Probe("cpu", True, (DeviceInfo(0, "cpu", 1, 1),), frozenset({"fp32", "int8", "int8-gemm"}))
    plain = Probe("cpu", True, (DeviceInfo(0, "cpu", 1, 1),), frozenset({"fp32", "int8"}))
    _, with_int_mm = _torchao_dynamic_linear(torch.Generator().manual_seed(0))
    _, without = _torchao_dynamic_linear(torch.Generator().manual_seed(0))
    Quantize().prepare(with_int_mm, {"scheme": "int8-dynamic"}, "cpu", fast)
    Quantize().prepare(without, {"scheme": "int8-dynamic"}, "cpu", plain)
    assert with_int_mm[0].int_mm and "kernel=int_mm" in repr(with_int_mm[0])
    assert not without[0].int_mm and "kernel=int_mm" not in repr(without[0])
    calls = []
    real_int_mm = torch._int_mm

    def counting(a, b):
        calls.append(tuple(a.shape))
        return real_int_mm(a, b)

    for rows in (1, 3, 200):
        x = torch.randn(2, rows, 64, generator=gen) * 3
        with torch.inference_mode():
            want = reference(x)
            with unittest.mock.patch.object(torch, "_int_mm", counting):
                got = with_int_mm(x)
            other = without(x)
        assert torch.equal(got, want), rows
        assert (other - want).abs().max() < 0.01 * want.abs().max(), rows
        half = (x.bfloat16(), reference(x.bfloat16()))
        with torch.inference_mode():
            got_half = with_int_mm(half[0])
        assert got_half.dtype == torch.bfloat16
        assert (got_half.float() - half[1].float()).abs().max() <= 0.01 * half[1].float().abs().max()
    assert calls == [(2, 64), (6, 64), (400, 64)]
    _, on_gpu = _torchao_dynamic_linear(torch.Generator().manual_seed(0))
    Quantize().prepare(on_gpu, {"scheme": "int8-dynamic"}, "cuda", fast)
    assert isinstance(on_gpu[0], torch.nn.Linear)  # a CPU capability says nothing of a GPU


def test_the_cpu_probe_reports_int8_gemm_only_when_int_mm_is_measured_fast_and_correct(monkeypatch):
    """``int8-gemm`` is a measurement: an _int_mm several times slower than fp32 (a plain loop,
    as on CPUs without VNNI) or one with wrong results is not reported, whatever the flags."""
    import time as time_module

    from edgepack.targets import cpu

    real_int_mm, measured = torch._int_mm, cpu.int8_gemm_fast

    def slow(a, b):
        time_module.sleep(0.05)
        return real_int_mm(a, b)

    def wrong(a, b):
        return real_int_mm(a, b) + 1

    try:
        for replacement in (slow, wrong):
            cpu.int8_gemm_fast.cache_clear()
            monkeypatch.setattr(torch, "_int_mm", replacement)
            assert not cpu.int8_gemm_fast(), replacement.__name__
            assert "int8-gemm" not in cpu.CpuTarget({}).probe().capabilities
        monkeypatch.setattr(torch, "_int_mm", real_int_mm)
        monkeypatch.setattr(cpu, "int8_gemm_fast", lambda: True)
        assert "int8-gemm" in cpu.CpuTarget({}).probe().capabilities
    finally:
        measured.cache_clear()


needs_int4_kernel = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"), reason="this torch has no CPU int4 kernel")


@needs_int4_kernel
def test_int4_repacking_for_the_cpu_kernel_does_not_depend_on_the_chunking():
    """pack_int4_for_cpu converts a few rows at a time (the int32 codes of a whole output head
    would be 8x its packed size); the bytes equal those of one whole conversion, including a
    last block shorter than the kernel's 64 rows."""
    from edgepack.plugins.quantize import pack_int4_for_cpu

    q, scale, offset = quantize_int4_groups(torch.randn(304, 128, generator=torch.Generator().manual_seed(0)), 32)
    whole = pack_int4_for_cpu(q, scale, offset, chunk_rows=4096)
    chunked = pack_int4_for_cpu(q, scale, offset, chunk_rows=64)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert whole[0].shape == q.shape and whole[0].dtype == torch.uint8  # no more memory than before
    assert whole[1].shape == (128 // 32, 304, 2)


@needs_int4_kernel
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_kernel_matches_dequantize_then_matmul(group_size):
    """An int4 Linear repacked for torch's fused CPU kernel gives the outputs of the portable
    dequantize-then-matmul path (bf16 activations: within 2% of the largest output) at every
    number of rows, and refuses shapes and group sizes the kernel does not take."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 256, generator=gen), torch.randn(96, generator=gen)
    q, scale, offset = quantize_int4_groups(weight, group_size)
    reference = dequantize(q, scale, offset, 4, torch.float32)
    layer = QuantLinear(256, 96, 4, q, scale, offset, bias)
    assert layer.use_int4_kernel()
    assert layer.int4_group == group_size and layer.offset is None
    assert "kernel=int4pack" in repr(layer)
    for rows in (1, 7, 40):
        x = torch.randn(2, rows, 256, generator=gen)
        want = x @ reference.T + bias
        with torch.inference_mode():
            got = layer(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max() < 0.02 * want.abs().max(), rows
    q16, s16, o16 = quantize_int4_groups(weight, 16)
    assert not QuantLinear(256, 96, 4, q16, s16, o16).use_int4_kernel()  # group 16: no kernel
    q40, s40, o40 = quantize_int4_groups(weight[:40], 32)
    assert not QuantLinear(256, 40, 4, q40, s40, o40).use_int4_kernel()  # rows not a multiple of 16


@needs_int4_kernel
def test_int4_decoder_bundle_decodes_in_the_fused_kernel_and_loads_without_it(tmp_path, monkeypatch):
    """An int4 decoder bundle's Linears run in the fused kernel where this CPU has it; the same
    bundle loaded where the fast path is missing (simulated) runs the portable dequantizing path
    with the same logits: the kernel layout is made at load time and never stored."""
    from edgepack.plugins import quantize as quantize_module
    from edgepack.testing import build_decoder

    llama = build_decoder("llama", tmp_path / "llama")
    # round-to-nearest int4 keeps about half of this random model's greedy tokens, with or
    # without the kernel; the floor is lowered since the test compares the two paths directly
    result = edgepack.pack(str(llama), target="cpu", budget="500MB", apply=["quantize:scheme=int4,method=rtn"],
                           min_fidelity=0.0, out=str(tmp_path / "dist"), registry=builtin_registry())
    ids = torch.randint(200, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    fast = edgepack.load(result.bundle)
    linears = [m for m in fast.modules() if isinstance(m, QuantLinear)]
    assert linears
    if quantize_module.fused_kernels_available():
        assert all(m.int4_group == 32 for m in linears)
    monkeypatch.setattr(quantize_module, "fused_kernels_available", lambda: False)
    portable = edgepack.load(result.bundle)
    assert all(m.int4_group is None and m.offset is not None for m in portable.modules() if isinstance(m, QuantLinear))
    with torch.inference_mode():
        a, b = fast(input_ids=ids).logits, portable(input_ids=ids).logits
    assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_a_repacked_weight_leaves_resident_memory_once_copied(tmp_path):
    """int4 Linears repacked for the fused kernel at load take the memory-mapped stored codes
    out of the process's resident memory (``drop_file_pages``), so the weights do not count
    twice: a mapped tensor's pages leave (a later read faults them in again from the file, the
    same bytes); nothing is lost from a tensor in anonymous memory either."""
    import sys

    from safetensors.torch import load_file, save_file

    from edgepack.environment import drop_file_pages

    if sys.platform != "linux":
        pytest.skip("madvise and /proc/self: Linux")

    def rss_file_kb() -> int:
        return int(next(l for l in open("/proc/self/status") if l.startswith("RssFile")).split()[1])

    data = torch.randint(0, 255, (16 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_file({"codes": data, "beside": torch.ones(10)}, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    before = rss_file_kb()
    assert int(loaded["codes"].sum()) == int(data.sum())  # read: mapped in
    read = rss_file_kb()
    if read - before < 12 * 1024:
        pytest.skip(f"{tmp_path} is on a file system whose mapped pages are not file pages (tmpfs)")
    assert drop_file_pages(loaded["codes"])
    assert rss_file_kb() < read - 12 * 1024
    assert torch.equal(loaded["codes"], data) and int(loaded["beside"].sum()) == 10
    anonymous = data.clone()
    drop_file_pages(anonymous)
    assert torch.equal(anonymous, data)


def test_int4_encoder_keeps_the_gemm_path(int4):
    """Encoders run large batches, where dequantize-then-GEMM beats the fused int4 kernel
    (``python examples/benchmark_speed.py --kernels``): their int4 Linears are not repacked."""
    model = edgepack.load(int4.bundle)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.int4_group is None for m in linears)


def test_the_output_head_can_be_quantized_and_decodes_in_the_fused_kernel(tmp_path, registry, model_dir):
    """quantize:head=true (int8): an untied head is quantized per channel, offered to the
    planner for decoders with a head of their own, refused for tied heads, models without a
    head (encoders) and int8-dynamic."""
    import transformers

    from edgepack.model import ModelSource
    from edgepack.testing import build_decoder

    llama = build_decoder("llama", tmp_path / "llama")
    gpt2 = build_decoder("gpt2", tmp_path / "gpt2", tie_word_embeddings=True)
    probe = registry.target("cpu").probe()
    quantize = Quantize()
    offered = quantize.candidates(ModelSource.open(llama).facts, probe)
    heads = [{"scheme": "int8", "head": True}, {"scheme": "int4", "group_size": 32, "head": True}]
    assert all(h in offered for h in heads)
    assert not any(h in quantize.candidates(ModelSource.open(gpt2).facts, probe) for h in heads)
    with pytest.raises(UsageError, match="head=true needs scheme=int8, int4 or mixed"):
        fixed_plan(registry, ["quantize:scheme=int8-dynamic,head=true"], probe)

    options = quantize.parse_options({"scheme": "int8", "head": "true"})
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    model = quantize.apply(model, options, None)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    model = quantize.prepare(model, options, "cpu", probe)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fused_rows > 0
    tied = transformers.AutoModelForCausalLM.from_pretrained(gpt2)
    with pytest.raises(UsageError, match="tie_word_embeddings"):
        quantize.apply(tied, options, None)
    with pytest.raises(UsageError, match="output head, but this model has none"):
        quantize.apply(transformers.AutoModel.from_pretrained(model_dir), options, None)


@pytest.mark.parametrize("scheme", ["int4", "mixed"])
def test_int4_and_mixed_store_a_quantized_head_as_int8_rows(scheme, tmp_path, registry):
    """head=true with int4 or mixed: the head is int8 per row in the int4 file (never int4:
    it decides greedy tokens), the rest as the scheme has it; the bundle restores to the same
    logits and its head decodes in the fused int8 kernel. The estimate counts the head at
    int8, below the unquantized head's plan and above int4 everywhere."""
    import transformers

    from edgepack.interfaces import ApplyContext
    from edgepack.memory import initial_footprint
    from edgepack.model import ModelSource
    from edgepack.testing import build_decoder

    llama = build_decoder("llama", tmp_path / "llama")
    facts = ModelSource.open(llama).facts
    quantize = Quantize()
    probe = registry.target("cpu").probe()
    spec = {"scheme": scheme, "method": "rtn"} if scheme == "int4" else {"scheme": scheme, "bits": "7.5"}
    options = quantize.parse_options({**spec, "head": "true"})
    ids = torch.randint(200, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    model = quantize.apply(model, options, ApplyContext(registry.target("cpu"), probe, facts, calibration, None))
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    if scheme == "mixed":  # the head stays int8 and counts in the average: an average it prevents names it
        unreachable = quantize.parse_options({"scheme": "mixed", "bits": "4.5", "head": "true"})
        with pytest.raises(UsageError, match="and so does the output head with head=true"):
            quantize.apply(transformers.AutoModelForCausalLM.from_pretrained(llama), unreachable,
                           ApplyContext(registry.target("cpu"), probe, facts, calibration, None))
    bits = {m.bits for m in model.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert bits == ({4} if scheme == "int4" else {4, 8})
    with torch.inference_mode():
        before = model(input_ids=ids[:2]).logits
    assert quantize.save(model, tmp_path / "bundle", options)
    restored = quantize.prepare(quantize.restore(tmp_path / "bundle", options, "cpu"), options, "cpu", probe)
    assert restored.lm_head.bits == 8
    if fused_kernels_available():
        assert restored.lm_head.fused_rows > 0
    with torch.inference_mode():
        after = restored(input_ids=ids[:2]).logits
    assert (before - after).abs().max() < 0.02 * before.abs().max()
    if scheme == "int4":
        plain = initial_footprint(facts)
        with_head = quantize.estimate(plain, options, probe).weights_bytes
        without = quantize.estimate(plain, quantize.parse_options(spec), probe).weights_bytes
        int8_head = quantize.estimate(plain, quantize.parse_options({"scheme": "int8", "head": "true"}), probe)
        head = facts.vocab_size * facts.hidden_size
        assert with_head == pytest.approx(without - head * (4 - quantize.bits_per_weight({"scheme": "int8"}, facts.hidden_size) / 8),
                                          rel=1e-3)
        assert with_head < int8_head.weights_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_large_weights_are_dequantized_a_slice_of_rows_at_a_time(bits, monkeypatch):
    """On CPU a Linear whose weight is large dequantizes CHUNKS.rows rows at a time into one
    buffer for inputs of up to CHUNKS.max_input_rows rows (faster, and a slice of scratch instead
    of the whole weight): the same products as the whole dequantized weight, in fp32 and bf16,
    with a last slice shorter than the others. Small weights and larger inputs dequantize whole."""
    from edgepack.plugins import quantize as quantize_module
    from edgepack.plugins.quantize import CHUNKS, quantize_int4_groups, quantize_int8_rows

    gen = torch.Generator().manual_seed(0)
    in_f = 1024
    out_f = CHUNKS.min_elements // in_f + CHUNKS.rows // 2  # the last slice is half a slice
    assert CHUNKS.applies(out_f, in_f, CHUNKS.max_input_rows) and not CHUNKS.applies(1536, 384, 1)
    assert not CHUNKS.applies(out_f, in_f, CHUNKS.max_input_rows + 1) and not CHUNKS.applies(CHUNKS.rows, 1 << 16, 1)
    weight = torch.randn(out_f, in_f, generator=gen)
    if bits == 8:
        q, scale = quantize_int8_rows(weight)
        offset = None
    else:
        q, scale, offset = quantize_int4_groups(weight, 32)
    bias = torch.randn(out_f, generator=gen)
    layer = QuantLinear(in_f, out_f, bits, q, scale, offset, bias)
    sliced = []
    real = quantize_module.dequantize
    monkeypatch.setattr(quantize_module, "dequantize",
                        lambda q, *a, **k: sliced.append(q.shape[0]) or real(q, *a, **k))
    for dtype, rows, whole in ((torch.float32, 40, False), (torch.bfloat16, 40, False), (torch.float32, 300, True)):
        x = torch.randn(3, rows, in_f, generator=gen).to(dtype)
        sliced.clear()
        with torch.inference_mode():
            got = layer(x)
            want = torch.nn.functional.linear(x, dequantize(q, scale, offset, bits, dtype), bias.to(dtype))
        assert got.dtype == dtype and got.shape == (3, rows, out_f) and got.is_contiguous()
        slices = [out_f] if whole else [CHUNKS.rows] * (out_f // CHUNKS.rows) + [out_f % CHUNKS.rows]
        assert sliced == slices, (dtype, rows)
        error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert error < (1e-5 if dtype == torch.float32 else 2 ** -7), (dtype, error)  # bf16: its rounding
    small = QuantLinear(384, 1536, 8, *quantize_int8_rows(torch.randn(1536, 384, generator=gen)))
    sliced.clear()
    with torch.inference_mode():
        small(torch.randn(2, 384, generator=gen))
    assert sliced == [1536]


def test_the_estimate_counts_a_slice_of_a_large_weight_on_cpu_only():
    """The estimate follows the slices: a decoder whose FFN weights are chunked on CPU needs
    less activation memory there than on a GPU, where weights dequantize whole."""
    from edgepack.interfaces import Workload
    from edgepack.memory import activation_bytes, initial_footprint
    from edgepack.interfaces import ModelFacts

    facts = ModelFacts(architecture="LlamaForCausalLM", model_type="llama", task="text-generation", dtype="float32",
                       num_parameters=0, parameters_by_kind={"linear": 16 * 3 * 2048 * 5632}, num_layers=16,
                       hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                       intermediate_size=5632, vocab_size=32000, max_positions=2048)
    footprint = initial_footprint(facts)
    cpu = Probe("cpu", True, (DeviceInfo(0, "cpu", 1, 1),), frozenset({"fp32", "int8"}))
    gpu = Probe("cuda", True, (DeviceInfo(0, "gpu", 1, 1),), frozenset({"fp32", "int8"}))
    on_cpu = Quantize().estimate(footprint, {"scheme": "int8"}, cpu)
    on_gpu = Quantize().estimate(footprint, {"scheme": "int8"}, gpu)
    assert on_cpu.scratch_chunks is not None and on_gpu.scratch_chunks is None
    workload = Workload(1, 128, 136)
    whole, sliced = activation_bytes(facts, workload, on_gpu), activation_bytes(facts, workload, on_cpu)
    # the largest phase's scratch: a 5632 x 2048 fp32 weight, against 256 of its rows and a copy of the result
    per_element = on_cpu.weight_scratch  # bytes per element of a dequantized weight (fp32, and bf16 on some CPUs)
    assert whole - sliced == per_element * 5632 * 2048 - (per_element * 256 * 5632 + 128 * 2048 * 4)
    long = Workload(1, 1024, 1032)  # a prefill of more rows than CHUNKS.max_input_rows dequantizes whole
    assert activation_bytes(facts, long, on_cpu) == activation_bytes(facts, long, on_gpu)
    import dataclasses  # a later step's larger scratch (its own whole weights) is not sliced

    later = dataclasses.replace(on_cpu, weight_scratch=per_element + 4)
    assert activation_bytes(facts, workload, later) == activation_bytes(facts, workload, dataclasses.replace(later, scratch_chunks=None))


@pytest.mark.parametrize("kind,spec", [
    ("llama", {"scheme": "int8"}),
    ("llama", {"scheme": "int8-dynamic"}),
    ("llama", {"scheme": "int4", "head": "true"}),  # GPTQ layer by layer, the head int8
    ("llama", {"scheme": "int4", "method": "rtn"}),  # one Linear at a time
    ("gpt2", {"scheme": "int8"}),  # Conv1D layers, which quantize leaves: cast at its end
])
def test_precision_before_quantize_leaves_it_the_linear_weights_to_cast_with_the_same_result(kind, spec, tmp_path,
                                                                                             registry):
    """precision followed by quantize casts everything but the Linear weights, which stay the
    memory-mapped source's until quantize casts each (so the model never exists whole in
    bf16 beside its source); the quantized model is the one precision-then-quantize makes."""
    from edgepack.interfaces import ApplyContext
    from edgepack.model import ModelSource
    from edgepack.plugins.precision import Precision
    from edgepack.testing import build_decoder

    path = build_decoder(kind, tmp_path / kind)
    source = ModelSource.open(path)
    probe = registry.target("cpu").probe()
    precision, quantize = Precision(), Quantize()
    cast, options = precision.parse_options({"dtype": "bf16"}), quantize.parse_options(spec)
    ids = torch.randint(200, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    context = ApplyContext(registry.target("cpu"), probe, source.facts,
                           [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    later = dataclasses.replace(context, later=(PlanStep("quantize", quantize.version, options),))

    results = []
    for precision_context in (context, later):
        model = precision.apply(source.load(), cast, precision_context)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
        if precision_context is later:  # the Linear weights are the source's still, marked; everything else is cast
            assert all(m.weight.dtype == torch.float32 and "_edgepack_cast_to" in m.__dict__
                       for m in linears if m.weight is not model.get_input_embeddings().weight)
            assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        else:
            assert {m.weight.dtype for m in linears} == {torch.bfloat16}
        model = quantize.apply(model, options, context)
        assert not any("_edgepack_cast_to" in m.__dict__ for m in model.modules())
        results.append(model.state_dict())
    eager, deferred = results
    assert eager.keys() == deferred.keys()
    for key in eager:
        a, b = eager[key], deferred[key]
        a, b = (t.dequantize() if hasattr(t, "dequantize") and type(t) is not torch.Tensor else t for t in (a, b))
        assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.parametrize("tied", [False, True])
def test_int8_saves_its_quantized_tensors_without_copying_them_and_the_same_file(tied, tmp_path, registry):
    """Stock saving of torchao tensors clones every one (the whole quantized model twice for a
    moment); quantize's flattening hands safetensors the tensors' own data instead, and the
    files are the same bytes as stock saving's, with a tied head too."""
    import hashlib

    from edgepack.interfaces import ApplyContext
    from edgepack.model import ModelSource, normalize_safetensors
    from edgepack.testing import build_decoder

    source = ModelSource.open(build_decoder("llama", tmp_path / "llama", tie_word_embeddings=tied))
    quantize = Quantize()
    options = quantize.parse_options({"scheme": "int8", "embeddings": "true"})
    model = quantize.apply(source.load(), options, ApplyContext(registry.target("cpu"), registry.target("cpu").probe(),
                                                                source.facts, []))
    data, _ = model.hf_quantizer.get_state_dict_and_metadata(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert data["model.layers.0.self_attn.q_proj._weight_qdata"].data_ptr() == weight.qdata.data_ptr()
    assert data["model.layers.0.self_attn.q_proj._weight_scale"].data_ptr() == weight.scale.data_ptr()
    if tied:  # an embedding tied to the head stays as it is (see _targets): one plain tensor, saved once
        assert "model.embed_tokens.weight" in data and "model.embed_tokens._weight_qdata" not in data

    files = {}
    for how in ("edgepack", "stock"):
        if how == "stock":
            del model.hf_quantizer.get_state_dict_and_metadata  # torchao's flattening, which clones
        model.save_pretrained(tmp_path / how, safe_serialization=True)
        for path in (tmp_path / how).glob("*.safetensors"):
            normalize_safetensors(path)
        files[how] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / how).iterdir()}
    assert files["edgepack"] == files["stock"]


@pytest.mark.parametrize("deferring", [False, True])
def test_precision_rounds_the_modules_it_keeps_in_fp32_as_before(deferring, tmp_path, registry):
    """Modules the model keeps in fp32 (``_keep_in_fp32_modules``) hold their weights rounded
    through the 16-bit dtype, as ``model.to(bf16)`` then ``module.float()`` left them (a
    rebuilt bundle keeps its bytes), whether or not the Linear weights wait for quantize."""
    from edgepack.interfaces import ApplyContext, PlanStep
    from edgepack.model import ModelSource
    from edgepack.plugins.precision import Precision, cast_deferred
    from edgepack.testing import build_decoder

    source = ModelSource.open(build_decoder("llama", tmp_path / "llama"))
    reference = source.load()
    reference._keep_in_fp32_modules = ["mlp"]
    reference.to(torch.bfloat16)
    for name, module in reference.named_modules():
        if "mlp" in name.split("."):
            module.to(torch.float32)

    model = source.load()
    model._keep_in_fp32_modules = ["mlp"]
    later = (PlanStep("quantize", "1", {"scheme": "int8"}),) if deferring else ()
    model = Precision().apply(model, {"dtype": "bf16"}, ApplyContext(None, registry.target("cpu").probe(), source.facts,
                                                                      [], later=later))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == (torch.float32 if deferring else torch.bfloat16)
    with torch.inference_mode():  # a deferred Linear casts itself when it first runs
        q_proj(torch.randn(1, q_proj.in_features, dtype=torch.bfloat16))
    assert q_proj.weight.dtype == torch.bfloat16 and not q_proj._forward_pre_hooks
    assert not q_proj.weight.is_inference()
    cast_deferred(model)
    expected = reference.state_dict()
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key
