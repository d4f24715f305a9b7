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
