"""Deterministic tar archives of bundles, and extraction that checks every member first."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

from edgepack.bundle.manifest import MANIFEST, unsafe_path
from edgepack.errors import VerificationError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a bundle archive (by suffix) rather than a directory."""
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def create_archive(bundle_dir: Path) -> Path:
    """Write ``<bundle>.tar.gz`` beside the bundle: sorted members, zeroed times and owners,
    so the same bundle always gives the same bytes."""
    bundle_dir = Path(bundle_dir)
    target = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    members = [bundle_dir] + sorted(bundle_dir.rglob("*"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in members:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(bundle_dir.parent).as_posix())
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as handle:
                    tar.addfile(info, handle)
            else:
                tar.addfile(info)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as handle:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0) as gz:
            gz.write(raw.getvalue())
    partial.replace(target)
    return target


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive into ``dest`` and return the bundle directory.

    Every member is checked before anything is written: regular files and directories only,
    one top-level directory, no absolute paths, no ``..``, no links, and every file named in
    the archive's manifest.
    """
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise VerificationError(f"{archive} is not a readable tar archive: {exc}") from None
    with tar:
        members = tar.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1:
            raise VerificationError(f"{archive} must hold exactly one bundle directory, found {sorted(tops)}")
        top = tops.pop()
        manifest_member = next((m for m in members if m.name == f"{top}/{MANIFEST}"), None)
        if manifest_member is None or not manifest_member.isfile():
            raise VerificationError(f"{archive} holds no {top}/{MANIFEST}")
        try:
            manifest = json.loads(tar.extractfile(manifest_member).read())
            listed = {f"{top}/{e['path']}" for e in manifest["files"]} | {f"{top}/{MANIFEST}"}
        except (ValueError, KeyError, TypeError) as exc:
            raise VerificationError(f"{archive}: {top}/{MANIFEST} is not a valid manifest: {exc}") from None
        for m in members:
            rel = m.name
            if unsafe_path(rel) or unsafe_path(rel.split("/", 1)[-1] if "/" in rel else rel):
                raise VerificationError(f"{archive}: member {rel!r} has an unsafe path")
            if m.isdir():
                continue
            if not m.isfile():
                raise VerificationError(f"{archive}: member {rel!r} is not a regular file (links are refused)")
            if rel not in listed:
                raise VerificationError(f"{archive}: member {rel!r} is not named in the manifest")
        dest.mkdir(parents=True, exist_ok=True)
        for m in members:
            out = dest / m.name
            if m.isdir():
                out.mkdir(parents=True, exist_ok=True)
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(out, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
    return dest / top
