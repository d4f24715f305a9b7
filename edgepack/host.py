"""The plugin host: builds a plugin manager and the registry of compressors and targets.

Every plugin, built-in or third-party, comes in through the ``edgepack`` entry-point group.
``EDGEPACK_DISABLE_PLUGINS=name,...`` blocks plugins by entry-point name (and drops any
compressor or target registered under one of those names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pluggy

from edgepack import hookspecs
from edgepack.errors import PluginError, UsageError
from edgepack.interfaces import COMPRESSOR_KINDS, Compressor, Target

PROJECT = "edgepack"
DISABLE_ENV = "EDGEPACK_DISABLE_PLUGINS"


def disabled_names(environ: os._Environ | dict | None = None) -> set[str]:
    """Names listed in ``EDGEPACK_DISABLE_PLUGINS`` (comma separated, blanks ignored)."""
    env = os.environ if environ is None else environ
    return {n.strip() for n in env.get(DISABLE_ENV, "").split(",") if n.strip()}


class EdgepackPluginManager(pluggy.PluginManager):
    """A pluggy plugin manager that remembers which distribution each plugin came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.distributions: dict[str, str] = {}

    def load_entrypoints(self) -> None:
        """Import and register every ``edgepack`` entry point that is not blocked.

        Unlike pluggy's loader this names the entry point and distribution that fail to import.
        """
        from importlib.metadata import distributions

        for dist in distributions():
            for ep in dist.entry_points:
                if ep.group != PROJECT or self.is_blocked(ep.name):
                    continue
                label = f"{dist.metadata['name']} {dist.version}"
                if self.get_plugin(ep.name) is not None:
                    if self.distributions.get(ep.name) == label:
                        continue  # the same distribution seen twice on sys.path
                    raise PluginError(
                        f"plugin name {ep.name!r} is registered twice: by "
                        f"{self.distributions.get(ep.name, 'an earlier plugin')} and by {label}"
                    )
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken third-party plugin must not look like our bug
                    raise PluginError(
                        f"plugin {ep.name!r} from {label} failed to import: {type(exc).__name__}: {exc} "
                        f"(skip it with {DISABLE_ENV}={ep.name}, or uninstall {dist.metadata['name']})"
                    ) from exc
                self.register(plugin, name=ep.name)
                self.distributions[ep.name] = label


def make_plugin_manager(*, entrypoints: bool = True, disabled: Iterable[str] | None = None) -> EdgepackPluginManager:
    """A fresh plugin manager with the ``edgepack`` hook specs and, by default, every plugin
    installed under the ``edgepack`` entry-point group except the disabled ones.

    :param entrypoints: load installed plugins; tests pass False and register their own.
    :param disabled: plugin names to block; defaults to ``EDGEPACK_DISABLE_PLUGINS``.
    """
    pm = EdgepackPluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disabled_names() if disabled is None else disabled:
        pm.set_blocked(name)
    if entrypoints:
        pm.load_entrypoints()
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        raise PluginError(
            f"plugin {name!r} implements an unknown hook: {exc} (skip it with {DISABLE_ENV}={name})"
        ) from exc
    return pm


def _distribution_of(pm: pluggy.PluginManager, plugin: object) -> str:
    name = pm.get_name(plugin) or repr(plugin)
    known = getattr(pm, "distributions", {})
    return known.get(name) or f"{name} (not from a distribution)"


@dataclass
class Registered:
    """A registered class and where it came from."""

    cls: type
    plugin: str  # the pluggy plugin name (entry-point name for installed ones)
    distribution: str


@dataclass
class Registry:
    """Compressors and targets by name, with the distribution that registered each."""

    compressors: dict[str, Registered] = field(default_factory=dict)
    targets: dict[str, Registered] = field(default_factory=dict)

    def compressor(self, name: str) -> Compressor:
        """A fresh instance of the named compressor; UsageError lists the valid names."""
        if name not in self.compressors:
            valid = ", ".join(sorted(self.compressors)) or "none installed"
            raise UsageError(f"unknown plugin {name!r}; available compression plugins: {valid}")
        return self.compressors[name].cls()

    def target(self, spec: str, options: Mapping[str, Any] | None = None) -> Target:
        """A fresh instance of the target ``spec`` names: ``cuda`` or ``cuda:memory=8GB,...``
        (options describe a device that is not here); ``options`` adds more (a manifest's).
        UsageError lists the valid names, or names the option at fault."""
        from edgepack.interfaces import parse_spec

        name, raw = parse_spec(spec, "--target", "target")
        if name not in self.targets:
            valid = ", ".join(sorted(self.targets)) or "none installed"
            raise UsageError(f"unknown target {name!r}; available targets: {valid}")
        return self.targets[name].cls({**(options or {}), **raw})


def collect(pm: pluggy.PluginManager, *, disabled: Iterable[str] | None = None) -> Registry:
    """Call the register hooks of every plugin and build the registry.

    Refuses a class that does not follow its interface, and a name registered twice, naming
    both distributions.
    """
    blocked = disabled_names() if disabled is None else set(disabled)
    registry = Registry()

    def make_register(table: dict[str, Registered], base: type, what: str, plugin: object):
        def register(cls: type) -> None:
            source = _distribution_of(pm, plugin)
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(f"{source} registered {cls!r}, which is not a {base.__name__} subclass")
            name = getattr(cls, "name", "")
            if not name:
                raise PluginError(f"{source} registered {what} class {cls.__name__} without a name")
            if base is Compressor and cls.kind not in COMPRESSOR_KINDS:
                raise PluginError(
                    f"{source} registered compressor {name!r} with kind {cls.kind!r}; "
                    f"kinds are {', '.join(COMPRESSOR_KINDS)}"
                )
            if name in blocked:
                return
            if name in table:
                raise PluginError(
                    f"{what} name {name!r} is registered twice: by {table[name].distribution} "
                    f"and by {source}"
                )
            table[name] = Registered(cls, pm.get_name(plugin) or "", source)

        return register

    # Call each plugin's implementation separately so that each register call knows its origin.
    hooks = ((pm.hook.edgepack_register_compressors, registry.compressors, Compressor, "compressor"),
             (pm.hook.edgepack_register_targets, registry.targets, Target, "target"))
    for hook, table, base, what in hooks:
        for impl in hook.get_hookimpls():
            name = pm.get_name(impl.plugin) or repr(impl.plugin)
            try:
                impl.function(register=make_register(table, base, what, impl.plugin))
            except PluginError as exc:
                raise PluginError(f"{exc} (skip plugin {name!r} with {DISABLE_ENV}={name})") from exc
            except Exception as exc:  # a broken plugin's bug must not look like edgepack's
                raise PluginError(
                    f"plugin {name!r} from {_distribution_of(pm, impl.plugin)} failed in {hook.name}: "
                    f"{type(exc).__name__}: {exc} (skip it with {DISABLE_ENV}={name})"
                ) from exc
    return registry


def load_registry() -> Registry:
    """The registry of every installed, enabled plugin (a fresh plugin manager each call)."""
    return collect(make_plugin_manager())
