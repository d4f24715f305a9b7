"""Reading bundles: the manifest, its format version, and the integrity of every file.

Nothing here follows a link inside a bundle or raises for a malformed bundle: every problem is
a :class:`~edgepack.bundle.manifest.Failure` (or, from :func:`read_verified`, one
VerificationError naming the first).
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Sequence

from edgepack.bundle.archive import is_archive, safe_extract
from edgepack.bundle.manifest import (
    MANIFEST, MAX_MANIFEST_BYTES, Failure, NotRegularFile, StrictJSONError, format_version_problem,
    content_failures, integrity_failures, open_regular, reference_failures, schema_failures, strict_json,
)
from edgepack.errors import UsageError, VerificationError


def open_path(bundle: str | Path) -> Path:
    """The bundle directory for ``bundle``: the directory itself, or an archive extracted
    (with every member checked) into a temporary directory removed at exit.

    The path given may itself be a link (it is the user's name for the bundle); links inside
    the bundle are refused by the integrity check. An unreadable archive raises
    VerificationError."""
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


def _read_manifest_bytes(root: Path) -> tuple[bytes | None, Failure | None]:
    file = root / MANIFEST
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        return None, Failure("manifest", MANIFEST, f"{root} has no {MANIFEST}; it is not a bundle")
    except OSError as exc:
        return None, Failure("manifest", MANIFEST, f"cannot be read: {exc.strerror or exc}")
    if stat.S_ISLNK(info.st_mode):
        return None, Failure("manifest", MANIFEST, "is a symbolic link; a bundle's manifest must be a regular file")
    if not stat.S_ISREG(info.st_mode):
        return None, Failure("manifest", MANIFEST, f"{root} has no {MANIFEST} file; it is not a bundle")
    if info.st_size > MAX_MANIFEST_BYTES:
        return None, Failure("manifest", MANIFEST,
                             f"is {info.st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    try:
        with os.fdopen(open_regular(file), "rb") as handle:
            return handle.read(MAX_MANIFEST_BYTES + 1), None
    except NotRegularFile as exc:
        return None, Failure("manifest", MANIFEST, exc.strerror or "is not a regular file")
    except OSError as exc:
        return None, Failure("manifest", MANIFEST, f"cannot be read: {exc.strerror or exc}")


def read_manifest_bytes(root: Path) -> tuple[bytes | None, Failure | None]:
    """The bytes of ``root``'s manifest, read without following a link and bounded by
    MAX_MANIFEST_BYTES, or the Failure saying why they cannot be read."""
    return _read_manifest_bytes(Path(root))


def parse_manifest(data: bytes) -> tuple[dict[str, Any] | None, list[Failure]]:
    """Parse manifest bytes strictly (see :func:`~edgepack.bundle.manifest.strict_json`), then
    check the format version and the schema: the manifest, or what is wrong with it."""
    try:
        manifest = strict_json(data)
    except UnicodeDecodeError as exc:
        return None, [Failure("manifest", MANIFEST, f"not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})")]
    except StrictJSONError as exc:
        return None, [Failure("manifest", f"{MANIFEST}:{exc.key}" if exc.key else MANIFEST, exc.detail)]
    except ValueError as exc:
        return None, [Failure("manifest", MANIFEST, f"not valid JSON: {exc}")]
    except RecursionError:
        return None, [Failure("manifest", MANIFEST, "not valid JSON: nested too deeply")]
    if isinstance(manifest, dict) and "format_version" in manifest:
        problem = format_version_problem(manifest["format_version"])
        if problem is not None:
            return None, [Failure("format_version", f"{MANIFEST}:format_version", problem)]
    failures = schema_failures(manifest)
    return (manifest if not failures else None), failures


def read_manifest(root: Path) -> tuple[dict[str, Any] | None, list[Failure]]:
    """The parsed manifest and what is wrong with it (missing, unreadable, a link, not JSON or
    not strict JSON, too large, wrong version, schema)."""
    data, failure = _read_manifest_bytes(Path(root))
    if failure is not None:
        return None, [failure]
    assert data is not None
    return parse_manifest(data)


def check_integrity(root: Path) -> tuple[dict[str, Any] | None, list[Failure]]:
    """Manifest checks, then every file's size and sha256; the manifest when all hold."""
    manifest, failures = read_manifest(root)
    if manifest is None:
        return None, failures
    failures = integrity_failures(root, manifest)
    return manifest, failures


def read_verified(bundle: str | Path, keys: Sequence[Any] = ()) -> tuple[Path, dict[str, Any]]:
    """The bundle directory and manifest, after the integrity checks (and that the files the
    manifest names are among its listed files), the content digest and the signature check of
    :func:`edgepack.bundle.signing.check` (a signature that is present must hold; with trusted
    ``keys``, public key files or loaded keys, one of them must have signed); VerificationError
    names the first fault."""
    root = open_path(bundle)
    manifest, failures = check_integrity(root)
    if manifest is not None and not failures:
        failures = reference_failures(manifest) or content_failures(manifest)
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more problems)" if len(failures) > 1 else ""
        raise VerificationError(f"bundle {root} failed its integrity check: {first.path}: {first.detail}{more}")
    assert manifest is not None
    from edgepack.bundle.signing import check as check_signature

    signature = check_signature(root, keys)
    if not signature.ok:
        raise VerificationError(f"bundle {root} failed its signature check: {signature.detail}")
    return root, manifest
