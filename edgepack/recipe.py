"""``edgepack.toml`` recipes: the same settings as ``pack``'s flags, in a file (flags win).

::

    target = "cpu"
    budget = "100MB"
    apply = ["precision:dtype=bf16"]
    batch = 1
    seq_len = 128
    min_fidelity = 0.99
    version = "0.1.0"
    out = "dist"

Paths (``samples``, ``out``) are relative to the recipe's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from edgepack.errors import UsageError
from edgepack.memory import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: recipe key → (pack() keyword, expected type)
KEYS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "target": ("target", str),
    "budget": ("budget", (str, int)),
    "apply": ("apply", list),
    "batch": ("batch_size", int),
    "seq_len": ("seq_len", int),
    "min_fidelity": ("min_fidelity", (float, int)),
    "version": ("version", str),
    "samples": ("samples", str),
    "devices": ("devices", int),
    "name": ("name", str),
    "archive": ("archive", bool),
    "out": ("out", str),
}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """pack() keyword arguments from a recipe; UsageError names the file and the key at fault."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"recipe {file} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe {file} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        if norm not in KEYS:
            raise UsageError(f"recipe {file}: unknown key {key!r}; valid keys: {', '.join(sorted(KEYS))}")
        name, kind = KEYS[norm]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"recipe {file}: key {key!r} has the wrong type ({type(value).__name__})")
        if norm == "apply" and not all(isinstance(v, str) for v in value):
            raise UsageError(f"recipe {file}: key 'apply' must be a list of PLUGIN[:KEY=VALUE,...] strings")
        if norm == "budget":
            value = parse_size(value, f"recipe {file}: budget")
        if norm in ("samples", "out"):
            value = str((file.parent / value).resolve()) if not Path(value).is_absolute() else value
        settings[name] = value
    return settings
