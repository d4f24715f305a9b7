"""Reproducible bundles (issue 11, item 4): the same source, plan and versions give the same
content digest and byte-identical ``model/`` and ``smoke/`` files; ``edgepack rebuild`` re-runs
a bundle's recorded plan and names what differs; ``verify --digest`` pins an approved bundle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgepack
from edgepack.bundle.archive import create_archive
from edgepack.bundle.manifest import MANIFEST, canonical_json, content_digest, content_section, file_entries
from edgepack.cli import cli
from edgepack.testing import build_decoder, build_encoder

from conftest import assert_one_error_line

EPOCH = "1700000000"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return build_encoder(tmp_path_factory.mktemp("src") / "tiny-bert")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return build_decoder("llama", tmp_path_factory.mktemp("src") / "tiny-llama")


def _files(bundle: Path) -> dict[str, str]:
    """sha256 of every file under model/ and smoke/."""
    return {str(p.relative_to(bundle)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(bundle.rglob("*")) if p.is_file() and p.relative_to(bundle).parts[0] in ("model", "smoke")}


def _pack(model: Path, out: Path, apply: str, monkeypatch, **settings) -> edgepack.PackResult:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    target = "multi-gpu:devices=2" if apply.startswith("parallel") else "cpu"
    return edgepack.pack(model, target=target, apply=[apply], out=out, min_fidelity=0.0,
                         progress=lambda message: None, **settings)


@pytest.fixture(scope="module")
def int8_bundle(encoder, tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    try:
        return _pack(encoder, tmp_path_factory.mktemp("dist"), "quantize:scheme=int8", mp).bundle
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def rebuilt(int8_bundle, encoder, tmp_path_factory) -> tuple[dict, Path]:
    """``edgepack rebuild --json`` of the int8 bundle, the rebuilt bundle kept."""
    result = CliRunner().invoke(cli, ["rebuild", str(int8_bundle), "--source", str(encoder),
                                      "--out", str(tmp_path_factory.mktemp("rebuilt")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    return report, Path(report["kept"])


def test_rebuild_reproduces_the_content_byte_for_byte(int8_bundle, rebuilt):
    """A second pack (through ``rebuild``, which re-reads the recorded plan) has the same
    content digest and the same bytes in every model/ and smoke/ file; the manifests differ
    only in what the digest leaves out."""
    report, kept = rebuilt
    recorded = json.loads((int8_bundle / MANIFEST).read_text())["content"]["digest"]
    assert report["identical"] and report["differences"] == []
    assert report["recorded_digest"] == report["rebuilt_digest"] == recorded
    assert _files(kept) == _files(int8_bundle) and len(_files(kept)) == report["compared_files"]


def test_the_archive_of_a_bundle_is_byte_identical_each_time(int8_bundle, tmp_path):
    import shutil

    copy = tmp_path / int8_bundle.name
    shutil.copytree(int8_bundle, copy)
    first = create_archive(copy).read_bytes()
    (copy.parent / (copy.name + ".tar.gz")).unlink()
    for path in copy.rglob("*"):  # other times and modes on disk: the archive does not record them
        path.chmod(0o700 if path.is_dir() else 0o600)
    assert create_archive(copy).read_bytes() == first


def test_rebuild_names_a_changed_file_and_exits_1(int8_bundle, rebuilt, encoder, tmp_path, monkeypatch):
    """A bundle whose config was edited (manifest and digest made consistent, as a careless or
    hostile rebuild would) does not match its source's rebuild: that file alone is named."""
    import shutil

    import edgepack.pipeline

    changed = tmp_path / int8_bundle.name
    shutil.copytree(int8_bundle, changed)
    config = changed / "model" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"_edited": 1,\n  "hidden_act"', 1))
    manifest = json.loads((changed / MANIFEST).read_text())
    manifest["files"] = file_entries(changed)
    manifest["content"] = content_section(manifest)
    (changed / MANIFEST).write_bytes(canonical_json(manifest))
    _, kept = rebuilt
    rebuilt_manifest = json.loads((kept / MANIFEST).read_text())
    # the pack itself is the one the fixture ran: reuse its bundle rather than pack again
    monkeypatch.setattr(edgepack.pipeline, "pack_target", lambda session, request, **kw: edgepack.pipeline.PackResult(
        kept, rebuilt_manifest))
    result = CliRunner().invoke(cli, ["rebuild", str(changed), "--source", str(encoder), "--json"])
    assert result.exit_code == 1, result.output
    assert "DIFFERS" in result.stdout
    report = json.loads(result.stdout.splitlines()[-1])
    assert [d["key"] for d in report["differences"]] == ["model/config.json"]
    assert report["recorded_digest"] == manifest["content"]["digest"] != report["rebuilt_digest"]


def test_rebuild_refuses_another_source(int8_bundle, tmp_path):
    other = build_encoder(tmp_path / "other", seed=1)
    result = CliRunner().invoke(cli, ["rebuild", str(int8_bundle), "--source", str(other)])
    assert_one_error_line(result, 1, "is not the source", "source.sha256")


def test_verify_digest_pins_the_approved_bundle(int8_bundle, monkeypatch):
    import edgepack.smoke
    from safetensors.torch import load_file

    def fake(bundle_dir, **kwargs):  # the model reproduces its golden outputs: only the digest matters here
        return edgepack.smoke.ProbeResult(10, "test scope", load_file(Path(bundle_dir) / "smoke/expected.safetensors"), 0.0)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", fake)
    digest = json.loads((int8_bundle / MANIFEST).read_text())["content"]["digest"]
    ok = edgepack.verify(int8_bundle, digest=digest)
    assert ok.ok and ok.content_digest == digest and "content" in ok.checks
    other = "sha256:" + "0" * 64
    report = edgepack.verify(int8_bundle, digest=other)
    assert [(f.check, f.path) for f in report.failures] == [("content", "manifest.json:content.digest")]
    assert other in report.failures[0].detail and "load" not in report.checks
    result = CliRunner().invoke(cli, ["verify", str(int8_bundle), "--digest", "sha256:xyz"])
    assert_one_error_line(result, 2, "--digest", "not a content digest")


def test_verify_refuses_a_recorded_digest_the_content_does_not_give(int8_bundle, tmp_path):
    import shutil

    edited = tmp_path / int8_bundle.name
    shutil.copytree(int8_bundle, edited)
    manifest = json.loads((edited / MANIFEST).read_text())
    manifest["plan"][0]["options"]["scheme"] = "int4"  # the record says int4; the digest was of int8
    (edited / MANIFEST).write_bytes(canonical_json(manifest))
    report = edgepack.verify(edited)
    assert [(f.check, f.path) for f in report.failures] == [("content", "manifest.json:content.digest")]
    assert content_digest(manifest) in report.failures[0].detail


#: A plan of every built-in compressor, on the model kind it applies to (parallel on the
#: multi-gpu target, emulated on CPU ranks over gloo where no GPU is present). Each is packed twice.
PLANS = [
    ("encoder", "parallel:mode=tensor,ranks=2"),
    ("encoder", "precision:dtype=bf16"),
    ("encoder", "precision:dtype=fp16"),
    ("encoder", "quantize:scheme=int8-dynamic"),
    ("decoder", "quantize:scheme=int4,method=gptq"),
    ("decoder", "quantize:scheme=int8,head=true"),
    ("encoder", "prune:heads=0.25,ffn=0.25"),
    ("encoder", "prune:sparsity=0.5,method=wanda"),
    ("encoder", "sparsify:format=bitmask,sparsity=0.5"),
]


@pytest.mark.extended
@pytest.mark.parametrize("kind, plan", PLANS, ids=[p for _, p in PLANS])
def test_two_packs_of_every_builtin_plan_have_the_same_content(kind, plan, encoder, decoder, tmp_path, monkeypatch):
    model = encoder if kind == "encoder" else decoder
    first = _pack(model, tmp_path / "a", plan, monkeypatch)
    second = _pack(model, tmp_path / "b", plan, monkeypatch)
    assert first.manifest["content"] == second.manifest["content"]
    assert _files(first.bundle) == _files(second.bundle)
