"""The plugin host: builds a plugin manager and the registry of compressors and targets.

Every plugin, built-in or third-party, comes in through the ``edgepack`` entry-point group.
``EDGEPACK_DISABLE_PLUGINS=name,...`` blocks plugins by entry-point name (and drops any
compressor or target registered under one of those names); ``EDGEPACK_PLUGINS=name,...``
loads only the named entry points.

One broken plugin never takes the tool down: a plugin that fails to import, was written for
another plugin API, implements an unknown hook, raises in a register hook, registers a class
that breaks its interface, or reuses a name already taken is skipped with one
:class:`PluginWarning` naming its entry point and distribution, and every other plugin keeps
working. :attr:`EdgepackPluginManager.statuses` (and ``edgepack plugins``) says which plugins
are ok, broken (and why) or disabled.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pluggy

from edgepack import hookspecs
from edgepack.errors import PluginError, UsageError
from edgepack.interfaces import COMPRESSOR_KINDS, Compressor, Target

PROJECT = "edgepack"
DISABLE_ENV = "EDGEPACK_DISABLE_PLUGINS"
ALLOW_ENV = "EDGEPACK_PLUGINS"

#: The plugin API this edgepack offers. A plugin module may declare the API it was written for
#: as ``EDGEPACK_PLUGIN_API = 1``; one written for another API is skipped with a warning that
#: says what to upgrade. Plugins that declare nothing are taken to be written for this one.
PLUGIN_API = 1


class PluginWarning(UserWarning):
    """A plugin was skipped: it is broken or was written for another plugin API."""


@dataclass
class PluginStatus:
    """What became of one plugin: ``ok``, ``broken`` (with the reason) or ``disabled``."""

    name: str
    distribution: str
    status: str
    reason: str = ""

    def to_json(self) -> dict[str, str]:
        """Plain-JSON form for ``edgepack plugins --json``."""
        return {"name": self.name, "distribution": self.distribution, "status": self.status, "reason": self.reason}


def disabled_names(environ: os._Environ | dict | None = None) -> set[str]:
    """Names listed in ``EDGEPACK_DISABLE_PLUGINS`` (comma separated, blanks ignored)."""
    env = os.environ if environ is None else environ
    return {n.strip() for n in env.get(DISABLE_ENV, "").split(",") if n.strip()}


def allowed_names(environ: os._Environ | dict | None = None) -> set[str] | None:
    """Names listed in ``EDGEPACK_PLUGINS``, or None when it is not set (every plugin)."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOW_ENV)
    return None if raw is None or not raw.strip() else {n.strip() for n in raw.split(",") if n.strip()}


class EdgepackPluginManager(pluggy.PluginManager):
    """A pluggy plugin manager that remembers which distribution each plugin came from and
    what became of every plugin it was offered (:attr:`statuses`)."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.distributions: dict[str, str] = {}
        self.installed_by: dict[str, tuple[str, str]] = {}
        self.statuses: dict[str, PluginStatus] = {}

    def skip(self, name: str, distribution: str, reason: str) -> None:
        """Record plugin ``name`` as broken and warn once, naming how to silence it."""
        self.statuses[name] = PluginStatus(name, distribution, "broken", reason)
        warnings.warn(
            f"plugin {name!r} from {distribution} was skipped: {reason} "
            f"(set {DISABLE_ENV}={name} to disable it)", PluginWarning, stacklevel=3,
        )

    def load_entrypoints(self, allowed: set[str] | None = None) -> None:
        """Import and register every ``edgepack`` entry point that is not blocked (and, when
        ``allowed`` is given, is in it). A plugin that cannot be loaded is skipped with a
        warning naming the entry point and its distribution."""
        from importlib.metadata import distributions

        for dist in distributions():
            ours = [ep for ep in dist.entry_points if ep.group == PROJECT]
            if not ours:
                continue
            # read once: each access to dist.metadata parses the whole METADATA file again,
            # long description included (edgepack's own README: 0.3 s of every command)
            metadata = dist.metadata
            dist_name, dist_version = metadata["Name"], metadata["Version"]
            label = f"{dist_name} {dist_version}"
            for ep in ours:
                if self.is_blocked(ep.name):
                    self.statuses[ep.name] = PluginStatus(ep.name, label, "disabled", f"listed in {DISABLE_ENV}")
                    continue
                if allowed is not None and ep.name not in allowed:
                    self.statuses[ep.name] = PluginStatus(ep.name, label, "disabled", f"not listed in {ALLOW_ENV}")
                    continue
                if ep.name in self.statuses:
                    earlier = self.statuses[ep.name].distribution
                    if earlier != label:  # else: the same distribution seen twice on sys.path
                        self.skip(ep.name, label, f"the entry-point name {ep.name!r} is already taken by {earlier}")
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken third-party plugin must not look like our bug
                    self.skip(ep.name, label, f"it failed to import: {type(exc).__name__}: {exc}")
                    continue
                api = getattr(plugin, "EDGEPACK_PLUGIN_API", PLUGIN_API)
                if api != PLUGIN_API:
                    upgrade = "edgepack" if isinstance(api, int) and api > PLUGIN_API else dist_name
                    self.skip(ep.name, label, f"it was written for edgepack plugin API {api!r}, this edgepack "
                                              f"offers API {PLUGIN_API}: upgrade {upgrade}")
                    continue
                try:
                    self.register(plugin, name=ep.name)
                except Exception as exc:  # pluggy.PluginValidationError: a hook with wrong arguments
                    self.skip(ep.name, label, f"it does not follow the hook specs: {exc}")
                    continue
                self.distributions[ep.name] = label
                self.installed_by[ep.name] = (dist_name, dist_version)
                self.statuses[ep.name] = PluginStatus(ep.name, label, "ok")

    def drop_unknown_hooks(self) -> None:
        """Skip (with a warning) every plugin that implements a hook edgepack does not know,
        such as a misspelt one, which would otherwise never be called."""
        while True:
            try:
                self.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.get_name(exc.plugin) or repr(exc.plugin)
                self.unregister(exc.plugin)
                self.skip(name, self.distributions.get(name, f"{name} (not from a distribution)"),
                          f"it implements an unknown hook: {exc}")


def make_plugin_manager(*, entrypoints: bool = True, disabled: Iterable[str] | None = None,
                        allowed: Iterable[str] | None = None) -> EdgepackPluginManager:
    """A fresh plugin manager with the ``edgepack`` hook specs and, by default, every plugin
    installed under the ``edgepack`` entry-point group except the disabled ones. Broken
    plugins are skipped with a :class:`PluginWarning`.

    :param entrypoints: load installed plugins; tests pass False and register their own.
    :param disabled: plugin names to block; defaults to ``EDGEPACK_DISABLE_PLUGINS``.
    :param allowed: the only entry points to load; defaults to ``EDGEPACK_PLUGINS`` (all when unset).
    """
    pm = EdgepackPluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disabled_names() if disabled is None else disabled:
        pm.set_blocked(name)
    if entrypoints:
        pm.load_entrypoints(allowed_names() if allowed is None else set(allowed))
    pm.drop_unknown_hooks()
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
    #: (distribution name, version) that installed it; None for plugins registered in-process
    installed_by: tuple[str, str] | None = None

    def requirement(self) -> str | None:
        """``acme-edgepack>=1.2.3``: what to install to get this class, or None if unknown."""
        return f"{self.installed_by[0]}>={self.installed_by[1]}" if self.installed_by else None


@dataclass
class Registry:
    """Compressors and targets by name, with the distribution that registered each."""

    compressors: dict[str, Registered] = field(default_factory=dict)
    targets: dict[str, Registered] = field(default_factory=dict)
    #: what became of every entry-point plugin: ok, broken (why) or disabled
    statuses: list[PluginStatus] = field(default_factory=list)

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

    A plugin whose hook raises, or registers a class that does not follow its interface, or a
    name another plugin registered first, is skipped whole (none of its classes is kept) with
    a :class:`PluginWarning` naming it and its distribution; the others are unaffected.
    """
    blocked = disabled_names() if disabled is None else set(disabled)
    registry = Registry()
    statuses: dict[str, PluginStatus] = getattr(pm, "statuses", {})

    def check(cls: type, base: type, what: str, source: str) -> str:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"it registered {cls!r}, which is not a {base.__name__} subclass")
        name = getattr(cls, "name", "")
        if not name:
            raise PluginError(f"it registered {what} class {cls.__name__} without a name")
        if base is Compressor and cls.kind not in COMPRESSOR_KINDS:
            raise PluginError(f"it registered compressor {name!r} with kind {cls.kind!r}; "
                              f"kinds are {', '.join(COMPRESSOR_KINDS)}")
        for option in getattr(cls, "options", ()):  # a default reaches apply unparsed: it must parse
            if getattr(option, "default", None) is not None:
                try:
                    option.parse(option.default, name)
                except UsageError as exc:
                    raise PluginError(f"it registered {what} {name!r} whose default {exc}") from None
        return name

    hooks = (("edgepack_register_compressors", registry.compressors, Compressor, "compressor"),
             ("edgepack_register_targets", registry.targets, Target, "target"))
    for plugin_name, plugin in pm.list_name_plugin():  # in registration order: the first name wins
        if plugin is None:
            continue  # blocked
        plugin_name = plugin_name or repr(plugin)
        source = _distribution_of(pm, plugin)
        installed_by = getattr(pm, "installed_by", {}).get(plugin_name)
        staged: list[tuple[dict[str, Registered], str, Registered, str]] = []
        try:
            for hook_name, table, base, what in hooks:
                impls = [i for i in getattr(pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
                for impl in impls:
                    def register(cls: type, table=table, base=base, what=what) -> None:
                        staged.append((table, check(cls, base, what, source), Registered(cls, plugin_name, source, installed_by), what))
                    impl.function(register=register)
            seen: dict[tuple[int, str], str] = {}
            for table, name, entry, what in staged:
                if name in table or (id(table), name) in seen:
                    other = table[name].distribution if name in table else source
                    raise PluginError(f"{what} name {name!r} is registered twice: by {other} and by {source}")
                seen[(id(table), name)] = name
        except Exception as exc:  # a broken plugin's bug must not look like edgepack's
            reason = str(exc) if isinstance(exc, PluginError) else f"its register hook raised {type(exc).__name__}: {exc}"
            if isinstance(pm, EdgepackPluginManager):
                pm.skip(plugin_name, source, reason)
            else:  # pragma: no cover - a plain pluggy manager
                warnings.warn(f"plugin {plugin_name!r} from {source} was skipped: {reason}", PluginWarning, stacklevel=2)
            continue
        for table, name, entry, _ in staged:
            if name not in blocked:
                table[name] = entry
    registry.statuses = sorted(statuses.values(), key=lambda s: s.name)
    return registry


def load_registry() -> Registry:
    """The registry of every installed, enabled plugin (a fresh plugin manager each call)."""
    return collect(make_plugin_manager())
