"""The bundle format: atomic writer, canonical manifest, integrity, schema, archives."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from edgepack.bundle import writer as writer_module
from edgepack.bundle.archive import create_archive, safe_extract
from edgepack.bundle.manifest import (
    CONTENT_SCHEME, FORMAT, MANIFEST, canonical_json, content_differences, content_digest, content_failures,
    content_section, integrity_failures,
    schema_failures,
)
from edgepack.bundle.reader import check_integrity, open_path, read_manifest, read_verified
from edgepack.bundle.verify import verify
from edgepack.bundle.writer import BundleWriter
from edgepack.errors import UsageError, VerificationError

from conftest import format_manifest

# Written in an order that is not the sorted one; "a-b/x" and "a/b" sort differently as
# strings and as path parts.
FILES = {
    "model/weights.bin": bytes(range(256)) * 8,
    "README.md": "# tiny bundle\n".encode(),
    "a/b": b"ab",
    "a-b/x": b"x",
    "smoke/tolerances.json": b'{"min": 0.99}\n',
    "model/config.json": b'{"model_type": "bert"}\n',
}


def valid_manifest() -> dict:
    """A manifest that satisfies the schema once commit adds ``files`` and ``content``."""
    return format_manifest()


def finished_manifest(**sections) -> dict:
    """:func:`valid_manifest` with what commit adds: ``files`` (none here) and ``content``."""
    manifest = dict(valid_manifest(), **{"files": [], **sections})
    manifest["content"] = content_section(manifest)
    return manifest


def write_bundle(out: Path, name: str = "tiny-0.1.0-cpu", files: dict | None = None,
                 manifest: dict | None = None) -> Path:
    with BundleWriter(out, name) as w:
        for rel, data in (files or FILES).items():
            path = w.staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o600)  # as safetensors writes them
        return w.commit(valid_manifest() if manifest is None else manifest)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "dist")


def load_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))


def rewrite_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / MANIFEST).write_bytes(canonical_json(manifest))


# ---------------------------------------------------------------------------------------------
# BundleWriter


def test_exception_inside_writer_leaves_no_bundle_and_no_staging(tmp_path):
    out = tmp_path / "dist"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with BundleWriter(out, "tiny-0.1.0-cpu") as w:
            assert w.staging.is_dir() and w.staging.parent == out
            (w.staging / "model").mkdir()
            (w.staging / "model" / "w.bin").write_bytes(b"123")
            raise RuntimeError("disk on fire")
    assert not out.exists()  # the writer made it, and takes it away again


def test_leaving_without_commit_leaves_nothing(tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    with BundleWriter(out, "tiny-0.1.0-cpu") as w:
        (w.staging / "README.md").write_text("x")
    assert list(out.iterdir()) == []  # a directory that was there stays


def test_a_failed_write_removes_only_the_empty_directories_it_made(tmp_path):
    nested = tmp_path / "a" / "b" / "dist"
    with BundleWriter(nested, "tiny-0.1.0-cpu"):
        assert nested.is_dir()
    assert list(tmp_path.iterdir()) == []  # --out a/b/dist: all three were made, all three go
    bundle = write_bundle(tmp_path / "dist")  # a directory that holds another bundle stays
    with BundleWriter(tmp_path / "dist" / "more", "other-0.1.0-cpu") as w:
        (w.staging / "README.md").write_text("x")
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [bundle.name]


def test_a_writer_that_cannot_start_removes_the_directories_it_made(tmp_path, monkeypatch):
    import errno

    import edgepack.bundle.writer as writer

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writer.tempfile, "mkdtemp", refused)
    with pytest.raises(UsageError, match="is not writable: Permission denied"):
        with BundleWriter(tmp_path / "a" / "dist", "tiny-0.1.0-cpu"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_staging_is_hidden_and_bundle_appears_only_at_commit(tmp_path):
    out = tmp_path / "dist"
    with BundleWriter(out, "tiny-0.1.0-cpu") as w:
        assert w.staging.name.startswith(".tiny-0.1.0-cpu.partial-")
        (w.staging / "README.md").write_text("x")
        assert not (out / "tiny-0.1.0-cpu").exists()
        final = w.commit(valid_manifest())
    assert final == out / "tiny-0.1.0-cpu"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-0.1.0-cpu"]
    assert not w.staging.exists()


def test_commit_writes_the_manifest_last_then_renames(tmp_path, monkeypatch):
    seen = []
    real_rename = os.rename
    real_renameat2 = writer_module._renameat2

    def record(src, dst):
        src = Path(src)
        seen.append({
            "manifest": (src / MANIFEST).is_file(),
            "final_exists": Path(dst).exists(),
            "mtimes": {p.relative_to(src).as_posix(): p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file()},
        })

    def spy_rename(src, dst):
        record(src, dst)
        return real_rename(src, dst)

    def spy_renameat2(src, dst, flags):
        record(src, dst)
        try:
            return real_renameat2(src, dst, flags)
        except OSError:
            seen.pop()  # renameat2 unsupported here: the writer falls back to os.rename
            raise

    monkeypatch.setattr(writer_module.os, "rename", spy_rename)
    monkeypatch.setattr(writer_module, "_renameat2", spy_renameat2)
    final = write_bundle(tmp_path / "dist")
    assert len(seen) == 1
    assert seen[0]["manifest"] and not seen[0]["final_exists"]
    mtimes = seen[0]["mtimes"]
    assert mtimes[MANIFEST] >= max(t for rel, t in mtimes.items() if rel != MANIFEST)
    assert (final / MANIFEST).is_file()


def test_files_list_is_sorted_complete_and_correct(bundle):
    manifest = load_manifest(bundle)
    entries = manifest["files"]
    paths = [e["path"] for e in entries]
    assert paths == sorted(paths)
    assert paths == sorted(FILES)
    assert MANIFEST not in paths
    for entry in entries:
        data = FILES[entry["path"]]
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_commit_keeps_the_manifest_it_was_given(bundle):
    manifest = load_manifest(bundle)
    expected = dict(valid_manifest(), files=manifest["files"], content=manifest["content"])
    assert manifest == expected


def test_commit_records_the_content_digest_of_the_final_files(bundle):
    manifest = load_manifest(bundle)
    assert manifest["content"] == {"scheme": CONTENT_SCHEME, "digest": content_digest(manifest)}
    assert content_failures(manifest) == []


def test_file_modes_are_0644_and_dirs_0755(bundle):
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o755
    for path in bundle.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), path


def test_manifest_on_disk_is_canonical(bundle):
    raw = (bundle / MANIFEST).read_bytes()
    assert raw == canonical_json(json.loads(raw))


def test_existing_bundle_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "dist"
    existing = out / "tiny-0.1.0-cpu"
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("old")
    with pytest.raises(UsageError, match=r"tiny-0.1.0-cpu already exists"):
        with BundleWriter(out, "tiny-0.1.0-cpu"):
            pass
    assert (existing / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["tiny-0.1.0-cpu"]


def test_overwrite_replaces_an_existing_bundle(tmp_path):
    out = tmp_path / "dist"
    write_bundle(out, files={"old.txt": b"old"})
    with BundleWriter(out, "tiny-0.1.0-cpu", overwrite=True) as w:
        (w.staging / "new.txt").write_text("new")
        final = w.commit(valid_manifest())
    assert not (final / "old.txt").exists()
    assert [e["path"] for e in load_manifest(final)["files"]] == ["new.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["tiny-0.1.0-cpu"]


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "dist"
    out.write_text("not a dir")
    with pytest.raises(UsageError, match="is not a directory"):
        with BundleWriter(out, "tiny-0.1.0-cpu"):
            pass


# ---------------------------------------------------------------------------------------------
# canonical JSON


def test_canonical_json_is_byte_stable():
    a = {"b": 1, "a": {"z": [3, 2, 1], "y": "café"}, "c": 0.1}
    b = {"c": 0.1, "a": {"y": "café", "z": [3, 2, 1]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json(a) == canonical_json(json.loads(canonical_json(a)))
    text = canonical_json(a).decode("utf-8")
    assert text.endswith("}\n")
    assert "café" in text  # UTF-8, not \u escapes
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert text.index('"y"') < text.index('"z"')


# ---------------------------------------------------------------------------------------------
# integrity


def test_untouched_bundle_has_no_integrity_failures(bundle):
    assert integrity_failures(bundle, load_manifest(bundle)) == []
    manifest, failures = check_integrity(bundle)
    assert failures == [] and manifest["format"] == FORMAT


def test_changed_byte_is_named(bundle):
    path = bundle / "model/weights.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    failures = integrity_failures(bundle, load_manifest(bundle))
    assert [(f.check, f.path) for f in failures] == [("files", "model/weights.bin")]
    assert "sha256" in failures[0].detail


def test_changed_size_is_named(bundle):
    with open(bundle / "README.md", "ab") as handle:
        handle.write(b"more")
    failures = integrity_failures(bundle, load_manifest(bundle))
    assert [f.path for f in failures] == ["README.md"]
    assert "size" in failures[0].detail


def test_missing_file_is_named(bundle):
    (bundle / "smoke/tolerances.json").unlink()
    failures = integrity_failures(bundle, load_manifest(bundle))
    assert [f.path for f in failures] == ["smoke/tolerances.json"]
    assert "missing" in failures[0].detail


def test_added_file_is_named(bundle):
    (bundle / "model/extra.bin").write_bytes(b"sneaky")
    failures = integrity_failures(bundle, load_manifest(bundle))
    assert [f.path for f in failures] == ["model/extra.bin"]
    assert "not listed" in failures[0].detail


def test_added_directory_is_named(bundle):
    (bundle / "extra").mkdir()
    (bundle / "extra/payload.sh").write_text("echo hi")
    paths = {f.path for f in integrity_failures(bundle, load_manifest(bundle))}
    assert "extra/payload.sh" in paths


def test_file_replaced_by_symlink_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(FILES["model/weights.bin"])
    (bundle / "model/weights.bin").unlink()
    (bundle / "model/weights.bin").symlink_to(outside)
    failures = integrity_failures(bundle, load_manifest(bundle))
    assert [f.path for f in failures] == ["model/weights.bin"]


def test_manifest_path_escaping_the_bundle_is_refused(bundle):
    manifest = load_manifest(bundle)
    manifest["files"].append({"path": "../secret", "size": 1, "sha256": "0" * 64})
    failures = integrity_failures(bundle, manifest)
    assert [(f.path, f.detail) for f in failures] == [("../secret", "path escapes the bundle directory")]


def test_read_verified_names_the_first_file_at_fault(bundle):
    (bundle / "model/config.json").write_bytes(b'{"model_type": "roberta"}\n')
    with pytest.raises(VerificationError, match=r"model/config.json: size expected"):
        read_verified(bundle)


# ---------------------------------------------------------------------------------------------
# format version and schema


@pytest.mark.parametrize("version", ["2.0", "0.9", "10.0", "banana"])
def test_unknown_major_format_version_is_refused(bundle, version):
    manifest = load_manifest(bundle)
    manifest["format_version"] = version
    rewrite_manifest(bundle, manifest)
    parsed, failures = read_manifest(bundle)
    assert parsed is None
    assert [(f.check, f.path) for f in failures] == [("format_version", "manifest.json:format_version")]
    assert f"bundle format {version} is not supported" in failures[0].detail
    assert "reads format 1.x" in failures[0].detail
    with pytest.raises(VerificationError, match=f"format {version} is not supported"):
        read_verified(bundle)


def test_newer_minor_format_version_is_read(bundle):
    manifest = load_manifest(bundle)
    manifest["format_version"] = "1.7"
    rewrite_manifest(bundle, manifest)
    parsed, failures = read_manifest(bundle)
    assert failures == [] and parsed["format_version"] == "1.7"


def test_verify_reports_unknown_format_version(bundle):
    manifest = load_manifest(bundle)
    manifest["format_version"] = "2.0"
    rewrite_manifest(bundle, manifest)
    report = verify(bundle)
    assert not report.ok
    assert report.to_json()["failures"][0]["check"] == "format_version"


def test_valid_manifest_has_no_schema_failures():
    assert schema_failures(finished_manifest()) == []


def test_content_digest_is_required_from_format_1_1_and_optional_before():
    manifest = finished_manifest()
    del manifest["content"]
    assert [(f.path, f.detail) for f in schema_failures(manifest)] == [
        ("manifest.json:content", "required key is missing (format 1.1 and later manifests carry a content digest)")]
    assert schema_failures(dict(manifest, format_version="1.0")) == []


@pytest.mark.parametrize("content, key", [
    ({"scheme": "edgepack-content/9", "digest": "sha256:" + "0" * 64}, "content.scheme"),
    ({"scheme": "edgepack-content/1", "digest": "0" * 64}, "content.digest"),
    ({"scheme": "edgepack-content/1", "digest": "sha512:" + "0" * 64}, "content.digest"),
    ({"digest": "sha256:" + "0" * 64}, "content.scheme"),
])
def test_malformed_content_section_is_named(content, key):
    failures = schema_failures(dict(finished_manifest(), content=content))
    assert [f.path for f in failures] == [f"manifest.json:{key}"]


def test_content_digest_covers_content_and_not_the_record_of_the_build():
    base = finished_manifest(files=[{"path": "model/a.bin", "size": 1, "sha256": "a" * 64},
                                    {"path": "README.md", "size": 1, "sha256": "b" * 64}])
    digest = content_digest(base)
    varying = copy.deepcopy(base)
    varying["bundle"]["created"] = "2030-01-01T00:00:00+00:00"
    varying["memory"]["measured_peak_bytes"] = 12345
    varying["budget"]["bytes_per_device"] = 999
    varying["source"]["model"] = "/elsewhere/tiny"
    varying["producer"]["torch"] = "9"
    varying["files"][1]["sha256"] = "c" * 64  # the model card reports measurements
    assert content_digest(varying) == digest
    for change in (lambda m: m["files"][0].update(sha256="d" * 64), lambda m: m["plan"].append(
            {"plugin": "quantize", "version": "0.1.0", "options": {}}), lambda m: m["workload"].update(seq_len=9),
            lambda m: m["bundle"].update(version="0.2.0"), lambda m: m["target"].update(options={"threads": 1})):
        changed = copy.deepcopy(base)
        change(changed)
        assert content_digest(changed) != digest
        assert content_differences(base, changed)
    assert content_differences(base, varying) == []


@pytest.mark.parametrize("key", ["format_version", "plan", "memory", "files", "fidelity", "smoke"])
def test_missing_top_level_key_is_named(key):
    manifest = dict(valid_manifest(), files=[])
    del manifest[key]
    paths = [(f.path, f.detail) for f in schema_failures(manifest)]
    assert (f"manifest.json:{key}", "required key is missing") in paths


@pytest.mark.parametrize("key, sub", [("memory", "scope"), ("bundle", "version"), ("fidelity", "floor"),
                                      ("producer", "plugins"), ("budget", "source")])
def test_missing_nested_key_is_named(key, sub):
    manifest = copy.deepcopy(finished_manifest())
    del manifest[key][sub]
    failures = schema_failures(manifest)
    assert [(f.path, f.detail) for f in failures] == [(f"manifest.json:{key}.{sub}", "required key is missing")]


def test_wrong_types_and_format_are_named():
    manifest = dict(valid_manifest(), files=[{"path": "x"}], plan={}, format="zip")
    paths = {f.path: f.detail for f in schema_failures(manifest)}
    assert paths["manifest.json:plan"] == "must be a JSON list"
    assert "manifest.json:format" in paths
    assert paths["manifest.json:files[0]"] == "needs path, size and sha256"
    assert schema_failures([1, 2]) and schema_failures([1, 2])[0].path == MANIFEST


def test_schema_failure_stops_check_integrity(bundle):
    manifest = load_manifest(bundle)
    del manifest["memory"]["scope"]
    rewrite_manifest(bundle, manifest)
    parsed, failures = check_integrity(bundle)
    assert parsed is None
    assert [f.path for f in failures] == ["manifest.json:memory.scope"]


def test_not_json_and_no_manifest(bundle, tmp_path):
    (bundle / MANIFEST).write_text("{nope")
    parsed, failures = read_manifest(bundle)
    assert parsed is None and "not valid JSON" in failures[0].detail
    empty = tmp_path / "empty"
    empty.mkdir()
    parsed, failures = read_manifest(empty)
    assert parsed is None and "it is not a bundle" in failures[0].detail


def test_open_path_refuses_missing_and_plain_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        open_path(tmp_path / "nowhere")
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(UsageError, match="neither a bundle directory nor"):
        open_path(plain)


# ---------------------------------------------------------------------------------------------
# archives


def test_archive_is_deterministic(bundle):
    first = create_archive(bundle).read_bytes()
    for path in bundle.rglob("*"):  # times must not matter
        os.utime(path, (1_000_000_000, 1_000_000_000))
    second_path = create_archive(bundle)
    assert second_path == bundle.with_name(bundle.name + ".tar.gz")
    assert second_path.read_bytes() == first
    assert not list(bundle.parent.glob("*.partial"))


def test_archive_members_are_sorted_and_anonymous(bundle):
    archive = create_archive(bundle)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == bundle.name
    assert all(n == bundle.name or n.startswith(bundle.name + "/") for n in names)
    assert f"{bundle.name}/{MANIFEST}" in names
    for m in members:
        assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
        assert m.mode == (0o755 if m.isdir() else 0o644)


def test_archive_round_trip(bundle, tmp_path):
    archive = create_archive(bundle)
    root = safe_extract(archive, tmp_path / "x")
    assert root == tmp_path / "x" / bundle.name
    manifest, failures = check_integrity(root)
    assert failures == []
    assert (root / "model/weights.bin").read_bytes() == FILES["model/weights.bin"]
    opened = open_path(archive)  # the reader extracts archives itself
    assert check_integrity(opened)[1] == []


def _tar(path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]], listed: list[str]) -> Path:
    """A bundle tar by hand: top dir ``b``, a manifest listing ``listed``, then ``extra``."""
    manifest = json.dumps({"files": [{"path": p, "size": 1, "sha256": "0" * 64} for p in listed]}).encode()
    with tarfile.open(path, "w") as tar:
        top = tarfile.TarInfo("b")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        info = tarfile.TarInfo(f"b/{MANIFEST}")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        ok = tarfile.TarInfo("b/ok.txt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"1"))
        for member, data in extra:
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return path


def _file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"evil"


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_handmade_clean_tar_extracts(tmp_path):
    archive = _tar(tmp_path / "clean.tar", [], ["ok.txt"])
    root = safe_extract(archive, tmp_path / "dest")
    assert (root / "ok.txt").read_bytes() == b"1"


@pytest.mark.parametrize("member, listed, fragment", [
    (_link("b/link", "/etc/passwd", tarfile.SYMTYPE), ["ok.txt", "link"], "not a regular file"),
    (_link("b/hard", "b/ok.txt", tarfile.LNKTYPE), ["ok.txt", "hard"], "not a regular file"),
    (_file("b/../evil.txt"), ["ok.txt", "../evil.txt"], "unsafe path"),
    (_file("b/model/../../evil.txt"), ["ok.txt", "model/../../evil.txt"], "unsafe path"),
    (_file("b//tmp/evil.txt"), ["ok.txt", "/tmp/evil.txt"], "unsafe path"),
    (_file("/tmp/evil.txt"), ["ok.txt"], "exactly one bundle directory"),
    (_file("../evil.txt"), ["ok.txt"], "exactly one bundle directory"),
    (_file("b/unlisted.txt"), ["ok.txt"], "'b/unlisted.txt' is not named in the manifest"),
], ids=["symlink", "hardlink", "dotdot", "nested-dotdot", "absolute-inner", "absolute", "dotdot-top", "unlisted"])
def test_safe_extract_refuses_before_writing_anything(tmp_path, member, listed, fragment):
    archive = _tar(tmp_path / "bad.tar", [member], listed)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(VerificationError) as info:
        safe_extract(archive, dest)
    assert fragment in str(info.value)
    assert not dest.exists()
    assert not (tmp_path / "deep" / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_a_tar_without_manifest(tmp_path):
    archive = tmp_path / "nomanifest.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("b/ok.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(VerificationError, match=f"holds no b/{MANIFEST}"):
        safe_extract(archive, tmp_path / "dest")


def test_safe_extract_refuses_a_non_tar(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all")
    with pytest.raises(VerificationError, match="not a readable tar archive"):
        safe_extract(junk, tmp_path / "dest")
