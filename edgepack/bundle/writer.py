"""Atomic bundle writing: build in a hidden sibling directory, write the manifest last, rename.

An interrupted pack leaves at most a hidden ``.NAME.partial-*`` directory, never a bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgepack.bundle.manifest import MANIFEST, canonical_json, file_entries
from edgepack.errors import UsageError


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
        if self.final.exists() and not self.overwrite:
            raise UsageError(f"bundle {self.final} already exists; remove it or pass --force")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UsageError(f"--out {self.out_dir} is not a directory")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.out_dir))
        except OSError as exc:
            raise UsageError(f"--out {self.out_dir} is not writable: {exc.strerror or exc}") from None
        return self

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Add ``files`` to the manifest (kept as :attr:`manifest`), write it last, and move the
        bundle into place."""
        assert self.staging is not None, "commit() outside the with-block"
        # Bundles are release artifacts: readable by all (safetensors writes 0600 files).
        for path in self.staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        self.staging.chmod(0o755)
        self.manifest = manifest = dict(manifest, files=file_entries(self.staging))
        data = canonical_json(manifest)
        with open(self.staging / MANIFEST, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o644)
            handle.flush()
            os.fsync(handle.fileno())
        if self.final.exists():  # overwrite: move the old bundle aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.out_dir))
            os.rename(self.final, old / "bundle")
            os.rename(self.staging, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.staging, self.final)
        self.committed = True
        return self.final

    def __exit__(self, *exc: Any) -> None:
        if not self.committed and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
