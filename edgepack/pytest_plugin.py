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

Bundles as test items: ``pytest --edgepack-bundle dist/my-model-1.0.0-cpu`` (repeatable; a
directory or an archive), or collecting a bundle directory (``pytest dist/my-model-1.0.0-cpu``:
its ``manifest.json`` is collected), verifies the bundle once and reports each of verify's checks
as a test: ``integrity``, ``content``, ``signature``, ``weights``, ``load``, ``smoke``,
``memory``. A failed check shows verify's sentences; a check that did not run because an
earlier one failed is skipped, saying so. ``--edgepack-key PUB`` (repeatable) requires a
signature by one of those keys; ``--edgepack-allow-code`` lets a bundle's own code run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

#: One test item per verify check: (item name, the Failure.check values it reports).
BUNDLE_CHECKS = (
    ("integrity", ("format_version", "manifest", "schema", "files")),
    ("content", ("content",)),
    ("signature", ("signature", "version")),
    ("weights", ("weights", "code")),
    ("load", ("plugins", "target", "load")),
    ("smoke", ("smoke",)),
    ("memory", ("memory",)),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgepack", "edgepack bundles as test items")
    group.addoption("--edgepack-bundle", action="append", default=[], metavar="PATH",
                    help="verify this bundle (directory or archive) and report each check as a test; repeatable")
    group.addoption("--edgepack-key", action="append", default=[], metavar="PUB",
                    help="a trusted public key: the bundles must be signed by one of them; repeatable")
    group.addoption("--edgepack-allow-code", action="store_true", default=False,
                    help="let bundles that hold their model's own code (model.code) run it")


class BundleCheckFailed(Exception):
    """A verify check failed: its sentences, one per line."""


class BundleCollector(pytest.Collector):
    """One bundle: verified once, on the first of its items to run."""

    def __init__(self, *, bundle: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bundle = bundle
        self._report: Any = None

    def collect(self) -> list[pytest.Item]:
        return [BundleCheckItem.from_parent(self, name=name, checks=checks) for name, checks in BUNDLE_CHECKS]

    def report(self) -> Any:
        if self._report is None:
            from edgepack.bundle.verify import verify

            config = self.config
            self._report = verify(self.bundle, keys=config.getoption("edgepack_key") or (),
                                  allow_code=config.getoption("edgepack_allow_code"))
        return self._report


class BundleCheckItem(pytest.Item):
    """One of verify's checks of one bundle."""

    def __init__(self, *, checks: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checks = checks

    def runtest(self) -> None:
        report = self.parent.report()
        failures = [f for f in report.failures if f.check in self.checks]
        if failures:
            raise BundleCheckFailed("\n".join(f"[{f.check}] {f.path}: {f.detail}" for f in failures))
        if self.name not in report.checks:
            pytest.skip("not run: an earlier check failed" if report.failures else "not run for this bundle")

    def repr_failure(self, excinfo: Any, style: Any = None) -> Any:
        if isinstance(excinfo.value, BundleCheckFailed):
            return f"edgepack verify {self.parent.bundle}: {self.name} failed\n{excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.parent.bundle, None, f"edgepack bundle {self.parent.bundle.name}: {self.name}"


def _is_manifest(path: Path) -> bool:
    """Whether ``path`` is an edgepack bundle's manifest (read only when small and named so)."""
    try:
        if path.name != "manifest.json" or path.stat().st_size > 64 * 2**20:
            return False
        return json.loads(path.read_bytes()).get("format") == "edgepack.bundle"
    except (OSError, ValueError, AttributeError):
        return False


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    """A bundle directory's ``manifest.json`` collects the bundle."""
    if _is_manifest(file_path):
        return BundleCollector.from_parent(parent, name=file_path.parent.name, path=file_path,
                                           bundle=file_path.parent)
    return None


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--edgepack-bundle PATH``: the bundle's checks join the collected items."""
    for raw in config.getoption("edgepack_bundle") or ():
        bundle = Path(raw)
        if not bundle.exists():
            raise pytest.UsageError(f"--edgepack-bundle {raw}: no such bundle directory or archive")
        collector = BundleCollector.from_parent(session, name=f"edgepack-bundle[{raw}]", path=bundle.resolve(),
                                                bundle=bundle)
        items.extend(collector.collect())


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
