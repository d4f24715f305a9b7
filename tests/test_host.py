"""The plugin host: plugin managers, registration, duplicates, disabling, built-ins."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import click
import pluggy
import pytest
from click.testing import CliRunner

import edgepack
from edgepack.errors import PluginError, UsageError
from edgepack.host import DISABLE_ENV, collect, load_registry, make_plugin_manager
from edgepack.interfaces import Compressor, Target

from conftest import FakeTarget, Halve, assert_one_error_line

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


def test_duplicate_compressor_name_names_both_sources(pm):
    class Other(Halve):
        pass

    pm.register(_plugin(edgepack_register_compressors=[Halve]), name="first-plugin")
    pm.register(_plugin(edgepack_register_compressors=[Other]), name="second-plugin")
    with pytest.raises(PluginError) as info:
        collect(pm)
    message = str(info.value)
    assert "'halve'" in message and "twice" in message
    assert "first-plugin" in message and "second-plugin" in message


def test_duplicate_target_name_names_both_sources(pm):
    class OtherTarget(FakeTarget):
        pass

    pm.register(_plugin(edgepack_register_targets=[FakeTarget]), name="first-plugin")
    pm.register(_plugin(edgepack_register_targets=[OtherTarget]), name="second-plugin")
    with pytest.raises(PluginError) as info:
        collect(pm)
    assert "'fake'" in str(info.value)
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)


def test_duplicate_of_a_builtin_names_both_distributions(fake_dist):
    fake_dist("""
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
    """)
    with pytest.raises(PluginError) as info:
        load_registry()
    message = str(info.value)
    assert "'precision'" in message
    assert f"edgepack {edgepack.__version__}" in message
    assert "acme-edgepack 1.2.3" in message


def test_same_entry_point_name_in_two_distributions_is_refused(fake_dist):
    fake_dist("""
        import edgepack
        from edgepack.interfaces import Compressor

        class Fancy(Compressor):
            name = "fancy"
            def estimate(self, footprint, options, target): return footprint
            def quality_cost(self, options, facts): return 0.0
            def apply(self, model, options, context): return model

        @edgepack.hookimpl
        def edgepack_register_compressors(register):
            register(Fancy)
    """, entry_points={"precision": None})
    with pytest.raises(PluginError) as info:
        make_plugin_manager()
    assert "acme-edgepack 1.2.3" in str(info.value)
    assert f"edgepack {edgepack.__version__}" in str(info.value)


# ---------------------------------------------------------------------------------------------
# classes that break the interface


def test_class_that_is_not_a_compressor_is_refused(pm):
    class NotACompressor:
        name = "bogus"
        kind = "other"

    pm.register(_plugin(edgepack_register_compressors=[NotACompressor]), name="bad-plugin")
    with pytest.raises(PluginError, match=r"bad-plugin.*not a Compressor subclass"):
        collect(pm)


def test_target_registered_as_compressor_is_refused(pm):
    pm.register(_plugin(edgepack_register_compressors=[FakeTarget]), name="bad-plugin")
    with pytest.raises(PluginError, match="not a Compressor subclass"):
        collect(pm)


def test_compressor_registered_as_target_is_refused(pm):
    pm.register(_plugin(edgepack_register_targets=[Halve]), name="bad-plugin")
    with pytest.raises(PluginError, match="not a Target subclass"):
        collect(pm)


def test_instance_instead_of_class_is_refused(pm):
    pm.register(_plugin(edgepack_register_compressors=[Halve()]), name="bad-plugin")
    with pytest.raises(PluginError, match="not a Compressor subclass"):
        collect(pm)


def test_compressor_without_name_is_refused(pm):
    class Nameless(Halve):
        name = ""

    pm.register(_plugin(edgepack_register_compressors=[Nameless]), name="bad-plugin")
    with pytest.raises(PluginError, match="Nameless without a name"):
        collect(pm)


def test_compressor_with_unknown_kind_is_refused(pm):
    class Weird(Halve):
        name = "weird"
        kind = "magic"

    pm.register(_plugin(edgepack_register_compressors=[Weird]), name="bad-plugin")
    with pytest.raises(PluginError, match=r"kind 'magic'; kinds are prune, quantize"):
        collect(pm)


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


def test_misspelt_hook_in_installed_plugin_is_a_plugin_error(fake_dist):
    fake_dist("""
        import edgepack

        @edgepack.hookimpl
        def edgepack_register_compresors(register):
            pass
    """)
    with pytest.raises(PluginError, match="edgepack_register_compresors"):
        make_plugin_manager()


def test_misspelt_hook_makes_the_cli_exit_2(fake_dist):
    fake_dist("""
        import edgepack

        @edgepack.hookimpl
        def edgepack_register_compresors(register):
            pass
    """)
    from edgepack.cli import cli

    result = CliRunner().invoke(cli, ["plugins"])
    assert_one_error_line(result, 2, "edgepack_register_compresors")


def test_plugin_that_fails_to_import_names_entry_point_and_distribution(fake_dist):
    fake_dist("raise ImportError('no module named acme_runtime')\n", entry_points={"acme": None})
    with pytest.raises(PluginError) as info:
        make_plugin_manager()
    message = str(info.value)
    assert "'acme'" in message and "acme-edgepack 1.2.3" in message
    assert "no module named acme_runtime" in message


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
