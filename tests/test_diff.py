"""``edgepack diff`` (issue 15, item 3): content differences decide the exit code; the record of
each build (fidelity, memory, versions, time) is shown beside them. Bundles are built by hand
as in test_bundle_hardening.py, so no model is packed."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import assert_one_error_line
from test_bundle_hardening import NAME, _files, make_bundle
from edgepack.bundle.archive import create_archive
from edgepack.bundle.diff import diff_bundles
from edgepack.cli import cli


def _diff(a, b):
    result = CliRunner().invoke(cli, ["diff", str(a), str(b), "--json"])
    return result.exit_code, json.loads(result.stdout.splitlines()[-1]), result


def test_same_content_with_another_record_is_identical(tmp_path):
    a = make_bundle(tmp_path / "a" / NAME)
    b = make_bundle(tmp_path / "b" / NAME, mutate=lambda m: (
        m["memory"].update(measured_peak_bytes=12), m["fidelity"].update(value=0.995),
        m["bundle"].update(created="2030-01-01T00:00:00+00:00"), m["producer"].update(torch="9.9")))
    code, report, _ = _diff(a, create_archive(b))  # a directory against an archive
    assert code == 0 and report["identical"] and report["content"] == [] and report["files"] == []
    assert {r["field"]: (r["a"], r["b"]) for r in report["record"]} == {
        "fidelity": (1.0, 0.995), "measured peak bytes": (None, 12), "torch": ("2", "9.9"),
        "created": ("2024-01-01T00:00:00+00:00", "2030-01-01T00:00:00+00:00")}
    text = CliRunner().invoke(cli, ["diff", str(a), str(b)]).stdout
    assert "content identical" in text and "fidelity" in text and "1.0 -> 0.995" in text


def test_a_changed_plan_and_a_changed_file_are_reported_and_exit_1(tmp_path):
    files = _files()
    a = make_bundle(tmp_path / "a" / NAME, files=files)
    changed = dict(files, **{"model/config.json": b'{"model_type": "bert", "hidden_size": 8}\n'})
    b = make_bundle(tmp_path / "b" / NAME, files=changed,
                    mutate=lambda m: m["plan"][0]["options"].update(dtype="fp16"))
    code, report, _ = _diff(a, b)
    assert code == 1 and not report["identical"]
    assert report["content_digest"]["a"] != report["content_digest"]["b"]
    keys = [c["key"] for c in report["content"]]
    assert keys == ["plan", "model/config.json"]
    assert "precision:dtype=bf16 (0.1.0) against precision:dtype=fp16 (0.1.0)" == report["content"][0]["detail"]
    assert report["files"] == [{"path": "model/config.json", "size_a": len(files["model/config.json"]),
                                "size_b": len(changed["model/config.json"])}]
    text = CliRunner().invoke(cli, ["diff", str(a), str(b)]).stdout
    assert "content differs" in text and "plan: precision:dtype=bf16" in text and "model/config.json" in text


def test_a_file_only_in_one_bundle(tmp_path):
    files = _files()
    a = make_bundle(tmp_path / "a" / NAME, files=files)
    b = make_bundle(tmp_path / "b" / NAME, files=dict(files, **{"model/extra.json": b"{}\n"}))
    result = diff_bundles(a, b)
    assert not result.identical
    assert result.content == [("model/extra.json", "only in the second bundle")]
    assert result.sizes == {"model/extra.json": (None, 3)}


def test_diff_refuses_a_bundle_that_fails_its_integrity_check(tmp_path):
    a = make_bundle(tmp_path / "a" / NAME)
    b = make_bundle(tmp_path / "b" / NAME)
    (b / "model" / "config.json").write_bytes(b"{}\n")
    result = CliRunner().invoke(cli, ["diff", str(a), str(b)])
    assert_one_error_line(result, 1, "integrity check", "model/config.json")
