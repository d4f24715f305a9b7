"""Bundles as pytest items (issue 15, item 5): ``pytest --edgepack-bundle PATH`` or collecting a
bundle directory reports each of verify's checks as a test. Hand-made bundles with the fake
probe of test_bundle_hardening.py, run in-process, so no model is loaded."""

from __future__ import annotations

import pytest

from test_bundle_hardening import NAME, make_bundle

pytest_plugins = ["pytester"]

CHECKS = ("integrity", "content", "signature", "weights", "load", "smoke", "memory")


@pytest.fixture
def fake_probe(monkeypatch):
    """The fresh-process probe replaced: the "model" reproduces the golden outputs exactly."""
    from pathlib import Path

    from safetensors.torch import load_file

    import edgepack.smoke

    def fake(bundle_dir, **kwargs):
        return edgepack.smoke.ProbeResult(10, "test scope", load_file(Path(bundle_dir) / "smoke/expected.safetensors"), 0.0)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", fake)


@pytest.fixture(autouse=True)
def imported_first(tmp_path_factory, fake_probe):
    """An in-process pytester run puts sys.modules back as it found them afterwards; torch and
    the libraries verify imports cannot be imported twice in one process, so a signed bundle is
    verified here first, and the inner runs find every module already imported."""
    from edgepack.bundle.signing import keygen, sign
    from edgepack.bundle.verify import verify

    root = tmp_path_factory.mktemp("warm")
    bundle = make_bundle(root / NAME)
    key = keygen(root / "warm")
    sign(bundle, key.private)
    assert verify(bundle, keys=[key.public]).ok


def test_each_check_of_an_intact_bundle_is_a_passing_test(pytester, tmp_path, fake_probe):
    bundle = make_bundle(tmp_path / "dist" / NAME)
    result = pytester.runpytest("-p", "no:cacheprovider", "--edgepack-bundle", str(bundle), "-v")
    result.assert_outcomes(passed=len(CHECKS))
    for check in CHECKS:
        result.stdout.fnmatch_lines([f"*edgepack-bundle*{check} PASSED*"])


def test_a_tampered_bundle_fails_its_integrity_item_readably_and_skips_the_rest(pytester, tmp_path, fake_probe):
    bundle = make_bundle(tmp_path / "dist" / NAME)
    (bundle / "model" / "config.json").write_bytes(b'{"model_type": "gpt2"}\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "--edgepack-bundle", str(bundle), "-rs")
    result.assert_outcomes(failed=1, passed=1, skipped=len(CHECKS) - 2)  # the signature is checked regardless
    result.stdout.fnmatch_lines(["*integrity failed*", "*files?*model/config.json: sha256 expected*",
                                 "*not run: an earlier check failed*"])
    assert "Traceback" not in result.stdout.str()


def test_collecting_a_bundle_directory_runs_its_checks(pytester, tmp_path, fake_probe):
    bundle = make_bundle(tmp_path / "dist" / NAME)
    pytester.runpytest("-p", "no:cacheprovider", str(bundle)).assert_outcomes(passed=len(CHECKS))


def test_a_required_key_fails_the_signature_item(pytester, tmp_path, fake_probe):
    from edgepack.bundle.signing import keygen

    bundle = make_bundle(tmp_path / "dist" / NAME)
    (tmp_path / "keys").mkdir()
    key = keygen(tmp_path / "keys" / "release")
    result = pytester.runpytest("-p", "no:cacheprovider", "--edgepack-bundle", str(bundle),
                                "--edgepack-key", str(key.public))
    result.assert_outcomes(passed=2, failed=1, skipped=4)  # integrity and content pass; signature fails
    result.stdout.fnmatch_lines(["*signature failed*", "*unsigned*"])


def test_a_missing_bundle_is_a_usage_error(pytester, tmp_path):
    result = pytester.runpytest("-p", "no:cacheprovider", "--edgepack-bundle", str(tmp_path / "nope"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--edgepack-bundle*no such bundle*"])
