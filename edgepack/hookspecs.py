"""Every ``edgepack_*`` hook: the contract between the edgepack host and its plugins.

A plugin is any module or object that implements some of these hooks, marked with
:data:`edgepack.hookimpl`. Plugins are found through the ``edgepack`` entry-point group; the
built-in compressors and targets are registered the same way.

Discovery hooks take a ``register`` callback rather than returning values, so that new keyword
arguments can be added to ``register`` later without breaking plugins, and so that the host can
refuse a duplicate name at the moment it is registered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from edgepack.interfaces import Compressor, Target

hookspec = pluggy.HookspecMarker("edgepack")


@hookspec
def edgepack_register_compressors(register: Callable[[type["Compressor"]], None]) -> None:
    """Register compression methods.

    Call ``register(CompressorClass)`` once per class. The class must subclass
    :class:`edgepack.interfaces.Compressor` and carry a unique ``name``; a name that another
    plugin already registered makes the later plugin skipped, with a warning naming both distributions.

    :param register: callback that records one :class:`~edgepack.interfaces.Compressor` subclass.
    """


@hookspec
def edgepack_register_targets(register: Callable[[type["Target"]], None]) -> None:
    """Register hardware targets.

    Call ``register(TargetClass)`` once per class. The class must subclass
    :class:`edgepack.interfaces.Target` and carry a unique ``name`` (``cpu``, ``cuda``, ...).

    :param register: callback that records one :class:`~edgepack.interfaces.Target` subclass.
    """


@hookspec
def edgepack_register_commands(cli: "click.Group") -> None:
    """Add extra commands to the ``edgepack`` command line.

    Called once when the CLI starts. Use ``@cli.command()`` to attach click commands.

    :param cli: the top-level ``edgepack`` click group.
    """
