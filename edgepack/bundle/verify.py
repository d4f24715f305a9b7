"""``edgepack verify``: hashes → schema → load on the target → smoke tests → peak ≤ budget."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepack.bundle.manifest import MANIFEST, Failure
from edgepack.bundle.reader import check_integrity, open_path
from edgepack.errors import EdgepackError, VerificationError


@dataclass
class VerifyReport:
    """The outcome of verifying one bundle."""

    bundle: str
    failures: list[Failure] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    budget_bytes: int | None = None
    fidelity: dict[str, Any] | None = None
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        """``{"ok", "failures": [{"check", "path", "detail"}], ...}`` (DESIGN section 6)."""
        return {
            "ok": self.ok,
            "bundle": self.bundle,
            "failures": [f.to_json() for f in self.failures],
            "checks": self.checks,
            "memory": {"budget_bytes": self.budget_bytes, "measured_peak_bytes": self.measured_peak_bytes},
            "fidelity": self.fidelity,
        }


def verify(bundle: str | Path, *, progress: Callable[[str], None] = lambda message: None) -> VerifyReport:
    """Verify a bundle (directory or archive) on this machine.

    Checks, in order: the manifest's format version and schema; every file's size and sha256
    (changed, missing and unlisted files are each reported by path); that the target is present
    here; that the model loads in a fresh process; that the smoke outputs match the golden
    outputs within the recorded tolerances; and that the measured peak memory is within the
    budget. Integrity failures stop before anything is loaded.
    """
    from safetensors.torch import load_file

    from edgepack.host import load_registry
    from edgepack.runtime import plan_steps
    from edgepack.smoke import check, compare, measure_in_fresh_process

    root = open_path(bundle)
    report = VerifyReport(str(bundle))  # the path the user gave (an archive is extracted to a temp dir)
    progress("checking manifest and file hashes")
    manifest, failures = check_integrity(root)
    report.failures.extend(failures)
    report.checks.append("integrity")
    if manifest is None or failures:
        return report

    target_name = manifest["target"]["name"]
    try:
        target = load_registry().target(target_name)
    except EdgepackError as exc:
        report.failures.append(Failure("target", f"{MANIFEST}:target.name", str(exc)))
        return report
    probe = target.probe()
    if not probe.present:
        reason = probe.detail.get("reason", "no device found")
        report.failures.append(Failure("target", f"{MANIFEST}:target.name",
                                       f"target {target_name} is not present on this machine ({reason})"))
        return report

    smoke = manifest["smoke"]
    try:
        expected = load_file(root / smoke["expected"])
        tolerances = json.loads((root / smoke["tolerances"]).read_text())
    except (OSError, ValueError, KeyError) as exc:
        report.failures.append(Failure("smoke", smoke.get("expected", "smoke/"), f"unreadable smoke data: {exc}"))
        return report

    progress(f"loading the bundle on {target_name} in a fresh process and running the smoke inputs")
    try:
        measured = measure_in_fresh_process(
            root, task=manifest["model"]["task"], steps=plan_steps(manifest),
            loader=manifest["model"].get("loader"), target=target_name,
            batch_size=int(manifest["workload"]["batch_size"]),
            new_tokens=int(smoke.get("new_tokens", 8)),
        )
    except VerificationError as exc:
        report.failures.append(Failure("load", "model/", str(exc)))
        return report
    report.checks.append("load")

    fidelity = compare(expected, measured.outputs, manifest["model"]["task"])
    report.fidelity = fidelity.to_json()
    for problem in check(fidelity, tolerances):
        report.failures.append(Failure("smoke", smoke["expected"], problem))
    report.checks.append("smoke")

    budget = int(manifest["memory"]["budget_bytes"])
    report.budget_bytes = budget
    report.measured_peak_bytes = measured.peak_bytes
    if measured.peak_bytes > budget:
        report.failures.append(Failure(
            "memory", f"{MANIFEST}:memory.budget_bytes",
            f"measured peak {measured.peak_bytes} bytes exceeds the budget of {budget} bytes "
            f"({measured.scope})",
        ))
    report.checks.append("memory")
    return report
