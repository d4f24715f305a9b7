"""Hardening of the bundle format (issue 7): untrusted manifest fields, links and special files,
concurrent and failing publication, streamed archives, corrupt archives, unreadable files.

Bundles here are built by hand (files plus a canonical manifest with their sha256), so these
tests stay fast; none of them packs a model.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

import edgepack.smoke
from conftest import assert_one_error_line, format_manifest
from edgepack.bundle import manifest as manifest_module
from edgepack.bundle import writer as writer_module
from edgepack.bundle.archive import create_archive, safe_extract
from edgepack.bundle.manifest import (
    MANIFEST, canonical_json, content_section, file_entries, integrity_failures, schema_failures,
)
from edgepack.bundle.reader import check_integrity, open_path, read_manifest, read_verified
from edgepack.bundle.verify import verify
from edgepack.bundle.writer import BundleWriter
from edgepack.cli import cli
from edgepack.errors import EdgepackError, UsageError, VerificationError

NAME = "tiny-0.1.0-cpu"
TOLERANCES = {"metric": "mean_cosine", "min_value": 0.99, "min_worst": 0.98}
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (renameat2, /proc/self/fd)")


def _safetensors(tensors: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _files() -> dict[str, bytes]:
    import torch

    return {
        "README.md": b"# tiny bundle\n",
        "model/config.json": b'{"model_type": "bert"}\n',
        "model/model.safetensors": _safetensors({"weight": torch.arange(4096, dtype=torch.int32).reshape(64, 64)}),
        "smoke/inputs.safetensors": _safetensors({
            "input_ids": torch.zeros(2, 4, dtype=torch.int64),
            "attention_mask": torch.ones(2, 4, dtype=torch.int64),
        }),
        "smoke/expected.safetensors": _safetensors({"embeddings": torch.eye(2, 4)}),
        "smoke/tolerances.json": canonical_json(TOLERANCES),
    }


def base_manifest() -> dict[str, Any]:
    """A format 1.0 manifest whose every field is well formed (``files`` is added later)."""
    return format_manifest(
        workload={"batch_size": 2, "seq_len": 4},
        plan=[{"plugin": "precision", "version": "0.1.0", "options": {"dtype": "bf16"}}],
        candidates=[{"plan": [], "estimated_peak_bytes": 10}],
        memory={"budget_bytes": 1000, "predicted_peak_bytes": 10, "measured_peak_bytes": None, "scope": "test"},
        smoke={"inputs": "smoke/inputs.safetensors", "expected": "smoke/expected.safetensors",
               "tolerances": "smoke/tolerances.json", "new_tokens": 8},
    )


def entries_for(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for rel, data in sorted(files.items())]


def make_bundle(root: Path, mutate: Callable[[dict], Any] | None = None,
                files: dict[str, bytes] | None = None) -> Path:
    """Write a bundle by hand: its files, then a manifest listing them, changed by ``mutate``."""
    files = _files() if files is None else files
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    manifest = dict(base_manifest(), files=entries_for(files))
    placeholder = manifest["content"] = content_section(manifest)
    if mutate is not None:
        mutate(manifest)
    if isinstance(manifest, dict) and manifest.get("content") is placeholder:
        manifest["content"] = content_section(manifest)  # the digest of the mutated content
    (root / MANIFEST).write_bytes(canonical_json(manifest))
    return root


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_bundle(tmp_path / "dist" / NAME)


@pytest.fixture
def fake_probe(monkeypatch):
    """Replace the fresh-process probe: the "model" reproduces the golden outputs exactly."""
    from safetensors.torch import load_file

    calls = []

    def fake(bundle_dir, *, task, steps, loader, target, batch_size, new_tokens=8, target_options=None,
             allow_code=False, logits_from="generate", batching="padded", peak_only=False):
        calls.append(dict(task=task, loader=loader, target=target, batch_size=batch_size, new_tokens=new_tokens))
        outputs = load_file(Path(bundle_dir) / "smoke/expected.safetensors")
        return edgepack.smoke.ProbeResult(10, "test scope", outputs, 0.0)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", fake)
    return calls


def _load(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))


def _rewrite(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_bytes(canonical_json(manifest))


def _set(dotted: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting ``a.b`` (or ``plan[0].version``) to ``value``."""
    def mutate(manifest: dict) -> None:
        *parents, last = _parse(dotted)
        node = manifest
        for part in parents:
            node = node[part]
        node[last] = value
    return mutate


def _del(dotted: str) -> Callable[[dict], None]:
    def mutate(manifest: dict) -> None:
        *parents, last = _parse(dotted)
        node = manifest
        for part in parents:
            node = node[part]
        del node[last]
    return mutate


def _parse(dotted: str) -> list[Any]:
    parts: list[Any] = []
    for piece in dotted.split("."):
        if "[" in piece:
            name, index = piece[:-1].split("[")
            parts += [name, int(index)]
        else:
            parts.append(piece)
    return parts


def _paths(failures) -> dict[str, str]:
    return {f.path: f.detail for f in failures}


# ---------------------------------------------------------------------------------------------
# 1. Every manifest field a reader uses is validated before it is used


def test_handmade_bundle_is_valid_and_verifies(tiny, fake_probe):
    manifest, failures = check_integrity(tiny)
    assert failures == [] and manifest is not None
    report = verify(tiny)
    assert report.ok, report.failures
    assert fake_probe == [dict(task="feature-extraction", loader=None, target="cpu", batch_size=2, new_tokens=8)]


SCHEMA_CASES = [
    ("workload.batch_size", "two"),
    ("workload.batch_size", True),
    ("workload.batch_size", 0),
    ("workload.batch_size", 2.0),
    ("workload.seq_len", -4),
    ("workload.cache_len", "long"),
    ("memory.budget_bytes", "lots"),
    ("memory.budget_bytes", 0),
    ("memory.predicted_peak_bytes", "10"),
    ("memory.measured_peak_bytes", 1.5),
    ("memory.scope", 3),
    ("target.name", 7),
    ("target.name", ""),
    ("target.devices", 0),
    ("target.devices", "1"),
    ("target.capabilities", "fp32"),
    ("model.task", "translation"),
    ("model.task", None),
    ("model.loader", 3),
    ("model.loader", "quantize"),  # not in the plan
    ("plan[0].plugin", 5),
    ("plan[0].version", 1.0),
    ("plan[0].options", []),
    ("plan[0]", "precision"),
    ("candidates[0]", "all of them"),
    ("fidelity.value", "high"),
    ("fidelity.floor", None),
    ("fidelity.value", True),
    ("fidelity.metric", 1),
    ("smoke.inputs", 3),
    ("smoke.expected", "/etc/passwd"),
    ("smoke.expected", "../outside.safetensors"),
    ("smoke.tolerances", "smoke/../../x.json"),
    ("smoke.expected", MANIFEST),
    ("smoke.new_tokens", "8"),
    ("smoke.new_tokens", 0),
    ("smoke.batching", "trimmed"),  # a grouping of rows this edgepack does not know
    ("smoke.batching", True),
    ("bundle.name", 1),
    ("bundle.version", ["0", "1"]),
    ("bundle.created", 1700000000),
    ("budget.bytes_per_device", "1k"),
    ("budget.source", "guess"),
    ("source.model", None),
    ("producer.plugins", []),
    ("files[0].path", 3),
    ("files[0].path", "/abs/README.md"),
    ("files[0].path", "model/../README.md"),
    ("files[0].path", "model//README.md"),
    ("files[0].path", "./README.md"),
    ("files[0].path", MANIFEST),
    ("files[0].size", -1),
    ("files[0].size", "12"),
    ("files[0].size", True),
    ("files[0].sha256", "abc"),
    ("files[0].sha256", "A" * 64),
]


@pytest.mark.parametrize("key, value", SCHEMA_CASES, ids=[f"{k}={v!r}"[:60] for k, v in SCHEMA_CASES])
def test_schema_names_each_malformed_field(key, value):
    manifest = dict(base_manifest(), files=entries_for(_files()))
    _set(key, value)(manifest)
    failures = schema_failures(manifest)
    found = _paths(failures)
    wanted = f"{MANIFEST}:{key}"
    assert wanted in found, found
    detail = found[wanted]
    assert detail and "\n" not in detail
    assert all(f.check == "schema" for f in failures)


def test_schema_refuses_duplicate_file_paths():
    manifest = dict(base_manifest(), files=entries_for(_files()))
    manifest["files"].append(dict(manifest["files"][0]))
    found = _paths(schema_failures(manifest))
    assert f"{MANIFEST}:files[6].path" in found
    assert "more than once" in found[f"{MANIFEST}:files[6].path"]


@pytest.mark.parametrize("key", ["plan[0].version", "plan[0].plugin", "plan[0].options", "model.loader",
                                 "workload.seq_len", "fidelity.value"])
def test_schema_names_missing_nested_fields(key):
    manifest = dict(base_manifest(), files=entries_for(_files()))
    _del(key)(manifest)
    assert f"{MANIFEST}:{key}" in _paths(schema_failures(manifest))


def test_verify_refuses_absolute_smoke_path_without_reading_it(tmp_path, fake_probe):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"\x00" * 64)  # not safetensors: reading it ended in a library traceback
    bundle = make_bundle(tmp_path / NAME, _set("smoke.expected", str(outside)))
    report = verify(bundle)
    assert not report.ok
    assert f"{MANIFEST}:smoke.expected" in _paths(report.failures)
    assert fake_probe == []


def test_verify_refuses_smoke_path_not_among_the_listed_files(tmp_path, fake_probe):
    bundle = make_bundle(tmp_path / NAME, _set("smoke.expected", "smoke/other.safetensors"))
    report = verify(bundle)
    found = _paths(report.failures)
    assert f"{MANIFEST}:smoke.expected" in found
    assert "listed" in found[f"{MANIFEST}:smoke.expected"]
    with pytest.raises(VerificationError, match=r"smoke\.expected"):
        read_verified(bundle)


VERIFY_CASES = [
    ("workload.batch_size", "two"),
    ("memory.budget_bytes", "lots"),
    ("smoke.new_tokens", "eight"),
    ("model.task", "translation"),
    ("model.loader", 7),
    ("target.name", ["cpu"]),
    ("plan[0]", {"plugin": "precision", "options": {}}),
    ("smoke.tolerances", {"path": "x"}),
]


@pytest.mark.parametrize("key, value", VERIFY_CASES, ids=[k for k, _ in VERIFY_CASES])
def test_verify_reports_malformed_fields_without_raising(tmp_path, fake_probe, key, value):
    bundle = make_bundle(tmp_path / NAME, _set(key, value))
    report = verify(bundle)  # must not raise
    assert not report.ok
    top = key.split("[")[0].split(".")[0]
    assert any(f.path.startswith(f"{MANIFEST}:{top}") for f in report.failures), report.failures
    assert fake_probe == []  # nothing is loaded from a malformed manifest
    json.dumps(report.to_json())


@pytest.mark.parametrize("tolerances", [
    b'{"min": 0.99}\n',
    b'{"metric": "mean_cosine", "min_value": "high", "min_worst": 0.9}\n',
    b'{"metric": 3, "min_value": 0.9, "min_worst": 0.9}\n',
    b'{"metric": "mean_cosine", "min_value": 0.9, "min_worst": true}\n',
    b'[0.99, 0.98]\n',
    b'{not json\n',
    b'\xff\xfe\x00',
], ids=["missing-keys", "string-min-value", "int-metric", "bool-min-worst", "list", "not-json", "not-utf8"])
def test_verify_reports_malformed_tolerances(tmp_path, fake_probe, tolerances):
    files = dict(_files(), **{"smoke/tolerances.json": tolerances})
    bundle = make_bundle(tmp_path / NAME, files=files)
    report = verify(bundle)
    assert not report.ok
    assert [(f.check, f.path) for f in report.failures] == [("smoke", "smoke/tolerances.json")]
    assert "\n" not in report.failures[0].detail


def test_verify_reports_golden_outputs_without_the_expected_tensors(tmp_path, fake_probe):
    import torch

    files = dict(_files(), **{"smoke/expected.safetensors": _safetensors({"other": torch.ones(2, 4)})})
    bundle = make_bundle(tmp_path / NAME, files=files)
    report = verify(bundle)
    assert not report.ok
    assert report.failures[0].check == "smoke"
    assert report.failures[0].path == "smoke/expected.safetensors"


def test_verify_reports_unreadable_golden_outputs(tmp_path, fake_probe):
    files = dict(_files(), **{"smoke/expected.safetensors": b"\x00" * 64})
    bundle = make_bundle(tmp_path / NAME, files=files)
    report = verify(bundle)
    # refused by the header check every safetensors file of a bundle goes through, before reading
    assert [(f.check, f.path) for f in report.failures] == [("weights", "smoke/expected.safetensors")]
    assert fake_probe == []


def test_verify_turns_an_unexpected_probe_error_into_a_failure(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("garbage on the child's stdout")

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", broken)
    report = verify(tiny)
    assert [(f.check, f.path) for f in report.failures] == [("load", "model/")]
    assert "garbage" in report.failures[0].detail


CLI_CASES = [
    ("plan[0]", {"plugin": "precision", "options": {}}, "plan[0].version"),
    ("workload.batch_size", "two", "workload.batch_size"),
    ("memory.budget_bytes", "lots", "memory.budget_bytes"),
    ("memory.measured_peak_bytes", "big", "memory.measured_peak_bytes"),
    ("model.loader", 3, "model.loader"),
    ("smoke.expected", "/etc/passwd", "smoke.expected"),
    ("files[0].size", "12", "files[0].size"),
    ("files[0].sha256", None, "files[0].sha256"),
    ("fidelity.value", "high", "fidelity.value"),
]


@pytest.mark.parametrize("key, value, named", CLI_CASES, ids=[c[2] for c in CLI_CASES])
def test_cli_inspect_malformed_manifest_is_one_line(tmp_path, key, value, named):
    bundle = make_bundle(tmp_path / NAME, _set(key, value))
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert_one_error_line(result, 2, f"{MANIFEST}:{named}")


@pytest.mark.parametrize("key, value, named", CLI_CASES, ids=[c[2] for c in CLI_CASES])
def test_cli_verify_malformed_manifest_exits_1_without_traceback(tmp_path, fake_probe, key, value, named):
    bundle = make_bundle(tmp_path / NAME, _set(key, value))
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--json"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(f["path"] == f"{MANIFEST}:{named}" for f in report["failures"]), report


def test_cli_inspect_valid_handmade_bundle(tiny):
    result = CliRunner().invoke(cli, ["inspect", str(tiny)])
    assert result.exit_code == 0, result.output
    assert "precision" in result.stdout


@pytest.mark.parametrize("text", ["[" * 100_000, "null", '"a string"'])
def test_pathological_manifest_json_is_a_failure(tiny, text):
    (tiny / MANIFEST).write_text(text)
    manifest, failures = read_manifest(tiny)
    assert manifest is None and failures


# ---------------------------------------------------------------------------------------------
# 2. Links and special files are refused at every level, never followed


def test_symlinked_directory_is_refused(tiny, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(tiny / "model"), str(elsewhere))
    (tiny / "model").symlink_to(elsewhere, target_is_directory=True)
    manifest, failures = check_integrity(tiny)
    found = _paths(failures)
    assert "model" in found and "link" in found["model"]
    with pytest.raises(VerificationError, match="model"):
        read_verified(tiny)


def test_unlisted_symlink_to_a_directory_is_refused(tiny, tmp_path):
    (tmp_path / "other").mkdir()
    (tiny / "extra").symlink_to(tmp_path / "other", target_is_directory=True)
    found = _paths(integrity_failures(tiny, _load(tiny)))
    assert "extra" in found and "link" in found["extra"]


def test_dangling_symlink_is_refused(tiny):
    (tiny / "smoke" / "ghost").symlink_to("/nonexistent/target")
    found = _paths(integrity_failures(tiny, _load(tiny)))
    assert "smoke/ghost" in found and "link" in found["smoke/ghost"]


def test_fifo_is_refused_without_being_opened(tiny):
    os.mkfifo(tiny / "smoke" / "pipe")
    found = _paths(integrity_failures(tiny, _load(tiny)))
    assert "smoke/pipe" in found and "not a regular file" in found["smoke/pipe"]


def test_fifo_at_a_listed_path_is_refused(tiny):
    (tiny / "README.md").unlink()
    os.mkfifo(tiny / "README.md")
    failures = integrity_failures(tiny, _load(tiny))
    assert [f.path for f in failures] == ["README.md"]
    assert "not a regular file" in failures[0].detail


def test_manifest_that_is_a_link_is_refused(tiny, tmp_path):
    copy = tmp_path / "manifest-copy.json"
    shutil.copy(tiny / MANIFEST, copy)
    (tiny / MANIFEST).unlink()
    (tiny / MANIFEST).symlink_to(copy)
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert failures[0].path == MANIFEST and "link" in failures[0].detail


def test_bundle_root_given_as_a_link_is_accepted(tiny, tmp_path):
    """The path the user names may be a link (dist/latest -> dist/x-0.1.0); nothing below it may."""
    alias = tmp_path / "latest"
    alias.symlink_to(tiny, target_is_directory=True)
    manifest, failures = check_integrity(alias)
    assert failures == [] and manifest is not None


def test_writer_refuses_a_link_in_staging_and_never_follows_it(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    outside.chmod(0o600)
    out = tmp_path / "dist"
    with pytest.raises(EdgepackError, match="link"):
        with BundleWriter(out, NAME) as w:
            (w.staging / "README.md").write_text("x")
            (w.staging / "model").mkdir()
            (w.staging / "model" / "weights.bin").symlink_to(outside)
            w.commit(base_manifest())
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # chmod did not follow the link
    assert outside.read_bytes() == b"secret"
    assert not out.exists()  # no staging left, nor the --out directory the writer made


def test_file_entries_does_not_follow_links(tmp_path):
    root = tmp_path / "staging"
    (root / "model").mkdir(parents=True)
    (root / "model" / "a.bin").write_bytes(b"a")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.bin").write_bytes(b"b")
    (root / "linked").symlink_to(tmp_path / "dir", target_is_directory=True)
    with pytest.raises(EdgepackError, match="linked"):
        file_entries(root)


# ---------------------------------------------------------------------------------------------
# 3. Publication: never replace a bundle published meanwhile, never lose the old one, fsync


def _stage(w: BundleWriter, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = w.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("other_is_empty", [True, False], ids=["empty-dir", "bundle"])
def test_bundle_published_meanwhile_is_not_replaced(tmp_path, other_is_empty):
    out = tmp_path / "dist"
    final = out / NAME
    with pytest.raises(UsageError, match=f"bundle {final} already exists"):
        with BundleWriter(out, NAME) as w:
            _stage(w, {"README.md": b"mine"})
            final.mkdir()  # another process publishes between __enter__ and commit
            if not other_is_empty:
                (final / "README.md").write_text("theirs")
            w.commit(base_manifest())
    assert sorted(p.name for p in final.iterdir()) == ([] if other_is_empty else ["README.md"])
    if not other_is_empty:
        assert (final / "README.md").read_text() == "theirs"
    assert _hidden(out) == []  # staging removed


@linux_only
def test_overwrite_never_leaves_the_final_path_without_a_bundle(tmp_path, monkeypatch):
    out = tmp_path / "dist"
    make_bundle(out / NAME, files={"README.md": b"old"})
    final = out / NAME
    real_rename = os.rename
    real_renameat2 = getattr(writer_module, "_renameat2", None)
    calls = []

    def holds_a_bundle() -> None:
        calls.append(1)
        assert (final / MANIFEST).is_file(), "the final path was left without a bundle"

    def spy_rename(src, dst):
        holds_a_bundle()
        return real_rename(src, dst)

    def spy_renameat2(src, dst, flags):
        holds_a_bundle()
        return real_renameat2(src, dst, flags)

    monkeypatch.setattr(writer_module.os, "rename", spy_rename)
    monkeypatch.setattr(writer_module, "_renameat2", spy_renameat2, raising=False)
    with BundleWriter(out, NAME, overwrite=True) as w:
        _stage(w, {"README.md": b"new"})
        w.commit(base_manifest())
    assert calls
    assert (final / "README.md").read_bytes() == b"new"
    assert _hidden(out) == []


def _old_bundle(out: Path) -> tuple[Path, bytes]:
    final = make_bundle(out / NAME, files={"README.md": b"old"})
    return final, (final / MANIFEST).read_bytes()


@pytest.mark.parametrize("renameat2_error, into_place_fails", [
    # the exchange fails (and os.rename onto the bundle, for an implementation using it)
    (errno.EIO, lambda src: True),
    # no renameat2 here: the fallback moves the old bundle aside, then moving the new one in fails
    (errno.EINVAL, lambda src: src.name.startswith(f".{NAME}.partial-")),
], ids=["exchange-fails", "fallback-swap-fails"])
def test_a_failed_overwrite_keeps_the_old_bundle(tmp_path, monkeypatch, renameat2_error, into_place_fails):
    out = tmp_path / "dist"
    final, old_manifest = _old_bundle(out)
    real_rename = os.rename

    def failing_renameat2(src, dst, flags):
        raise OSError(renameat2_error, "renameat2 failed (simulated)")

    def failing_rename(src, dst):
        if Path(dst) == final and into_place_fails(Path(src)):
            raise OSError(errno.EIO, "I/O error (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(writer_module, "_renameat2", failing_renameat2, raising=False)
    monkeypatch.setattr(writer_module.os, "rename", failing_rename)
    with pytest.raises((OSError, EdgepackError)):
        with BundleWriter(out, NAME, overwrite=True) as w:
            _stage(w, {"README.md": b"new"})
            w.commit(base_manifest())
    assert (final / MANIFEST).read_bytes() == old_manifest
    assert (final / "README.md").read_bytes() == b"old"
    assert sorted(p.name for p in out.iterdir()) == [NAME]


def test_overwrite_without_renameat2_still_replaces(tmp_path, monkeypatch):
    out = tmp_path / "dist"
    final, _ = _old_bundle(out)

    def unsupported(src, dst, flags):
        raise OSError(errno.ENOSYS, "no renameat2 (simulated)")

    monkeypatch.setattr(writer_module, "_renameat2", unsupported, raising=False)
    with BundleWriter(out, NAME, overwrite=True) as w:
        _stage(w, {"README.md": b"new"})
        w.commit(base_manifest())
    assert (final / "README.md").read_bytes() == b"new"
    assert sorted(p.name for p in out.iterdir()) == [NAME]
    shutil.rmtree(final)
    with pytest.raises(UsageError, match="already exists"):
        with BundleWriter(out, NAME) as w:
            _stage(w, {"README.md": b"newer"})
            final.mkdir()  # published meanwhile, and empty: os.rename alone would replace it
            w.commit(base_manifest())
    assert list(final.iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == [NAME]


@linux_only
def test_commit_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync
    out = tmp_path / "dist"
    final = out / NAME

    def spy(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), final.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", spy)
    files = {"README.md": b"r", "model/config.json": b"{}", "model/sub/w.bin": b"w", "smoke/t.json": b"{}"}
    with BundleWriter(out, NAME) as w:
        staging = str(w.staging)
        _stage(w, files)
        w.commit(base_manifest())
    paths = {p for p, _ in synced}
    for rel in list(files) + [MANIFEST]:
        assert f"{staging}/{rel}" in paths, rel
    for rel in ("model", "model/sub", "smoke"):
        assert f"{staging}/{rel}" in paths, rel
    assert staging in paths
    assert (str(out), True) in synced  # the directory holding the bundle, after the rename


# ---------------------------------------------------------------------------------------------
# 4. Archives: streamed, deterministic, through a private temporary file, links never followed


def test_two_archives_of_the_same_bundle_are_byte_identical(tiny):
    first = create_archive(tiny).read_bytes()
    for path in [tiny, *tiny.rglob("*")]:
        os.utime(path, (1_000_000_000, 1_000_000_000))
    second = create_archive(tiny).read_bytes()
    assert first == second
    assert sorted(p.name for p in tiny.parent.iterdir()) == [NAME, NAME + ".tar.gz"]
    assert stat.S_IMODE((tiny.parent / (NAME + ".tar.gz")).stat().st_mode) == 0o644
    root = safe_extract(tiny.parent / (NAME + ".tar.gz"), tiny.parent.parent / "x")
    assert check_integrity(root)[1] == []


def test_archive_does_not_write_through_a_planted_partial_link(tiny, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tiny.parent / (NAME + ".tar.gz.partial")).symlink_to(victim)
    archive = create_archive(tiny)
    assert victim.read_bytes() == b"precious"
    assert not archive.is_symlink() and archive.is_file()
    with tarfile.open(archive) as tar:
        assert f"{NAME}/{MANIFEST}" in tar.getnames()


def test_archive_is_streamed_not_built_in_memory(tmp_path):
    big = bytes(range(256)) * (16 * 4096)  # 16 MiB
    bundle = make_bundle(tmp_path / NAME, files=dict(_files(), **{"model/model.safetensors": big}))
    tracemalloc.start()
    try:
        create_archive(bundle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6 * 2**20, f"peak Python allocation {peak} bytes while archiving 16 MiB"


def test_archive_refuses_a_bundle_holding_a_link(tiny, tmp_path):
    (tmp_path / "outside").mkdir()
    (tiny / "extra").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(EdgepackError, match="link"):
        create_archive(tiny)
    assert not (tiny.parent / (NAME + ".tar.gz")).exists()
    assert _hidden(tiny.parent) == []


# ---------------------------------------------------------------------------------------------
# 5. Corrupt archives are one VerificationError; extraction is bounded and stays in dest


@pytest.fixture
def archive(tmp_path) -> Path:
    files = dict(_files(), **{"model/model.safetensors": os.urandom(256 * 1024)})
    return create_archive(make_bundle(tmp_path / "src" / NAME, files=files))


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999, 30], ids=["half", "most", "all-but-tail", "header"])
def test_truncated_archive_is_a_verification_error(archive, tmp_path, keep):
    data = archive.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    archive.write_bytes(data[:cut])
    with pytest.raises(VerificationError, match=f"{archive} is truncated or corrupt: "):
        safe_extract(archive, tmp_path / "dest")
    with pytest.raises(VerificationError, match="is truncated or corrupt"):
        open_path(archive)


def test_corrupt_gzip_is_a_verification_error(archive, tmp_path):
    data = bytearray(archive.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    archive.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="is truncated or corrupt"):
        safe_extract(archive, tmp_path / "dest")


@pytest.mark.parametrize("name, data", [("junk.tar.gz", b"not a tar at all"),
                                        ("junk.tar", b"x" * 2048),
                                        ("gz-of-junk.tar.gz", gzip.compress(b"x" * 2048, mtime=0))])
def test_not_a_tar_is_a_verification_error(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(VerificationError, match=f"{path} is truncated or corrupt"):
        safe_extract(path, tmp_path / "dest")


def test_cli_verify_truncated_archive_is_one_line(archive):
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(cli, ["verify", str(archive)])
    assert_one_error_line(result, 1, "truncated or corrupt", archive.name)
    result = CliRunner().invoke(cli, ["inspect", str(archive)])  # bad input to inspect: exit 2
    assert_one_error_line(result, 2, "truncated or corrupt", archive.name)


def _bomb_tar(path: Path, declared: int, actual: int) -> Path:
    manifest = canonical_json({"files": [{"path": "ok.txt", "size": declared, "sha256": "0" * 64}]})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((f"b/{MANIFEST}", manifest), ("b/ok.txt", b"\0" * actual)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_member_larger_than_declared_is_refused(tmp_path):
    archive = _bomb_tar(tmp_path / "bomb.tar.gz", declared=1, actual=4 * 2**20)
    dest = tmp_path / "dest"
    with pytest.raises(VerificationError, match="larger than"):
        safe_extract(archive, dest)
    assert not dest.exists()


def test_member_of_declared_size_is_extracted(tmp_path):
    archive = _bomb_tar(tmp_path / "ok.tar.gz", declared=1000, actual=1000)
    root = safe_extract(archive, tmp_path / "dest")
    assert (root / "ok.txt").stat().st_size == 1000


def test_duplicate_members_are_refused(tmp_path):
    manifest = canonical_json({"files": [{"path": "ok.txt", "size": 1, "sha256": "0" * 64}]})
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in ((f"b/{MANIFEST}", manifest), ("b/ok.txt", b"1"), ("b/ok.txt", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(VerificationError, match="more than once"):
        safe_extract(path, tmp_path / "dest")


def test_extraction_writes_nothing_outside_dest(archive, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / NAME).symlink_to(outside, target_is_directory=True)  # planted before extraction
    with pytest.raises(VerificationError):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 6. Unreadable files and directories are failures naming the path


def test_unreadable_file_is_a_failure(tiny, monkeypatch):
    target = str(tiny / "model" / "model.safetensors")
    real_open = os.open

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", target)

    def guarded_open(path, flags, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(manifest_module, "sha256_file", denied, raising=False)
    monkeypatch.setattr(os, "open", guarded_open)
    failures = integrity_failures(tiny, _load(tiny))
    assert [f.path for f in failures] == ["model/model.safetensors"]
    assert "Permission denied" in failures[0].detail


def test_unreadable_directory_is_a_failure(tiny, monkeypatch):
    real_scandir = os.scandir
    blocked = str(tiny / "smoke")

    def guarded(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(errno.EACCES, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    failures = integrity_failures(tiny, _load(tiny))
    found = _paths(failures)
    assert "smoke" in found and "Permission denied" in found["smoke"]


def test_unreadable_manifest_is_a_failure(tiny, monkeypatch):
    from edgepack.bundle import reader as reader_module

    real_open = os.open
    target = str(tiny / MANIFEST)

    def guarded_open(path, flags, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(path, flags, *args, **kwargs)

    def denied_read_text(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(reader_module.Path, "read_text", denied_read_text)
    monkeypatch.setattr(reader_module.Path, "read_bytes", denied_read_text)
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert failures[0].path == MANIFEST and "Permission denied" in failures[0].detail


# ---------------------------------------------------------------------------------------------
# 8. Strict manifest reading (issue 11): one text, one meaning; bounded sizes; one sentence each


def _write_text(bundle: Path, text: str) -> None:
    (bundle / MANIFEST).write_bytes(text.encode("utf-8"))


def _canonical_text(bundle: Path, mutate: Callable[[dict], Any] | None = None) -> str:
    manifest = _load(bundle)
    if mutate is not None:
        mutate(manifest)
    return canonical_json(manifest).decode("utf-8")


@pytest.mark.parametrize("original, doubled, key", [
    ('"name": "tiny",', '"name": "tiny", "version": "9.9.9",', "bundle.version"),  # nested
    ('"format": "edgepack.bundle",', '"format": "edgepack.bundle", "format_version": "1.0",', "format_version"),
    ('"path": "README.md",', '"path": "README.md", "path": "model/x",', "files[0].path"),
])
def test_duplicate_json_keys_are_refused_and_named(tiny, original, doubled, key):
    text = _canonical_text(tiny)
    assert original in text
    _write_text(tiny, text.replace(original, doubled, 1))
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert [(f.check, f.path) for f in failures] == [("manifest", f"{MANIFEST}:{key}")]
    assert "appears twice in one JSON object" in failures[0].detail and "\n" not in failures[0].detail


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_and_named(tiny, literal):
    # candidates[0] is a field the schema does not look into: only the strict reader sees it.
    text = _canonical_text(tiny, _set("candidates[0].estimated_peak_bytes", 12345))
    _write_text(tiny, text.replace("12345", literal, 1))
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert failures[0].path == f"{MANIFEST}:candidates[0].estimated_peak_bytes"
    assert f"is {literal}, which is not a JSON number" in failures[0].detail


def test_integers_beyond_64_bits_are_refused(tiny):
    _rewrite(tiny, dict(_load(tiny), candidates=[{"plan": [], "estimated_peak_bytes": 2**64}]))
    manifest, failures = read_manifest(tiny)
    assert manifest is None and failures[0].path == f"{MANIFEST}:candidates[0].estimated_peak_bytes"
    assert "beyond 64 bits" in failures[0].detail


def test_nesting_deeper_than_the_bound_is_refused(tiny):
    deep: Any = 1
    for _ in range(manifest_module.MAX_DEPTH + 2):
        deep = {"x": deep}
    _rewrite(tiny, dict(_load(tiny), candidates=[deep]))
    manifest, failures = read_manifest(tiny)
    assert manifest is None and failures[0].path.startswith(f"{MANIFEST}:candidates[0].x.x")
    assert f"deeper than {manifest_module.MAX_DEPTH} levels" in failures[0].detail


def test_unknown_top_level_key_of_this_format_version_is_refused(tiny):
    _rewrite(tiny, dict(_load(tiny), trusted_by_everyone=True))
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert [(f.check, f.path) for f in failures] == [("schema", f"{MANIFEST}:trusted_by_everyone")]
    assert "unknown key is refused" in failures[0].detail


def test_unknown_top_level_key_of_a_newer_minor_version_is_kept_not_trusted(tiny, fake_probe):
    _rewrite(tiny, dict(_load(tiny), format_version="1.3", provenance={"builder": "ci"}))
    manifest, failures = read_manifest(tiny)
    assert failures == [] and manifest["provenance"] == {"builder": "ci"}  # kept
    report = verify(tiny)
    assert report.ok and report.untrusted_keys == ["provenance"]  # and said to be untrusted
    result = CliRunner().invoke(cli, ["verify", str(tiny), "--json"])
    assert result.exit_code == 0 and "provenance" in result.stdout and "not checked or used" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1])["untrusted_keys"] == ["provenance"]


@pytest.mark.parametrize("version", ["1", "1.x", "1.0.0", "01.0", 1.0])
def test_malformed_format_version_of_this_major_is_refused(tiny, version):
    _rewrite(tiny, dict(_load(tiny), format_version=version))
    manifest, failures = read_manifest(tiny)
    assert manifest is None
    assert (failures[0].check, failures[0].path) == ("format_version", f"{MANIFEST}:format_version")
    assert "MAJOR.MINOR" in failures[0].detail


@pytest.mark.parametrize("algorithm", ["blake3", "sha512", "md5"])
def test_unknown_hash_algorithm_in_a_files_entry_is_refused(tiny, algorithm):
    manifest = _load(tiny)
    manifest["files"][0][algorithm] = "00" * 32
    _rewrite(tiny, manifest)
    _, failures = read_manifest(tiny)
    found = _paths(failures)
    assert f"{MANIFEST}:files[0].{algorithm}" in found
    assert "knows no hash algorithm but sha256" in found[f"{MANIFEST}:files[0].{algorithm}"]


def test_source_digests_must_be_sha256(tiny):
    _rewrite(tiny, dict(_load(tiny), source={"model": "/m", "sha256": {"model.safetensors": "md5:abc"}}))
    _, failures = read_manifest(tiny)
    assert f"{MANIFEST}:source.sha256" in _paths(failures)


def test_number_of_files_is_bounded(tiny, monkeypatch):
    monkeypatch.setattr(manifest_module, "MAX_FILES", 3)
    _, failures = read_manifest(tiny)
    assert [(f.path, f.detail) for f in failures] == [
        (f"{MANIFEST}:files", "lists 6 files, more than the 3 a bundle may hold")]


@pytest.mark.parametrize("path, needle", [
    ("model/" + "a" * 1100, "more than the 1024 a bundle path may have"),
    ("model/" + "b" * 300, "component longer than the 255 bytes"),
])
def test_path_length_is_bounded(path, needle):
    manifest = dict(base_manifest(), files=entries_for(_files()))
    manifest["files"][0]["path"] = path
    found = _paths(schema_failures(manifest))
    assert needle in found[f"{MANIFEST}:files[0].path"]


def test_cli_verify_duplicate_key_exits_1_with_one_failure(tiny):
    _write_text(tiny, _canonical_text(tiny).replace('"name": "tiny",', '"name": "tiny", "name": "evil",', 1))
    result = CliRunner().invoke(cli, ["verify", str(tiny), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [{"check": "manifest", "path": f"{MANIFEST}:bundle.name",
                                   "detail": report["failures"][0]["detail"]}]
    inspect = CliRunner().invoke(cli, ["inspect", str(tiny)])
    assert_one_error_line(inspect, 2, "bundle.name", "appears twice")


def test_archive_with_a_duplicate_key_manifest_is_refused_before_extraction(tiny, tmp_path):
    _write_text(tiny, _canonical_text(tiny).replace('"name": "tiny",', '"name": "tiny", "name": "evil",', 1))
    archive = create_archive(tiny)
    with pytest.raises(VerificationError, match=r"bundle\.name: appears twice"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out" / NAME).exists()


# ---------------------------------------------------------------------------------------------
# SOURCE_DATE_EPOCH


def test_created_honours_source_date_epoch(monkeypatch):
    from edgepack.pipeline import created_time

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert created_time() == "2023-11-14T22:13:20+00:00"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH='yesterday' is not a whole number of seconds"):
        created_time()
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert created_time().endswith("+00:00")


def test_a_bad_source_date_epoch_is_refused_before_any_work(model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "-")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        edgepack.pack(str(model_dir), target="cpu", budget="1GB", out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_verify_refuses_a_weight_file_whose_header_does_not_match_its_data(tmp_path, fake_probe):
    """A bundle whose hashes all match, but whose weight file has bytes after its last tensor:
    verify names the file and the fault before any library reads it (nothing is loaded)."""
    files = _files()
    files["model/model.safetensors"] = files["model/model.safetensors"] + b"\0" * 8
    root = make_bundle(tmp_path / "dist" / NAME, files=files)
    report = verify(root)
    assert [(f.check, f.path) for f in report.failures] == [("weights", "model/model.safetensors")]
    assert "8 bytes after the last tensor belong to no tensor" in report.failures[0].detail
    assert fake_probe == []  # nothing was loaded
