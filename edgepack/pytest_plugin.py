"""edgepack's pytest plugin: fixtures for testing edgepack plugins.

Installed with edgepack through the ``pytest11`` entry point, so a plugin author's tests get
these fixtures without a conftest.py (``pytest -p no:edgepack`` turns them off):

- ``edgepack_plugin_manager``: a fresh edgepack plugin manager with no plugins at all;
- ``edgepack_register``: ``edgepack_register(plugin, name=None)`` makes a plugin (a module or
  object with hooks, or a Compressor or Target subclass) an installed edgepack plugin until
  the test ends (:func:`edgepack.testing.registered`);
- ``edgepack_tiny_encoder`` / ``edgepack_tiny_decoder``: directories of a small BERT encoder
  and a small Llama-style decoder, built once per session with seed 0.

Nothing here imports torch at start-up: the fixtures import what they need when used. With
them, a plugin's conformance test is one line::

    from edgepack.testing import check_compressor

    def test_conforms(edgepack_tiny_encoder):
        check_compressor(MyCompressor, model=edgepack_tiny_encoder).raise_for_problems()
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest


@pytest.fixture
def edgepack_plugin_manager() -> Any:
    """A fresh edgepack plugin manager holding no plugins (no entry points, nothing blocked)."""
    from edgepack.testing import plugin_manager

    return plugin_manager()


@pytest.fixture
def edgepack_register() -> Iterator[Callable[..., Any]]:
    """``register(plugin, name=None)``: make ``plugin`` visible to ``load_registry()``, the CLI
    and the processes pack and verify measure in, until the test ends; returns the
    :class:`edgepack.testing.Registration`."""
    from edgepack.testing import registered

    with contextlib.ExitStack() as stack:

        def register(plugin: Any, name: str | None = None) -> Any:
            return stack.enter_context(registered(plugin, name=name))

        yield register


@pytest.fixture(scope="session")
def edgepack_tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random BERT encoder with a tokenizer (:func:`edgepack.testing.build_encoder`,
    seed 0), built once per session."""
    from edgepack.testing import build_encoder

    return build_encoder(tmp_path_factory.mktemp("edgepack-tiny-encoder"), seed=0)


@pytest.fixture(scope="session")
def edgepack_tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama-style decoder with a tokenizer
    (:func:`edgepack.testing.build_decoder`, seed 0), built once per session."""
    from edgepack.testing import build_decoder

    return build_decoder("llama", tmp_path_factory.mktemp("edgepack-tiny-decoder"), seed=0)
