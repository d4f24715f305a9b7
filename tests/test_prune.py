"""The ``prune`` plugin: options, checks, structured and unstructured pruning, estimates."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgepack.errors import UsageError  # noqa: E402
from edgepack.interfaces import ApplyContext, PlanStep, Probe  # noqa: E402
from edgepack.memory import initial_footprint  # noqa: E402
from edgepack.model import ModelSource, count_parameters  # noqa: E402
from edgepack.plugins.prune import PRUNED_FILE, Prune  # noqa: E402
from edgepack.smoke import CALIBRATION_SAMPLES, batches, mean_pool, tokenize  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, HEAD_DIM = 384, 1536, 6, 12, 32
PROBE = Probe("cpu", True, (), frozenset({"fp32"}))


# ---------------------------------------------------------------------------------------------
# Fixtures: MiniLM loaded once, short calibration inputs, facts


@pytest.fixture(scope="module")
def minilm(model_dir):
    return transformers.AutoModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def calibration(tokenizer):
    """One batch of 8 calibration sentences at 32 tokens: enough to rank, and fast."""
    inputs = tokenize(tokenizer, list(CALIBRATION_SAMPLES[:8]), 32, "feature-extraction")
    return list(batches(inputs, 8))


@pytest.fixture(scope="module")
def facts(model_dir):
    return ModelSource.open(model_dir).facts


@pytest.fixture(scope="module")
def sentences(tokenizer):
    texts = ["A pruned model is smaller.", "The ferry leaves at noon on weekdays.",
             "Prime numbers have exactly two divisors."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _context(calibration, facts=None):
    return ApplyContext(target=None, probe=PROBE, facts=facts, calibration=calibration)


def _pruned(minilm, calibration, **raw):
    prune = Prune()
    options = prune.parse_options({k: str(v) for k, v in raw.items()})
    model = prune.apply(copy.deepcopy(minilm), options, _context(calibration))
    return prune, options, model


def _embed(model, inputs):
    with torch.no_grad():
        return mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Registration, options, checks


def test_module_imports_without_torch():
    code = "import sys, edgepack.plugins.prune as p; assert p.Prune.name == 'prune'; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_attributes():
    assert (Prune.name, Prune.kind) == ("prune", "prune")
    assert {o.name for o in Prune.options} >= {"heads", "ffn", "sparsity", "method"}


def test_defaults_and_spellings():
    prune = Prune()
    assert prune.parse_options({}) == {"ffn": 0.25}
    assert prune.parse_options({"heads": "0.25", "ffn": "0.5"}) == {"heads": 0.25, "ffn": 0.5}
    assert prune.parse_options({"sparsity": "0.5"}) == {"sparsity": 0.5, "method": "wanda"}
    assert prune.parse_options({"sparsity": "0.5", "method": "magnitude"}) == {"sparsity": 0.5, "method": "magnitude"}
    assert prune.parse_options({"ffn": "0.25", "sparsity": "0.5"})["method"] == "wanda"


@pytest.mark.parametrize("raw, needle", [
    ({"ffn": "2"}, "ffn"),
    ({"heads": "0.95"}, "heads"),
    ({"heads": "-0.1"}, "heads"),
    ({"sparsity": "0.99"}, "sparsity"),
    ({"ffn": "lots"}, "ffn"),
    ({"sparsity": "0.5", "method": "random"}, "method"),
    ({"method": "wanda"}, "sparsity"),
    ({"ffn": "0.25", "method": "magnitude"}, "sparsity"),
    ({"ratio": "0.5"}, "ratio"),
    ({"ffn": "0", "heads": "0"}, "removes nothing"),
])
def test_bad_options_are_usage_errors(raw, needle):
    with pytest.raises(UsageError, match=needle):
        Prune().parse_options(raw)


def test_check_refuses_a_second_prune_and_prune_after_quantize():
    prune = Prune()
    options = prune.parse_options({"ffn": "0.25"})
    assert prune.check(options, PROBE, []) is None
    assert prune.check(options, PROBE, [PlanStep("precision", "0", {"dtype": "bf16"})]) is None
    assert "already" in prune.check(options, PROBE, [PlanStep("prune", "0", {"sparsity": 0.5})])
    assert "before quantize" in prune.check(options, PROBE, [PlanStep("quantize", "0", {"scheme": "int8"})])


def test_candidates_and_quality_cost(facts):
    prune = Prune()
    assert prune.candidates(facts, PROBE) == [{"ffn": 0.25}, {"ffn": 0.5}]
    cost = lambda **raw: prune.quality_cost(prune.parse_options({k: str(v) for k, v in raw.items()}), facts)
    assert 0 < cost(ffn=0.1) < cost(ffn=0.25) < cost(ffn=0.5) <= 1
    assert 0 < cost(heads=0.25) < cost(heads=0.5)
    assert cost(heads=0.25, ffn=0.25) > max(cost(heads=0.25), cost(ffn=0.25))
    assert cost(sparsity=0.5, method="wanda") < cost(sparsity=0.5, method="magnitude")
    assert cost(sparsity=0.3) < cost(sparsity=0.7)


# ---------------------------------------------------------------------------------------------
# Structured pruning of MiniLM


def test_ffn_removes_a_quarter_of_neurons_and_round_trips_stock(minilm, calibration, sentences, tmp_path):
    prune, options, model = _pruned(minilm, calibration, ffn=0.25)
    kept = FFN - FFN // 4
    assert model.config.intermediate_size == kept
    for layer in model.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (kept, HIDDEN)
        assert tuple(layer.intermediate.dense.bias.shape) == (kept,)
        assert tuple(layer.output.dense.weight.shape) == (HIDDEN, kept)
        assert tuple(layer.attention.self.query.weight.shape) == (HIDDEN, HIDDEN)
    removed = LAYERS * (FFN // 4) * (2 * HIDDEN + 1)
    assert _n_params(model) == _n_params(minilm) - removed
    assert _n_params(minilm) == 22_713_216  # the original is untouched

    # stock saving: save() declines, and stock AutoModel loads the new shapes
    assert prune.save(model, tmp_path, options) is False
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == kept
    assert _n_params(loaded) == _n_params(model)
    torch.testing.assert_close(_embed(loaded, sentences), _embed(model, sentences))
    cosine = torch.nn.functional.cosine_similarity(_embed(model, sentences), _embed(minilm, sentences)).mean()
    assert cosine > 0.8


def test_heads_removes_three_of_twelve_per_layer_and_round_trips(minilm, calibration, sentences, tmp_path):
    prune, options, model = _pruned(minilm, calibration, heads=0.25)
    kept = (HEADS - 3) * HEAD_DIM
    for layer in model.encoder.layer:
        attention = layer.attention
        for proj in (attention.self.query, attention.self.key, attention.self.value):
            assert tuple(proj.weight.shape) == (kept, HIDDEN) and tuple(proj.bias.shape) == (kept,)
        assert tuple(attention.output.dense.weight.shape) == (HIDDEN, kept)
        assert attention.self.num_attention_heads == HEADS - 3
        assert tuple(layer.output.dense.weight.shape) == (HIDDEN, FFN)
    removed = LAYERS * 3 * HEAD_DIM * (4 * HIDDEN + 3)
    assert _n_params(model) == _n_params(minilm) - removed
    before = _embed(model, sentences)
    assert torch.nn.functional.cosine_similarity(before, _embed(minilm, sentences)).mean() > 0.8

    # BERT in transformers 5 cannot express fewer heads in config.json: prune saves and restores
    assert prune.save(model, tmp_path, options) is True
    assert (tmp_path / PRUNED_FILE).is_file() and (tmp_path / "config.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()  # stock loading fails loudly, not silently
    with pytest.raises(Exception):
        transformers.AutoModel.from_pretrained(tmp_path)
    restored = prune.restore(tmp_path, options, "cpu")
    assert _n_params(restored) == _n_params(model)
    torch.testing.assert_close(_embed(restored, sentences), before)


def test_heads_and_ffn_together(minilm, calibration, sentences):
    _, _, model = _pruned(minilm, calibration, heads=0.25, ffn=0.25)
    removed = LAYERS * (3 * HEAD_DIM * (4 * HIDDEN + 3) + (FFN // 4) * (2 * HIDDEN + 1))
    assert _n_params(model) == _n_params(minilm) - removed
    assert torch.isfinite(_embed(model, sentences)).all()


@pytest.mark.parametrize("raw", [{"ffn": 0.25}, {"heads": 0.25}, {"heads": 0.25, "ffn": 0.25}, {"ffn": 0.5}])
def test_estimate_matches_the_real_linear_count(minilm, calibration, facts, raw):
    prune, options, model = _pruned(minilm, calibration, **raw)
    real = count_parameters(model)[0]["linear"]
    start = initial_footprint(facts)
    estimated = prune.estimate(start, options, PROBE)
    linear = next(g.params for g in estimated.weights if g.kind == "linear")
    assert abs(linear - real) / real < 0.01
    # given the model's facts the arithmetic is exact up to biases
    exact = next(g.params for g in prune.estimate(start, options, PROBE, facts).weights if g.kind == "linear")
    assert abs(exact - real) / real < 0.002
    assert estimated.ffn_scale == pytest.approx(1 - options.get("ffn", 0))
    assert estimated.heads_scale == pytest.approx(1 - options.get("heads", 0))
    assert len(estimated.notes) == len(start.notes) + 1
    other = {g.kind: g.params for g in estimated.weights if g.kind != "linear"}
    assert other == {g.kind: g.params for g in start.weights if g.kind != "linear"}


def test_estimate_of_unstructured_keeps_dense_weights(facts):
    prune = Prune()
    start = initial_footprint(facts)
    after = prune.estimate(start, prune.parse_options({"sparsity": "0.5"}), PROBE)
    assert after.weights_bytes == start.weights_bytes  # zeros are stored dense
    linear = next(g for g in after.weights if g.kind == "linear")
    assert linear.density == pytest.approx(0.5)  # for a sparse format that follows
    assert (after.ffn_scale, after.heads_scale) == (1.0, 1.0)
    assert "dense" in after.notes[-1]


def test_structured_without_calibration_still_prunes(minilm):
    prune = Prune()
    options = prune.parse_options({"ffn": "0.5"})
    model = prune.apply(copy.deepcopy(minilm), options, _context([]))
    assert model.config.intermediate_size == FFN // 2


# ---------------------------------------------------------------------------------------------
# Unstructured pruning


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.fixture(scope="module")
def sparse(minilm, calibration):
    """MiniLM at sparsity 0.5 by each method."""
    return {m: _pruned(minilm, calibration, sparsity=0.5, method=m)[2] for m in ("magnitude", "wanda")}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sparsity_fraction_per_linear(minilm, sparse, sentences, method):
    model = sparse[method]
    for name, module in _linears(model).items():
        w = module.weight
        zeros = (w == 0).float().mean().item()
        assert abs(zeros - 0.5) <= 1.0 / w.shape[1] + 1e-6, (name, zeros)
        if method == "wanda":  # per output row, as in the Wanda paper
            per_row = (w == 0).sum(dim=1)
            assert (per_row == round(0.5 * w.shape[1])).all(), name
    # embeddings are left alone, shapes are unchanged
    emb = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(emb, minilm.embeddings.word_embeddings.weight)
    assert _n_params(model) == _n_params(minilm)
    cosine = torch.nn.functional.cosine_similarity(_embed(model, sentences), _embed(minilm, sentences)).mean()
    assert cosine > 0.6


def test_wanda_and_magnitude_choose_different_weights(sparse, minilm, sentences):
    name = "encoder.layer.0.intermediate.dense"
    a, b = _linears(sparse["wanda"])[name].weight == 0, _linears(sparse["magnitude"])[name].weight == 0
    assert (a != b).float().mean() > 0.05
    # wanda keeps the embeddings closer to the original (MiniLM: 0.86 against 0.74 on 20 sentences)
    ref = _embed(minilm, sentences)
    cos = {m: torch.nn.functional.cosine_similarity(_embed(model, sentences), ref).mean() for m, model in sparse.items()}
    assert cos["wanda"] > cos["magnitude"]


def test_wanda_needs_calibration(minilm):
    prune = Prune()
    with pytest.raises(UsageError, match="calibration"):
        prune.apply(copy.deepcopy(minilm), prune.parse_options({"sparsity": "0.5"}), _context([]))


def test_structured_then_unstructured_in_one_step(minilm, calibration):
    _, _, model = _pruned(minilm, calibration, ffn=0.25, sparsity=0.5, method="magnitude")
    dense = model.encoder.layer[0].output.dense
    assert tuple(dense.weight.shape) == (HIDDEN, FFN - FFN // 4)
    assert (dense.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# Decoders and unsupported architectures (tiny random models, no downloads)


def _tiny(config_cls, **kwargs):
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, max_position_embeddings=64, **kwargs) if config_cls is not transformers.GPT2Config \
        else config_cls(vocab_size=128, n_positions=64, **kwargs)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _decoder_calibration():
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (4, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    return [{"input_ids": ids, "attention_mask": mask}]


@pytest.mark.parametrize("config_cls", [transformers.LlamaConfig, transformers.Qwen2Config])
def test_llama_style_heads_and_ffn_round_trip_stock(config_cls, tmp_path):
    model = _tiny(config_cls, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4)
    prune = Prune()
    options = prune.parse_options({"heads": "0.5", "ffn": "0.25"})
    calibration = _decoder_calibration()
    model = prune.apply(model, options, _context(calibration))
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.intermediate_size == 96
    layer = model.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (32, 64)
    assert tuple(layer.self_attn.k_proj.weight.shape) == (16, 64)
    assert tuple(layer.self_attn.o_proj.weight.shape) == (64, 32)
    assert tuple(layer.mlp.gate_proj.weight.shape) == (96, 64)
    assert tuple(layer.mlp.down_proj.weight.shape) == (64, 96)
    assert prune.save(model, tmp_path, options) is False
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = calibration[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
        loaded.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_gpt2_ffn_prunes_and_heads_are_refused(tmp_path):
    prune = Prune()
    model = _tiny(transformers.GPT2Config, n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(UsageError, match="GPT2"):
        prune.apply(copy.deepcopy(model), prune.parse_options({"heads": "0.25"}), _context(_decoder_calibration()))
    options = prune.parse_options({"ffn": "0.5"})
    model = prune.apply(model, options, _context(_decoder_calibration()))
    assert model.config.n_inner == 128
    assert tuple(model.transformer.h[0].mlp.c_fc.weight.shape) == (64, 128)  # Conv1D stores (in, out)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = _decoder_calibration()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_decoder_sparsity_spares_the_lm_head():
    prune = Prune()
    model = _tiny(transformers.LlamaConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, tie_word_embeddings=False)
    head_before = model.lm_head.weight.clone()
    model = prune.apply(model, prune.parse_options({"sparsity": "0.5"}), _context(_decoder_calibration()))
    torch.testing.assert_close(model.lm_head.weight, head_before)
    down = model.model.layers[1].mlp.down_proj.weight
    assert (down == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_unsupported_architecture_is_named():
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                           max_position_embeddings=64)
    model = transformers.AutoModel.from_config(config).eval()
    prune = Prune()
    with pytest.raises(UsageError, match="DistilBert"):
        prune.apply(model, prune.parse_options({"ffn": "0.25"}), _context([]))
    # unstructured pruning works on any Linear
    model = prune.apply(model, prune.parse_options({"sparsity": "0.5", "method": "magnitude"}), _context([]))
    w = model.transformer.layer[0].ffn.lin1.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
