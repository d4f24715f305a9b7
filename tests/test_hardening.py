"""Hostile and careless input to pack and load: bundle names, pickles, tokenizers, recipe
precedence, list options, sizes, and plugins that raise."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import pytest
from click.testing import CliRunner

import edgepack
from edgepack import pipeline
from edgepack.cli import cli
from edgepack.errors import NoPlanFits, UsageError, VerificationError
from edgepack.host import DISABLE_ENV, PluginWarning, collect, make_plugin_manager
from edgepack.interfaces import Compressor, Footprint, Option, PlanStep, Probe
from edgepack.memory import parse_size
from edgepack.planner import fixed_plan, parse_apply
from edgepack.recipe import merge, read_recipe

from conftest import assert_one_error_line


def builtin_registry(*extra: tuple[str, object]):
    """The cpu target, the built-in compressors and ``extra`` plugins (no entry points)."""
    import importlib

    pm = make_plugin_manager(entrypoints=False)
    pm.register(importlib.import_module("edgepack.targets.cpu"), name="cpu")
    for name in ("precision", "quantize", "prune", "sparsify"):
        pm.register(importlib.import_module(f"edgepack.plugins.{name}"), name=name)
    for name, plugin in extra:
        pm.register(plugin, name=name)
    return collect(pm, disabled=())


class _Marker:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def write_malicious_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps({"weight": _Marker(marker)}))


# ---------------------------------------------------------------------------------------------
# bundle names stay inside --out


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x" * 101, "", "name with space", "/abs"])
def test_bad_bundle_names_are_refused_before_any_work(name, model_dir, tmp_path):
    out = tmp_path / "dist" / "a" / "b"
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--name", name, "--out", str(out), "--budget", "200MB"])
    assert_one_error_line(result, 2, "--name", "not a valid bundle name")
    assert list(tmp_path.rglob("*")) == []  # nothing written, not even --out


def test_a_recipe_name_is_checked_too(model_dir, tmp_path):
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text('out = "dist"\nname = "../escape"\n')
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--recipe", str(recipe)])
    assert_one_error_line(result, 2, "'../escape'", "not a valid bundle name")
    with pytest.raises(UsageError, match="not a valid bundle name"):
        pipeline.pack_many(str(model_dir), [{"target": "cpu", "name": "../../up"}], out=str(tmp_path / "d"))
    assert not (tmp_path / "dist").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------
# nothing is unpickled


def _model_copy(model_dir: Path, dest: Path, weights: bool = True) -> Path:
    shutil.copytree(model_dir, dest, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dest


def test_a_bundle_model_with_only_a_pickled_checkpoint_is_refused_unread(model_dir, tmp_path):
    from edgepack.runtime import load_model_dir

    model = _model_copy(model_dir, tmp_path / "model", weights=False)
    marker = tmp_path / "marker"
    write_malicious_pickle(model / "pytorch_model.bin", marker)
    with pytest.raises(VerificationError, match="pytorch_model.bin is a pickled checkpoint"):
        load_model_dir(model, task="feature-extraction", steps=[], loader=None, target_name="cpu",
                       registry=builtin_registry())
    assert not marker.exists()


def test_a_source_with_pickle_and_safetensors_reads_safetensors_and_says_so(model_dir, tmp_path):
    from edgepack.model import ModelSource

    source_dir = _model_copy(model_dir, tmp_path / "src")
    marker = tmp_path / "marker"
    write_malicious_pickle(source_dir / "pytorch_model.bin", marker)
    messages: list[str] = []
    session = pipeline.open_source(source_dir, progress=messages.append)
    assert any("ignoring pytorch_model.bin" in m and "never unpickles" in m for m in messages), messages
    model = session.source.load()
    assert not marker.exists()
    assert sum(p.numel() for p in model.parameters()) > 20_000_000
    assert ModelSource.open(source_dir).ignored_files() == ["pytorch_model.bin"]


# ---------------------------------------------------------------------------------------------
# the tokenizer must belong to the model


def test_a_source_without_tokenizer_files_is_refused(model_dir, tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, source_dir / name)
    with pytest.raises(UsageError, match="has no tokenizer files"):
        pipeline.open_source(source_dir)
    result = CliRunner().invoke(cli, ["pack", str(source_dir), "--out", str(tmp_path / "dist")])
    assert_one_error_line(result, 2, "no tokenizer files")
    assert not (tmp_path / "dist").exists()


def test_a_tokenizer_that_does_not_match_the_vocabulary_is_refused(model_dir, tmp_path):
    source_dir = _model_copy(model_dir, tmp_path / "src")
    (source_dir / "tokenizer.json").unlink()
    (source_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the"]) + "\n")
    with pytest.raises(UsageError, match=r"tokenizer has 6 tokens but config.json's vocab_size is 30522"):
        pipeline.open_source(source_dir)


def test_smoke_samples_of_mostly_unknown_tokens_are_refused(model_dir, tmp_path):
    samples = tmp_path / "samples.txt"
    samples.write_text("🙂🙃 🚀🛰️\n🧪🧬 🦀🐍\n")
    session = pipeline.open_source(model_dir, samples=samples, seq_len=16)
    with pytest.raises(UsageError, match=r"of the smoke inputs' \d+ tokens are the unknown token '\[UNK\]'"):
        session.inputs
    ok = pipeline.open_source(model_dir, seq_len=16)
    assert ok.inputs["input_ids"].shape == (len(ok.samples), 16)


def test_a_smoke_token_past_the_vocabulary_is_refused(model_dir, tmp_path):
    import transformers

    source_dir = _model_copy(model_dir, tmp_path / "src")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    tokenizer.add_tokens(["<tool_call>"], special_tokens=True)  # id 30522, one past the embeddings
    tokenizer.save_pretrained(source_dir)
    samples = tmp_path / "samples.txt"
    samples.write_text("<tool_call> an edge device\n")
    session = pipeline.open_source(source_dir, samples=samples, seq_len=16)
    with pytest.raises(UsageError, match=r"token '<tool_call>' \(id 30522\), past config.json's vocab_size 30522"):
        session.inputs


# ---------------------------------------------------------------------------------------------
# recipe precedence: flag > [[targets]] entry > top level > default


def test_an_entry_beats_the_top_level_and_a_flag_beats_both(tmp_path):
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text("""
out = "dist"
budget = "100MB"
name = "top"
seq_len = 64
[[targets]]
target = "cpu"
budget = "2GB"
name = "entry"
[[targets]]
target = "cuda"
""")
    settings = read_recipe(recipe)
    workload, targets = merge(settings, {})
    assert workload == {"seq_len": 64}
    assert [(t["target"], t["budget"], t["name"]) for t in targets] == [
        ("cpu", 2_000_000_000, "entry"), ("cuda", 100_000_000, "top")]
    workload, targets = merge(settings, {"budget": 5, "name": "flag", "seq_len": 32, "batch_size": None})
    assert workload == {"seq_len": 32}
    assert [(t["budget"], t["name"]) for t in targets] == [(5, "flag"), (5, "flag")]


def test_target_flag_selects_entries_instead_of_dropping_them(tmp_path):
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text('out = "dist"\n[[targets]]\ntarget = "cpu"\nbudget = "2GB"\n'
                      '[[targets]]\ntarget = "cuda"\nbudget = "8GB"\n')
    settings = read_recipe(recipe)
    _, targets = merge(settings, {"target": "cuda"})
    assert [(t["target"], t["budget"]) for t in targets] == [("cuda", 8_000_000_000)]
    with pytest.raises(UsageError, match=r"--target multi-gpu: the recipe's \[\[targets\]\] has no entry for it \(its targets: cpu, cuda\)"):
        merge(settings, {"target": "multi-gpu"})


def test_without_targets_the_top_level_is_one_target_and_defaults_fill_the_rest():
    workload, targets = merge({"budget": 7, "out": "d"}, {"target": None, "apply": ["precision"]})
    assert workload == {}
    assert targets == [{"budget": 7, "out": "d", "apply": ["precision"]}]
    request = pipeline.PackRequest.from_settings(targets[0])
    assert (request.target, request.version, request.force) == ("cpu", "0.1.0", False)


def test_cli_top_level_budget_does_not_override_an_entry(model_dir, tmp_path):
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text('out = "dist"\nbudget = "5kB"\n[[targets]]\ntarget = "cpu"\nbudget = "6kB"\n'
                      '[[targets]]\ntarget = "cpu"\nname = "second"\n')
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--recipe", str(recipe), "--json"])
    assert result.exit_code == 3, result.output
    details = [f["detail"] for f in json.loads(result.stdout.strip().splitlines()[-1])["failures"]]
    assert [d.split(":")[0] for d in details] == [
        "no plan fits the budget of 6.0 kB per device", "no plan fits the budget of 5.0 kB per device"]


def test_pack_many_lays_each_entry_over_the_shared_settings(model_dir, tmp_path):
    # entry budget 2GB would fit; the shared 5MB must not override it, so only the second fails
    outcomes = pipeline.pack_many(str(model_dir), [{"target": "cpu", "budget": "5kB"},
                                                   {"target": "cpu", "name": "second"}],
                                  out=str(tmp_path / "dist"), budget="6kB")
    assert [str(o.error).split(":")[0] for o in outcomes] == [
        "no plan fits the budget of 5.0 kB per device", "no plan fits the budget of 6.0 kB per device"]


# ---------------------------------------------------------------------------------------------
# list options


def test_list_options_are_bracketed_on_the_command_line():
    name, raw = parse_apply("quantize:scheme=int8,keep=[layer.0.,layer.5.],embeddings=false")
    assert (name, raw) == ("quantize", {"scheme": "int8", "keep": "[layer.0.,layer.5.]", "embeddings": "false"})
    registry = builtin_registry()
    probe = registry.target("cpu").probe()
    [(quantize, options)] = fixed_plan(registry, ["quantize:scheme=int8,keep=[layer.0.,layer.5.]"], probe)
    assert options["keep"] == ["layer.0.", "layer.5."]
    step = PlanStep("quantize", "1", options)
    assert "keep=[layer.0.,layer.5.]" in step.spec()
    assert fixed_plan(registry, [step.spec()], probe)[0][1] == options  # the spec round-trips
    [(_, single)] = fixed_plan(registry, ["quantize:keep=word_embeddings"], probe)
    assert single["keep"] == ["word_embeddings"]
    [(_, table)] = fixed_plan(registry, [{"plugin": "quantize", "keep": ["layer.0.", "layer.5."]}], probe)
    assert table["keep"] == ["layer.0.", "layer.5."]
    for bad, message in (("quantize:keep=[a,b", "without its ']'"), ("quantize:keep=a]", "without its '['"),
                         ("quantize:keep=[[a]]", "do not nest"), ("quantize:keep=[a,,b]", "non-empty strings")):
        with pytest.raises(UsageError, match=re.escape(message)):
            fixed_plan(registry, [bad], probe)


def test_a_recipe_may_give_a_step_as_a_table(tmp_path):
    recipe = tmp_path / "edgepack.toml"
    recipe.write_text('apply = [{plugin = "quantize", scheme = "int8", keep = ["layer.0.", "layer.5."]}]\n')
    assert read_recipe(recipe)["apply"] == [{"plugin": "quantize", "scheme": "int8", "keep": ["layer.0.", "layer.5."]}]
    recipe.write_text('apply = [{scheme = "int8"}]\n')
    with pytest.raises(UsageError, match="tables with a 'plugin' key"):
        read_recipe(recipe)


def test_keep_leaves_the_named_layers_unquantized_in_place(model_dir):
    """quantize's keep= names module fragments that stay as they are (the end-to-end version
    below runs the README's example through pack and verify)."""
    import torch

    from edgepack.host import load_registry
    from edgepack.model import ModelSource

    quantize = load_registry().compressors["quantize"].cls()
    options = quantize.parse_options({"scheme": "int8", "keep": ["layer.0.", "layer.5."]})
    model = quantize.apply(ModelSource.open(model_dir).load(), options, None)
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32]
    assert kept and all("layer.0." in n or "layer.5." in n or n.startswith("pooler") for n in kept), kept
    assert any("layer.0." in n for n in kept) and any("layer.5." in n for n in kept)


@pytest.mark.extended
def test_keep_leaves_the_named_layers_unquantized(model_dir, tmp_path):
    """The README's example, end to end through the command line."""
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--apply", "quantize:scheme=int8,keep=[layer.0.,layer.5.]",
                                      "--budget", "200MB", "--seq-len", "32", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["plan"][0]["options"]["keep"] == ["layer.0.", "layer.5."]
    from safetensors import safe_open

    bundle = Path(data["bundle"])
    dtypes = {}
    for file in (bundle / "model").glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                dtypes[key] = handle.get_slice(key).get_dtype()
    assert any("layer.0." in k and "query" in k and v == "F32" for k, v in dtypes.items()), dtypes
    assert not any("layer.1." in k and "query.weight" in k and v == "F32" for k, v in dtypes.items())
    assert edgepack.verify(bundle).ok


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("text, message", [
    ("9" * 400, "larger than any device"),
    ("1.5", "fraction of a byte"),
    ("0.4", "fraction of a byte"),
    ("1e9", "is not a size"),
    ("-5MB", "is not a size"),
])
def test_bad_sizes_are_one_sentence(text, message, model_dir):
    with pytest.raises(UsageError, match=message):
        parse_size(text, "--budget")
    result = CliRunner().invoke(cli, ["plan", str(model_dir), "--budget", text])
    assert_one_error_line(result, 2, "--budget", message)


def test_good_sizes():
    assert parse_size("1.5kB") == 1500
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("100") == 100
    assert parse_size(" 30 MB ") == 30_000_000


# ---------------------------------------------------------------------------------------------
# plugins that raise


class Boom(Compressor):
    """Shrinks the estimate to almost nothing, then raises while applying."""

    name = "boom"
    kind = "other"
    options = (Option("when", str, ("apply", "save"), "apply"),)

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        return footprint.with_groups(("embedding", "linear", "norm", "other"), 0.01, "boom")

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return 0.0

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        raise RuntimeError("kernel exploded")


class BoomPlugin:
    @edgepack.hookimpl
    def edgepack_register_compressors(self, register):
        register(Boom)


def test_a_plugin_raising_in_apply_rejects_its_candidate(model_dir, tmp_path):
    registry = builtin_registry(("boom-plugin", BoomPlugin()))
    # only boom's estimate fits 12 MB: it is tried, raises, and is rejected with its reason
    with pytest.raises(NoPlanFits) as info:
        edgepack.pack(str(model_dir), target="cpu", budget="12MB", seq_len=16, out=str(tmp_path), registry=registry)
    assert "plugin 'boom'" in str(info.value) and "RuntimeError: kernel exploded" in str(info.value)
    with pytest.raises(pipeline.PackFailed, match=r"plan boom:when=apply: plugin 'boom' .* failed: RuntimeError: kernel exploded"):
        edgepack.pack(str(model_dir), target="cpu", budget="12MB", seq_len=16, apply=["boom"], out=str(tmp_path),
                      registry=registry)
    assert list(tmp_path.iterdir()) == []


def test_one_target_raising_does_not_stop_the_others(model_dir, tmp_path, monkeypatch):
    calls = []
    real = pipeline.pack_target

    def flaky(session, request, **kwargs):
        calls.append(request.target)
        if len(calls) == 1:
            raise RuntimeError("driver crashed")
        return real(session, request, **kwargs)

    monkeypatch.setattr(pipeline, "pack_target", flaky)
    outcomes = pipeline.pack_many(str(model_dir), [{"target": "cpu", "budget": "5kB", "name": "one"},
                                                   {"target": "cpu", "budget": "6kB", "name": "two"}],
                                  out=str(tmp_path))
    assert isinstance(outcomes[0].error, pipeline.PackFailed) and outcomes[0].error.exit_code == 1
    assert "RuntimeError: driver crashed" in str(outcomes[0].error)
    assert isinstance(outcomes[1].error, NoPlanFits)  # the second target still ran


def test_a_broken_register_hook_names_the_plugin_and_how_to_skip_it():
    class Raises:
        @edgepack.hookimpl
        def edgepack_register_compressors(self, register):
            raise RuntimeError("cannot find my kernels")

    pm = make_plugin_manager(entrypoints=False)
    pm.register(Raises(), name="raises")
    with pytest.warns(PluginWarning, match=rf"plugin 'raises' .*RuntimeError: cannot find my kernels \(set {DISABLE_ENV}=raises to disable it\)"):
        collect(pm, disabled=())


def test_a_plugin_that_fails_to_import_names_the_switch(fake_dist):
    fake_dist("raise ImportError('no such kernel library')\n", entry_points={"broken": None})
    with pytest.warns(PluginWarning, match=rf"'broken' from acme-edgepack 1.2.3 was skipped: it failed to import: .*{DISABLE_ENV}=broken"):
        make_plugin_manager()


def test_os_errors_are_one_line(model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "dist"))

    monkeypatch.setattr(pipeline, "open_source", refuse)
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--out", str(tmp_path / "dist")])
    assert_one_error_line(result, 2, "No space left on device", str(tmp_path / "dist"))


# ---------------------------------------------------------------------------------------------
# plan options from a manifest go through the plugin's parse_options


def test_manifest_plan_options_are_parsed_before_restore_or_prepare(model_dir):
    from edgepack.runtime import checked_steps

    registry = builtin_registry()
    with pytest.raises(VerificationError, match=r"plan\[0\]\.options: .*scheme=int3 is not one of"):
        checked_steps([PlanStep("quantize", "1", {"scheme": "int3"})], registry)
    with pytest.raises(VerificationError, match=r"plan\[1\]: the bundle needs compression plugin 'lowrank' 2.0"):
        checked_steps([PlanStep("precision", "1", {}), PlanStep("lowrank", "2.0", {})], registry)
    [step] = checked_steps([PlanStep("precision", "1", {})], registry)
    assert step.options == {"dtype": "bf16"}  # parsed: the default filled in


# ---------------------------------------------------------------------------------------------
# bundles name the plugins they need, and verify says what to install


def test_a_bundle_records_what_to_install(packed):
    requires = packed.manifest["producer"]["requires"]
    assert requires == {"precision": f"edgepack>={edgepack.__version__}", "cpu": f"edgepack>={edgepack.__version__}"}


def test_verify_says_what_to_install_when_a_plugin_is_missing_or_older(bundle_copy):
    from edgepack.bundle.manifest import content_section
    from edgepack.bundle.verify import verify

    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["producer"]["requires"]["precision"] = "edgepack>=99.0"
    manifest["content"] = content_section(manifest)  # edited consistently: the digest covers requires
    manifest_path.write_text(json.dumps(manifest))
    report = verify(bundle_copy)
    assert [(f.check, f.path) for f in report.failures] == [("plugins", "manifest.json:plan[0]")]
    assert report.failures[0].detail == (
        f"the bundle needs compression plugin 'precision' from edgepack>=99.0, but edgepack "
        f"{edgepack.__version__} is installed here: install edgepack>=99.0")

    manifest["plan"][0]["plugin"] = "lowrank"
    manifest["producer"]["requires"] = {"lowrank": "acme-lowrank>=1.2.3"}
    manifest["content"] = content_section(manifest)
    manifest_path.write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["verify", str(bundle_copy)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("[plugins] manifest.json:plan[0]: the bundle needs compression plugin 'lowrank', which is not "
            "installed here: install acme-lowrank>=1.2.3") in result.output
    with pytest.raises(VerificationError, match="install acme-lowrank>=1.2.3"):
        edgepack.load(bundle_copy)
