"""``edgepack diff``: what differs between two bundles, for a release engineer reviewing a new
version against the last.

Two kinds of difference are told apart: the *content* (what the content digest covers: plan,
target, workload, every file of ``model/`` and ``smoke/``; see
:func:`edgepack.bundle.manifest.content_differences`), which decides whether the bundles are the
same deployable thing, and the *record* of each build (fidelity, predicted and measured memory,
budget, producing versions, time), which is shown beside it but never makes two bundles differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.bundle.manifest import content_differences, recorded_digest
from edgepack.bundle.reader import read_verified

#: The record fields compared, as (label, section, key): shown when they differ.
RECORD_FIELDS = (
    ("fidelity", "fidelity", "value"),
    ("fidelity floor", "fidelity", "floor"),
    ("fidelity metric", "fidelity", "metric"),
    ("predicted peak bytes", "memory", "predicted_peak_bytes"),
    ("measured peak bytes", "memory", "measured_peak_bytes"),
    ("budget bytes", "memory", "budget_bytes"),
    ("memory scope", "memory", "scope"),
    ("edgepack", "producer", "edgepack"),
    ("python", "producer", "python"),
    ("torch", "producer", "torch"),
    ("transformers", "producer", "transformers"),
    ("plugins", "producer", "plugins"),
    ("created", "bundle", "created"),
    ("source path", "source", "model"),
)


@dataclass
class BundleDiff:
    """The differences between bundles ``a`` and ``b``."""

    a: str
    b: str
    digest_a: str
    digest_b: str
    #: ``(key or file path, what)``: the content differences, fields then files.
    content: list[tuple[str, str]] = field(default_factory=list)
    #: ``(label, value in a, value in b)``: the record fields that differ.
    record: list[tuple[str, Any, Any]] = field(default_factory=list)
    #: ``{path: (size in a or None, size in b or None)}`` for every file whose bytes differ.
    sizes: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """Whether the two bundles have the same content (their record may still differ)."""
        return self.digest_a == self.digest_b

    def to_json(self) -> dict[str, Any]:
        """``diff --json`` output."""
        return {
            "a": self.a, "b": self.b, "identical": self.identical,
            "content_digest": {"a": self.digest_a, "b": self.digest_b},
            "content": [{"key": key, "detail": detail} for key, detail in self.content],
            "record": [{"field": label, "a": va, "b": vb} for label, va, vb in self.record],
            "files": [{"path": path, "size_a": sa, "size_b": sb} for path, (sa, sb) in self.sizes.items()],
        }


def _plan_text(manifest: dict[str, Any]) -> str:
    """The plan as ``--apply`` spells it, with each plugin's version:
    ``prune:ffn=0.25 (0.1.0) + quantize:scheme=int8 (0.1.0)``."""
    from edgepack.runtime import plan_steps

    return " + ".join(f"{s.spec()} ({s.version})" for s in plan_steps(manifest)) or "(none)"


def diff_bundles(a: str | Path, b: str | Path) -> BundleDiff:
    """Compare two bundles (directories or archives), each integrity-checked first.

    Raises VerificationError when either fails its integrity check (exit 1): a comparison of
    bundles whose files do not match their manifests would compare claims, not bundles."""
    _, ma = read_verified(a)
    _, mb = read_verified(b)
    content = [(key, f"{_plan_text(ma)} against {_plan_text(mb)}" if key == "plan" else detail)
               for key, detail in content_differences(ma, mb)]
    result = BundleDiff(str(a), str(b), recorded_digest(ma), recorded_digest(mb), content=content)
    for label, section, key in RECORD_FIELDS:
        va, vb = (ma.get(section) or {}).get(key), (mb.get(section) or {}).get(key)
        if va != vb:
            result.record.append((label, va, vb))
    files_a = {e["path"]: e for e in ma["files"]}
    files_b = {e["path"]: e for e in mb["files"]}
    for path in sorted(set(files_a) | set(files_b)):
        ea, eb = files_a.get(path), files_b.get(path)
        if ea is None or eb is None or ea["sha256"] != eb["sha256"]:
            result.sizes[path] = (ea["size"] if ea else None, eb["size"] if eb else None)
    return result
