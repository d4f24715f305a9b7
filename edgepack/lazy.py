"""Lazy imports for plugins: registering a plugin must not import torch, so that
``edgepack --help`` and ``edgepack plugins`` stay fast (STYLE: heavy imports happen on use)."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for a module that imports it on first attribute access::

        torch = LazyModule("torch")
        nn = LazyModule("torch.nn")

        def f():
            return torch.zeros(3)      # torch is imported here, not at plugin import
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
