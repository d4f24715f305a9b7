"""The bundle manifest (format 1.0): schema, canonical JSON, and file hashing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgepack.model import sha256_file

FORMAT = "edgepack.bundle"
FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"

#: Top-level keys and the JSON type each must have.
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": str,
    "bundle": dict,
    "producer": dict,
    "source": dict,
    "target": dict,
    "workload": dict,
    "budget": dict,
    "plan": list,
    "candidates": list,
    "memory": dict,
    "fidelity": dict,
    "smoke": dict,
    "files": list,
    "model": dict,
}

#: Keys required inside the nested objects.
NESTED: dict[str, tuple[str, ...]] = {
    "bundle": ("name", "version", "created"),
    "producer": ("edgepack", "python", "torch", "transformers", "plugins"),
    "source": ("model", "sha256"),
    "target": ("name", "devices", "capabilities"),
    "workload": ("batch_size", "seq_len"),
    "budget": ("bytes_per_device", "source"),
    "memory": ("budget_bytes", "predicted_peak_bytes", "measured_peak_bytes", "scope"),
    "fidelity": ("metric", "value", "floor"),
    "smoke": ("inputs", "expected", "tolerances"),
    "model": ("task", "loader"),
}


@dataclass(frozen=True)
class Failure:
    """One failed check: which check, the file or key at fault, and what was wrong."""

    check: str
    path: str
    detail: str

    def to_json(self) -> dict[str, str]:
        """Plain-JSON form for ``verify --json``."""
        return asdict(self)


def canonical_json(data: Any) -> bytes:
    """UTF-8 JSON with sorted keys and a trailing newline: the same data, the same bytes."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def file_entries(root: Path) -> list[dict[str, Any]]:
    """``{path, size, sha256}`` of every file below ``root`` except the manifest, by path."""
    entries = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries.append({"path": rel, "size": file.stat().st_size, "sha256": sha256_file(file)})
    return sorted(entries, key=lambda e: e["path"])


def major(version: str) -> int | None:
    """The major number of a ``MAJOR.MINOR`` version string, or None if malformed."""
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def schema_failures(manifest: Any) -> list[Failure]:
    """Every way ``manifest`` departs from format 1.0 (empty when it conforms)."""
    if not isinstance(manifest, dict):
        return [Failure("schema", MANIFEST, "the manifest is not a JSON object")]
    failures = []
    if manifest.get("format") != FORMAT:
        failures.append(Failure("schema", f"{MANIFEST}:format", f"expected {FORMAT!r}, got {manifest.get('format')!r}"))
    for key, kind in SCHEMA.items():
        if key not in manifest:
            failures.append(Failure("schema", f"{MANIFEST}:{key}", "required key is missing"))
        elif not isinstance(manifest[key], kind):
            failures.append(Failure("schema", f"{MANIFEST}:{key}", f"must be a JSON {kind.__name__}"))
    for key, inner in NESTED.items():
        if isinstance(manifest.get(key), dict):
            for sub in inner:
                if sub not in manifest[key]:
                    failures.append(Failure("schema", f"{MANIFEST}:{key}.{sub}", "required key is missing"))
    for i, entry in enumerate(manifest.get("files") or []):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            failures.append(Failure("schema", f"{MANIFEST}:files[{i}]", "needs path, size and sha256"))
    return failures


def unsafe_path(rel: str) -> bool:
    """Whether a manifest path could escape the bundle directory."""
    path = Path(rel)
    return path.is_absolute() or ".." in path.parts or rel.startswith(("/", "\\")) or rel == ""


def integrity_failures(root: Path, manifest: dict[str, Any]) -> list[Failure]:
    """Files changed, missing or unlisted, compared with the manifest's ``files``."""
    failures = []
    listed = set()
    for entry in manifest.get("files", []):
        rel = entry["path"]
        listed.add(rel)
        if unsafe_path(rel):
            failures.append(Failure("files", rel, "path escapes the bundle directory"))
            continue
        file = root / rel
        if not file.is_file() or file.is_symlink():
            failures.append(Failure("files", rel, "listed in the manifest but missing"))
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            failures.append(Failure("files", rel, f"size expected {entry['size']}, actual {size}"))
            continue
        digest = sha256_file(file)
        if digest != entry["sha256"]:
            failures.append(Failure("files", rel, f"sha256 expected {entry['sha256']}, actual {digest}"))
    for file in sorted(root.rglob("*")):
        rel = file.relative_to(root).as_posix()
        if rel == MANIFEST or rel in listed:
            continue
        if file.is_dir() and any(p.startswith(rel + "/") for p in listed):
            continue
        failures.append(Failure("files", rel, "not listed in the manifest"))
    return failures
