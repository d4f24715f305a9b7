"""Meta-tests (the datasette pattern): every hook spec is documented and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from edgepack import hookspecs
from edgepack.host import make_plugin_manager

TESTS = Path(__file__).parent


def _hook_names() -> list[str]:
    return sorted(
        name for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and hasattr(obj, "edgepack_spec")
    )


HOOKS = _hook_names()


def test_hookspecs_declares_the_contract_hooks():
    assert {"edgepack_register_compressors", "edgepack_register_targets",
            "edgepack_register_commands"} <= set(HOOKS)


def test_hookspecs_holds_only_edgepack_prefixed_specs():
    functions = [n for n, o in vars(hookspecs).items()
                 if inspect.isfunction(o) and o.__module__ == hookspecs.__name__]
    assert sorted(functions) == HOOKS
    assert all(name.startswith("edgepack_") for name in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc and len(doc.split()) >= 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_known_to_the_plugin_manager(hook):
    caller = getattr(make_plugin_manager(entrypoints=False).hook, hook)
    assert caller.has_spec()


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    sources = [p for p in TESTS.glob("test_*.py") if p.resolve() != Path(__file__).resolve()]
    users = [p.name for p in sources if hook in p.read_text(encoding="utf-8")]
    assert users, f"no test in {TESTS} mentions {hook}"


# ---------------------------------------------------------------------------------------------
# The author guide documents the whole contract


PLUGIN_GUIDE = TESTS.parent / "docs" / "plugins.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_the_plugin_guide(hook):
    text = PLUGIN_GUIDE.read_text(encoding="utf-8")
    assert f"### `{hook}(" in text, f"docs/plugins.md has no section for {hook}"


def _public_methods(cls: type) -> list[str]:
    return sorted(name for name, member in vars(cls).items()
                  if callable(member) and not name.startswith("_"))


@pytest.mark.parametrize("cls_name", ["Compressor", "Target"])
def test_every_interface_method_is_documented_in_the_plugin_guide(cls_name):
    from edgepack import interfaces

    cls = getattr(interfaces, cls_name)
    text = PLUGIN_GUIDE.read_text(encoding="utf-8")
    missing = [m for m in _public_methods(cls) if f"`{m}(" not in text]
    assert not missing, f"docs/plugins.md does not document {cls_name}.{', '.join(missing)}"
    for attribute in ("name", "version", "description", "options"):
        assert f"`{attribute}`" in text


def test_the_plugin_guide_names_only_helpers_that_exist():
    """Every ``edgepack.module.helper`` the guide tells authors to call exists."""
    import importlib
    import re

    text = PLUGIN_GUIDE.read_text(encoding="utf-8")
    names = set(re.findall(r"`(edgepack(?:\.\w+)+)", text))
    assert names
    for dotted in sorted(names):
        module_name, _, attr = dotted.rpartition(".")
        try:
            module = importlib.import_module(dotted)
            continue
        except ImportError:
            module = importlib.import_module(module_name)
        assert hasattr(module, attr), f"docs/plugins.md names {dotted}, which does not exist"
