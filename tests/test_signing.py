"""Bundle signatures (issue 11, item 3): keygen, sign, verify --key / --min-version.

Bundles are built by hand as in test_bundle_hardening.py (files plus a canonical manifest) and
verified with its fake probe, so these tests stay fast; none of them packs a model.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import assert_one_error_line
from test_bundle_hardening import NAME, make_bundle
import edgepack.smoke
from edgepack.bundle import signing
from edgepack.bundle.archive import create_archive
from edgepack.bundle.manifest import MANIFEST, SIGNATURE, canonical_json
from edgepack.bundle.reader import check_integrity
from edgepack.bundle.signing import check, keygen, load_private_key, load_public_key, sign, write_signature
from edgepack.bundle.verify import verify
from edgepack.bundle.writer import BundleWriter
from edgepack.cli import cli
from edgepack.errors import UsageError, VerificationError

PAST = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_bundle(tmp_path / "dist" / NAME)


@pytest.fixture
def fake_probe(monkeypatch):
    """The fresh-process probe replaced as in test_bundle_hardening: the "model" reproduces the
    golden outputs exactly."""
    from safetensors.torch import load_file

    def fake(bundle_dir: Path, **kwargs: object) -> edgepack.smoke.ProbeResult:
        outputs = load_file(Path(bundle_dir) / "smoke/expected.safetensors")
        return edgepack.smoke.ProbeResult(10, "test scope", outputs, 0.0)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", fake)


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: ``release`` and ``other``."""
    (tmp_path / "keys").mkdir()
    return keygen(tmp_path / "keys" / "release"), keygen(tmp_path / "keys" / "other")


def _signature(bundle: Path) -> dict:
    return json.loads((bundle / SIGNATURE).read_text(encoding="utf-8"))


def _rewrite_signature(bundle: Path, document: dict) -> None:
    (bundle / SIGNATURE).write_bytes(canonical_json(document))


def _failure(report, check_name: str = "signature") -> str:
    details = [f.detail for f in report.failures if f.check == check_name]
    assert details, report.failures
    assert all("\n" not in d for d in details)
    return details[0]


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_writes_a_private_0600_key_and_a_public_key(tmp_path):
    files = keygen(tmp_path / "release")
    assert files.private == tmp_path / "release.key" and files.public == tmp_path / "release.pub"
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in files.private.read_bytes() and b"PUBLIC KEY" in files.public.read_bytes()
    public = load_public_key(files.public)
    assert files.fingerprint == public.fingerprint and len(files.fingerprint) == 16
    assert signing.fingerprint(public.raw) == files.fingerprint
    load_private_key(files.private)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release.key", "release.pub"]  # no partial files


def test_public_key_fast_path_reads_what_cryptography_reads(tmp_path):
    """verify reads keygen's PEM without cryptography's PEM parser (it costs ~30 ms to import)."""
    from cryptography.hazmat.primitives import serialization

    files = keygen(tmp_path / "release")
    parsed = serialization.load_pem_public_key(files.public.read_bytes())
    raw = parsed.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signing._pem_ed25519_raw(files.public.read_bytes()) == raw == load_public_key(files.public).raw
    assert signing._pem_ed25519_raw(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n") is None


@pytest.mark.parametrize("existing", ["release.key", "release.pub"])
def test_keygen_refuses_to_overwrite(tmp_path, existing):
    (tmp_path / existing).write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists; keygen never replaces a key"):
        keygen(tmp_path / "release")
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing half-written


def test_cli_keygen_prints_the_fingerprint_and_refuses_overwrite(tmp_path):
    result = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k"), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["fingerprint"] == load_public_key(tmp_path / "k.pub").fingerprint
    assert f"fingerprint  {printed['fingerprint']}" in result.stdout
    again = CliRunner().invoke(cli, ["keygen", "--out", str(tmp_path / "k")])
    assert_one_error_line(again, 2, "k.key", "already exists")


# ---------------------------------------------------------------------------------------------
# sign and verify


def test_sign_then_verify_with_the_trusted_key(tiny, keys, fake_probe):
    release, _ = keys
    manifest_before = (tiny / MANIFEST).read_bytes()
    document = sign(tiny, release.private)
    assert (tiny / MANIFEST).read_bytes() == manifest_before  # the signature lives beside the manifest
    assert document["key"] == release.fingerprint and document["algorithm"] == "ed25519"
    assert stat.S_IMODE((tiny / SIGNATURE).stat().st_mode) == 0o644
    assert check_integrity(tiny)[1] == []  # the signature file is the one unlisted file accepted
    report = verify(tiny, keys=[release.public])
    assert report.ok, report.failures
    assert report.signature["state"] == "trusted" and report.signature["key"] == release.fingerprint
    assert report.to_json()["signature"]["trusted_keys"] == [release.fingerprint]
    assert not any(p.name.endswith(".partial") for p in tiny.parent.rglob("*"))


def test_any_of_several_trusted_keys_may_have_signed(tiny, keys, fake_probe):
    release, other = keys
    sign(tiny, other.private)
    assert verify(tiny, keys=[release.public, other.public]).ok


def test_tampered_manifest_after_signing_fails(tiny, keys, fake_probe):
    release, _ = keys
    sign(tiny, release.private)
    manifest = json.loads((tiny / MANIFEST).read_text())
    manifest["fidelity"]["value"] = 0.5  # a change no file hash notices
    (tiny / MANIFEST).write_bytes(canonical_json(manifest))
    assert check_integrity(tiny)[1] == []
    report = verify(tiny, keys=[release.public])
    assert not report.ok and "changed after it was signed" in _failure(report)
    assert verify(tiny).ok is False  # a signature that is present must hold, with or without --key


@pytest.mark.parametrize("field, value", [
    ("signature", None),  # one byte of the signature flipped
    ("expires", "2999-01-01T00:00:00+00:00"),  # an expiry changed or added after signing
    ("signed_at", "2030-01-01T00:00:00+00:00"),
])
def test_tampered_signature_file_fails(tiny, keys, fake_probe, field, value):
    release, _ = keys
    sign(tiny, release.private)
    document = _signature(tiny)
    if field == "signature":
        raw = bytearray(base64.b64decode(document["signature"]))
        raw[0] ^= 1
        value = base64.b64encode(bytes(raw)).decode()
    document[field] = value
    _rewrite_signature(tiny, document)
    report = verify(tiny, keys=[release.public])
    assert "does not verify" in _failure(report)


def test_removing_the_expiry_breaks_the_signature(tiny, keys):
    release, _ = keys
    sign(tiny, release.private, expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1))
    document = _signature(tiny)
    document["expires"] = None
    _rewrite_signature(tiny, document)
    assert check(tiny, [release.public]).state == "failed"


def test_signature_by_another_key_fails(tiny, keys, fake_probe):
    release, other = keys
    sign(tiny, other.private)
    report = verify(tiny, keys=[release.public])
    detail = _failure(report)
    assert other.fingerprint in detail and "not a trusted key" in detail and release.fingerprint in detail


def test_resigning_with_another_key_and_its_public_key_swapped_in_fails(tiny, keys):
    """An attacker who re-signs with their own key cannot pass --key."""
    release, other = keys
    sign(tiny, release.private)
    sign(tiny, other.private)  # replaces the signature
    assert check(tiny, [release.public]).state == "failed"
    assert check(tiny, [other.public]).state == "trusted"


def test_expired_signature_fails(tiny, keys, fake_probe):
    release, _ = keys
    sign(tiny, release.private, now=PAST, expires=PAST + dt.timedelta(days=1))
    report = verify(tiny, keys=[release.public])
    assert "expired at 2020-01-02" in _failure(report)
    assert not verify(tiny).ok  # expiry is the signer's word: it holds without --key too
    assert check(tiny, [release.public], now=PAST + dt.timedelta(hours=1)).state == "trusted"


def test_unsigned_bundle_with_a_key_fails(tiny, keys, fake_probe):
    release, _ = keys
    report = verify(tiny, keys=[release.public])
    assert "unsigned" in _failure(report) and release.fingerprint in _failure(report)


def test_unsigned_bundle_without_a_key_verifies_and_says_unsigned(tiny, fake_probe):
    report = verify(tiny)
    assert report.ok and report.signature["state"] == "unsigned"
    result = CliRunner().invoke(cli, ["verify", str(tiny)])
    assert result.exit_code == 0 and "signature unsigned" in result.stdout


def test_signed_bundle_without_a_key_names_the_key_but_is_not_trusted(tiny, keys, fake_probe):
    release, _ = keys
    sign(tiny, release.private)
    report = verify(tiny)
    assert report.ok and report.signature["state"] == "signed"
    detail = report.signature["detail"]
    assert release.fingerprint in detail and "not checked against a trusted key" in detail


@pytest.mark.parametrize("junk, needle", [
    ("link", "not a regular file"),
    ("not json", "not valid JSON"),
    ("algorithm", "algorithm 'rsa' is not supported"),
    ("unknown key", "unknown key 'comment'"),
    ("duplicate key", "appears twice"),
    ("key mismatch", "is not the fingerprint of its public_key"),
    ("huge", f"more than the {signing.MAX_SIGNATURE_BYTES} a signature file may have"),
])
def test_malformed_signature_file_is_one_failure(tiny, keys, fake_probe, junk, needle):
    release, _ = keys
    sign(tiny, release.private)
    document = _signature(tiny)
    file = tiny / SIGNATURE
    if junk == "link":
        file.unlink()
        target = tiny.parent / "elsewhere.json"
        target.write_bytes(canonical_json(document))
        file.symlink_to(target)
    elif junk == "not json":
        file.write_text("{signature")
    elif junk == "algorithm":
        _rewrite_signature(tiny, dict(document, algorithm="rsa"))
    elif junk == "unknown key":
        _rewrite_signature(tiny, dict(document, comment="hi"))
    elif junk == "huge":
        file.write_bytes(canonical_json(dict(document, padding="x" * signing.MAX_SIGNATURE_BYTES)))
    elif junk == "duplicate key":
        file.write_text(canonical_json(document).decode().replace('"key":', '"key": "0000000000000000", "key":', 1))
    else:
        _rewrite_signature(tiny, dict(document, key="0" * 16))
    report = verify(tiny)
    assert not report.ok
    assert needle in _failure(report)


def test_only_the_signature_file_may_sit_unlisted(tiny):
    (tiny / "manifest.sig.json.bak").write_bytes(b"{}")
    failures = check_integrity(tiny)[1]
    assert [(f.path, f.detail) for f in failures] == [("manifest.sig.json.bak", "not listed in the manifest")]


def test_a_manifest_may_not_list_the_signature_file(tmp_path):
    from test_bundle_hardening import _files

    files = dict(_files(), **{SIGNATURE: b"{}"})
    bundle = make_bundle(tmp_path / NAME, files=files)
    _, failures = check_integrity(bundle)
    assert any(f.path.endswith(".path") and SIGNATURE in f.detail for f in failures), failures


def test_sign_refuses_a_bundle_that_fails_its_integrity_check(tiny, keys):
    release, _ = keys
    (tiny / "model/config.json").write_bytes(b"{}")
    with pytest.raises(VerificationError, match="failed its integrity check"):
        sign(tiny, release.private)
    assert not (tiny / SIGNATURE).exists()


def test_sign_refuses_a_manifest_not_in_canonical_form(tiny, keys):
    release, _ = keys
    manifest = json.loads((tiny / MANIFEST).read_text())
    (tiny / MANIFEST).write_text(json.dumps(manifest))  # valid, but not the canonical bytes
    with pytest.raises(VerificationError, match="not in canonical form"):
        sign(tiny, release.private)


# ---------------------------------------------------------------------------------------------
# --min-version (rollback)


@pytest.mark.parametrize("minimum, ok", [("0.2.0", False), ("0.1.0", True), ("0.1", True), ("0.0.9", True)])
def test_min_version(tiny, fake_probe, minimum, ok):
    report = verify(tiny, min_version=minimum)  # the hand-made bundle's version is 0.1.0
    assert report.ok is ok
    if not ok:
        assert "older than --min-version 0.2.0" in _failure(report, "version")


def test_malformed_min_version_is_bad_usage(tiny):
    with pytest.raises(UsageError, match="--min-version 'banana'"):
        verify(tiny, min_version="banana")
    assert_one_error_line(CliRunner().invoke(cli, ["verify", str(tiny), "--min-version", "banana"]), 2, "--min-version")


# ---------------------------------------------------------------------------------------------
# Key files


@pytest.mark.parametrize("kind, needle", [("garbage", "is not a PEM or OpenSSH private key"),
                                          ("missing", "does not exist"),
                                          ("public for signing", "is a public key"),
                                          ("rsa", "not an Ed25519 key")])
def test_bad_private_key_is_one_sentence(tiny, keys, tmp_path, kind, needle):
    release, _ = keys
    bad = tmp_path / "bad.key"
    if kind == "garbage":
        bad.write_bytes(b"not a key\n")
    elif kind == "public for signing":
        bad = release.public
    elif kind == "rsa":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        bad.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(UsageError) as info:
        sign(tiny, bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    result = CliRunner().invoke(cli, ["sign", str(tiny), "--key", str(bad)])
    assert_one_error_line(result, 2, "--key", str(bad), needle)
    assert not (tiny / SIGNATURE).exists()


@pytest.mark.parametrize("kind, needle", [("garbage", "is not a PEM or OpenSSH public key"),
                                          ("private for verifying", "is a private key")])
def test_bad_public_key_is_one_sentence(tiny, keys, tmp_path, kind, needle):
    release, _ = keys
    bad = tmp_path / "bad.pub"
    if kind == "garbage":
        bad.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    else:
        bad = release.private
    result = CliRunner().invoke(cli, ["verify", str(tiny), "--key", str(bad)])
    assert_one_error_line(result, 2, "--key", str(bad), needle)


def test_openssh_public_key_is_read(keys, tmp_path):
    from cryptography.hazmat.primitives import serialization

    release, _ = keys
    private = load_private_key(release.private)
    line = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "release_ssh.pub").write_bytes(line + b" release@build\n")
    assert load_public_key(tmp_path / "release_ssh.pub").fingerprint == release.fingerprint


# ---------------------------------------------------------------------------------------------
# CLI, archives, pack --sign


def test_cli_sign_and_verify_exit_codes(tiny, keys, fake_probe):
    release, other = keys
    signed = CliRunner().invoke(cli, ["sign", str(tiny), "--key", str(release.private), "--expires", "30"])
    assert signed.exit_code == 0, signed.output
    assert release.fingerprint in signed.stdout and "expires" in signed.stdout
    ok = CliRunner().invoke(cli, ["verify", str(tiny), "--key", str(other.public), "--key", str(release.public),
                                  "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["signature"]["state"] == "trusted"
    assert f"signed by trusted key {release.fingerprint}" in ok.stdout
    wrong = CliRunner().invoke(cli, ["verify", str(tiny), "--key", str(other.public), "--json"])
    assert wrong.exit_code == 1 and "Traceback" not in wrong.output
    report = json.loads(wrong.stdout.strip().splitlines()[-1])
    assert report["failures"][0]["check"] == "signature" and report["signature"]["state"] == "failed"
    rollback = CliRunner().invoke(cli, ["verify", str(tiny), "--min-version", "1.0.0"])
    assert rollback.exit_code == 1 and "older than --min-version" in rollback.stdout


@pytest.mark.parametrize("expires, needle", [("yesterday", "neither a number of days nor a date"),
                                             ("2001-01-01", "not in the future")])
def test_cli_sign_bad_expiry_is_bad_usage(tiny, keys, expires, needle):
    release, _ = keys
    result = CliRunner().invoke(cli, ["sign", str(tiny), "--key", str(release.private), "--expires", expires])
    assert_one_error_line(result, 2, "--expires", needle)
    assert not (tiny / SIGNATURE).exists()


def test_cli_sign_missing_bundle_is_bad_usage(tmp_path, keys):
    release, _ = keys
    result = CliRunner().invoke(cli, ["sign", str(tmp_path / "nope"), "--key", str(release.private)])
    assert_one_error_line(result, 2, "does not exist")


def test_sign_an_archive_repacks_it_in_one_rename(tiny, keys, fake_probe):
    release, _ = keys
    archive = create_archive(tiny)
    inode_before = archive.stat().st_ino
    sign(archive, release.private)
    assert archive.stat().st_ino != inode_before  # a new file renamed into place, not rewritten
    assert sorted(p.name for p in archive.parent.iterdir()) == sorted([NAME, archive.name])  # no leftovers
    report = verify(archive, keys=[release.public])
    assert report.ok, report.failures
    assert not (tiny / SIGNATURE).exists()  # only the archive was signed


def test_sign_refuses_an_uncompressed_tar(tiny, keys, tmp_path):
    import tarfile

    release, _ = keys
    tar_path = tmp_path / f"{NAME}.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tiny, arcname=NAME)
    with pytest.raises(UsageError, match="uncompressed .tar archive"):
        sign(tar_path, release.private)


def test_writer_signs_before_publishing(tmp_path, keys, fake_probe):
    """``pack --sign``'s path: the bundle appears signed, or not at all."""
    from test_bundle_hardening import _files, base_manifest

    release, _ = keys
    key = load_private_key(release.private)
    with BundleWriter(tmp_path / "dist", NAME) as writer:
        for rel, data in _files().items():
            (writer.staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (writer.staging / rel).write_bytes(data)
        final = writer.commit(base_manifest(), finish=lambda staging: write_signature(staging, key))
    assert verify(final, keys=[release.public]).ok
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [NAME]

    def fail(staging: Path) -> None:
        raise OSError(28, "No space left on device")

    from edgepack.bundle.writer import DiskFull

    with pytest.raises(DiskFull, match="no bundle was written"):  # a full disk while signing: one sentence
        with BundleWriter(tmp_path / "dist", "other-0.1.0-cpu") as writer:
            (writer.staging / "README.md").write_bytes(b"x")
            writer.commit(base_manifest(), finish=fail)
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == [NAME]  # nothing published


def test_pack_refuses_a_bad_sign_key_before_any_work(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(cli, ["pack", str(tmp_path / "no-model"), "--target", "cpu", "--sign", str(bad),
                                      "--out", str(tmp_path / "dist")])
    assert_one_error_line(result, 2, "--sign", str(bad))
    assert not (tmp_path / "dist").exists()


def test_help_and_unsigned_verify_do_not_import_cryptography(tiny):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from edgepack.cli import cli\n"
        "for args in (['--help'], ['verify', '--help'], ['sign', '--help'], ['keygen', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "from edgepack.bundle.signing import check\n"
        f"assert check({str(tiny)!r}).state == 'unsigned'\n"
        "print('cryptography' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.stdout.strip() == "False", out.stderr


def test_load_and_run_check_the_signature_before_loading(tiny, keys, monkeypatch):
    """``edgepack.load`` / ``edgepack run`` refuse what verify refuses about signatures, before
    anything is loaded: a bundle not signed by a trusted key, and a broken signature without
    keys; a good signature lets the load go on (here to a model loader that records it ran)."""
    import edgepack.runtime
    from edgepack.errors import VerificationError

    release, other = keys
    loaded = []
    monkeypatch.setattr(edgepack.runtime, "load_model_dir", lambda *a, **k: loaded.append(1) or (_Stop(), None))
    with pytest.raises(VerificationError, match="unsigned"):
        edgepack.runtime.load(tiny, keys=[release.public])
    sign(tiny, other.private)
    with pytest.raises(VerificationError, match="signature check"):
        edgepack.runtime.load(tiny, keys=[release.public])
    result = CliRunner().invoke(cli, ["run", str(tiny), "--key", str(release.public), "text"])
    assert_one_error_line(result, 1, "signature check", other.fingerprint)
    assert loaded == []
    with pytest.raises(_Stopped):  # signed by a trusted key: the model is loaded
        edgepack.runtime.load(tiny, keys=[release.public, other.public])
    document = _signature(tiny)
    document["signed_at"] = "2021-01-01T00:00:00+00:00"
    _rewrite_signature(tiny, document)
    with pytest.raises(VerificationError, match="signature check"):  # broken: refused with no keys too
        edgepack.runtime.load(tiny)
    assert loaded == [1]


class _Stopped(Exception):
    pass


class _Stop:
    def parameters(self):
        raise _Stopped
