"""Deterministic tar archives of bundles, and extraction that checks every member first."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from edgepack.bundle.manifest import (
    MANIFEST, MAX_MANIFEST_BYTES, MAX_SIGNATURE_BYTES, SIGNATURE, NotRegularFile, path_sort_key, open_regular,
    path_problem, scan_tree, strict_json, unsafe_path,
)
from edgepack.errors import VerificationError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_COPY_CHUNK = 1 << 20


def is_archive(path: Path) -> bool:
    """Whether ``path`` names a bundle archive (by suffix) rather than a directory."""
    return path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES)


def _fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename inside it is durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _shown(text: object) -> str:
    """Untrusted text (a member name, a manifest key) as it goes into an error message: one
    line, with line breaks and other control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _tarinfo(name: str, *, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    """A member header with nothing of this machine in it: time 0, owner 0, fixed modes."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def create_archive(bundle_dir: Path) -> Path:
    """Write ``<bundle>.tar.gz`` beside the bundle: sorted members, zeroed times and owners,
    fixed modes, so the same bundle always gives the same bytes.

    The tar is streamed straight into the gzip file (never held in memory), written to a
    private temporary file in the same directory (created with O_EXCL, so a planted link is
    never followed), fsynced, and renamed into place. Members are read without following
    links; a bundle holding a link or a special file is refused.
    """
    bundle_dir = Path(bundle_dir)
    target = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    scan = scan_tree(bundle_dir)
    if scan.problems:
        rel = sorted(scan.problems, key=path_sort_key)[0]
        raise VerificationError(f"bundle {bundle_dir} cannot be archived: {rel} {scan.problems[rel]}")
    top = bundle_dir.name
    members = sorted([(rel, True) for rel in scan.dirs] + [(rel, False) for rel in scan.files],
                     key=lambda item: path_sort_key(item[0]))
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with open(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    tar.addfile(_tarinfo(top, directory=True))
                    for rel, directory in members:
                        name = f"{top}/{rel}"
                        if directory:
                            tar.addfile(_tarinfo(name, directory=True))
                            continue
                        try:
                            handle = open(open_regular(bundle_dir / rel), "rb")
                        except NotRegularFile as exc:
                            raise VerificationError(f"bundle {bundle_dir} cannot be archived: {rel} {exc.strerror}") from None
                        with handle:
                            size = os.fstat(handle.fileno()).st_size
                            tar.addfile(_tarinfo(name, size=size), handle)
            raw.flush()
            os.fchmod(raw.fileno(), 0o644)  # a release artifact, readable by all (mkstemp makes 0600)
            os.fsync(raw.fileno())
        os.replace(partial, target)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------------------------------------
# Extraction


class _Corrupt(Exception):
    """Reading the archive failed (its bytes are truncated, not gzip, or not a tar); args[0]
    is the original error."""


def _corrupt(archive: Path, exc: BaseException) -> VerificationError:
    """The one error for an archive whose bytes cannot be read as a tar (gzip) archive."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, PermissionError):
        return VerificationError(f"{archive} cannot be read: {exc.strerror or text}")
    return VerificationError(f"{archive} is truncated or corrupt: it is not a readable tar archive ({text})")


#: Errors that mean the archive's bytes are bad (truncated, corrupt, not a tar); each
#: compression that tarfile's "r:*" may detect adds its own (gzip's BadGzipFile is an OSError).
_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error)
try:
    import lzma

    _READ_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover - Python built without lzma
    pass


def _listed_files(archive: Path, top: str, manifest: Any) -> dict[str, int | None]:
    """``{member name: declared size}`` of the files the archive's manifest lists."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in files):
        raise VerificationError(f"{archive}: {_shown(top)}/{MANIFEST} is not a valid manifest: "
                                "files must be a list of entries with path, size and sha256")
    listed: dict[str, int | None] = {}
    for entry in files:
        size = entry.get("size")
        listed[f"{top}/{entry['path']}"] = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    return listed


def _check_members(archive: Path, tar: tarfile.TarFile) -> tuple[str, list[tarfile.TarInfo]]:
    """Check every member before anything is written; the top directory and the members."""
    members = tar.getmembers()
    tops = {m.name.split("/", 1)[0] for m in members}
    if len(tops) != 1:
        raise VerificationError(f"{archive} must hold exactly one bundle directory, found {sorted(tops)}")
    top = tops.pop()
    if path_problem(top) is not None:
        raise VerificationError(f"{archive}: top-level directory {top!r} has an unsafe path")
    manifest_member = next((m for m in members if m.name == f"{top}/{MANIFEST}"), None)
    if manifest_member is None or not manifest_member.isfile():
        raise VerificationError(f"{archive} holds no {_shown(top)}/{MANIFEST}")
    if manifest_member.size > MAX_MANIFEST_BYTES:
        raise VerificationError(f"{archive}: {_shown(top)}/{MANIFEST} is {manifest_member.size} bytes, "
                                f"more than the {MAX_MANIFEST_BYTES} a manifest may have")
    data = tar.extractfile(manifest_member).read()
    try:
        manifest = strict_json(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and StrictJSONError are ValueErrors
        raise VerificationError(f"{archive}: {_shown(top)}/{MANIFEST} is not a valid manifest: {_shown(exc)}") from None
    listed = _listed_files(archive, top, manifest)
    listed[f"{top}/{MANIFEST}"] = MAX_MANIFEST_BYTES
    listed[f"{top}/{SIGNATURE}"] = MAX_SIGNATURE_BYTES  # the one file beside the manifest it signs
    parents = {"/".join(name.split("/")[:n]) for name in listed for n in range(1, name.count("/") + 1)}
    seen: set[str] = set()
    for m in members:
        rel = m.name
        if unsafe_path(rel) or unsafe_path(rel.split("/", 1)[-1] if "/" in rel else rel):
            raise VerificationError(f"{archive}: member {rel!r} has an unsafe path")
        if rel in seen:
            raise VerificationError(f"{archive}: member {rel!r} appears more than once")
        seen.add(rel)
        if m.isdir():
            if rel not in parents:
                raise VerificationError(f"{archive}: directory {rel!r} holds none of the files the manifest names")
            continue
        if not m.isfile():
            raise VerificationError(f"{archive}: member {rel!r} is not a regular file (links are refused)")
        if rel not in listed:
            raise VerificationError(f"{archive}: member {rel!r} is not named in the manifest")
        declared = listed[rel]
        if declared is None:
            raise VerificationError(f"{archive}: member {rel!r} has no valid size in the manifest")
        if m.size > declared:
            raise VerificationError(f"{archive}: member {rel!r} is {m.size} bytes, larger than the "
                                    f"{declared} bytes its manifest declares")
    return top, members


def _write_member(src: BinaryIO, out: Path, size: int) -> None:
    """Copy exactly ``size`` bytes into a new file ``out`` (never through a link, never over a
    file already there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    with open(os.open(out, flags, 0o644), "wb") as dst:
        written = 0
        while written < size:
            try:
                block = src.read(min(_COPY_CHUNK, size - written))
            except _READ_ERRORS as exc:
                raise _Corrupt(exc) from None
            if not block:
                raise _Corrupt(EOFError("unexpected end of data"))
            dst.write(block)
            written += len(block)


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive into ``dest`` and return the bundle directory.

    Every member is checked before anything is written: regular files and directories only,
    one top-level directory, no absolute paths, no ``..``, no links, no member twice, every
    file named in the archive's manifest and no larger than the size it declares (so an
    archive cannot fill the disk beyond its manifest's total). Extraction then writes only
    below ``dest / <top>``, which must not exist yet: new directories, and new files created
    with O_EXCL and O_NOFOLLOW. Any error reading the archive (truncated, corrupt gzip, not a
    tar) is one VerificationError: ``ARCHIVE is truncated or corrupt: ...``.
    """
    archive = Path(archive)
    dest = Path(dest)
    try:
        tar = tarfile.open(archive, mode="r:*")
    except _READ_ERRORS as exc:
        raise _corrupt(archive, exc) from None
    with tar:
        try:
            top, members = _check_members(archive, tar)
        except _READ_ERRORS as exc:
            raise _corrupt(archive, exc) from None
        total = sum(m.size for m in members if m.isfile())
        dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest).free
        if total > free:
            raise VerificationError(f"{archive} needs {total} bytes to extract, {dest} has {free} free")
        root = dest / top
        try:
            root.mkdir()
        except FileExistsError:
            raise VerificationError(f"cannot extract {archive}: {_shown(root)} already exists") from None
        try:
            _extract_members(archive, tar, dest, root, members)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # never leave half an archive behind
            raise
    return root


def _extract_members(archive: Path, tar: tarfile.TarFile, dest: Path, root: Path,
                     members: list[tarfile.TarInfo]) -> None:
    for m in members:
        if m.name == root.name:
            continue
        out = dest / m.name
        try:
            _make_dirs(root, out if m.isdir() else out.parent)
            if m.isdir():
                continue
            try:
                src = tar.extractfile(m)
            except _READ_ERRORS as exc:
                raise _Corrupt(exc) from None
            with src:
                _write_member(src, out, m.size)
        except _Corrupt as exc:
            raise _corrupt(archive, exc.args[0]) from None
        except OSError as exc:
            raise VerificationError(f"cannot extract {archive} into {dest}: {_shown(m.name)}: "
                                    f"{exc.strerror or exc}") from None
    # Read the compressed stream to its end, so its checksum (gzip's CRC-32) is verified too.
    try:
        while tar.fileobj.read(_COPY_CHUNK):
            pass
    except _READ_ERRORS as exc:
        raise _corrupt(archive, exc) from None


def _make_dirs(root: Path, directory: Path) -> None:
    """Create ``directory`` and its parents below ``root``, refusing any that is a link."""
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        try:
            current.mkdir()
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise VerificationError(f"{_shown(current)} is not a directory") from None
