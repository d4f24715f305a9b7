"""End to end on all-MiniLM-L6-v2: pack once (bf16, 200MB), then load, verify, tamper, run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgepack
from edgepack.bundle.archive import create_archive
from edgepack.bundle.manifest import FORMAT_VERSION, MANIFEST, canonical_json, content_section
from edgepack.bundle.reader import check_integrity, open_path
from edgepack.cli import cli
from edgepack.errors import NoPlanFits, VerificationError
from edgepack.model import sha256_file
from edgepack.smoke import CALIBRATION_SAMPLES, DEFAULT_SAMPLES

from conftest import assert_one_error_line

#: Section 5 of DESIGN.md: every top-level key and the keys required inside each.
DESIGN_KEYS = {
    "format": None,
    "format_version": None,
    "bundle": ("name", "version", "created"),
    "producer": ("edgepack", "python", "torch", "transformers", "plugins"),
    "source": ("model", "sha256"),
    "target": ("name", "devices", "capabilities"),
    "workload": ("batch_size", "seq_len"),
    "budget": ("bytes_per_device", "source"),
    "plan": None,
    "candidates": None,
    "memory": ("budget_bytes", "predicted_peak_bytes", "measured_peak_bytes", "scope"),
    "fidelity": ("metric", "value", "floor"),
    "smoke": ("inputs", "expected", "tolerances"),
    "files": None,
    "content": ("scheme", "digest"),
}

#: Fidelity sentences: none of them is a smoke or calibration sample.
HELD_OUT = [
    "The library closes early on Fridays during the summer.",
    "A gradient step moves the weights against the slope of the loss.",
    "Two cups of flour, one egg and a pinch of salt make the dough.",
    "The satellite entered a stable orbit after a six-hour burn.",
    "Our support team answers tickets within one business day.",
    "Il pleuvait sur la ville quand le train est arrivé.",
    "for i in range(10): print(i * i)",
    "The defendant's appeal was dismissed with costs.",
    "Wind turbines generate more power in the winter months.",
    "Why do cats purr when they are content?",
    "Invoice #4471: 12 units at 9.99 USD each, shipped 2 May.",
]

FLIPPED = "model/model.safetensors"


def _mean_pool(hidden, mask):
    import torch

    mask = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _embed(model, tokenizer, texts):
    import torch

    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    return _mean_pool(hidden, enc["attention_mask"])


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERINGS = {
    "flip": (FLIPPED, lambda b: flip_byte(b / FLIPPED)),
    "delete": ("model/config.json", lambda b: (b / "model/config.json").unlink()),
    "add": ("model/extra.txt", lambda b: (b / "model/extra.txt").write_text("not in the manifest")),
}


# ---------------------------------------------------------------------------------------------
# the manifest


def test_manifest_has_every_design_key(packed):
    manifest = json.loads((packed.bundle / MANIFEST).read_text())
    assert manifest == packed.manifest
    for key, inner in DESIGN_KEYS.items():
        assert key in manifest, key
        for sub in inner or ():
            assert sub in manifest[key], f"{key}.{sub}"
    assert manifest["format"] == "edgepack.bundle"
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["content"] == content_section(manifest)
    for entry in manifest["plan"]:
        assert set(entry) >= {"plugin", "version", "options"}
    for candidate in manifest["candidates"]:
        assert set(candidate) >= {"plan", "estimated_peak_bytes"}
    for entry in manifest["files"]:
        assert set(entry) >= {"path", "size", "sha256"}


def test_manifest_values(packed, model_dir):
    m = packed.manifest
    assert packed.bundle.name == f"{m['bundle']['name']}-0.1.0-cpu"
    assert m["bundle"]["version"] == "0.1.0"
    assert m["plan"] == [{"plugin": "precision", "version": edgepack.__version__, "options": {"dtype": "bf16"}}]
    assert m["producer"]["edgepack"] == edgepack.__version__
    assert m["producer"]["plugins"]["precision"] == edgepack.__version__
    assert m["producer"]["plugins"]["cpu"] == edgepack.__version__
    assert m["target"]["name"] == "cpu" and m["target"]["devices"] == 1
    assert m["budget"]["bytes_per_device"] == 200_000_000 and m["budget"]["source"] == "user"
    assert m["memory"]["budget_bytes"] == 200_000_000
    assert 0 < m["memory"]["predicted_peak_bytes"] <= 200_000_000
    assert 0 < m["memory"]["measured_peak_bytes"] <= 200_000_000
    assert m["memory"]["scope"]
    assert m["fidelity"]["metric"] == "mean_cosine"
    assert m["fidelity"]["floor"] <= m["fidelity"]["value"] <= 1.0 + 1e-6
    assert m["source"]["sha256"] == {"model.safetensors": sha256_file(model_dir / "model.safetensors")}
    assert [c.get("chosen") for c in m["candidates"]] == [True]
    for key in ("inputs", "expected", "tolerances"):
        assert (packed.bundle / m["smoke"][key]).is_file()


def test_manifest_is_canonical_and_lists_every_file(packed):
    raw = (packed.bundle / MANIFEST).read_bytes()
    assert raw == canonical_json(json.loads(raw))
    on_disk = sorted(p.relative_to(packed.bundle).as_posix() for p in packed.bundle.rglob("*")
                     if p.is_file() and p != packed.bundle / MANIFEST)
    listed = [f["path"] for f in packed.manifest["files"]]
    assert listed == sorted(listed) == on_disk
    assert {"README.md", "model/config.json", "model/model.safetensors"} <= set(listed)
    assert check_integrity(packed.bundle)[1] == []


def test_weights_are_stored_in_bf16(packed, model_dir):
    from safetensors import safe_open

    with safe_open(packed.bundle / "model/model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert dtypes == {"BF16"}
    original = (model_dir / "model.safetensors").stat().st_size
    assert (packed.bundle / "model/model.safetensors").stat().st_size < 0.6 * original


def test_pack_json_summary(packed):
    summary = packed.to_json()
    assert summary["bundle"] == str(packed.bundle)
    assert summary["plan"] == packed.manifest["plan"]
    assert set(summary["memory"]) == {"budget_bytes", "predicted_peak_bytes", "measured_peak_bytes"}
    assert set(summary["fidelity"]) >= {"metric", "value"}
    assert summary["size_bytes"] == sum(p.stat().st_size for p in packed.bundle.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# loading and fidelity


def test_stock_transformers_loads_the_bundle(packed):
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(packed.bundle / "model", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(packed.bundle / "model", local_files_only=True)
    assert type(model).__name__ == "BertModel"
    vectors = _embed(model.eval(), tokenizer, HELD_OUT[:2])
    assert vectors.shape == (2, 384) and torch.isfinite(vectors).all()


def test_fidelity_on_held_out_sentences(packed, model_dir):
    import torch
    import transformers

    assert not set(HELD_OUT) & (set(DEFAULT_SAMPLES) | set(CALIBRATION_SAMPLES))
    original = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    packed_model = edgepack.load(packed.bundle)
    assert next(packed_model.parameters()).dtype == torch.bfloat16
    reference = _embed(original, tokenizer, HELD_OUT)
    candidate = _embed(packed_model, tokenizer, HELD_OUT)
    cosines = (reference * candidate).sum(-1)
    assert cosines.mean().item() >= 0.999, cosines
    assert cosines.min().item() >= 0.99, cosines


def test_load_returns_a_model_in_eval_mode(packed):
    model = edgepack.load(packed.bundle)
    assert model.training is False
    assert all(not m.training for m in model.modules())
    assert next(model.parameters()).device.type == "cpu"


def test_load_refuses_a_tampered_bundle(bundle_copy):
    flip_byte(bundle_copy / FLIPPED)
    with pytest.raises(VerificationError, match=re.escape(FLIPPED)):
        edgepack.load(bundle_copy)


# ---------------------------------------------------------------------------------------------
# verify


@pytest.mark.extended  # the same bundle verifies with this report in test_probe's verify-from-inside-a-bundle test
def test_verify_passes_on_the_packed_bundle(packed):
    report = edgepack.verify(packed.bundle)
    assert report.ok, report.failures
    assert report.checks == ["integrity", "content", "signature", "weights", "load", "smoke", "memory"]
    assert 0 < report.measured_peak_bytes <= report.budget_bytes == 200_000_000
    assert report.fidelity["value"] >= packed.manifest["fidelity"]["floor"]


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_verify_names_the_tampered_file(bundle_copy, how):
    path, tamper = TAMPERINGS[how]
    tamper(bundle_copy)
    report = edgepack.verify(bundle_copy)
    assert not report.ok
    assert [f.path for f in report.failures] == [path]
    assert report.failures[0].check == "files"
    assert report.checks == ["integrity", "signature"]  # nothing was loaded


@pytest.mark.parametrize("how", sorted(TAMPERINGS))
def test_cli_verify_json_after_tampering(bundle_copy, how):
    path, tamper = TAMPERINGS[how]
    tamper(bundle_copy)
    result = CliRunner().invoke(cli, ["verify", str(bundle_copy), "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is False
    assert [f["path"] for f in report["failures"]] == [path]
    assert set(report["failures"][0]) >= {"check", "path", "detail"}
    assert "Traceback" not in result.output


def test_verify_checks_the_smoke_outputs(bundle_copy, monkeypatch):
    """Golden outputs that no longer match (with a consistent manifest) fail the smoke check.
    The fresh process that runs the model returns the golden outputs as packed: what this
    bundle's model gives (test_probe's verify of the same bundle runs it for real)."""
    import torch
    from safetensors.torch import load_file, save_file

    import edgepack.smoke
    from edgepack.bundle.manifest import file_entries

    expected_file = bundle_copy / "smoke/expected.safetensors"
    expected = load_file(expected_file)
    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process",
                        lambda bundle_dir, **kwargs: edgepack.smoke.ProbeResult(10, "test scope", expected, 0.0))
    save_file({k: torch.roll(v, 1, dims=0).contiguous() for k, v in expected.items()}, expected_file)
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    manifest["files"] = file_entries(bundle_copy)
    manifest["content"] = content_section(manifest)
    (bundle_copy / MANIFEST).write_bytes(canonical_json(manifest))
    report = edgepack.verify(bundle_copy)
    assert not report.ok
    assert report.failures
    assert {(f.check, f.path) for f in report.failures} == {("smoke", "smoke/expected.safetensors")}
    assert report.checks == ["integrity", "content", "signature", "weights", "load", "smoke", "memory"]


# ---------------------------------------------------------------------------------------------
# CLI on the bundle


def test_cli_run_prints_an_embedding(packed):
    result = CliRunner().invoke(cli, ["run", str(packed.bundle), "An edge device has little memory."])
    assert result.exit_code == 0, result.output
    assert "dim 384, norm 1.0000" in result.stdout


def test_cli_run_json(packed):
    result = CliRunner().invoke(cli, ["run", str(packed.bundle), "--json", "first text", "second text"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["task"] == "feature-extraction" and data["dim"] == 384
    assert len(data["embeddings"]) == 2
    for row in data["embeddings"]:
        assert abs(sum(x * x for x in row) - 1.0) < 1e-3


def test_cli_run_refuses_a_tampered_bundle(bundle_copy):
    flip_byte(bundle_copy / FLIPPED)
    result = CliRunner().invoke(cli, ["run", str(bundle_copy), "text"])
    assert_one_error_line(result, 1, FLIPPED)


def test_cli_inspect_json_prints_the_manifest(packed):
    result = CliRunner().invoke(cli, ["inspect", str(packed.bundle), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == packed.manifest


def test_cli_inspect_human(packed):
    result = CliRunner().invoke(cli, ["inspect", str(packed.bundle)])
    assert result.exit_code == 0, result.output
    assert "precision:dtype=bf16" in result.stdout
    assert "model/model.safetensors" in result.stdout


@pytest.mark.slow
@pytest.mark.extended  # test_reproducible's archive test (a packed bundle) and test_bundle_hardening's cover it
def test_archive_of_the_packed_bundle_is_deterministic_and_intact(bundle_copy, tmp_path):
    first = create_archive(bundle_copy).read_bytes()
    second = create_archive(bundle_copy)
    assert second.read_bytes() == first
    root = open_path(second)
    assert root.name == bundle_copy.name
    assert check_integrity(root)[1] == []


# ---------------------------------------------------------------------------------------------
# budgets that nothing fits, and failures mid-pack


def test_fixed_plan_over_budget_raises_no_plan_fits(model_dir, tmp_path):
    out = tmp_path / "dist"
    with pytest.raises(NoPlanFits) as info:
        edgepack.pack(str(model_dir), target="cpu", budget="10MB", apply=["precision:dtype=bf16"], out=str(out))
    message = str(info.value)
    assert "10.0 MB" in message
    assert re.search(r"smallest estimated peak is \d+(\.\d)? [kMG]B, reached by precision:dtype=bf16", message), message
    assert info.value.exit_code == 3
    assert not out.exists()  # not even the --out directory


def test_cli_fixed_plan_over_budget_exits_3(model_dir, tmp_path):
    out = tmp_path / "dist"
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--target", "cpu", "--budget", "10MB",
                                      "--apply", "precision:dtype=bf16", "--out", str(out)])
    assert_one_error_line(result, 3, "smallest", "precision:dtype=bf16")
    assert not out.exists()  # not even the --out directory


def test_failure_while_writing_leaves_no_bundle(model_dir, tmp_path, monkeypatch):
    from edgepack import pipeline

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pipeline, "_save_model", broken)
    out = tmp_path / "dist"
    with pytest.raises(OSError, match="No space left"):
        edgepack.pack(str(model_dir), target="cpu", budget="200MB", apply=["precision:dtype=bf16"], out=str(out))
    assert not out.exists()  # not even the --out directory


def test_plan_ranks_fitting_plans_first(model_dir):
    import edgepack.plugins.precision
    import edgepack.targets.cpu
    from edgepack.host import collect, make_plugin_manager
    from edgepack.planner import plan_model

    pm = make_plugin_manager(entrypoints=False)  # only the built-ins under test, not work in progress
    pm.register(edgepack.targets.cpu, name="cpu")
    pm.register(edgepack.plugins.precision, name="precision")
    registry = collect(pm)
    budget, candidates = plan_model(str(model_dir), target="cpu", budget="70MB", registry=registry)
    assert budget.bytes_per_device == 70_000_000 and budget.source == "user"
    specs = [c.spec for c in candidates]
    assert set(specs) == {"(none)", "precision:dtype=bf16", "precision:dtype=fp16"}
    fits = [c.fits for c in candidates]
    assert fits == sorted(fits, reverse=True)
    plain = next(c for c in candidates if c.spec == "(none)")
    bf16 = next(c for c in candidates if c.spec == "precision:dtype=bf16")
    assert bf16.estimate.weights_bytes < plain.estimate.weights_bytes
    assert fits == [True, True, False]  # fp32 does not fit in 70MB, either 16-bit cast does
    assert [c.spec for c in candidates if c.chosen] == ["precision:dtype=bf16"]  # lower quality cost
