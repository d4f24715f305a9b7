"""The command line: help texts, discovery commands, and error paths (exit 2, one line)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli

from conftest import assert_one_error_line

EDGEPACK = Path(sys.executable).with_name("edgepack")
COMMANDS = sorted(cli.commands)


@pytest.fixture
def runner():
    return CliRunner()


# ---------------------------------------------------------------------------------------------
# help


def test_top_level_help_has_examples(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout


def test_top_level_help_lists_commands_and_exit_codes(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("targets", "plugins", "plan", "pack", "verify", "inspect", "run", "bench"):
        assert name in result.stdout
    assert "3 no plan fits" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_has_an_example(runner, command):
    result = runner.invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.stdout
    assert f"edgepack {command}" in result.stdout


def test_console_script_help_and_version():
    assert EDGEPACK.is_file(), EDGEPACK
    result = subprocess.run([str(EDGEPACK), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Usage: edgepack" in result.stdout
    version = subprocess.run([str(EDGEPACK), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "0.1.0" in version.stdout


# ---------------------------------------------------------------------------------------------
# discovery commands


def test_targets_json(runner):
    result = runner.invoke(cli, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])["targets"]}
    assert {"cpu", "cuda"} <= set(rows)
    assert rows["cpu"]["present"] is True and rows["cpu"]["capacity_bytes"] > 0
    assert "fp32" in rows["cpu"]["probe"]["capabilities"]


def test_plugins_json(runner):
    result = runner.invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout.strip().splitlines()[-1])["plugins"]}
    precision = rows["precision"]
    assert precision["kind"] == "precision"
    assert precision["distribution"].startswith("edgepack ")
    assert precision["options"] == [{"name": "dtype", "type": "str", "choices": ["bf16", "fp16"],
                                     "default": "bf16", "help": "16-bit dtype to cast to"}]


# ---------------------------------------------------------------------------------------------
# error paths: exit 2, one error line, no traceback


def _pack(model: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["pack", model, "--target", "cpu", "--out", str(tmp_path / "dist"), *extra]


def test_missing_model_path(runner, tmp_path):
    missing = tmp_path / "no-such-model"
    result = runner.invoke(cli, _pack(str(missing), tmp_path))
    assert_one_error_line(result, 2, str(missing), "does not exist")
    assert not (tmp_path / "dist").exists()


def test_directory_that_is_not_a_model(runner, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = runner.invoke(cli, _pack(str(empty), tmp_path))
    assert_one_error_line(result, 2, str(empty), "config.json")


def test_model_with_only_pickled_weights_is_refused(runner, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = runner.invoke(cli, _pack(str(model), tmp_path))
    assert_one_error_line(result, 2, "safetensors")


def test_unknown_target_lists_valid_targets(runner, model_dir, tmp_path):
    result = runner.invoke(cli, ["pack", str(model_dir), "--target", "tpu", "--out", str(tmp_path / "dist")])
    line = assert_one_error_line(result, 2, "'tpu'", "available targets:")
    assert "cpu" in line and "cuda" in line


def test_unknown_plugin_lists_valid_plugins(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--apply", "sparkle:level=3"))
    line = assert_one_error_line(result, 2, "'sparkle'", "available compression plugins:")
    assert "precision" in line


def test_unknown_option_key_lists_valid_options(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--apply", "precision:dtyp=bf16"))
    assert_one_error_line(result, 2, "'dtyp'", "valid options:", "dtype=bf16|fp16")


def test_bad_option_value(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--apply", "precision:dtype=int3"))
    assert_one_error_line(result, 2, "precision:dtype=int3", "bf16|fp16")


def test_malformed_apply_spec(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--apply", "precision:dtype"))
    assert_one_error_line(result, 2, "'dtype' is not KEY=VALUE")


def test_malformed_budget_exits_2_naming_the_value(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--budget", "30XB"))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith(("Error:", "edgepack: error:"))]
    assert len(errors) == 1 and "--budget" in errors[0] and "'30XB'" in errors[0]
    assert not (tmp_path / "dist").exists()


def test_malformed_budget_is_one_line(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--budget", "30XB"))
    assert_one_error_line(result, 2, "'30XB'")


@pytest.mark.parametrize("budget", ["-1", "0", "abc"])
def test_other_bad_budgets_exit_2(runner, model_dir, tmp_path, budget):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--budget", budget))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert repr(budget) in result.stderr


def test_bad_version(runner, model_dir, tmp_path):
    result = runner.invoke(cli, _pack(str(model_dir), tmp_path, "--version", "one"))
    assert_one_error_line(result, 2, "'one'", "semantic version")


def test_verify_missing_bundle(runner, tmp_path):
    result = runner.invoke(cli, ["verify", str(tmp_path / "nope")])
    assert_one_error_line(result, 2, "does not exist")


def test_inspect_directory_that_is_not_a_bundle(runner, tmp_path):
    result = runner.invoke(cli, ["inspect", str(tmp_path)])
    assert_one_error_line(result, 2, "manifest.json")


def test_console_script_error_has_no_traceback(tmp_path):
    """The installed script (not just the click group) turns user errors into one line."""
    missing = tmp_path / "no-such-model"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([str(EDGEPACK), "pack", str(missing), "--target", "cpu", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("edgepack: error:")]
    assert lines == [f"edgepack: error: model path {missing} does not exist"]
    assert result.stderr.rstrip().splitlines()[-1] == lines[0]


# ---------------------------------------------------------------------------------------------
# progress


@pytest.mark.parametrize("setting, terminal, shown", [
    (None, False, False), (None, True, True),  # standard error a terminal or not
    ("1", False, True), ("true", False, True), ("0", True, False), ("off", True, False),
    ("maybe", True, True),  # not a setting: the terminal decides
])
def test_progress_lines_follow_the_terminal_and_the_setting(monkeypatch, capsys, setting, terminal, shown):
    from edgepack.environment import progress_printer, progress_wanted

    if setting is None:
        monkeypatch.delenv("EDGEPACK_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("EDGEPACK_PROGRESS", setting)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert progress_wanted() is shown
    progress_printer()("loading")
    progress_printer(as_json=True)("loading")  # --json output is for machines: never
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == (1 if shown else 0) and all(re.fullmatch(r"\[\d\d:\d\d\.\d\] loading", l) for l in lines)


def test_bench_reports_its_phases_as_progress_lines(runner, packed, monkeypatch):
    monkeypatch.setenv("EDGEPACK_PROGRESS", "1")
    result = runner.invoke(cli, ["bench", str(packed.bundle), "--repeats", "1", "--no-source"])
    assert result.exit_code == 0, result.output
    lines = [l for l in result.stderr.splitlines() if re.match(r"\[\d\d:\d\d\.\d\] ", l)]
    assert [l.split("] ", 1)[1].split(" ")[0] for l in lines] == ["warming", "loading", "timing"], lines


def test_compile_is_refused_from_the_manifest_for_programs_and_split_bundles():
    from edgepack.runtime import compile_refusal

    assert compile_refusal({"model": {"task": "feature-extraction"}}, "b") is None
    assert compile_refusal({"model": {"task": "text-generation"}}, "b") is None
    assert compile_refusal({"model": {"program": {"format": "pte"}}}, "b").endswith(
        "b cannot, its model is a compiled program already")
    assert compile_refusal({"model": {}, "parallel": {"world_size": 2}}, "b").endswith(
        "b cannot, it is split across devices, one process per rank")


def test_run_and_bench_compile_an_encoders_forward_pass(packed, monkeypatch):
    """--compile on an encoder: run's embeddings come from a compiled graph of the forward pass,
    equal to eager ones (traced here by a plain backend: inductor's C++ build would add half a
    minute), and bench times compiled batches of the bundle and the source, with what
    compiling took."""
    import torch
    from torch._dynamo.testing import CompileCounter

    from edgepack import runtime
    from edgepack.errors import UsageError

    with pytest.raises(UsageError, match=r"^--compile compiles a transformers model; --source x is not one"):
        runtime.compiled_forward(object(), "--source x")  # a compiled program: refused before compiling
    counter = CompileCounter()
    monkeypatch.setattr(runtime, "compiled_forward", lambda model, what="": torch.compile(model, dynamic=False, backend=counter))
    outputs = {}
    for flags in ((), ("--compile",)):
        result = CliRunner().invoke(cli, ["run", str(packed.bundle), "An edge device.", "--json", *flags])
        assert result.exit_code == 0, result.output
        outputs[flags] = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])["embeddings"])
        assert counter.frame_count == (1 if flags else 0)
    assert torch.allclose(outputs[()], outputs[("--compile",)], atol=1e-5)
    session = runtime.open_bundle(packed.bundle)  # a session compiles once, whatever it embeds next
    session.embed(["one"], compiled=True)
    first = session.compiled_model
    session.embed(["two"], compiled=True)
    assert first is not None and session.compiled_model is first and counter.frame_count == 2
    result = CliRunner().invoke(cli, ["bench", str(packed.bundle), "--compile", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "compile_s" in report and "compile_s" in report["source"] and counter.frame_count == 4


def test_a_failed_compile_is_one_sentence_that_names_compile():
    from torch._inductor.exc import InvalidCxxCompiler

    from edgepack.errors import UsageError
    from edgepack.runtime import _compiling

    from torch._inductor.exc import InductorError

    for raised in (InvalidCxxCompiler(), InductorError(InvalidCxxCompiler(), None)):  # as inductor raises it
        with pytest.raises(UsageError, match=r"^--compile: compiling the model failed \(InvalidCxxCompiler: "
                                             r"No working C\+\+ compiler.*\); without --compile the model runs eager$"):
            with _compiling(True):
                raise raised
    for compiled in (True, False):  # anything else, or not compiling: errors pass through as they are
        with pytest.raises(RuntimeError, match="^a bug$"):
            with _compiling(compiled):
                raise RuntimeError("a bug")
