"""Target options: packing for a device that is not here (``--target cuda:memory=8GB,capability=8.7``),
and verify refusing a device that falls short of the one a bundle was packed for."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import edgepack
from edgepack.bundle.verify import verify
from edgepack.cli import cli
from edgepack.errors import UsageError
from edgepack.host import load_registry
from edgepack.interfaces import DeviceInfo, Probe
from edgepack.planner import fixed_plan, plan_model

from conftest import assert_one_error_line


def test_a_described_gpu_has_the_memory_and_kernels_it_is_given():
    registry = load_registry()
    orin = registry.target("cuda:memory=8GB,capability=8.7")
    probe = orin.planning_probe()
    assert [d.total_bytes for d in probe.devices] == [8_000_000_000]
    assert {"bf16", "2:4", "int4-kernel"} <= probe.capabilities and "fp8" not in probe.capabilities
    assert orin.capacity(probe) == 7_200_000_000  # less the 10% reserve
    turing = registry.target("cuda:capability=7.5").planning_probe()
    assert "bf16" not in turing.capabilities and "2:4" not in turing.capabilities


def test_a_described_cpu_is_this_cpu_with_less_memory():
    registry = load_registry()
    here = registry.target("cpu").planning_probe()
    small = registry.target("cpu:memory=2GiB").planning_probe()
    assert small.devices[0].total_bytes == 2 * 2**30 and small.capabilities == here.capabilities


@pytest.mark.parametrize("spec, needle", [
    ("cuda:capability=eight", "cuda:capability=eight is not MAJOR.MINOR"),
    ("cuda:vram=8GB", "target 'cuda' has no option 'vram'; valid options: memory=SIZE, capability=STR"),
    ("cpu:memory=lots", "option cpu:memory 'lots' is not a size"),
    ("cpu:memory=0.5", "fraction of a byte"),
])
def test_bad_target_options_are_one_sentence(spec, needle, model_dir):
    with pytest.raises(UsageError, match="."):
        load_registry().target(spec)
    result = CliRunner().invoke(cli, ["plan", str(model_dir), "--target", spec])
    assert_one_error_line(result, 2, needle)


def test_plans_for_a_described_gpu_use_its_capacity_and_kernels(model_dir):
    budget, candidates = plan_model(str(model_dir), target="cuda:memory=60MB,capability=7.5")
    assert budget.bytes_per_device == 54_000_000 and budget.source == "target"
    specs = [c.spec for c in candidates]
    assert "precision:dtype=fp16" in specs
    assert not any("bf16" in s or "2:4" in s for s in specs)
    registry = load_registry()
    with pytest.raises(UsageError, match="2:4"):
        fixed_plan(registry, ["sparsify:format=2:4"], registry.target("cuda:capability=7.5").planning_probe())
    assert fixed_plan(registry, ["sparsify:format=2:4"], registry.target("cuda:capability=8.7").planning_probe())


def test_an_absent_gpu_without_memory_needs_a_budget_and_says_how_to_describe_it(model_dir):
    if load_registry().target("cuda").probe().present:
        pytest.skip("a GPU is present")
    result = CliRunner().invoke(cli, ["plan", str(model_dir), "--target", "cuda"])
    assert_one_error_line(result, 2, "give --budget or describe it (--target cuda:memory=SIZE)")


def test_cuda_contradictions_name_both_numbers():
    target = load_registry().target("cuda:memory=8GB,capability=8.7")
    small = Probe("cuda", True, (DeviceInfo(0, "T4", 4_000_000_000, 3_000_000_000),), frozenset(),
                  {"compute_capability": "7.5"})
    assert target.contradictions(small) == [
        "the bundle was packed for cuda:memory=8000000000 bytes, but this GPU has 4000000000 bytes",
        "the bundle was packed for cuda:capability=8.7, but this GPU has 7.5",
    ]
    big = Probe("cuda", True, (DeviceInfo(0, "H200", 140_000_000_000, 139_000_000_000),), frozenset(),
                {"compute_capability": "9.0"})
    assert target.contradictions(big) == []


def test_verify_refuses_a_machine_smaller_than_the_described_one(bundle_copy):
    from edgepack.bundle.manifest import content_section

    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["target"]["options"] == {}
    manifest["target"]["options"] = {"memory": 10**18}
    manifest["content"] = content_section(manifest)  # an edit made consistently: the digest covers options
    manifest_path.write_text(json.dumps(manifest))
    report = verify(bundle_copy)
    assert [(f.check, f.path) for f in report.failures] == [("target", "manifest.json:target.options")]
    assert "packed for cpu:memory=1000000000000000000 bytes, but this machine has" in report.failures[0].detail
    manifest["target"]["options"] = {"memory": "lots"}
    manifest["content"] = content_section(manifest)
    manifest_path.write_text(json.dumps(manifest))
    report = verify(bundle_copy)
    assert report.failures[0].path == "manifest.json:target" and "not a size" in report.failures[0].detail


@pytest.mark.slow
def test_pack_for_a_described_cpu_records_the_options_and_verifies(edgepack_tiny_encoder, tmp_path):
    # the tiny encoder: what is checked is the target's options, which no model size changes
    result = edgepack.pack(str(edgepack_tiny_encoder), target="cpu:memory=120MB", seq_len=32,
                           apply=["precision:dtype=bf16"], out=str(tmp_path))
    assert result.bundle.name.endswith("-0.1.0-cpu")
    manifest = result.manifest
    assert manifest["target"]["name"] == "cpu" and manifest["target"]["options"] == {"memory": 120_000_000}
    assert manifest["budget"] == {**manifest["budget"], "bytes_per_device": 108_000_000, "source": "target"}
    assert verify(result.bundle).ok
