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

Crash safety. A pack killed at any point (SIGKILL, a power cut after the last fsync) leaves
at the final path either nothing, the previous complete bundle, or the new complete bundle,
never a mix: nothing is written there but by the one rename (or exchange) of a fully written
and fsynced staging directory. What a killed pack does leave is its hidden staging directory
(``.NAME.partial-*``; after an exchange, the old bundle waiting there to be removed), so the
name of every staging directory records its owner: ``.NAME.partial-PID-START-HOST-RANDOM``,
with the creating process's id, its start time (``/proc/PID/stat`` field 22, which tells a
reused process id apart) and ``HOST``, a hash of the kernel's boot id and the process's pid
namespace (process ids mean something only within one boot and one namespace). Entering a
writer removes the staging directories of the same bundle name whose owner is gone, as
long as they are real directories (never a link, never followed: removal goes through
``shutil.rmtree``, which does not follow links), owned by this user, and have this ``HOST``
token with the owner's process absent or started at another time. A staging directory of a
live process (another pack of the same bundle, in this process or another) is never touched,
nor one made on another machine or in another container, before a reboot, or by an edgepack
without this scheme: those are left for a person to remove. Where there is no ``/proc``
(other systems) the names carry no owner and nothing is cleaned up. The fallback swap's
``.NAME.old-OWNER-*`` directory (the previous bundle moved aside) is handled the same way,
except that when its owner died before the new bundle was moved into place (the final path
is empty), the previous bundle is moved back instead of removed; and so is a temporary file
that a step of the pack wrote beside its staging directory, named after it with a leading
dot and a ``.partial`` suffix (``pack --sign`` writes the signature that way).

A full disk (``ENOSPC``, or ``EDQUOT``), met anywhere inside the ``with`` block, whether as
an ``OSError`` or as an error raised from or while handling one, or as a library's error that
only says so in its text (safetensors: ``... (os error 28)``), leaves the block as
:class:`DiskFull` (a UsageError: exit 2), one sentence naming the bundle and, when known, the
file, after the staging directory is removed; nothing is published, and a bundle being
replaced is unchanged. (A failed publication is already a UsageError that says so.)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgepack.bundle.manifest import MANIFEST, canonical_json, content_section, file_entries, scan_tree
from edgepack.errors import EdgepackError, UsageError

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


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` unless something is there: ``renameat2(RENAME_NOREPLACE)``, or where
    that is not supported ``os.rename`` onto a path checked first (it would replace an empty
    directory silently). FileExistsError when something is at ``dst``; other OSErrors as raised."""
    try:
        _renameat2(src, dst, RENAME_NOREPLACE)  # its EEXIST is a FileExistsError
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", os.fspath(dst)) from None
        raise


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


class DiskFull(UsageError):
    """The disk (or the user's quota) filled up while a bundle was being written (exit 2)."""


#: errno values meaning "the disk is full".
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: How a Rust library (safetensors) spells an OS error in its message.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_full(exc: BaseException) -> tuple[int, str | None] | None:
    """``(errno, filename)`` when ``exc`` or an exception it was raised from or while handling
    is a full disk; None otherwise."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            filename = current.filename
            return current.errno, os.fsdecode(filename) if filename is not None else None
        # A library's own error may only say so in its text; edgepack's errors never count
        # (their text may quote another error, as "no plan fits" quotes each candidate's).
        library = not isinstance(current, (OSError, EdgepackError))
        match = _RUST_OS_ERROR.search(str(current)) if library else None
        if match and int(match.group(1)) in _FULL:
            return int(match.group(1)), None
        todo += [current.__context__, current.__cause__]
    return None


# ---------------------------------------------------------------------------------------------
# Owners of staging directories (see the module docstring)


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat`` (the start time, in clock ticks after boot); None when
    the process does not exist; raises OSError when that cannot be told."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    except ProcessLookupError:  # the process went away while being read
        return None
    # The command name (field 2) is in parentheses and may hold anything: split after it.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[22 - 3].decode("ascii")


@functools.lru_cache(maxsize=None)
def _host_token() -> str | None:
    """A short hash of this kernel's boot id and this process's pid namespace; None where
    they cannot be read (process ids then cannot be checked)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            boot = handle.read().strip()
        namespace = os.readlink("/proc/self/ns/pid").encode()
    except OSError:
        return None
    if not boot:
        return None
    return hashlib.sha256(boot + b"\0" + namespace).hexdigest()[:8]


def _owner_tag() -> str | None:
    """``PID-START-HOST`` for this process, or None where owners cannot be recorded."""
    host = _host_token()
    if host is None:
        return None
    try:
        start = _proc_start_time(os.getpid())
    except (OSError, ValueError, IndexError):
        return None
    return None if start is None else f"{os.getpid()}-{start}-{host}"


_OWNED = re.compile(r"(\d+)-(\d+)-([0-9a-f]{8})-[a-z0-9_]+")


def _owner_is_gone(tag: str) -> bool:
    """Whether the process that ``tag`` (``PID-START-HOST-RANDOM``) names is certainly gone:
    it ran under this boot and pid namespace, and its id is now unused or another process's."""
    match = _OWNED.fullmatch(tag)
    if match is None or match.group(3) != _host_token():
        return False  # no owner recorded, or another machine's, container's or boot's
    pid, start = int(match.group(1)), match.group(2)
    try:
        return _proc_start_time(pid) != start
    except (OSError, ValueError, IndexError):  # cannot tell: keep it
        return False


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
        #: the directories of ``out_dir`` this writer created, deepest first: removed again
        #: (when still empty) if no bundle is committed
        self.created: list[Path] = []

    def __enter__(self) -> "BundleWriter":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"--out {self.out_dir} is not a directory")
        if self.out_dir.is_dir():
            self.remove_stale()  # first: a killed fallback swap may put a previous bundle back
        if os.path.lexists(self.final) and not self.overwrite:
            raise UsageError(f"bundle {self.final} already exists; remove it or pass --force")
        self.created = [p for p in (self.out_dir, *self.out_dir.parents) if not os.path.lexists(p)]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=self._hidden_prefix("partial"), dir=self.out_dir))
        except OSError as exc:
            self._remove_created()
            if exc.errno in _FULL:
                raise DiskFull(f"--out {self.out_dir}: {(exc.strerror or str(exc)).lower()}; "
                               f"bundle {self.final} was not written") from None
            raise UsageError(f"--out {self.out_dir} is not writable: {exc.strerror or exc}") from None
        return self

    def _hidden_prefix(self, kind: str) -> str:
        """``.NAME.KIND-PID-START-HOST-`` (``.NAME.KIND-`` where owners cannot be recorded)."""
        owner = _owner_tag()
        return f".{self.final.name}.{kind}-" + (f"{owner}-" if owner else "")

    def remove_stale(self) -> list[Path]:
        """Remove what killed writers of this bundle name left in the output directory (see the
        module docstring); returns the paths removed (or, for a previous bundle moved back into
        place, the final path). Never raises: what cannot be removed stays."""
        done: list[Path] = []
        try:
            entries = sorted(os.scandir(self.out_dir), key=lambda e: e.name)
        except OSError:
            return done
        uid = os.geteuid() if hasattr(os, "geteuid") else None
        for entry in entries:
            kind = self._stale_kind(entry.name)
            if kind is None:
                continue
            path = Path(entry.path)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            wanted = stat.S_ISREG if kind == "file" else stat.S_ISDIR
            if not wanted(info.st_mode) or (uid is not None and info.st_uid != uid):
                continue  # a link (never followed, never removed), something else, another user's
            previous = path / "bundle"
            if kind == "old" and not os.path.lexists(self.final) and os.path.lexists(previous):
                # The owner moved the previous bundle aside and died before moving a new one in.
                try:
                    if not stat.S_ISDIR(os.lstat(previous).st_mode):
                        continue
                    self._move_back(previous)
                except OSError:
                    continue  # the previous bundle stays where it is, for a person to move back
                done.append(self.final)
            _remove(path)
            done.append(path)
        return done

    def _stale_kind(self, name: str) -> str | None:
        """``partial`` (a staging directory), ``old`` (the fallback swap's previous bundle) or
        ``file`` (a temporary file written beside a staging directory, named after it, such as
        the signature's ``..NAME.partial-OWNER.manifest.sig.json.*.partial``) when ``name`` is
        one of those of this bundle name and its owner is certainly gone; None otherwise."""
        for kind, prefix in (("partial", f".{self.final.name}.partial-"), ("old", f".{self.final.name}.old-"),
                             ("file", f"..{self.final.name}.partial-")):
            if not name.startswith(prefix):
                continue
            tag, dot, rest = name[len(prefix):].partition(".")
            if (kind == "file") != bool(dot) or (kind == "file" and not rest.endswith(".partial")):
                return None
            return kind if _owner_is_gone(tag) else None
        return None

    def _move_back(self, previous: Path) -> None:
        """Move a previous bundle that a killed swap left aside back to the final path."""
        _rename_no_replace(previous, self.final)
        _fsync_path(self.out_dir, directory=True)

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
            _rename_no_replace(self.staging, self.final)
        except FileExistsError:
            raise self._exists_error() from None
        except OSError as exc:
            raise UsageError(f"bundle {self.final} could not be published: {exc.strerror or exc}") from None
        self.committed = True
        _fsync_path(self.out_dir, directory=True)

    def _replace_by_renames(self) -> None:
        """The overwrite fallback without renameat2: move the old bundle aside, move the new
        one in, and move the old one back if that fails."""
        assert self.staging is not None
        aside = Path(tempfile.mkdtemp(prefix=self._hidden_prefix("old"), dir=self.out_dir))
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

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        if self.committed or self.staging is None:
            return
        _remove(self.staging)
        self._remove_created()
        # A UsageError (this writer's own, DiskFull included) already says what happened.
        full = disk_full(exc) if isinstance(exc, Exception) and not isinstance(exc, UsageError) else None
        if full is not None:
            raise DiskFull(self._disk_full_message(*full)) from exc

    def _remove_created(self) -> None:
        """Remove the directories this writer created, deepest first, while they are empty:
        ``--out`` as it was, nothing half-written, not even a folder."""
        for directory in self.created:
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (another bundle, another writer) or gone: leave it and what holds it

    def _disk_full_message(self, code: int, filename: str | None) -> str:
        """One sentence: the disk is full, where, and what became of the bundle."""
        assert self.staging is not None
        what = os.strerror(code).lower()  # "no space left on device", "disk quota exceeded"
        where = ""
        if filename:
            try:
                rel = Path(filename).relative_to(self.staging).as_posix()
            except ValueError:
                where = f" ({filename})"
            else:
                where = f" ({rel})" if rel != "." else ""
        if self.overwrite and os.path.lexists(self.final):
            outcome = "the previous bundle is unchanged"
        else:
            outcome = "no bundle was written"
        return f"{what} while writing bundle {self.final}{where}: {outcome}"
