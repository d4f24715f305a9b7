"""quantize:scheme=mixed (issue 13): int8 and int4 modules in one model, allocated by measured
sensitivity under an average-bits bound; stored, restored and planned like any scheme."""

from __future__ import annotations

import copy
import types

import pytest

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import PlanStep
from edgepack.testing import build_encoder

torch = pytest.importorskip("torch")

from edgepack.plugins.quantize import (  # noqa: E402
    INT4_FILE, QuantEmbedding, QuantLinear, Quantize, module_sensitivities,
)
from test_quantize import FULL_PROBE, builtin_registry  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    from edgepack.pipeline import _calibration_batches

    path = build_encoder(tmp_path_factory.mktemp("src") / "tiny-bert")
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    calibration = _calibration_batches(tokenizer, 32, "feature-extraction")
    return path, model, calibration


def _mixed(model, calibration, **options):
    context = types.SimpleNamespace(calibration=calibration, progress=None)
    quantize = Quantize()
    options = quantize.complete(quantize.parse_options({"scheme": "mixed", **options}), FULL_PROBE)
    return quantize.apply(copy.deepcopy(model), options, context), options


def _stored_bits(model):
    """Average stored bits per quantized weight, scales and offsets included."""
    bits = total = 0
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            rows, cols = ((module.num_embeddings, module.embedding_dim) if isinstance(module, QuantEmbedding)
                          else (module.out_features, module.in_features))
            row_width = cols
            per = Quantize.bits_per_weight({"scheme": "int4" if module.bits == 4 else "int8", "group_size": 32},
                                           row_width)
            bits += per * rows * cols
            total += rows * cols
    return bits / total


def test_allocation_meets_the_bits_bound_and_sends_the_least_sensitive_bytes_to_int4(tiny):
    _, model, calibration = tiny
    results = {}
    for target in (8.55, 7.0, 5.2):  # the tiny encoder stores int8 rows of 64 at 8.63 bits
        quantized, _ = _mixed(model, calibration, bits=target)
        allocation = quantized._edgepack_allocation
        assert _stored_bits(quantized) <= target + 1e-9
        results[target] = {name for name, info in allocation.items() if info["bits"] == 4}
    assert results[8.55] < results[7.0] <= results[5.2]  # fewer bits, more int4
    # the int4 modules are a prefix of the order of least loss per byte saved
    quantized, _ = _mixed(model, calibration, bits=8.55)
    sens = {n: info["sensitivity"] for n, info in quantized._edgepack_allocation.items()}
    weights = {n: m.weight for n, m in model.named_modules() if n in sens}
    saved = {n: w.numel() * (Quantize.bits_per_weight({"scheme": "int8"}, w.shape[1]) - 5.0) for n, w in weights.items()}
    order = sorted(sens, key=lambda n: (sens[n] / saved[n], n))
    assert set(order[:len(results[8.55])]) == results[8.55]


def test_a_module_made_sensitive_gets_more_bits(tiny):
    """Scaling up one Linear that went to int4 makes the model's output depend more on it (its
    rounding error grows with its weights): measured again, it stays int8."""
    _, model, calibration = tiny
    quantized, _ = _mixed(model, calibration, bits=7.0)
    to_int4 = sorted(n for n, info in quantized._edgepack_allocation.items()
                     if info["bits"] == 4 and isinstance(model.get_submodule(n), torch.nn.Linear))
    assert to_int4
    victim = to_int4[0]
    louder = copy.deepcopy(model)
    with torch.no_grad():
        louder.get_submodule(victim).weight.mul_(30.0)
    again, _ = _mixed(louder, calibration, bits=7.0)
    assert again._edgepack_allocation[victim]["bits"] == 8
    assert again._edgepack_allocation[victim]["sensitivity"] > quantized._edgepack_allocation[victim]["sensitivity"]


def test_sensitivity_is_measured_output_error_and_leaves_the_model_unchanged(tiny):
    _, model, calibration = tiny
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:3]
    before = {n: m.weight.detach().clone() for n, m in modules}
    sens = module_sensitivities(model, modules, 32, calibration[:1])
    assert all(s > 0 for s in sens.values())
    assert all(torch.equal(before[n], m.weight) for n, m in modules)
    lowered = copy.deepcopy(model).to(torch.bfloat16)  # 16-bit models are measured in fp32, then restored
    again = module_sensitivities(lowered, [(n, lowered.get_submodule(n)) for n, _ in modules], 32, calibration[:1])
    assert all(p.dtype == torch.bfloat16 for p in lowered.parameters())
    assert set(again) == set(sens)


def test_sensitivities_are_cached_per_model_and_calibration_set(tiny, monkeypatch):
    import edgepack.plugins.quantize as quantize_module
    from edgepack.plugins.quantize import cached_sensitivities, sensitivity_cache_dir

    _, model, calibration = tiny
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:2]
    first = cached_sensitivities(model, modules, 32, calibration[:1])
    assert len(list(sensitivity_cache_dir().glob("*.json"))) >= 1
    measured = []
    real = quantize_module.module_sensitivities
    monkeypatch.setattr(quantize_module, "module_sensitivities", lambda *a: measured.append(1) or real(*a))
    assert cached_sensitivities(model, modules, 32, calibration[:1]) == first and measured == []
    other = {k: v.flip(0) for k, v in calibration[0].items()}  # another calibration set: measured anew
    cached_sensitivities(model, modules, 32, [other])
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.get_submodule(modules[0][0]).weight.mul_(2)  # other weights: measured anew
    cached_sensitivities(changed, [(n, changed.get_submodule(n)) for n, _ in modules], 32, calibration[:1])
    assert measured == [1, 1]


def test_the_sensitivity_command_ranks_modules_and_shows_the_allocations(tiny):
    import json

    import click
    from click.testing import CliRunner

    from edgepack.plugins.quantize import allocate, edgepack_register_commands

    cli = click.Group("edgepack")  # the command comes through the plugin hook, as main() adds it
    edgepack_register_commands(cli=cli)

    path, model, _ = tiny
    result = CliRunner().invoke(cli, ["sensitivity", str(path), "--bits", "8.55", "--bits", "7", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    ranked = [m["sensitivity"] for m in report["modules"] if m["sensitivity"] is not None]
    assert ranked == sorted(ranked, reverse=True) and len(report["modules"]) == 16
    sens = {m["module"]: m["sensitivity"] for m in report["modules"]}
    chosen = [(n, m) for n, m in model.named_modules() if n in sens]
    for bits in ("8.55", "7.0"):
        int4, reached = allocate(chosen, list(sens), sens, float(bits), 5.0)
        assert report["allocations"][bits] == {"int4": sorted(int4), "bits": round(reached, 3)}
        assert reached <= float(bits)
    assert len(report["allocations"]["8.55"]["int4"]) < len(report["allocations"]["7.0"]["int4"])
    text = CliRunner().invoke(cli, ["sensitivity", str(path)]).stdout
    assert "most sensitive first" in text and "bits=7.0:" in text and "bits=6.0:" in text


def test_mixed_round_trips_through_save_and_restore(tiny, tmp_path):
    _, model, calibration = tiny
    quantized, options = _mixed(model, calibration, bits=6.0)
    quantize = Quantize()
    assert quantize.save(quantized, tmp_path, options)
    restored = quantize.restore(tmp_path, options, "cpu")
    assert Quantize.allocation(tmp_path) == quantized._edgepack_allocation
    bits = {n: m.bits for n, m in restored.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert set(bits.values()) == {4, 8}
    batch = calibration[0]
    with torch.inference_mode():
        assert torch.equal(quantized(**batch).last_hidden_state, restored(**batch).last_hidden_state)
    assert (tmp_path / INT4_FILE).is_file()


def test_option_checks():
    quantize = Quantize()
    assert "bits= sets the average of scheme=mixed" in quantize.check(
        {"scheme": "int8", "bits": 6.0}, FULL_PROBE, [])
    assert "below int4's 6.00 bits at group_size=16" in quantize.check(
        {"scheme": "mixed", "bits": 5.0, "group_size": 16}, FULL_PROBE, [])
    assert quantize.check({"scheme": "mixed", "bits": 5.0}, FULL_PROBE, []) is None
    with pytest.raises(UsageError, match="bits=9.5.*above its maximum"):
        quantize.parse_options({"scheme": "mixed", "bits": "9.5"})
    assert quantize.check({"scheme": "mixed"}, FULL_PROBE, [PlanStep("prune", "1", {"heads": 0.25})]) is None


def test_the_planner_offers_mixed_between_int8_and_int4(model_dir):
    from edgepack.planner import plan_model

    _, candidates = plan_model(str(model_dir), target="cpu", budget="26MB", registry=builtin_registry())
    fitting = [c for c in candidates if c.fits]
    assert "scheme=mixed" in fitting[0].spec  # int8 does not fit; mixed loses less than int4
    by_spec = {c.spec: c for c in candidates}
    int8, int4 = by_spec["quantize:scheme=int8"], by_spec["quantize:group_size=32,scheme=int4"]
    for bits in ("6.0", "7.0"):
        mixed = by_spec[f"quantize:bits={bits},scheme=mixed"]
        assert int4.estimate.peak_bytes < mixed.estimate.peak_bytes < int8.estimate.peak_bytes
        assert int8.quality_cost < mixed.quality_cost < int4.quality_cost


def test_pack_and_verify_a_mixed_bundle(tiny, tmp_path):
    path, _, _ = tiny
    result = edgepack.pack(path, target="cpu", apply=["quantize:scheme=mixed,bits=6"], out=tmp_path,
                           min_fidelity=0.0, progress=lambda message: None)
    assert result.manifest["model"]["loader"] == "quantize"
    details = result.manifest["plan"][0]["details"]
    modules = details["modules"]
    assert {m["format"] for m in modules.values()} == {"int4", "int8"}
    assert details["bits"] <= 6.0
    assert Quantize.allocation(result.bundle / "model") == {
        name: {"bits": int(m["format"][3:]), "sensitivity": m["sensitivity"]} for name, m in modules.items()}
    from edgepack.model import safetensors_layout

    header, _ = safetensors_layout(result.bundle / "model" / INT4_FILE)
    word = "embeddings.word_embeddings"
    assert modules[word]["bytes"] == sum(e - b for k, (b, e) in ((k, v["data_offsets"]) for k, v in header.items()
                                                                 if k != "__metadata__") if k.startswith(word + "."))
    card = (result.bundle / "README.md").read_text()
    most = max(modules, key=lambda n: modules[n]["sensitivity"])
    assert "## Per-module formats (quantize)" in card and f"| {most} | {modules[most]['format']} |" in card
    report = edgepack.verify(result.bundle)
    assert report.ok, report.failures


@pytest.mark.extended
@pytest.mark.parametrize("budget, floor", [("26MB", 0.99), ("24MB", 0.985)])
def test_minilm_fits_between_int8_and_int4_at_the_floor(model_dir, tmp_path, budget, floor):
    """The issue's goals: at 26 MB with the default floor, and at 24 MB at 0.985."""
    result = edgepack.pack(str(model_dir), target="cpu", budget=budget, out=tmp_path,
                           progress=lambda message: None)
    plan = " + ".join(s["plugin"] + ":" + str(s["options"].get("scheme", "")) for s in result.manifest["plan"])
    assert "mixed" in plan
    assert result.manifest["fidelity"]["value"] >= floor


# ---------------------------------------------------------------------------------------------
# awq=true: activation-aware per-channel scales for int4


def test_awq_scales_lower_the_output_error_where_some_input_channels_are_large():
    from edgepack.plugins.quantize import awq_scales, dequantize, quantize_int4_groups

    torch.manual_seed(0)
    wide = 1 + 20 * (torch.rand(256) < 0.05)  # a few input channels twenty times the others
    weight = torch.randn(128, 256) * 0.05

    def output_error(x, effective):
        return float(((x @ (effective - weight).T) ** 2).mean())

    for channels, better in ((wide, True), (torch.ones(256), False)):
        x = torch.randn(4096, 256) * channels
        hessian = (2 * x.T @ x / len(x)).double()
        plain = output_error(x, dequantize(*quantize_int4_groups(weight, 32), 4, torch.float32))
        scales = awq_scales(weight, hessian, 32)
        scaled = output_error(x, dequantize(*quantize_int4_groups(weight * scales, 32), 4, torch.float32) / scales)
        assert scaled <= plain * 1.0001  # alpha = 0 (plain int4) is on the grid
        if better:
            assert scaled < 0.6 * plain, (scaled, plain)
    # a channel silent on the calibration inputs is not scaled down without limit: its column's
    # error stays near the others' (any input it gets later is not magnified into garbage)
    channels = torch.ones(128)
    channels[0], channels[1] = 200.0, 0.0
    x = torch.randn(4096, 128) * channels
    narrow = weight[:, :128]
    scales = awq_scales(narrow, (2 * x.T @ x / len(x)).double(), 32)
    error = (dequantize(*quantize_int4_groups(narrow * scales, 32), 4, torch.float32) / scales - narrow).abs()
    assert error[:, 1].max() < 5 * error[:, 2:].max(), (error[:, 1].max(), error[:, 2:].max())


def test_awq_int4_round_trips_and_its_scales_are_stored(tiny, tmp_path):
    from safetensors import safe_open

    _, model, calibration = tiny
    context = types.SimpleNamespace(calibration=calibration, progress=None)
    quantize = Quantize()
    options = quantize.complete(quantize.parse_options({"scheme": "int4", "awq": "true"}), FULL_PROBE)
    quantized = quantize.apply(copy.deepcopy(model), options, context)
    scaled = [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None]
    assert scaled and all(isinstance(m, QuantLinear) for n, m in quantized.named_modules() if n in scaled)
    assert quantize.save(quantized, tmp_path, options)
    with safe_open(tmp_path / INT4_FILE, "pt") as stored:
        assert {f"{n}.input_scale" for n in scaled} <= set(stored.keys())
    restored = quantize.restore(tmp_path, options, "cpu")
    batch = calibration[0]
    with torch.inference_mode():
        expected = model(**batch).last_hidden_state
        got, back = quantized(**batch).last_hidden_state, restored(**batch).last_hidden_state
    assert torch.equal(got, back)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9


def test_awq_is_refused_where_nothing_could_use_it():
    from edgepack.plugins.parallel import Parallel

    assert "awq=true scales int4 weights" in Quantize().check({"scheme": "int8", "awq": True}, FULL_PROBE, [])
    assert Quantize().check({"scheme": "mixed", "awq": True}, FULL_PROBE, []) is None
    two = types.SimpleNamespace(devices=[0, 1], target="multi-gpu")
    assert "awq" in Parallel().check({}, two, [PlanStep("quantize", "1", {"scheme": "int4", "awq": True})])
