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
    shard_size = "1GB"
    work_memory = "8GB"

Several targets, each with its own budget (and optionally plan and floor), give one bundle
per target in one run; the golden outputs and calibration inputs are computed once::

    out = "dist"

    [[targets]]
    target = "cpu"
    budget = "100MB"

    [[targets]]
    target = "cuda"
    budget = "2GB"
    apply = ["precision:dtype=fp16"]

Paths (``samples``, ``out``) are relative to the recipe's directory. A setting comes from the
first place that gives it: a command-line flag, the ``[[targets]]`` entry, the top level, the
default (:func:`merge`). ``--target T`` with ``[[targets]]`` packs only the entries for T.

A step of ``apply`` is a string (``"quantize:scheme=int8,keep=[layer.0.,layer.5.]"``) or a
table (``{plugin = "quantize", scheme = "int8", keep = ["layer.0.", "layer.5."]}``).
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
    "cache_len": ("cache_len", int),
    "min_fidelity": ("min_fidelity", (float, int)),
    "version": ("version", str),
    "samples": ("samples", str),
    "devices": ("devices", int),
    "name": ("name", str),
    "archive": ("archive", bool),
    "out": ("out", str),
    "shard_size": ("shard_size", (str, int)),
    "work_memory": ("work_memory", (str, int)),
}


#: keys a ``[[targets]]`` entry may set
TARGET_KEYS = ("target", "budget", "apply", "min_fidelity", "devices", "name")

#: pack() keywords that describe the model's workload, shared by every target of a run
SOURCE_KEYS = ("batch_size", "seq_len", "cache_len", "samples")


def merge(recipe: dict[str, Any], flags: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Settings for one pack run, each from the first place that gives it: a command-line flag,
    then the recipe's ``[[targets]]`` entry, then the recipe's top level, then the default.

    :param recipe: :func:`read_recipe`'s result (``{}`` without a recipe).
    :param flags: pack() keywords given on the command line (None means not given).
    :returns: (workload settings for :func:`edgepack.pipeline.open_source`, one dict of
        :class:`edgepack.pipeline.PackRequest` fields per target). With ``[[targets]]`` and
        ``--target T``, only the entries for target T are packed.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    top = {k: v for k, v in recipe.items() if k != "targets"}
    source = {k: given.get(k, top.get(k)) for k in SOURCE_KEYS if given.get(k, top.get(k)) is not None}
    entries = recipe.get("targets")
    if entries and "target" in given:
        entries = [e for e in entries if e["target"] == given["target"]]
        if not entries:
            listed = ", ".join(sorted({e["target"] for e in recipe["targets"]}))
            raise UsageError(f"--target {given['target']}: the recipe's [[targets]] has no entry for it "
                             f"(its targets: {listed})")
    per_target = []
    for entry in entries or [{}]:
        settings = {k: v for k, v in top.items() if k not in SOURCE_KEYS}
        settings.update(entry)
        settings.update({k: v for k, v in given.items() if k not in SOURCE_KEYS})
        per_target.append(settings)
    return source, per_target


def read_recipe(path: str | Path) -> dict[str, Any]:
    """pack() keyword arguments from a recipe; UsageError names the file and the key at fault.

    A ``[[targets]]`` array comes back as ``targets``: a list of per-target settings."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"recipe {file} cannot be read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"recipe {file} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    if "targets" in data:
        entries = data.pop("targets")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise UsageError(f"recipe {file}: 'targets' must be an array of tables ([[targets]])")
        targets = []
        for index, entry in enumerate(entries):
            unknown = sorted(set(k.replace("-", "_") for k in entry) - set(TARGET_KEYS))
            if unknown:
                raise UsageError(f"recipe {file}: targets[{index}] has unknown key {unknown[0]!r}; "
                                 f"valid keys: {', '.join(TARGET_KEYS)}")
            if "target" not in entry:
                raise UsageError(f"recipe {file}: targets[{index}] needs a 'target' key")
            targets.append(_convert(file, entry, where=f"targets[{index}]."))
        settings["targets"] = targets
    settings.update(_convert(file, data))
    return settings


def _convert(file: Path, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in data.items():
        norm = key.replace("-", "_")
        if norm not in KEYS:
            raise UsageError(f"recipe {file}: unknown key {key!r}; valid keys: {', '.join(sorted(KEYS) + ['targets'])}")
        name, kind = KEYS[norm]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"recipe {file}: key {where}{key!r} has the wrong type ({type(value).__name__})")
        if norm == "apply" and not all(isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("plugin"), str))
                                       for v in value):
            raise UsageError(f"recipe {file}: key {where}'apply' must be a list of PLUGIN[:KEY=VALUE,...] strings "
                             "or tables with a 'plugin' key")
        if norm in ("budget", "shard_size", "work_memory"):
            value = parse_size(value, f"recipe {file}: {where}{norm}")
        if norm in ("samples", "out"):
            value = str((file.parent / value).resolve()) if not Path(value).is_absolute() else value
        settings[name] = value
    return settings
