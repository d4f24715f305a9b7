"""``edgepack verify``: hashes → schema → content digest → signature → load on the target → smoke
tests → peak ≤ budget."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from edgepack.bundle.manifest import (
    CONTENT_DIGEST, MANIFEST, SIGNATURE, Failure, NotRegularFile, content_failures, open_regular, reference_failures,
    tolerances_problem, untrusted_keys,
)
from edgepack.bundle.reader import check_integrity, open_path
from edgepack.errors import EdgepackError, UsageError, VerificationError

if TYPE_CHECKING:  # pragma: no cover
    from edgepack.bundle.signing import PublicKey

#: The golden output tensors each task's comparison reads.
GOLDEN_KEYS = {"feature-extraction": ("embeddings",), "text-generation": ("logits", "tokens")}


@dataclass
class VerifyReport:
    """The outcome of verifying one bundle."""

    bundle: str
    failures: list[Failure] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    budget_bytes: int | None = None
    rank_peak_bytes: list[int] | None = None
    fidelity: dict[str, Any] | None = None
    checks: list[str] = field(default_factory=list)
    #: :meth:`edgepack.bundle.signing.SignatureCheck.to_json` (None before the manifest is read).
    signature: dict[str, Any] | None = None
    #: Top-level manifest keys of a newer minor format version: kept, not read or trusted.
    untrusted_keys: list[str] = field(default_factory=list)
    #: The bundle's content digest (``content.digest``; None for a format 1.0 bundle).
    content_digest: str | None = None

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
            "memory": {"budget_bytes": self.budget_bytes, "measured_peak_bytes": self.measured_peak_bytes,
                       **({"rank_peak_bytes": self.rank_peak_bytes} if self.rank_peak_bytes is not None else {})},
            "fidelity": self.fidelity,
            "signature": self.signature,
            "untrusted_keys": self.untrusted_keys,
            "content_digest": self.content_digest,
        }


def _sentence(exc: BaseException) -> str:
    """One line describing ``exc``: its message, or its type when it has none."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _read_bytes(file: Path) -> bytes:
    with open(open_regular(file), "rb") as handle:
        return handle.read()


def _read_smoke(root: Path, smoke: dict[str, Any], task: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, Failure | None]:
    """The golden outputs and tolerances, or the Failure saying why they cannot be used."""
    from safetensors.torch import load as load_safetensors

    expected_rel, tolerances_rel = smoke["expected"], smoke["tolerances"]
    try:
        expected = load_safetensors(_read_bytes(root / expected_rel))
    except NotRegularFile as exc:
        return None, None, Failure("smoke", expected_rel, exc.strerror or "is not a regular file")
    except OSError as exc:
        return None, None, Failure("smoke", expected_rel, f"cannot be read: {exc.strerror or exc}")
    except Exception as exc:  # safetensors raises its own error types for malformed files
        return None, None, Failure("smoke", expected_rel, f"unreadable golden outputs: {_sentence(exc)}")
    missing = [k for k in GOLDEN_KEYS.get(task, ()) if k not in expected]
    if missing:
        return None, None, Failure("smoke", expected_rel,
                                   f"golden outputs lack the {', '.join(missing)} tensor(s) a {task} bundle needs")
    try:
        tolerances = json.loads(_read_bytes(root / tolerances_rel).decode("utf-8"))
    except NotRegularFile as exc:
        return None, None, Failure("smoke", tolerances_rel, exc.strerror or "is not a regular file")
    except OSError as exc:
        return None, None, Failure("smoke", tolerances_rel, f"cannot be read: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return None, None, Failure("smoke", tolerances_rel, "tolerances are not UTF-8 JSON text")
    except (ValueError, RecursionError) as exc:
        return None, None, Failure("smoke", tolerances_rel, f"tolerances are not valid JSON: {_sentence(exc)}")
    problem = tolerances_problem(tolerances)
    if problem is not None:
        return None, None, Failure("smoke", tolerances_rel, problem)
    return expected, tolerances, None


def _parse_min_version(min_version: str | None) -> Any:
    """``--min-version`` as a PEP 440 version (None when not given); UsageError when malformed."""
    if min_version is None:
        return None
    from packaging.version import InvalidVersion, Version

    try:
        return Version(str(min_version))
    except InvalidVersion:
        raise UsageError(f"--min-version {min_version!r} is not a version such as 1.2.0") from None


def _version_failure(manifest: dict[str, Any], minimum: Any) -> Failure | None:
    """The bundle's version against ``--min-version`` (a rollback to an older one is refused)."""
    from packaging.version import InvalidVersion, Version

    version = manifest["bundle"]["version"]
    key = f"{MANIFEST}:bundle.version"
    try:
        if Version(version) >= minimum:
            return None
    except InvalidVersion:
        return Failure("version", key, f"bundle version {version!r} cannot be compared with --min-version {minimum}")
    return Failure("version", key, f"bundle version {version} is older than --min-version {minimum}; "
                                   "an older bundle is refused (rollback)")


def verify(bundle: str | Path, *, progress: Callable[[str], None] = lambda message: None,
           keys: Sequence["str | Path | PublicKey"] = (), min_version: str | None = None,
           digest: str | None = None, allow_code: bool = False) -> VerifyReport:
    """Verify a bundle (directory or archive) on this machine.

    Checks, in order: the manifest's format version and schema (every field read below is
    validated first); every file's size and sha256 (changed, missing, unlisted, unreadable
    files, links and special files are each reported by path); that the smoke files the
    manifest names are among its listed files; that the recorded content digest is the one
    the manifest's content gives, and equals ``digest`` when one is given (the digest of the
    bundle a release engineer approved); the signature (see
    :func:`edgepack.bundle.signing.check`: one that is present must hold; with trusted ``keys``
    one must be present and made by one of them); that the bundle's version is at least
    ``min_version`` (PEP 440); that the target is present here; that the model loads in a
    fresh process; that the smoke outputs match the golden outputs within the recorded
    tolerances; and that the measured peak memory is within the budget. Integrity, signature
    and version failures stop before anything is loaded.

    A malformed bundle never raises: every problem is a Failure in the report. Only a path
    that does not exist, a key file that cannot be read or a malformed ``min_version``
    (UsageError), or an archive that cannot be read or extracted safely (VerificationError)
    raises, before there is a bundle to report on.

    :param keys: trusted public keys (``NAME.pub`` files or loaded keys): any of them may have
        signed the bundle.
    :param min_version: the oldest bundle version accepted.
    :param digest: the content digest (``sha256:...``) the bundle must have.
    :param allow_code: a bundle that holds the model's own Python code (``model.code``, packed
        with ``--allow-code``) is loaded, running that code; without it such a bundle fails
        the ``code`` check and nothing is loaded. Verify never runs any other code of a bundle.
    """
    from edgepack.host import load_registry
    from edgepack.runtime import plan_steps, requirement_problems
    from edgepack.smoke import (
        BATCHING_PADDED, DEFAULT_NEW_TOKENS, LOGITS_FORWARD, check, compare, measure_in_fresh_process,
    )

    minimum = _parse_min_version(min_version)
    if digest is not None and not (isinstance(digest, str) and CONTENT_DIGEST.fullmatch(digest)):
        raise UsageError(f"--digest {digest!r} is not a content digest such as sha256:<64 hexadecimal digits> "
                         "(edgepack inspect prints a bundle's)")
    trusted: list[Any] = []
    if keys:
        from edgepack.bundle.signing import load_public_keys

        trusted = load_public_keys(keys)
    root = open_path(bundle)
    report = VerifyReport(str(bundle))  # the path the user gave (an archive is extracted to a temp dir)
    progress("checking manifest and file hashes")
    manifest, failures = check_integrity(root)
    report.failures.extend(failures)
    if manifest is not None and not failures:
        report.failures.extend(reference_failures(manifest))
    report.checks.append("integrity")
    if manifest is None:
        return report
    if not report.failures:
        report.failures.extend(content_failures(manifest))
        recorded = (manifest.get("content") or {}).get("digest")
        report.content_digest = recorded
        if digest is not None and not report.failures and recorded != digest:
            report.failures.append(Failure("content", f"{MANIFEST}:content.digest", (
                f"the bundle's content digest is {recorded}, not the {digest} that --digest requires" if recorded
                else f"the bundle (format {manifest['format_version']}) has no content digest; --digest requires {digest}")))
        report.checks.append("content")
    report.untrusted_keys = untrusted_keys(manifest)
    from edgepack.bundle.signing import check as check_signature  # imports cryptography only for a signature

    signature = check_signature(root, trusted)
    report.signature = signature.to_json()
    if not signature.ok:
        report.failures.append(Failure("signature", SIGNATURE, signature.detail))
    report.checks.append("signature")
    if minimum is not None:
        if (failure := _version_failure(manifest, minimum)) is not None:
            report.failures.append(failure)
        report.checks.append("version")
    if report.failures:
        return report
    # Every safetensors header is validated before any library reads the file.
    from edgepack.model import safetensors_layout

    for entry in manifest["files"]:
        if entry["path"].endswith(".safetensors"):
            try:
                safetensors_layout(root / entry["path"])
            except UsageError as exc:
                report.failures.append(Failure("weights", entry["path"], str(exc)))
    report.checks.append("weights")
    if report.failures:
        return report

    code = manifest["model"].get("code") or []
    if code and not allow_code:
        report.failures.append(Failure("code", code[0], (
            f"the bundle holds the model's own Python code ({', '.join(code)}), which loading it would run; "
            "verify runs a bundle's code only with --allow-code")))
        return report

    # Every field used below was validated by the schema.
    target_name = manifest["target"]["name"]
    task = manifest["model"]["task"]
    registry = load_registry()
    missing = requirement_problems(manifest, registry)
    for key, problem in missing:  # a plugin the bundle needs is missing or too old here
        report.failures.append(Failure("plugins", key, problem))
    if missing:
        return report
    try:
        target = registry.target(target_name, options=manifest["target"].get("options") or {})
    except EdgepackError as exc:
        report.failures.append(Failure("target", f"{MANIFEST}:target", str(exc)))
        return report
    probe = target.probe()
    if not probe.present:
        reason = probe.detail.get("reason", "no device found")
        report.failures.append(Failure("target", f"{MANIFEST}:target.name",
                                       f"target {target_name} is not present on this machine ({reason})"))
        return report
    contradictions = target.contradictions(probe)
    for problem in contradictions:  # packed for a device this one is not
        report.failures.append(Failure("target", f"{MANIFEST}:target.options", problem))
    if contradictions:
        return report

    smoke = manifest["smoke"]
    expected, tolerances, failure = _read_smoke(root, smoke, task)
    if failure is not None:
        report.failures.append(failure)
        return report

    parallel = manifest.get("parallel")
    measure: dict[str, Any] = {}
    if parallel is not None:
        from edgepack.pipeline import rank_device

        device = rank_device(target, probe)
        measure = dict(ranks=parallel["world_size"], target_options=manifest["target"].get("options") or {},
                       device=device)
        progress(f"launching the bundle's {parallel['world_size']} ranks with torchrun ({device}"
                 f"{', emulated devices' if probe.detail.get('emulated') else ''}) and running the smoke inputs")
    else:
        measure = dict(target_options=manifest["target"].get("options") or {})
        if manifest["model"].get("program") is not None:  # a compiling target's program
            measure["program"] = manifest["model"]["program"]
        progress(f"loading the bundle on {target_name} in a fresh process and running the smoke inputs")
    try:
        measured = measure_in_fresh_process(
            root, task=task, steps=plan_steps(manifest),
            loader=manifest["model"]["loader"], target=target_name,
            batch_size=manifest["workload"]["batch_size"],
            new_tokens=smoke.get("new_tokens", DEFAULT_NEW_TOKENS), allow_code=bool(code),
            logits_from=smoke.get("logits_from", LOGITS_FORWARD), batching=smoke.get("batching", BATCHING_PADDED),
            **measure,
        )
    except VerificationError as exc:
        report.failures.append(Failure("load", "model/", str(exc)))
        return report
    except Exception as exc:  # a malformed bundle must not end in a traceback
        report.failures.append(Failure("load", "model/",
                                       f"the bundle could not be loaded and run: {type(exc).__name__}: {_sentence(exc)}"))
        return report
    report.checks.append("load")

    try:
        fidelity = compare(expected, measured.outputs, task)
    except Exception as exc:  # shapes or dtypes of the golden outputs do not match the model's
        report.failures.append(Failure("smoke", smoke["expected"],
                                       f"golden outputs cannot be compared with the model's outputs: {_sentence(exc)}"))
        return report
    report.fidelity = fidelity.to_json()
    for problem in check(fidelity, tolerances):
        report.failures.append(Failure("smoke", smoke["expected"], problem))
    report.checks.append("smoke")

    budget = manifest["memory"]["budget_bytes"]
    report.budget_bytes = budget
    report.measured_peak_bytes = measured.peak_bytes
    if measured.rank_peaks is not None:
        report.rank_peak_bytes = list(measured.rank_peaks)
        for rank, peak in enumerate(measured.rank_peaks):
            if peak > budget:
                report.failures.append(Failure(
                    "memory", f"{MANIFEST}:memory.budget_bytes",
                    f"rank {rank}'s measured peak {peak} bytes exceeds the budget of {budget} bytes per device "
                    f"({measured.scope})",
                ))
    elif measured.peak_bytes > budget:
        report.failures.append(Failure(
            "memory", f"{MANIFEST}:memory.budget_bytes",
            f"measured peak {measured.peak_bytes} bytes exceeds the budget of {budget} bytes "
            f"({measured.scope})",
        ))
    report.checks.append("memory")
    return report
