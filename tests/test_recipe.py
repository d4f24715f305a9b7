"""``edgepack.toml`` recipes: errors that name the file and the key, and multi-target recipes
that load the model once and fail per target (one run packs two bundles)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack import pipeline
from edgepack.cli import cli
from edgepack.errors import NoPlanFits, UsageError
from edgepack.model import ModelSource
from edgepack.recipe import read_recipe

from conftest import assert_one_error_line


def write(tmp_path: Path, text: str, name: str = "edgepack.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def recipe_error(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        read_recipe(path)
    message = str(info.value)
    assert str(path) in message, message
    assert info.value.exit_code == 2
    return message


# ---------------------------------------------------------------------------------------------
# reading


def test_a_valid_recipe_maps_keys_to_pack_arguments(tmp_path):
    path = write(tmp_path, """
        target = "cpu"
        budget = "30MB"
        apply = ["prune:ffn=0.25", "quantize:scheme=int8"]
        batch = 2
        seq-len = 64
        min_fidelity = 0.98
        version = "1.2.3"
        samples = "samples.txt"
        out = "dist"
        archive = true
    """)
    settings = read_recipe(path)
    assert settings == {
        "target": "cpu", "budget": 30_000_000, "apply": ["prune:ffn=0.25", "quantize:scheme=int8"],
        "batch_size": 2, "seq_len": 64, "min_fidelity": 0.98, "version": "1.2.3",
        "samples": str((tmp_path / "samples.txt").resolve()), "out": str((tmp_path / "dist").resolve()),
        "archive": True,
    }


def test_a_multi_target_recipe_lists_each_target(tmp_path):
    path = write(tmp_path, """
        out = "/abs/dist"
        [[targets]]
        target = "cpu"
        budget = "100MB"
        apply = ["precision:dtype=bf16"]
        [[targets]]
        target = "cuda"
        budget = 2000000000
        min-fidelity = 0.9
    """)
    settings = read_recipe(path)
    assert settings["out"] == "/abs/dist"
    assert settings["targets"] == [
        {"target": "cpu", "budget": 100_000_000, "apply": ["precision:dtype=bf16"]},
        {"target": "cuda", "budget": 2_000_000_000, "min_fidelity": 0.9},
    ]


def test_unknown_key_is_named(tmp_path):
    message = recipe_error(write(tmp_path, 'budgt = "30MB"\n'))
    assert "'budgt'" in message and "valid keys" in message and "budget" in message


def test_wrong_type_is_named(tmp_path):
    message = recipe_error(write(tmp_path, 'batch = "two"\n'))
    assert "'batch'" in message and "wrong type" in message
    message = recipe_error(write(tmp_path, "batch = true\n", "bool.toml"))  # a bool is not an int
    assert "'batch'" in message


def test_bad_budget_is_named(tmp_path):
    message = recipe_error(write(tmp_path, 'budget = "thirty megabytes"\n'))
    assert "budget" in message and "'thirty megabytes'" in message
    message = recipe_error(write(tmp_path, "budget = 0\n", "zero.toml"))
    assert "budget" in message


def test_apply_must_be_a_list_of_strings(tmp_path):
    message = recipe_error(write(tmp_path, 'apply = "precision:dtype=bf16"\n'))
    assert "'apply'" in message
    message = recipe_error(write(tmp_path, "apply = [1, 2]\n", "ints.toml"))
    assert "'apply'" in message and "PLUGIN" in message


def test_target_entry_without_target_is_named(tmp_path):
    message = recipe_error(write(tmp_path, """
        [[targets]]
        target = "cpu"
        [[targets]]
        budget = "100MB"
    """))
    assert "targets[1]" in message and "'target'" in message


def test_unknown_key_in_a_target_entry_is_named(tmp_path):
    message = recipe_error(write(tmp_path, """
        [[targets]]
        target = "cpu"
        seq_len = 64
    """))
    assert "targets[0]" in message and "'seq_len'" in message and "valid keys" in message


def test_bad_values_in_a_target_entry_are_named(tmp_path):
    message = recipe_error(write(tmp_path, """
        [[targets]]
        target = "cpu"
        budget = "lots"
    """))
    assert "targets[0]" in message and "budget" in message and "'lots'" in message
    message = recipe_error(write(tmp_path, """
        [[targets]]
        target = "cpu"
        apply = "precision"
    """, "apply.toml"))
    assert "targets[0]" in message and "apply" in message


def test_targets_must_be_an_array_of_tables(tmp_path):
    message = recipe_error(write(tmp_path, 'targets = "cpu"\n'))
    assert "'targets'" in message and "[[targets]]" in message


def test_unreadable_and_invalid_recipes_name_the_file(tmp_path):
    recipe_error(tmp_path / "missing.toml")
    message = recipe_error(write(tmp_path, "budget = = 3\n"))
    assert "not valid TOML" in message


def test_cli_recipe_error_is_one_line_exit_2(tmp_path, model_dir):
    path = write(tmp_path, 'out = "dist"\nbudgt = "30MB"\n')
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--recipe", str(path)])
    assert_one_error_line(result, 2, str(path), "'budgt'")
    assert not (tmp_path / "dist").exists()


# ---------------------------------------------------------------------------------------------
# several targets from one recipe


@pytest.fixture
def counters(monkeypatch):
    """Count golden-output runs (in this process) and weight loads of the source model."""
    import edgepack.smoke as smoke

    counts = {"run_outputs": 0, "load": 0}
    real_run, real_load = smoke.run_outputs, ModelSource.load

    def run_outputs(*args, **kwargs):
        counts["run_outputs"] += 1
        return real_run(*args, **kwargs)

    def load(self):
        counts["load"] += 1
        return real_load(self)

    monkeypatch.setattr(smoke, "run_outputs", run_outputs)
    monkeypatch.setattr(ModelSource, "load", load)
    return counts


def test_pack_many_fails_each_target_alone_without_loading_weights(model_dir, tmp_path, counters):
    outcomes = pipeline.pack_many(str(model_dir), [{"target": "cpu", "budget": "5MB"},
                                                   {"target": "cpu", "budget": 6_000_000, "name": "second"}],
                                  out=str(tmp_path / "dist"))
    assert [o.target for o in outcomes] == ["cpu", "cpu"]
    assert all(o.result is None and isinstance(o.error, NoPlanFits) for o in outcomes)
    assert "5.0 MB" in str(outcomes[0].error) and "6.0 MB" in str(outcomes[1].error)
    assert counters == {"run_outputs": 0, "load": 0}  # nothing fits: no weights needed


def test_pack_many_checks_every_setting_before_packing(model_dir, tmp_path, counters):
    with pytest.raises(UsageError, match="--version"):
        pipeline.pack_many(str(model_dir), [{"target": "cpu", "budget": "100MB"}], version="one", out=str(tmp_path))
    with pytest.raises(UsageError, match="--min-fidelity"):
        pipeline.pack_many(str(model_dir), [{"target": "cpu", "budget": "100MB"},
                                            {"target": "cpu", "min_fidelity": 1.5}], out=str(tmp_path))
    assert counters["load"] == 0


def test_cli_flag_budget_wins_over_every_target_entry(model_dir, tmp_path, counters):
    path = write(tmp_path, """
        out = "dist"
        [[targets]]
        target = "cpu"
        budget = "100MB"
        [[targets]]
        target = "cpu"
        name = "second"
        budget = "200MB"
    """)
    result = CliRunner().invoke(cli, ["pack", str(model_dir), "--recipe", str(path), "--budget", "5MB", "--json"])
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["bundles"] == []
    assert [(f["target"], f["exit_code"]) for f in data["failures"]] == [("cpu", 3), ("cpu", 3)]
    assert all("5.0 MB" in f["detail"] for f in data["failures"])
    assert counters["load"] == 0


@pytest.mark.slow
def test_cli_multi_target_recipe_loads_once_and_exits_with_the_failing_code(edgepack_tiny_encoder, tmp_path,
                                                                            counters):
    """cpu at 100MB (fits), cpu at 1MB (cannot: exit 3), cuda at 1GB (packs on a CPU-only box
    too): two bundles from one run of the golden outputs. The model is loaded once for them and
    once for each plan applied (a load memory-maps the weights; no plan starts from a copy).
    The tiny encoder: what is checked is the recipe's targets, which no model size changes."""
    import torch

    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    path = write(recipe_dir, """
        out = "dist"
        seq_len = 64
        [[targets]]
        target = "cpu"
        budget = "100MB"
        apply = ["precision:dtype=bf16"]
        [[targets]]
        target = "cpu"
        name = "tiny"
        budget = "1MB"
        [[targets]]
        target = "cuda"
        budget = "1GB"
        apply = ["precision:dtype=fp16"]
    """)
    result = CliRunner().invoke(cli, ["pack", str(edgepack_tiny_encoder), "--recipe", str(path), "--json"])
    assert result.exit_code == 3, result.output
    assert counters == {"run_outputs": 1, "load": 1 + 2}

    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [f["target"] for f in data["failures"]] == ["cpu"]
    failure = data["failures"][0]
    assert failure["exit_code"] == 3 and "1.0 MB" in failure["detail"] and "smallest" in failure["detail"]
    assert "cpu: FAILED: no plan fits" in result.stdout

    dist = recipe_dir / "dist"  # out is relative to the recipe
    bundles = {Path(b["bundle"]).name: b for b in data["bundles"]}
    assert sorted(bundles) == sorted(p.name for p in dist.iterdir() if p.is_dir())
    cpu = next(b for name, b in bundles.items() if name.endswith("-cpu"))
    cuda = next(b for name, b in bundles.items() if name.endswith("-cuda"))
    assert cpu["plan"] == [{"plugin": "precision", "version": cpu["plan"][0]["version"], "options": {"dtype": "bf16"}}]
    assert cuda["plan"][0]["options"] == {"dtype": "fp16"}
    assert cpu["memory"]["budget_bytes"] == 100_000_000 and cuda["memory"]["budget_bytes"] == 1_000_000_000
    assert 0 < cpu["memory"]["measured_peak_bytes"] <= 100_000_000
    if not torch.cuda.is_available():
        assert cuda["memory"]["measured_peak_bytes"] is None  # measured by verify on the GPU
    # both bundles carry the same golden outputs, computed once
    cpu_dir, cuda_dir = Path(cpu["bundle"]), Path(cuda["bundle"])
    for rel in ("smoke/expected.safetensors", "smoke/inputs.safetensors"):
        assert (cpu_dir / rel).read_bytes() == (cuda_dir / rel).read_bytes()
    manifest = json.loads((cpu_dir / "manifest.json").read_text())
    assert manifest["workload"]["seq_len"] == 64


def test_two_entries_for_the_same_bundle_name_are_refused_before_any_work(model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"targets\[0\] and targets\[1\] would both write bundle"):
        pipeline.pack_many(str(model_dir), [
            {"target": "cpu", "budget": "100MB", "apply": ["precision:dtype=bf16"]},
            {"target": "cpu", "budget": "200MB", "apply": ["precision:dtype=fp16"]},
        ], seq_len=32, out=str(tmp_path / "dist"))
    assert not (tmp_path / "dist").exists()


@pytest.mark.extended  # pack_many's two bundles are covered by the multi-target recipe test
def test_two_entries_for_the_same_target_with_names_give_two_bundles(model_dir, tmp_path):
    outcomes = pipeline.pack_many(str(model_dir), [
        {"target": "cpu", "budget": "100MB", "apply": ["precision:dtype=bf16"]},
        {"target": "cpu", "budget": "200MB", "apply": ["precision:dtype=fp16"], "name": "minilm-fp16"},
    ], seq_len=32, out=str(tmp_path / "dist"))
    assert [o.error for o in outcomes] == [None, None], [str(o.error) for o in outcomes]
    bundles = {o.result.bundle for o in outcomes}
    assert len(bundles) == 2 and all(b.is_dir() for b in bundles)
