"""A model with code of its own (issue 11, item 2): refused unless ``--allow-code``; then the
code is copied into the bundle with its hashes, declared in ``model.code``, and run by verify,
load and run only when they are given ``--allow-code`` too.

The test model's code rolls its output features by one place (edgepack.testing.CUSTOM_CODE), so
the outputs show whether that code ran or stock BERT did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgepack
from edgepack.bundle.manifest import MANIFEST, canonical_json, content_section, file_entries
from edgepack.cli import cli
from edgepack.errors import UsageError
from edgepack.model import sha256_file
from edgepack.testing import CUSTOM_CODE, build_custom_code_encoder

from conftest import assert_one_error_line


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_custom_code_encoder(tmp_path_factory.mktemp("src") / "rolled-bert")


@pytest.fixture(scope="module")
def bundle(source, tmp_path_factory) -> Path:
    return edgepack.pack(source, target="cpu", apply=["quantize:scheme=int8"], out=tmp_path_factory.mktemp("dist"),
                         allow_code=True, progress=lambda message: None).bundle


def test_plan_and_pack_refuse_the_code_without_allow_code(source, tmp_path):
    for args in (["plan", str(source)], ["pack", str(source), "--out", str(tmp_path)]):
        result = CliRunner().invoke(cli, args)
        assert_one_error_line(result, 2, "config.json", "auto_map", "modeling_rolled.RolledBertModel", "--allow-code")
    assert list(tmp_path.iterdir()) == []
    assert CliRunner().invoke(cli, ["plan", str(source), "--allow-code", "--json"]).exit_code == 0


def test_the_bundle_declares_and_hashes_the_code(bundle, source):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["model"]["code"] == [f"model/{name}" for name in sorted(CUSTOM_CODE)]
    assert manifest["model"]["stock_transformers"] is False
    assert manifest["source"]["code"] == {name: sha256_file(source / name) for name in CUSTOM_CODE}
    listed = {e["path"]: e["sha256"] for e in manifest["files"]}
    for name in CUSTOM_CODE:
        assert (bundle / "model" / name).read_text() == CUSTOM_CODE[name]
        assert listed[f"model/{name}"] == sha256_file(source / name)
    assert "allow_code=True" in (bundle / "README.md").read_text()


def test_verify_runs_the_code_only_with_allow_code(bundle):
    refused = edgepack.verify(bundle)
    assert [(f.check, f.path) for f in refused.failures] == [("code", "model/configuration_rolled.py")]
    assert "--allow-code" in refused.failures[0].detail and "load" not in refused.checks
    allowed = edgepack.verify(bundle, allow_code=True)
    assert allowed.ok, allowed.failures
    # the golden outputs are the rolled model's: stock BERT (the code not run) would miss them
    assert allowed.fidelity["value"] > 0.999


def test_load_and_run_need_allow_code(bundle):
    import torch

    with pytest.raises(UsageError, match="own Python code.*--allow-code"):
        edgepack.load(bundle)
    result = CliRunner().invoke(cli, ["run", str(bundle), "some text"])
    assert_one_error_line(result, 2, "own Python code", "--allow-code")
    model = edgepack.load(bundle, allow_code=True)
    assert type(model).__name__ == "RolledBertModel"
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        rolled = model(input_ids=ids).last_hidden_state
        stock = super(type(model), model).forward(input_ids=ids).last_hidden_state
    assert torch.allclose(rolled, stock.roll(1, dims=-1))


def test_an_undeclared_python_file_fails_verify(bundle, tmp_path):
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy)
    (copy / "model" / "extra.py").write_text("print('hello')\n")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"] = file_entries(copy)
    manifest["content"] = content_section(manifest)
    (copy / MANIFEST).write_bytes(canonical_json(manifest))
    report = edgepack.verify(copy, allow_code=True)
    assert [(f.check, f.path) for f in report.failures] == [("code", "model/extra.py")]
    assert "does not declare" in report.failures[0].detail
