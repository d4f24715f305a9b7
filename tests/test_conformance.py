"""The conformance kit for plugin authors (edgepack.testing, edgepack.pytest_plugin): built-in
plugins conform, deliberately broken ones are each reported under the rule they break, and a
plugin author's test file gets the fixtures through the pytest11 entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar, Mapping

import pytest

from conftest import FakeTarget, Halve, HalvePlugin
from edgepack.interfaces import DeviceInfo, Footprint, MemoryMeter, Option, Probe
from edgepack.plugins.parallel import Parallel
from edgepack.plugins.precision import Precision
from edgepack.plugins.prune import Prune
from edgepack.plugins.quantize import Quantize
from edgepack.plugins.sparsify import Sparsify
from edgepack.targets.cpu import CpuTarget
from edgepack.targets.cuda import CudaTarget
from edgepack.targets.multi_gpu import MultiGpuTarget
from edgepack.testing import (
    COMPRESSOR_RULES, TARGET_RULES, ConformanceReport, Problem, assert_conformant, build_encoder, check_compressor,
    check_target, plugin_manager, plugin_registry, registered,
)

pytest_plugins = ["pytester"]

BUILTIN_COMPRESSORS = (Precision, Quantize, Prune, Sparsify)


# ---------------------------------------------------------------------------------------------
# Plugin managers and registration


def test_plugin_manager_holds_the_given_plugins_and_nothing_installed():
    pm = plugin_manager(Halve, ("fake-plugin", FakeTarget), builtins=("cpu",))
    assert {pm.get_name(p) for p in pm.get_plugins()} == {"halve", "fake-plugin", "cpu"}
    registry = plugin_registry(HalvePlugin(), builtins=("precision",))
    assert set(registry.compressors) == {"halve", "precision"}
    assert set(registry.targets) == {"fake"}
    with pytest.raises(ValueError, match="no built-in plugin 'nope'"):
        plugin_manager(builtins=("nope",))


def test_registered_plugin_is_installed_for_the_block_only():
    import edgepack.smoke
    from click.testing import CliRunner

    from edgepack.cli import cli
    from edgepack.host import load_registry

    path, sites = list(sys.path), list(edgepack.smoke.PROBE_SITE_DIRS)
    assert "halve" not in load_registry().compressors
    with registered(Halve) as registration:
        entry = load_registry().compressors["halve"]
        assert entry.cls is Halve and entry.distribution == "edgepack-testing-halve 0.0.0"
        listed = json.loads(CliRunner().invoke(cli, ["plugins", "--json"]).output.strip().splitlines()[-1])
        assert {"name": "halve", "distribution": "edgepack-testing-halve 0.0.0", "status": "ok", "reason": ""} \
            in listed["entry_points"]
        assert registration.fresh_process and registration.site.is_dir()
        # the fresh processes of pack and verify add the registration's site as a site directory
        assert str(registration.site) in edgepack.smoke.probe_command("spec.json")[4].split(os.pathsep)
    assert "halve" not in load_registry().compressors
    assert sys.path == path and edgepack.smoke.PROBE_SITE_DIRS == sites
    assert not registration.site.exists()


def test_a_fresh_isolated_process_imports_the_registered_plugin():
    """What the measuring processes of pack and verify do: ``python -I`` with the site
    directories of edgepack's probe command, then the host's own discovery."""
    import edgepack.smoke

    program = ("import os, site, sys; [site.addsitedir(d) for d in sys.argv[1].split(os.pathsep)]; "
               "from edgepack.host import load_registry; "
               "registry = load_registry(); print(registry.compressors['halve'].cls.__module__, "
               "sorted(registry.targets))")
    with registered(HalvePlugin(), name="halve-plugin"):
        site = edgepack.smoke.probe_command("spec.json")[4]
        proc = subprocess.run([sys.executable, "-I", "-c", program, site], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "conftest" and "'fake'" in proc.stdout


def test_a_plugin_defined_in_a_function_is_registered_here_but_not_for_fresh_processes():
    class Local(Halve):
        name = "local"

    from edgepack.host import load_registry

    with registered(Local) as registration:
        assert load_registry().compressors["local"].cls is Local
        assert not registration.fresh_process and "inside a function" in registration.reason


# ---------------------------------------------------------------------------------------------
# The small models


def test_build_encoder_is_small_and_the_same_for_the_same_seed(edgepack_tiny_encoder, tmp_path):
    from edgepack.model import ModelSource, sha256_file

    facts = ModelSource.open(edgepack_tiny_encoder).facts
    assert facts.task == "feature-extraction" and facts.model_type == "bert"
    assert (facts.hidden_size, facts.num_layers, facts.num_attention_heads) == (64, 2, 4)
    again = build_encoder(tmp_path / "again", seed=0)
    assert sha256_file(again / "model.safetensors") == sha256_file(edgepack_tiny_encoder / "model.safetensors")
    other = build_encoder(tmp_path / "other", seed=1)
    assert sha256_file(other / "model.safetensors") != sha256_file(edgepack_tiny_encoder / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Compressors that conform


@pytest.mark.parametrize("cls", BUILTIN_COMPRESSORS, ids=lambda c: c.name)
def test_builtin_compressors_conform(cls, edgepack_tiny_encoder):
    report = check_compressor(cls, model=edgepack_tiny_encoder, pipeline=False)
    report.raise_for_problems()
    assert {"attributes", "options", "estimate", "estimate-pure", "quality-cost", "apply", "save"} <= set(report.checked)
    assert set(report.skipped) <= {"restore", "pack", "verify", "load"}


def test_sparsify_saves_and_restores_its_own_format(edgepack_tiny_encoder):
    report = check_compressor(Sparsify, {"sparsity": 0.3}, model=edgepack_tiny_encoder, pipeline=False)
    report.raise_for_problems()
    assert "restore" in report.checked


def test_parallel_is_refused_on_one_device_and_says_so(edgepack_tiny_encoder):
    report = check_compressor(Parallel, model=edgepack_tiny_encoder, pipeline=False)
    report.raise_for_problems()
    assert "estimate" in report.checked
    assert "use --target multi-gpu" in report.skipped["apply"]


def test_a_compressor_is_checked_for_a_gpu_that_is_not_here(edgepack_tiny_encoder):
    report = check_compressor(Precision, {"dtype": "bf16"}, model=edgepack_tiny_encoder,
                              target="cuda:memory=8GB,capability=8.7", pipeline=False)
    report.raise_for_problems()
    assert {"check", "estimate", "apply", "save"} <= set(report.checked)


def test_the_tests_halve_compressor_conforms_through_the_real_pipeline(edgepack_tiny_encoder, tmp_path):
    """Pack (with the step forced, as ``--apply halve`` does), verify and load back: Halve lives
    in conftest.py, so the measuring processes import it through the registration."""
    report = check_compressor(Halve, {"mode": "slow"}, model=edgepack_tiny_encoder, work_dir=tmp_path)
    assert_conformant(report)
    assert {"pack", "verify", "load"} <= set(report.checked)
    manifest = json.loads((report.bundle / "manifest.json").read_text())
    assert manifest["plan"] == [{"plugin": "halve", "version": "9.9", "options": {"ratio": 0.5, "mode": "slow"}}]
    assert manifest["producer"]["requires"]["halve"] == "edgepack-testing-halve>=0.0.0"


@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.parametrize("cls,options", [
    pytest.param(Precision, {"dtype": "fp16"}, id="precision:dtype=fp16"),
    pytest.param(Quantize, {}, id="quantize"),
    pytest.param(Prune, {"heads": 0.25}, id="prune:heads=0.25"),
    pytest.param(Sparsify, {}, id="sparsify"),
])
def test_builtin_compressors_conform_through_the_real_pipeline(cls, options, edgepack_tiny_encoder):
    report = check_compressor(cls, options, model=edgepack_tiny_encoder)
    report.raise_for_problems()
    assert {"pack", "verify", "load"} <= set(report.checked)


@pytest.mark.extended
@pytest.mark.slow
def test_quantize_int4_conforms_on_a_decoder(edgepack_tiny_decoder):
    report = check_compressor(Quantize, {"scheme": "int4", "group_size": 32}, model=edgepack_tiny_decoder)
    report.raise_for_problems()
    assert {"restore", "pack", "verify", "load"} <= set(report.checked)


@pytest.mark.extended
@pytest.mark.slow
def test_parallel_conforms_on_the_emulated_multi_gpu_target(edgepack_tiny_encoder):
    """Two gloo ranks on CPU processes: pack, verify and run the shards with torchrun."""
    report = check_compressor(Parallel, {"mode": "pipeline"}, model=edgepack_tiny_encoder,
                              target="multi-gpu:devices=2")
    report.raise_for_problems()
    assert {"apply", "save", "pack", "verify", "load"} <= set(report.checked)


# ---------------------------------------------------------------------------------------------
# Compressors that break a rule, one each


class BadKind(Halve):
    """``kind`` outside COMPRESSOR_KINDS."""

    name = "bad-kind"
    kind = "magic"


class BadDefault(Halve):
    """A default its own option refuses."""

    name = "bad-default"
    options = (Option("ratio", float, (), "lots"),)


class BadCandidates(Halve):
    """Offers the planner an option it does not have."""

    name = "bad-candidates"

    def candidates(self, facts: Any, probe: Probe) -> list[dict[str, Any]]:
        return [{"speed": "warp"}]


class SilentCheck(Halve):
    """``check`` answers False instead of None or a sentence."""

    name = "silent-check"

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Any) -> Any:
        return False


class EstimateReturnsBytes(Halve):
    """``estimate`` returns a number instead of a Footprint."""

    name = "estimate-bytes"

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Any:
        return footprint.weights_bytes // 2


class MutatingEstimate(Halve):
    """``estimate`` edits the footprint it was given."""

    name = "mutating-estimate"

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        object.__setattr__(footprint, "activation_bits", 8)
        return footprint


class ReadsWeights(Halve):
    """``estimate`` peeks at the model's files."""

    name = "reads-weights"
    source: ClassVar[Path] = Path("/nonexistent")  # set by the test

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        (self.source / "config.json").read_text()
        return super().estimate(footprint, options, target)


class NegativeCost(Halve):
    """``quality_cost`` below zero."""

    name = "negative-cost"

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return -0.5


class NanCost(Halve):
    """``quality_cost`` not a number."""

    name = "nan-cost"

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return float("nan")


def _missing_kernel(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("the fused kernel is not available")


class BreaksForward(Halve):
    """``apply`` returns a model whose forward pass raises."""

    name = "breaks-forward"

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        model.forward = _missing_kernel
        return model


class PoisonsWeights(Halve):
    """``apply`` leaves NaN in the weights."""

    name = "poisons-weights"

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        import torch

        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model


class PickleSave(Halve):
    """``save`` writes a pickled checkpoint."""

    name = "pickle-save"

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        import torch

        model_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(model_dir)
        torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
        return True


class ForgetfulRestore(Halve):
    """``restore`` rebuilds the architecture but not the weights save wrote."""

    name = "forgetful-restore"

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        model.save_pretrained(model_dir, safe_serialization=True)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        torch.manual_seed(1234)
        return transformers.AutoModel.from_config(config)


class SaveReturnsFalseButWrites(Halve):
    """``save`` writes files and then leaves saving to transformers."""

    name = "stray-files"

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "notes.txt").write_text("half done")
        return False


BROKEN_COMPRESSORS = [
    (BadKind, "attributes", "BadKind.kind"),
    (BadDefault, "options", "BadDefault.options"),
    (BadCandidates, "candidates", "BadCandidates.candidates"),
    (SilentCheck, "check", "SilentCheck.check"),
    (EstimateReturnsBytes, "estimate", "EstimateReturnsBytes.estimate"),
    (MutatingEstimate, "estimate-pure", "MutatingEstimate.estimate"),
    (ReadsWeights, "no-weights", "ReadsWeights (planning)"),
    (NegativeCost, "quality-cost", "NegativeCost.quality_cost"),
    (NanCost, "quality-cost", "NanCost.quality_cost"),
    (BreaksForward, "apply", "BreaksForward.apply"),
    (PoisonsWeights, "apply", "PoisonsWeights.apply"),
    (PickleSave, "save", "PickleSave.save"),
    (SaveReturnsFalseButWrites, "save", "SaveReturnsFalseButWrites.save"),
    (ForgetfulRestore, "restore", "ForgetfulRestore.restore"),
]


@pytest.mark.parametrize("cls,rule,method", BROKEN_COMPRESSORS, ids=[c.name for c, _, _ in BROKEN_COMPRESSORS])
def test_a_broken_compressor_is_reported_under_the_rule_it_breaks(cls, rule, method, edgepack_tiny_encoder,
                                                                  monkeypatch):
    monkeypatch.setattr(ReadsWeights, "source", edgepack_tiny_encoder)
    report = check_compressor(cls, model=edgepack_tiny_encoder, pipeline=False)
    assert not report.ok
    assert rule in report.broken, str(report)
    assert rule in COMPRESSOR_RULES
    problem = next(p for p in report.problems if p.rule == rule)
    assert problem.method == method, str(report)
    sentence = str(problem)
    assert sentence.startswith(f"[{rule}] {method} ") and "\n" not in sentence
    with pytest.raises(AssertionError) as raised:
        report.raise_for_problems()
    assert all(str(p) in str(raised.value) for p in report.problems)


def test_every_problem_is_reported_not_just_the_first(edgepack_tiny_encoder):
    class Sloppy(NegativeCost, MutatingEstimate):
        name = "sloppy"

    report = check_compressor(Sloppy, model=edgepack_tiny_encoder, pipeline=False)
    assert {"quality-cost", "estimate-pure"} <= report.broken


def test_a_pickle_and_a_stray_file_are_named(edgepack_tiny_encoder):
    report = check_compressor(PickleSave, model=edgepack_tiny_encoder, pipeline=False)
    saves = [str(p) for p in report.problems if p.rule == "save"]
    assert any("pytorch_model.bin" in s and "never pickles" in s for s in saves), saves
    assert any("no safetensors" in s for s in saves), saves
    assert "restore" in report.skipped


class CorruptingPrepare(Halve):
    """Fine until load time: ``prepare`` zeroes the weights of every model it is given."""

    name = "corrupting-prepare"

    def prepare(self, model: Any, options: Mapping[str, Any], device: str, probe: Any = None) -> Any:
        import torch

        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(0.5).add_(0.1)
        return model


@pytest.mark.slow
def test_a_compressor_broken_at_load_time_is_caught_by_the_pipeline(edgepack_tiny_encoder):
    """Its bundle verifies (its golden outputs were measured through the same prepare) but
    loads into something else than the model apply made: only loading back catches it."""
    report = check_compressor(CorruptingPrepare, model=edgepack_tiny_encoder)
    assert "load" in report.broken, str(report)
    assert "pack" in report.checked and "verify" not in report.broken


# ---------------------------------------------------------------------------------------------
# Targets


def test_cpu_target_conforms(edgepack_tiny_encoder):
    report = check_target(CpuTarget, model=edgepack_tiny_encoder)
    report.raise_for_problems()
    assert set(report.checked) == set(TARGET_RULES)


def test_cpu_target_describing_a_smaller_device_conforms(edgepack_tiny_encoder):
    check_target(CpuTarget, {"memory": "2GB"}, model=edgepack_tiny_encoder).raise_for_problems()


@pytest.mark.parametrize("options", [{}, {"memory": "8GB", "capability": "8.7"}], ids=["probed", "described"])
def test_cuda_target_conforms_and_skips_what_needs_a_gpu_here(options, edgepack_tiny_encoder):
    import torch

    report = check_target(CudaTarget, options, model=edgepack_tiny_encoder)
    report.raise_for_problems()
    if torch.cuda.is_available():
        assert set(report.checked) == set(TARGET_RULES)
    else:  # the meter and placement need the GPU: reported as not checked, with the reason
        assert set(report.skipped) == {"memory-meter", "place"}
        assert "not present on this machine" in report.skipped["memory-meter"]
        assert {"probe", "capacity", "plan"} <= set(report.checked)


def test_multi_gpu_target_conforms(edgepack_tiny_encoder):
    report = check_target(MultiGpuTarget, {"devices": 2}, model=edgepack_tiny_encoder)
    report.raise_for_problems()
    assert set(report.checked) == set(TARGET_RULES)


def test_the_tests_fake_target_is_a_stub_and_the_kit_says_where(edgepack_tiny_encoder):
    report = check_target(FakeTarget, model=edgepack_tiny_encoder)
    assert report.broken == {"attributes", "memory-meter"}, str(report)
    assert [p.method for p in report.problems] == ["FakeTarget.description", "_NullMeter.scope", "_NullMeter.peak_bytes"]
    assert "misses memory in use" in str(report.problems[-1])


class ZeroMemory(CpuTarget):
    """Present, with a device of no memory."""

    name = "zero-memory"

    def probe(self) -> Probe:
        return dataclasses.replace(super().probe(), devices=(DeviceInfo(0, "cpu", 0, 0),))


class SetCapabilities(CpuTarget):
    """Capabilities in a list, not a frozenset."""

    name = "set-capabilities"

    def probe(self) -> Probe:
        probe = super().probe()
        return dataclasses.replace(probe, capabilities=sorted(probe.capabilities))


class MutatingDescribe(CpuTarget):
    """``describe`` edits the probe it was given."""

    name = "mutating-describe"

    def describe(self, probe: Probe) -> Probe:
        probe.detail["described"] = True
        return probe


class ChattyContradictions(CpuTarget):
    """``contradictions`` returns one string, not a list of them."""

    name = "chatty-contradictions"

    def contradictions(self, probe: Probe) -> Any:
        return "no contradictions"


class GreedyCapacity(CpuTarget):
    """Promises more memory than there is."""

    name = "greedy-capacity"

    def capacity(self, probe: Probe) -> int:
        return 2 * max(d.available_bytes for d in probe.devices)


class _BlindMeter(MemoryMeter):
    scope = "nothing at all"

    def start(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0


class BlindMeter(CpuTarget):
    """A meter that sees no allocation."""

    name = "blind-meter"

    def memory_meter(self) -> MemoryMeter:
        return _BlindMeter()


class LosesModel(CpuTarget):
    """``place`` forgets to return the model."""

    name = "loses-model"

    def place(self, model: Any, probe: Probe) -> Any:
        model.to("cpu")


BROKEN_TARGETS = [
    (ZeroMemory, "probe", "ZeroMemory.probe"),
    (SetCapabilities, "probe", "SetCapabilities.probe"),
    (MutatingDescribe, "describe", "MutatingDescribe.describe"),
    (ChattyContradictions, "contradictions", "ChattyContradictions.contradictions"),
    (GreedyCapacity, "capacity", "GreedyCapacity.capacity"),
    (BlindMeter, "memory-meter", "_BlindMeter.peak_bytes"),
    (LosesModel, "place", "LosesModel.place"),
]


@pytest.mark.parametrize("cls,rule,method", BROKEN_TARGETS, ids=[c.name for c, _, _ in BROKEN_TARGETS])
def test_a_broken_target_is_reported_under_the_rule_it_breaks(cls, rule, method, edgepack_tiny_encoder):
    report = check_target(cls, model=edgepack_tiny_encoder)
    assert rule in report.broken, str(report)
    assert rule in TARGET_RULES
    problem = next(p for p in report.problems if p.rule == rule)
    assert problem.method == method and str(problem).startswith(f"[{rule}] {method} "), str(report)


def test_a_class_that_is_no_plugin_class_is_reported_not_raised():
    report = check_compressor(CpuTarget)
    assert report.broken == {"attributes"} and "not a subclass of edgepack.interfaces.Compressor" in str(report)
    assert check_target(Halve).broken == {"attributes"}


def test_report_reads_as_a_list_of_sentences():
    report = ConformanceReport("compressor 'x' (m.X)")
    assert report.ok and str(report) == "compressor 'x' (m.X): conforms"
    report.add("quality-cost", "X.quality_cost", "returned -1 for the options given; it must be a finite number >= 0")
    report.skip(["pack"], "pipeline=False")
    assert not report.ok and report.problems == [Problem("quality-cost", "X.quality_cost", report.problems[0].detail)]
    assert str(report).splitlines() == [
        "compressor 'x' (m.X): 1 problem(s)",
        "  [quality-cost] X.quality_cost returned -1 for the options given; it must be a finite number >= 0",
        "  (not checked: pack: pipeline=False)",
    ]


# ---------------------------------------------------------------------------------------------
# The pytest plugin


def test_pytest_plugin_is_offered_by_entry_point_and_imports_no_torch():
    from importlib.metadata import entry_points

    assert [ep.value for ep in entry_points(group="pytest11") if ep.name == "edgepack"] == ["edgepack.pytest_plugin"]
    program = "import sys, edgepack.pytest_plugin; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


AUTHOR_TESTS = '''
from edgepack.host import load_registry
from edgepack.interfaces import Compressor


class Noop(Compressor):
    name = "noop"
    kind = "other"
    version = "1.0"
    description = "changes nothing"

    def estimate(self, footprint, options, target):
        return footprint

    def quality_cost(self, options, facts):
        return 0.0

    def apply(self, model, options, context):
        return model


def test_registered_for_this_test(edgepack_register):
    registration = edgepack_register(Noop)
    assert load_registry().compressors["noop"].distribution == registration.distribution


def test_gone_in_the_next_test():
    assert "noop" not in load_registry().compressors


def test_a_fresh_plugin_manager(edgepack_plugin_manager):
    assert edgepack_plugin_manager.get_plugins() == set()


def test_a_tiny_encoder(edgepack_tiny_encoder):
    assert (edgepack_tiny_encoder / "config.json").is_file()
'''


def test_a_plugin_authors_test_file_gets_the_fixtures(pytester):
    pytester.makepyfile(test_author=AUTHOR_TESTS)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=4)
    # the fixtures come from the pytest11 plugin: without it, they do not exist
    without = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:edgepack", "-k", "registered_for_this_test")
    without.assert_outcomes(errors=1)
    without.stdout.fnmatch_lines(["*fixture 'edgepack_register' not found*"])
