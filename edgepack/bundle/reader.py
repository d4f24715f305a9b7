"""Reading bundles: the manifest, its format version, and the integrity of every file."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgepack.bundle.archive import is_archive, safe_extract
from edgepack.bundle.manifest import (
    FORMAT_VERSION, MANIFEST, Failure, integrity_failures, major, schema_failures,
)
from edgepack.errors import UsageError, VerificationError


def open_path(bundle: str | Path) -> Path:
    """The bundle directory for ``bundle``: the directory itself, or an archive extracted
    (with every member checked) into a temporary directory removed at exit."""
    path = Path(bundle)
    if not path.exists():
        raise UsageError(f"bundle {path} does not exist")
    if is_archive(path):
        tmp = Path(tempfile.mkdtemp(prefix="edgepack-bundle-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        return safe_extract(path, tmp)
    if not path.is_dir():
        raise UsageError(f"bundle {path} is neither a bundle directory nor a .tar.gz archive")
    return path


def read_manifest(root: Path) -> tuple[dict[str, Any] | None, list[Failure]]:
    """The parsed manifest and what is wrong with it (missing, not JSON, wrong version, schema)."""
    file = root / MANIFEST
    if not file.is_file():
        return None, [Failure("manifest", MANIFEST, f"{root} has no {MANIFEST}; it is not a bundle")]
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return None, [Failure("manifest", MANIFEST, f"not valid JSON: {exc}")]
    if isinstance(manifest, dict) and "format_version" in manifest:
        version = manifest["format_version"]
        if major(version) != major(FORMAT_VERSION):
            return None, [Failure(
                "format_version", f"{MANIFEST}:format_version",
                f"bundle format {version} is not supported; this edgepack reads format "
                f"{major(FORMAT_VERSION)}.x (upgrade edgepack to read it)",
            )]
    failures = schema_failures(manifest)
    return (manifest if not failures else None), failures


def check_integrity(root: Path) -> tuple[dict[str, Any] | None, list[Failure]]:
    """Manifest checks, then every file's size and sha256; the manifest when all hold."""
    manifest, failures = read_manifest(root)
    if manifest is None:
        return None, failures
    failures = integrity_failures(root, manifest)
    return manifest, failures


def read_verified(bundle: str | Path) -> tuple[Path, dict[str, Any]]:
    """The bundle directory and manifest, after the integrity checks; VerificationError names
    the first file at fault."""
    root = open_path(bundle)
    manifest, failures = check_integrity(root)
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more problems)" if len(failures) > 1 else ""
        raise VerificationError(f"bundle {root} failed its integrity check: {first.path}: {first.detail}{more}")
    assert manifest is not None
    return root, manifest
