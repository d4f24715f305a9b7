"""Atomic bundle writing: build in a hidden sibling directory, write the manifest last, rename.

An interrupted pack leaves at most a hidden ``.NAME.partial-*`` directory, never a bundle.
Every file and directory is fsynced before the bundle is published, and the directory that
holds it after.

Publication never replaces a bundle it was not asked to replace: without ``overwrite`` the
staging directory is renamed with ``renameat2(RENAME_NOREPLACE)`` (Linux), so a bundle that
another process published meanwhile makes the commit fail. With ``overwrite`` the new bundle
and the old one are swapped in one step with ``renameat2(RENAME_EXCHANGE)``, so the final path
always holds one of them; the old one is then removed. Where renameat2 is not available (other
systems, or a file system without these flags) the fallback is ``os.rename`` onto a path
checked first, and for ``overwrite`` moving the old bundle aside and back again on failure.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgepack.bundle.manifest import MANIFEST, canonical_json, content_section, file_entries, scan_tree
from edgepack.errors import UsageError

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: renameat2's system call number where libc has no wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "i686": 353, "i386": 353,
                  "ppc64le": 357, "s390x": 347, "riscv64": 276}
#: Errors meaning "renameat2 or this flag is not supported here": use the fallback.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL),
                getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


@functools.lru_cache(maxsize=None)
def _load_renameat2() -> Any:
    """A ctypes callable ``(olddirfd, oldpath, newdirfd, newpath, flags) -> int``, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running process's symbols, libc included
    except OSError:  # pragma: no cover
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        function.restype = ctypes.c_int
        return function
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:  # pragma: no cover
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def via_syscall(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> int:
        return syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(old),
                       ctypes.c_int(newdirfd), ctypes.c_char_p(new), ctypes.c_uint(flags))

    return via_syscall


def _renameat2(src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int) -> None:
    """``renameat2(src, dst, flags)``; raises OSError (ENOSYS where there is no renameat2)."""
    function = _load_renameat2()
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available on this system")
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))


def _fsync_path(path: Path, *, directory: bool) -> None:
    """fsync one file or directory, opened without following a link."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if directory:
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot fsync a directory; that is no reason to fail a pack.
        if not (directory and exc.errno in (errno.EINVAL, errno.EBADF, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove what is at ``path`` (a directory tree, a file or a link), never following a link."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


class BundleWriter:
    """Context manager that stages a bundle and publishes it with one rename.

    ::

        with BundleWriter(out_dir, "name-0.1.0-cpu") as writer:
            (writer.staging / "model").mkdir()
            ...
            writer.commit(manifest)       # hashes files, writes manifest.json, renames

    Leaving the block without :meth:`commit` (or with an exception) removes the staging dir.
    """

    def __init__(self, out_dir: str | Path, name: str, *, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.final = self.out_dir / name
        self.overwrite = overwrite
        self.staging: Path | None = None
        self.committed = False
        self.manifest: dict[str, Any] = {}

    def __enter__(self) -> "BundleWriter":
        if os.path.lexists(self.final) and not self.overwrite:
            raise UsageError(f"bundle {self.final} already exists; remove it or pass --force")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"--out {self.out_dir} is not a directory")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.out_dir))
        except OSError as exc:
            raise UsageError(f"--out {self.out_dir} is not writable: {exc.strerror or exc}") from None
        return self

    def commit(self, manifest: dict[str, Any], *, finish: Callable[[Path], None] | None = None) -> Path:
        """Add ``files`` and the ``content`` digest to the manifest (kept as :attr:`manifest`),
        write it last, fsync everything, and move the bundle into place.

        ``finish``, when given, is called with the staging directory once the manifest is
        written and before the bundle is published, to add the files that sit beside the
        manifest (its signature, written and fsynced by ``finish``); if it raises, nothing is
        published.

        Raises UsageError when the staging directory holds a link or a special file, and when
        a bundle appeared at the final path meanwhile (without ``overwrite``); the staging
        directory is then removed on leaving the block, and nothing at the final path changes.
        """
        assert self.staging is not None, "commit() outside the with-block"
        staging = self.staging
        # file_entries refuses links and special files, before anything is changed through one.
        manifest = dict(manifest, files=file_entries(staging))
        self.manifest = manifest = dict(manifest, content=content_section(manifest))
        scan = scan_tree(staging)
        # Bundles are release artifacts: readable by all (safetensors writes 0600 files).
        for rel in scan.dirs:
            os.chmod(staging / rel, 0o755)
        for rel in scan.files:
            os.chmod(staging / rel, 0o644)
        staging.chmod(0o755)
        with open(staging / MANIFEST, "wb") as handle:
            handle.write(canonical_json(manifest))
            os.fchmod(handle.fileno(), 0o644)
            handle.flush()
            os.fsync(handle.fileno())
        if finish is not None:
            finish(staging)
        for rel in scan.files:
            if rel != MANIFEST:
                _fsync_path(staging / rel, directory=False)
        for rel in sorted(scan.dirs, key=lambda r: -r.count("/")):  # deepest first
            _fsync_path(staging / rel, directory=True)
        _fsync_path(staging, directory=True)
        self._publish()
        return self.final

    # -----------------------------------------------------------------------------------------

    def _exists_error(self) -> UsageError:
        return UsageError(f"bundle {self.final} already exists (published while this one was being "
                          "written); remove it or pass --force")

    def _publish(self) -> None:
        """Move the staging directory to the final path (see the module docstring)."""
        assert self.staging is not None
        if self.overwrite and os.path.lexists(self.final):
            try:
                _renameat2(self.staging, self.final, RENAME_EXCHANGE)
            except OSError as exc:
                if exc.errno == errno.ENOENT and not os.path.lexists(self.final):
                    pass  # the old bundle went away meanwhile: publish as new
                elif exc.errno in _UNSUPPORTED:
                    self._replace_by_renames()
                    return
                else:
                    raise UsageError(f"bundle {self.final} could not be replaced: {exc.strerror or exc}; "
                                     "the previous bundle is unchanged") from None
            else:
                old = self.staging  # the exchange left the old bundle at the staging path
                self.committed = True
                try:
                    _fsync_path(self.out_dir, directory=True)
                except OSError as exc:
                    try:  # put the old bundle back: a publish that is not durable did not happen
                        _renameat2(old, self.final, RENAME_EXCHANGE)
                        self.committed = False
                    except OSError:  # pragma: no cover - the new bundle stays, and is complete
                        pass
                    raise UsageError(f"bundle {self.final} could not be published: {exc.strerror or exc}") from None
                _remove(old)
                return
        self._rename_noreplace()

    def _rename_noreplace(self) -> None:
        assert self.staging is not None
        try:
            _renameat2(self.staging, self.final, RENAME_NOREPLACE)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise self._exists_error() from None
            if exc.errno not in _UNSUPPORTED:
                raise UsageError(f"bundle {self.final} could not be published: {exc.strerror or exc}") from None
            # No renameat2 here: os.rename replaces an empty directory silently, so check first.
            if os.path.lexists(self.final):
                raise self._exists_error() from None
            try:
                os.rename(self.staging, self.final)
            except OSError as exc2:
                if exc2.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise self._exists_error() from None
                raise UsageError(f"bundle {self.final} could not be published: {exc2.strerror or exc2}") from None
        self.committed = True
        _fsync_path(self.out_dir, directory=True)

    def _replace_by_renames(self) -> None:
        """The overwrite fallback without renameat2: move the old bundle aside, move the new
        one in, and move the old one back if that fails."""
        assert self.staging is not None
        aside = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.out_dir))
        old = aside / "bundle"
        try:
            os.rename(self.final, old)
        except OSError as exc:
            _remove(aside)
            raise UsageError(f"bundle {self.final} could not be replaced: {exc.strerror or exc}; "
                             "the previous bundle is unchanged") from None
        try:
            if os.path.lexists(self.final):  # published meanwhile: leave it, restore nothing
                raise FileExistsError(errno.EEXIST, "exists")
            os.rename(self.staging, self.final)
        except OSError as exc:
            try:
                if not os.path.lexists(self.final):
                    os.rename(old, self.final)
                    _remove(aside)
                    detail = "the previous bundle is unchanged"
                else:
                    detail = f"the previous bundle was kept at {old}"
            except OSError:
                detail = f"the previous bundle was kept at {old}"
            raise UsageError(f"bundle {self.final} could not be replaced: {exc.strerror or exc}; {detail}") from None
        self.committed = True
        _fsync_path(self.out_dir, directory=True)
        _remove(aside)

    def __exit__(self, *exc: Any) -> None:
        if not self.committed and self.staging is not None:
            _remove(self.staging)
