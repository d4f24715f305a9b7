"""The plugin host: plugin managers, registration, duplicates, disabling, built-ins."""

from __future__ import annotations

import re
import sys
from importlib.metadata import entry_points
from typing import Any

import click
import pluggy
import pytest
from click.testing import CliRunner

import edgepack
from edgepack.errors import UsageError
from edgepack.host import ALLOW_ENV, DISABLE_ENV, PluginWarning, collect, load_registry, make_plugin_manager
from edgepack.interfaces import Compressor, Option, Target

from conftest import FakeTarget, Halve, HalvePlugin

BUILTINS = {"cpu": "edgepack.targets.cpu", "cuda": "edgepack.targets.cuda",
            "precision": "edgepack.plugins.precision"}


def _plugin(**hooks):
    """A plugin object whose register hooks register the given classes."""

    class P:
        pass

    for hook, classes in hooks.items():
        def impl(register, _classes=classes):
            for cls in _classes:
                register(cls)
        impl.__name__ = hook
        setattr(P, hook, staticmethod(edgepack.hookimpl(impl)))
    return P()


def test_a_distributions_metadata_is_read_once_however_many_plugins_it_offers(monkeypatch):
    """Each read of a distribution's metadata parses its whole METADATA file (edgepack's holds
    the README): once per distribution, not per entry point and field, as every command pays it."""
    import importlib.metadata

    reads: list[str] = []
    read_text = importlib.metadata.PathDistribution.read_text

    def counting(self, filename):
        text = read_text(self, filename)
        if filename in ("METADATA", "PKG-INFO") and text is not None:
            reads.append(str(self._path))
        return text

    monkeypatch.setattr(importlib.metadata.PathDistribution, "read_text", counting)
    pm = make_plugin_manager()
    ours = [name for name, (dist, _) in pm.installed_by.items() if dist == "edgepack"]
    assert len(ours) >= 5  # the built-in plugins and targets, from one distribution
    assert reads and max(reads.count(path) for path in reads) == 1, reads

# ---------------------------------------------------------------------------------------------
# registration through a fresh plugin manager


def test_fresh_manager_without_entry_points_has_no_plugins(pm):
    assert pm.get_plugins() == set()
    registry = collect(pm, disabled=[])
    assert registry.compressors == {} and registry.targets == {}


def test_registered_test_plugin_is_collected(pm_with_plugin):
    registry = collect(pm_with_plugin)
    assert set(registry.compressors) == {"halve"}
    assert set(registry.targets) == {"fake"}
    entry = registry.compressors["halve"]
    assert entry.cls is Halve
    assert entry.plugin == "halve-plugin"
    assert "halve-plugin" in entry.distribution
    assert isinstance(registry.compressor("halve"), Halve)
    assert isinstance(registry.target("fake"), FakeTarget)


def test_unknown_names_list_what_is_registered(pm_with_plugin):
    registry = collect(pm_with_plugin)
    with pytest.raises(UsageError, match=r"unknown plugin 'nope'; available compression plugins: halve"):
        registry.compressor("nope")
    with pytest.raises(UsageError, match=r"unknown target 'tpu'; available targets: fake"):
        registry.target("tpu")


def skipped(record) -> list[str]:
    """The PluginWarning messages recorded by pytest.warns."""
    return [str(w.message) for w in record if issubclass(w.category, PluginWarning)]


def test_duplicate_compressor_name_names_both_sources(pm):
    class Other(Halve):
        pass

    pm.register(_plugin(edgepack_register_compressors=[Halve]), name="first-plugin")
    pm.register(_plugin(edgepack_register_compressors=[Other]), name="second-plugin")
    with pytest.warns(PluginWarning) as record:
        registry = collect(pm)
    [message] = skipped(record)
    assert "'halve'" in message and "twice" in message
    assert "first-plugin" in message and "second-plugin" in message
    assert registry.compressors["halve"].cls is Halve  # the first keeps its name


def test_duplicate_target_name_names_both_sources(pm):
    class OtherTarget(FakeTarget):
        pass

    pm.register(_plugin(edgepack_register_targets=[FakeTarget]), name="first-plugin")
    pm.register(_plugin(edgepack_register_targets=[OtherTarget]), name="second-plugin")
    with pytest.warns(PluginWarning) as record:
        registry = collect(pm)
    [message] = skipped(record)
    assert "'fake'" in message and "first-plugin" in message and "second-plugin" in message
    assert registry.targets["fake"].cls is FakeTarget


IMPOSTOR = """
    import edgepack
    from edgepack.interfaces import Compressor

    class Impostor(Compressor):
        name = "precision"
        kind = "precision"
        def estimate(self, footprint, options, target): return footprint
        def quality_cost(self, options, facts): return 0.0
        def apply(self, model, options, context): return model

    @edgepack.hookimpl
    def edgepack_register_compressors(register):
        register(Impostor)
"""


def test_duplicate_of_a_builtin_names_both_distributions(fake_dist):
    fake_dist(IMPOSTOR)
    with pytest.warns(PluginWarning) as record:
        registry = load_registry()
    [message] = skipped(record)
    assert "'precision'" in message
    assert f"edgepack {edgepack.__version__}" in message and "acme-edgepack 1.2.3" in message
    assert {"precision", "quantize"} <= set(registry.compressors)  # one of the two, and every other plugin


def test_same_entry_point_name_in_two_distributions_is_refused(fake_dist):
    fake_dist(IMPOSTOR.replace('"precision"', '"fancy"'), entry_points={"precision": None})
    with pytest.warns(PluginWarning) as record:
        pm = make_plugin_manager()
    [message] = skipped(record)
    assert "acme-edgepack 1.2.3" in message and f"edgepack {edgepack.__version__}" in message
    assert "already taken" in message
    assert pm.get_plugin("cpu") is not None


# ---------------------------------------------------------------------------------------------
# classes that break the interface: the plugin is skipped, the others stay


def _skips(pm, *needles: str) -> Any:
    pm.register(HalvePlugin(), name="good-plugin")
    with pytest.warns(PluginWarning) as record:
        registry = collect(pm)
    [message] = skipped(record)
    assert "'bad-plugin'" in message and f"{DISABLE_ENV}=bad-plugin" in message
    for needle in needles:
        assert re.search(needle, message), (needle, message)
    assert set(registry.compressors) == {"halve"} and set(registry.targets) == {"fake"}
    return registry


def test_class_that_is_not_a_compressor_is_refused(pm):
    class NotACompressor:
        name = "bogus"
        kind = "other"

    pm.register(_plugin(edgepack_register_compressors=[NotACompressor]), name="bad-plugin")
    _skips(pm, "not a Compressor subclass")


def test_target_registered_as_compressor_is_refused(pm):
    class OtherFake(FakeTarget):
        name = "other-fake"

    pm.register(_plugin(edgepack_register_compressors=[OtherFake]), name="bad-plugin")
    _skips(pm, "not a Compressor subclass")


def test_compressor_registered_as_target_is_refused(pm):
    pm.register(_plugin(edgepack_register_targets=[Halve]), name="bad-plugin")
    _skips(pm, "not a Target subclass")


def test_instance_instead_of_class_is_refused(pm):
    pm.register(_plugin(edgepack_register_compressors=[Halve()]), name="bad-plugin")
    _skips(pm, "not a Compressor subclass")


def test_compressor_without_name_is_refused(pm):
    class Nameless(Halve):
        name = ""

    pm.register(_plugin(edgepack_register_compressors=[Nameless]), name="bad-plugin")
    _skips(pm, "Nameless without a name")


def test_compressor_with_unknown_kind_is_refused(pm):
    class Weird(Halve):
        name = "weird"
        kind = "magic"

    pm.register(_plugin(edgepack_register_compressors=[Weird]), name="bad-plugin")
    _skips(pm, r"kind 'magic'; kinds are prune, quantize")


def test_compressor_whose_default_its_own_option_refuses_is_refused(pm):
    """A default reaches apply as written: one that does not parse is caught at registration."""
    class LotsOfRatio(Halve):
        name = "lots"
        options = (Option("ratio", float, (), "lots", help="a ratio"),)

    pm.register(_plugin(edgepack_register_compressors=[LotsOfRatio]), name="bad-plugin")
    _skips(pm, r"compressor 'lots' whose default option lots:ratio=lots is not a valid float")


def test_a_plugin_is_skipped_whole_when_one_of_its_classes_is_bad(pm):
    class Weird(Halve):
        name = "weird"
        kind = "magic"

    class Fine(Halve):
        name = "fine"

    pm.register(_plugin(edgepack_register_compressors=[Fine, Weird]), name="bad-plugin")
    _skips(pm, "magic")  # 'fine' is not kept either: a half-registered plugin is worse than none


def test_a_register_hook_that_raises_is_skipped(pm):
    class Raises:
        @edgepack.hookimpl
        def edgepack_register_compressors(self, register):
            raise RuntimeError("cannot find my kernels")

    pm.register(Raises(), name="bad-plugin")
    _skips(pm, "RuntimeError: cannot find my kernels")


# ---------------------------------------------------------------------------------------------
# misspelt hooks and broken plugins


class Misspelt:
    @edgepack.hookimpl
    def edgepack_register_compresors(self, register):  # sic: one 's'
        register(Halve)


def test_misspelt_hook_fails_check_pending(pm):
    pm.register(Misspelt(), name="misspelt")
    with pytest.raises(pluggy.PluginValidationError, match="edgepack_register_compresors"):
        pm.check_pending()


MISSPELT = """
    import edgepack

    @edgepack.hookimpl
    def edgepack_register_compresors(register):
        pass
"""


def test_misspelt_hook_in_installed_plugin_is_skipped(fake_dist):
    fake_dist(MISSPELT)
    with pytest.warns(PluginWarning) as record:
        pm = make_plugin_manager()
    [message] = skipped(record)
    assert "'acme'" in message and "acme-edgepack 1.2.3" in message and "edgepack_register_compresors" in message
    assert pm.get_plugin("acme") is None and pm.get_plugin("precision") is not None
    assert pm.statuses["acme"].status == "broken"


def test_cli_lists_a_broken_plugin_warns_once_and_exits_0(fake_dist):
    import json

    fake_dist(MISSPELT)
    from edgepack.cli import _show_plugin_warnings, cli

    _show_plugin_warnings()
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    warnings_ = [l for l in result.stderr.splitlines() if l.startswith("edgepack: warning:")]
    assert len(warnings_) == 1 and "'acme'" in warnings_[0] and "acme-edgepack 1.2.3" in warnings_[0]
    data = json.loads(result.stdout.splitlines()[-1])
    statuses = {e["name"]: e for e in data["entry_points"]}
    assert statuses["acme"]["status"] == "broken" and "unknown hook" in statuses["acme"]["reason"]
    assert statuses["precision"]["status"] == "ok"
    assert "precision" in {p["name"] for p in data["plugins"]}


def test_plugin_that_fails_to_import_names_entry_point_and_distribution(fake_dist):
    fake_dist("raise ImportError('no module named acme_runtime')\n", entry_points={"acme": None})
    with pytest.warns(PluginWarning) as record:
        registry = load_registry()
    [message] = skipped(record)
    assert "'acme'" in message and "acme-edgepack 1.2.3" in message
    assert "no module named acme_runtime" in message and f"{DISABLE_ENV}=acme" in message
    assert "precision" in registry.compressors


@pytest.mark.parametrize("api, upgrade", [(2, "upgrade edgepack"), (0, "upgrade acme-edgepack")])
def test_a_plugin_written_for_another_api_says_what_to_upgrade(fake_dist, api, upgrade):
    fake_dist(IMPOSTOR.replace('"precision"', '"fancy"') + f"    EDGEPACK_PLUGIN_API = {api}\n")
    with pytest.warns(PluginWarning) as record:
        registry = load_registry()
    [message] = skipped(record)
    assert f"written for edgepack plugin API {api}" in message and upgrade in message
    assert "fancy" not in registry.compressors


# ---------------------------------------------------------------------------------------------
# disabling plugins


def test_disable_env_blocks_entry_point_plugins(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, " precision , cuda,")
    pm = make_plugin_manager()
    assert pm.get_plugin("precision") is None and pm.is_blocked("precision")
    assert pm.get_plugin("cuda") is None and pm.is_blocked("cuda")
    assert pm.get_plugin("cpu") is not None
    registry = collect(pm)
    assert "precision" not in registry.compressors
    assert "cuda" not in registry.targets
    assert "cpu" in registry.targets
    with pytest.raises(UsageError, match="unknown plugin 'precision'"):
        load_registry().compressor("precision")


def test_disabled_argument_blocks_and_overrides_env(monkeypatch):
    pm = make_plugin_manager(disabled=["precision"])
    assert pm.get_plugin("precision") is None and pm.get_plugin("cpu") is not None
    monkeypatch.setenv(DISABLE_ENV, "precision")
    pm = make_plugin_manager(disabled=[])
    assert pm.get_plugin("precision") is not None


def test_disable_drops_a_registered_name(pm_with_plugin, monkeypatch):
    assert "halve" not in collect(pm_with_plugin, disabled=["halve"]).compressors
    monkeypatch.setenv(DISABLE_ENV, "halve")
    registry = collect(pm_with_plugin)
    assert "halve" not in registry.compressors
    assert "fake" in registry.targets


def test_allow_list_loads_only_the_named_plugins(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "cpu, quantize")
    registry = load_registry()
    assert set(registry.compressors) == {"quantize"} and set(registry.targets) == {"cpu"}
    disabled = {s.name: s.reason for s in registry.statuses if s.status == "disabled"}
    assert disabled["precision"] == f"not listed in {ALLOW_ENV}"


def test_plugins_command_respects_disable_env(monkeypatch):
    import json

    from edgepack.cli import cli

    runner = CliRunner()
    names = {p["name"] for p in json.loads(runner.invoke(cli, ["plugins", "--json"]).stdout.splitlines()[-1])["plugins"]}
    assert "precision" in names
    monkeypatch.setenv(DISABLE_ENV, "precision")
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0
    names = {p["name"] for p in json.loads(result.stdout.splitlines()[-1])["plugins"]}
    assert "precision" not in names


# ---------------------------------------------------------------------------------------------
# built-ins come in through entry points


def test_builtins_are_declared_as_entry_points():
    declared = {ep.name: ep.value for ep in entry_points(group="edgepack")}
    for name, module in BUILTINS.items():
        assert declared.get(name) == module


def test_builtins_arrive_through_entry_points():
    pm = make_plugin_manager()
    for name, module in BUILTINS.items():
        plugin = pm.get_plugin(name)
        assert plugin is not None, name
        assert plugin.__name__ == module
        assert pm.distributions[name] == f"edgepack {edgepack.__version__}"
    registry = collect(pm)
    assert {"cpu", "cuda"} <= set(registry.targets)
    assert "precision" in registry.compressors
    for table, name in ((registry.targets, "cpu"), (registry.targets, "cuda"), (registry.compressors, "precision")):
        assert table[name].plugin == name
        assert table[name].distribution == f"edgepack {edgepack.__version__}"
    assert issubclass(registry.compressors["precision"].cls, Compressor)
    assert issubclass(registry.targets["cpu"].cls, Target)


def test_builtin_packages_live_under_the_edgepack_namespace():
    import edgepack.plugins.precision as precision
    import edgepack.targets.cpu as cpu

    assert precision.Precision.name == "precision"
    assert cpu.CpuTarget.name == "cpu"


# ---------------------------------------------------------------------------------------------
# edgepack_register_commands


class HelloCommands:
    @edgepack.hookimpl
    def edgepack_register_commands(self, cli):
        @cli.command("hello")
        def hello():
            click.echo("hello from a plugin")


def test_register_commands_hook_adds_a_command(pm):
    pm.register(HelloCommands(), name="hello-plugin")
    group = click.Group("g")
    pm.hook.edgepack_register_commands(cli=group)
    result = CliRunner().invoke(group, ["hello"])
    assert result.exit_code == 0
    assert result.stdout == "hello from a plugin\n"


def test_main_adds_commands_from_installed_plugins(fake_dist, monkeypatch, capsys):
    from edgepack import cli as cli_module

    fake_dist("""
        import click
        import edgepack

        @edgepack.hookimpl
        def edgepack_register_commands(cli):
            @cli.command("acme-hello")
            def acme_hello():
                click.echo("hello from acme")
    """)
    monkeypatch.setattr(sys, "argv", ["edgepack", "acme-hello"])
    try:
        with pytest.raises(SystemExit) as info:
            cli_module.main()
    finally:
        cli_module.cli.commands.pop("acme-hello", None)
    assert info.value.code in (0, None)
    assert "hello from acme" in capsys.readouterr().out


def test_loading_every_builtin_plugin_does_not_import_torch():
    """`edgepack --help` and `edgepack plugins` load every plugin: none may import torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from edgepack.host import load_registry\n"
        "registry = load_registry()\n"
        "assert {'precision', 'quantize', 'prune', 'sparsify'} <= set(registry.compressors), registry.compressors\n"
        "assert 'torch' not in sys.modules, 'a plugin imported torch at registration'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
