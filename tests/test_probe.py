"""The peak-memory probe and smoke runs: an isolated measuring process (nothing from the working
directory or PYTHONPATH is imported), its time limit and death by signal, decoder runs that stop
at end-of-sequence, and repeatable memory figures (project issue 7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgepack.errors import VerificationError

EDGEPACK = Path(sys.executable).with_name("edgepack")

#: Modules a hostile bundle or working directory might carry: importing any of them plants a
#: marker file next to itself.
SHADOWING = ("pluggy", "torch", "transformers", "safetensors")


def plant(directory: Path) -> list[Path]:
    """Write modules named like the libraries the probe imports into ``directory``; each
    writes ``<name>.imported`` beside itself when imported. Returns those marker paths."""
    markers = []
    for name in SHADOWING:
        marker = directory / f"{name}.imported"
        (directory / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('planted {name}')\n"
        )
        markers.append(marker)
    return markers


# ---------------------------------------------------------------------------------------------
# 1. The measuring process is isolated


def test_measuring_process_runs_isolated_in_an_empty_directory(tmp_path, monkeypatch):
    from edgepack.smoke import run_isolated

    planted = tmp_path / "planted"
    planted.mkdir()
    markers = plant(planted)
    monkeypatch.chdir(planted)
    env = dict(os.environ, PYTHONPATH=str(planted))
    code = "import json, os, sys; print(json.dumps([os.listdir('.'), sys.flags.isolated])); import pluggy"
    proc = run_isolated([sys.executable, "-I", "-c", code], timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    listing, isolated = json.loads(proc.stdout.strip().splitlines()[-1])
    assert listing == [] and isolated == 1
    assert not any(m.exists() for m in markers)


def test_probe_command_imports_edgepack_from_the_parents_directory(tmp_path, monkeypatch):
    """A parent that found edgepack only through sys.path or PYTHONPATH: the child imports the
    same package from the same directory (and nothing else from there), ignoring PYTHONPATH."""
    from edgepack.smoke import probe_command, run_isolated

    root = tmp_path / "checkout"
    (root / "edgepack").mkdir(parents=True)
    (root / "edgepack" / "__init__.py").write_text("")
    (root / "edgepack" / "probe.py").write_text(textwrap.dedent("""
        import sys
        def _entry(spec):
            import edgepack
            open(spec, "w").write(edgepack.__file__)
            try:
                import pluggy  # the installed one: the checkout's planted pluggy is never found
            except ImportError:
                return 3
            return 0 if "site-packages" in pluggy.__file__ else 4
    """))
    markers = plant(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    markers += plant(elsewhere)
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out.txt"
    env = dict(os.environ, PYTHONPATH=f"{elsewhere}{os.pathsep}{root}")
    proc = run_isolated(probe_command(out, root=root), timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == str(root / "edgepack" / "__init__.py")
    assert not any(m.exists() for m in markers)


def test_probe_command_defaults_to_this_edgepack():
    import edgepack
    from edgepack.smoke import probe_command

    command = probe_command("spec.json")
    assert command[:3] == [sys.executable, "-I", "-c"]
    assert command[-2] == str(Path(edgepack.__file__).resolve().parent.parent)
    assert command[-1] == "spec.json"


def test_verify_from_inside_a_bundle_imports_nothing_from_it(bundle_copy):
    """``cd bundle && edgepack verify .``, where the bundle lists planted modules among its
    files (so it passes the integrity check). (PYTHONPATH is the parent's to trust; the child
    ignoring it is tested in-process below.)"""
    from edgepack.bundle.manifest import content_section
    from edgepack.model import sha256_file

    markers = plant(bundle_copy)
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in SHADOWING:
        file = bundle_copy / f"{name}.py"
        manifest["files"].append({"path": file.name, "size": file.stat().st_size, "sha256": sha256_file(file)})
    manifest["files"].sort(key=lambda entry: entry["path"])
    manifest["content"] = content_section(manifest)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(EDGEPACK), "verify", ".", "--json"], cwd=bundle_copy, env=env,
                            capture_output=True, text=True, timeout=600)
    assert not [m.name for m in markers if m.exists()]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and report["ok"], (report, result.stderr[-2000:])
    # every check ran and passed (test_end_to_end's verify test, extended, asserts the same)
    assert report["checks"] == ["integrity", "content", "signature", "weights", "load", "smoke", "memory"]
    assert 0 < report["memory"]["measured_peak_bytes"] <= report["memory"]["budget_bytes"] == 200_000_000
    assert report["fidelity"]["value"] >= manifest["fidelity"]["floor"]


def test_probe_from_a_planted_directory_measures(packed, tmp_path, monkeypatch):
    """pack's path: the probe called in-process from a directory holding planted modules."""
    from edgepack.runtime import plan_steps
    from edgepack.smoke import measure_in_fresh_process, probe_threads

    markers = plant(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    manifest = packed.manifest
    result = measure_in_fresh_process(
        packed.bundle, task=manifest["model"]["task"], steps=plan_steps(manifest),
        loader=manifest["model"].get("loader"), target="cpu",
        batch_size=int(manifest["workload"]["batch_size"]),  # repeats: the fake-child test below
    )
    assert not [m.name for m in markers if m.exists()]
    assert len(result.peaks) == 1 and result.peak_bytes == result.peaks[0] > 0
    assert result.threads == probe_threads()
    assert f"{result.threads} intra-op thread" in result.scope
    assert result.outputs["embeddings"].shape[0] == manifest["smoke"]["count"]


# ---------------------------------------------------------------------------------------------
# 2. Time limit and death by signal


def test_probe_times_out_and_says_so(packed):
    from edgepack.runtime import plan_steps
    from edgepack.smoke import measure_in_fresh_process

    manifest = packed.manifest
    started = time.monotonic()
    with pytest.raises(VerificationError, match=r"timed out after 0\.5 s"):
        measure_in_fresh_process(packed.bundle, task=manifest["model"]["task"], steps=plan_steps(manifest),
                                 loader=None, target="cpu", batch_size=1, timeout=0.5)
    assert time.monotonic() - started < 30


def test_timeout_from_the_environment(monkeypatch):
    from edgepack.errors import UsageError
    from edgepack.smoke import PROBE_TIMEOUT, probe_timeout

    monkeypatch.delenv("EDGEPACK_PROBE_TIMEOUT", raising=False)
    assert probe_timeout() == PROBE_TIMEOUT >= 600
    monkeypatch.setenv("EDGEPACK_PROBE_TIMEOUT", "12.5")
    assert probe_timeout() == 12.5
    assert probe_timeout(3) == 3.0  # an explicit timeout wins
    monkeypatch.setenv("EDGEPACK_PROBE_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="EDGEPACK_PROBE_TIMEOUT"):
        probe_timeout()


def _hanging_with_a_grandchild(pid_file: Path) -> list[str]:
    """A command that starts a grandchild (its pid written to ``pid_file``) and sleeps."""
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    return [sys.executable, "-c", code]


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone
        if state in ("Z", "X"):
            return  # killed, not yet reaped by its new parent
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the measuring process's child outlived the timeout")


def test_timeout_kills_the_whole_process_group(tmp_path):
    from edgepack.smoke import run_isolated

    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(VerificationError, match=r"timed out after 2 s"):
        run_isolated(_hanging_with_a_grandchild(pid_file), timeout=2)
    _assert_gone(int(pid_file.read_text()))


def test_commands_run_together_return_in_order_and_a_timeout_kills_every_group(tmp_path):
    from edgepack.smoke import run_isolated_together

    # each waits until all three have started: run one after another, they would time out
    code = textwrap.dedent(f"""
        import pathlib, sys, time
        here = pathlib.Path({str(tmp_path)!r})
        (here / (sys.argv[1] + ".started")).touch()
        while len(list(here.glob("*.started"))) < 3:
            time.sleep(0.05)
        print("out", sys.argv[1]); print("err", sys.argv[1], file=sys.stderr); sys.exit(int(sys.argv[1]))
    """)
    procs = run_isolated_together([[sys.executable, "-c", code, str(n)] for n in range(3)], timeout=60)
    assert [(p.returncode, p.stdout.split(), p.stderr.split()) for p in procs] == [
        (n, ["out", str(n)], ["err", str(n)]) for n in range(3)]

    pid_files = [tmp_path / "first.pid", tmp_path / "second.pid"]
    with pytest.raises(VerificationError, match=r"the 3 measuring processes run at once timed out after 4 s"):
        run_isolated_together([_hanging_with_a_grandchild(pid_files[0]), [sys.executable, "-c", "pass"],
                               _hanging_with_a_grandchild(pid_files[1])], timeout=4)
    for pid_file in pid_files:
        _assert_gone(int(pid_file.read_text()))


def test_what_a_command_leaves_running_when_it_exits_is_killed(tmp_path):
    from edgepack.smoke import run_isolated

    pid_file = tmp_path / "grandchild.pid"
    code = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
    """)
    start = time.monotonic()
    assert run_isolated([sys.executable, "-c", code], timeout=60).returncode == 0
    assert time.monotonic() - start < 60
    _assert_gone(int(pid_file.read_text()))


def test_failure_reason_names_the_signal():
    from edgepack.smoke import failure_reason

    oom = subprocess.CompletedProcess(["python"], -signal.SIGKILL, "", "loading weights\n")
    assert failure_reason(oom) == "the measuring process was killed by signal SIGKILL (out of memory?)"
    segv = subprocess.CompletedProcess(["python"], -signal.SIGSEGV, "", "")
    assert failure_reason(segv) == "the measuring process was killed by signal SIGSEGV"
    failed = subprocess.CompletedProcess(["python"], 1, "", "Traceback ...\n  ...\nValueError: bad weights\n\n")
    assert failure_reason(failed) == "ValueError: bad weights"
    silent = subprocess.CompletedProcess(["python"], 2, "", "")
    assert failure_reason(silent) == "the measuring process exited with code 2"


def test_a_probe_killed_by_signal_is_reported_as_such(packed, monkeypatch):
    """A real child killed by SIGKILL (what the kernel's OOM killer sends), through the whole
    measure_in_fresh_process path; the command is the seam."""
    import edgepack.smoke as smoke
    from edgepack.runtime import plan_steps

    monkeypatch.setattr(smoke, "probe_command", lambda spec_path, root=None: [
        sys.executable, "-c", "import os, sys; print('about to load', file=sys.stderr); os.kill(os.getpid(), 9)"])
    manifest = packed.manifest
    with pytest.raises(VerificationError) as info:
        smoke.measure_in_fresh_process(packed.bundle, task=manifest["model"]["task"], steps=plan_steps(manifest),
                                       loader=None, target="cpu", batch_size=1)
    assert str(info.value).endswith("the measuring process was killed by signal SIGKILL (out of memory?)")


# ---------------------------------------------------------------------------------------------
# 3. Decoders whose generation stops at end-of-sequence


@pytest.fixture(scope="module")
def tiny_decoder():
    """A small random Qwen2-style decoder (no tokenizer needed) and two prompts: the first
    prompt's greedy continuation starts with a token the second's never produces."""
    torch = pytest.importorskip("torch")
    import transformers

    from edgepack.testing import decoder_config

    config = decoder_config("qwen2", 256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (12, 16), generator=gen)
    with torch.inference_mode():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, pad_token_id=0)[:, 16:]
    for a in range(len(ids)):
        for b in range(len(ids)):
            eos = int(full[a, 0])
            if a != b and eos != 0 and eos not in full[b].tolist():
                inputs = {"input_ids": ids[[a, b]], "attention_mask": torch.ones(2, 16, dtype=torch.long)}
                return model, inputs, eos, full[[a, b]]
    pytest.skip("no pair of prompts with a distinct first token")


def test_decoder_tokens_keep_their_width_when_generation_stops_at_eos(tiny_decoder):
    from edgepack.smoke import compare, run_outputs

    model, inputs, eos, full = tiny_decoder
    model.generation_config.eos_token_id = eos
    try:
        one = run_outputs(model, inputs, "text-generation", batch_size=1, new_tokens=8)
        both = run_outputs(model, inputs, "text-generation", batch_size=2, new_tokens=8)
        first_alone = run_outputs(model, {k: v[:1] for k, v in inputs.items()}, "text-generation",
                                  batch_size=1, new_tokens=8)
    finally:
        model.generation_config.eos_token_id = None
    assert one["tokens"].shape == both["tokens"].shape == (2, 8)
    assert first_alone["tokens"].shape == (1, 8)  # the whole batch ended after one token
    assert one["tokens"][0].tolist() == [eos] + [0] * 7  # ended: the pad id after eos
    assert one["tokens"][1].tolist() == full[1].tolist()  # never ended: unchanged
    assert one["tokens"].tolist() == both["tokens"].tolist()  # the same whatever the batching
    assert compare(one, both, "text-generation").value == 1.0


def test_finish_tokens_pads_after_the_first_eos():
    import torch

    from edgepack.smoke import finish_tokens

    tokens = torch.tensor([[5, 9, 7], [9, 4, 9]])
    assert finish_tokens(tokens, 5, [9], 0).tolist() == [[5, 9, 0, 0, 0], [9, 0, 0, 0, 0]]
    assert finish_tokens(tokens, 3, [], 0).tolist() == tokens.tolist()
    assert finish_tokens(tokens, 4, [], 1).tolist() == [[5, 9, 7, 1], [9, 4, 9, 1]]


def test_compare_never_broadcasts_token_tables_of_different_widths():
    import torch

    from edgepack.smoke import compare

    logits = torch.zeros(2, 4)
    expected = {"tokens": torch.full((2, 8), 5), "logits": logits}
    actual = {"tokens": torch.full((2, 1), 5), "logits": logits}  # a run that stopped after one token
    fidelity = compare(expected, actual, "text-generation")
    assert fidelity.value == pytest.approx(1 / 8)
    assert compare(actual, expected, "text-generation").value == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------------------------
# 4. Repeatable memory figures


def test_measuring_environment_is_fixed(monkeypatch):
    from edgepack.smoke import probe_env, probe_threads

    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    env = probe_env(3)
    assert env["MALLOC_ARENA_MAX"] == "1"
    assert env["MALLOC_MMAP_THRESHOLD_"] and env["MALLOC_TRIM_THRESHOLD_"]
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["HF_HUB_OFFLINE"] == "1"
    assert 1 <= probe_threads() <= min(4, os.cpu_count() or 1)


def test_repeated_measurements_report_the_largest(packed, monkeypatch, tmp_path):
    """Every fresh process's peak is kept; the verdict uses the largest."""
    import edgepack.smoke as smoke
    from edgepack.runtime import plan_steps

    fake_child = textwrap.dedent("""
        import json, pathlib, struct, sys, time
        spec = json.load(open(sys.argv[1]))
        n = int(sys.argv[1].rsplit("-", 1)[1].split(".")[0])
        started = time.time()
        time.sleep(1)  # long enough for processes started together to overlap
        (pathlib.Path(sys.argv[2]) / f"{n}.times").write_text(f"{started} {time.time()}")
        assert (spec["outputs"] is None) == (n > 0)  # only the first process's outputs are read
        header = b"{}      "
        if spec["outputs"]:
            open(spec["outputs"], "wb").write(struct.pack("<Q", len(header)) + header)
        print(json.dumps({"peak_bytes": [100, 300, 200][n], "scope": "fake", "seconds": 0.1,
                          "threads": spec["threads"], "host_peak_bytes": [7, 9, 8][n]}))
    """)
    times = tmp_path / "times"
    times.mkdir()
    monkeypatch.setattr(smoke, "probe_command",
                        lambda spec_path, root=None: [sys.executable, "-c", fake_child, str(spec_path), str(times)])
    manifest = packed.manifest
    for at_once in (1, 3):  # one at a time, or all three together
        result = smoke.measure_in_fresh_process(packed.bundle, task=manifest["model"]["task"],
                                                steps=plan_steps(manifest), loader=None, target="cpu",
                                                batch_size=1, repeats=3, threads=2, at_once=at_once)
        spans = [tuple(map(float, (times / f"{n}.times").read_text().split())) for n in range(3)]
        if at_once == 1:
            assert all(spans[n][0] >= spans[n - 1][1] for n in (1, 2))  # each started once the one before ended
        else:
            assert max(start for start, _ in spans) < min(end for _, end in spans)  # all ran at the same time
        assert result.peaks == [100, 300, 200]
        assert result.peak_bytes == 300
        assert result.spread_bytes == 200
        assert result.threads == 2
        assert result.host_peak_bytes == 9


def test_more_measurements_run_together_where_cores_and_memory_allow(monkeypatch):
    import edgepack.memory
    from edgepack.smoke import ProbeResult, concurrent_repeats

    gb = 1 << 30
    monkeypatch.setattr(edgepack.memory, "main_memory", lambda: (16 * gb, 8 * gb))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)

    def result(host: int | None) -> ProbeResult:
        return ProbeResult(1, "scope", {}, 1.0, peaks=[1], host_peak_bytes=host)

    assert concurrent_repeats(result(gb // 2), 2, "cpu") == 2
    assert concurrent_repeats(result(gb // 2), 8, "cpu") == 4  # no more than the cores
    assert concurrent_repeats(result(3 * gb), 2, "cpu") == 1  # two would take over half the memory available
    assert concurrent_repeats(result(gb), 3, "cpu") == 3
    assert concurrent_repeats(result(None), 2, "cpu") == 1  # what one needs is unknown
    assert concurrent_repeats(result(gb // 2), 2, "cuda") == 1  # they would share the device


def test_acceptance_limit_leaves_a_margin_for_the_spread():
    from edgepack.smoke import ProbeResult, acceptance_limit, close_call, margin_bytes

    mb = 1_000_000

    def result(*peaks: int) -> ProbeResult:
        return ProbeResult(max(peaks), "scope", {}, 1.0, peaks=list(peaks))

    assert margin_bytes(result(2 * mb)) == 1 << 20  # the floor for small bundles
    assert margin_bytes(result(40 * mb)) == 2 * mb  # 5% of the peak
    assert margin_bytes(result(17 * mb, 19 * mb, 18 * mb)) == 4 * mb  # twice the spread seen
    assert acceptance_limit(80 * mb, result(74 * mb)) == 80 * mb - 3_700_000
    # the bundle under an 80 MB budget: one measurement of 73.7 MB is a close call, and
    # repeats spread as its verify runs did (73.7 to 77.0 MB) reject it
    assert close_call(80 * mb, result(73_700_000))
    spread = result(73_700_000, 75_700_000, 77_000_000)
    assert spread.peak_bytes > acceptance_limit(80 * mb, spread)
    assert close_call(80 * mb, result(74 * mb)) and not close_call(500 * mb, result(74 * mb))
    assert not close_call(80 * mb, result(74 * mb, 74 * mb, 75 * mb))  # measured often enough
    combined = result(70 * mb).with_more(result(72 * mb, 71 * mb))
    assert combined.peaks == [70 * mb, 72 * mb, 71 * mb] and combined.peak_bytes == 72 * mb


def test_decoder_logits_are_the_first_generation_steps_or_a_padded_forwards():
    """``logits_from="generate"``: a left-padded prompt's logits are those of the prompt alone
    (generation's positions follow the mask) and give the first token; ``"forward"`` (bundles
    packed before smoke.logits_from) runs the padded prompt at positions 0.. instead, which for
    absolute positions (GPT-2) gives other logits."""
    torch = pytest.importorskip("torch")
    import transformers

    from edgepack.smoke import run_outputs
    from edgepack.testing import decoder_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(decoder_config("gpt2", 256)).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    prompt = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    padded = {"input_ids": torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt], dim=1),
              "attention_mask": torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], dim=1)}
    first = run_outputs(model, padded, "text-generation", 1, new_tokens=4)
    forward = run_outputs(model, padded, "text-generation", 1, new_tokens=4, logits_from="forward")
    with torch.inference_mode():
        alone = model(input_ids=prompt).logits[:, -1, :]
    assert torch.allclose(first["logits"], alone, atol=1e-5)
    assert first["tokens"][:, 0].tolist() == first["logits"].argmax(-1).tolist()
    assert first["tokens"].tolist() == forward["tokens"].tolist()  # where the logits come from changes no token
    assert (forward["logits"] - alone).abs().max() > 100 * (first["logits"] - alone).abs().max() + 1e-4
    with pytest.raises(ValueError, match="logits_from"):
        run_outputs(model, padded, "text-generation", 1, logits_from="prefill")
    model.generation_config.num_beams = 2  # a model that generates by beam search: one row per prompt still
    try:
        beams = run_outputs(model, padded, "text-generation", 1, new_tokens=4)
    finally:
        model.generation_config.num_beams = 1
    assert beams["logits"].shape == first["logits"].shape and torch.allclose(beams["logits"], alone, atol=1e-5)


def test_smoke_batches_trim_the_padding_after_a_first_batch_as_stored():
    """After the first batch (the declared batch and length, which the meter counts), rows run
    in consecutive groups trimmed of the padding columns all their rows share, left (decoders)
    or right (encoders), each holding no more tokens than the first batch, generated ones
    included, and no more rows than a golden batch."""
    import torch

    from edgepack.smoke import BATCHING_PADDED, BATCHING_TRIMMED, batches, golden_batch, smoke_batches

    lengths = [3, 9, 2, 4, 4, 1, 7]
    width = 12
    left = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        left[row, width - n:] = 1
    ids = torch.arange(len(lengths) * width).reshape(len(lengths), width)
    for mask in (left, left.flip(1)):  # left padding, then right padding
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        out = list(smoke_batches(inputs, 2, batching=BATCHING_TRIMMED, new_tokens=3))
        assert torch.equal(out[0]["input_ids"], ids[:2]) and out[0]["input_ids"].shape == (2, width)
        rows = [b["input_ids"].shape[0] for b in out[1:]]
        spans = [b["input_ids"].shape[1] for b in out[1:]]
        assert rows == [4, 1] and spans == [4, 7]  # 2 x (12 + 3) = 30 tokens: lengths 2, 4, 4, 1 take 4 x (4 + 3)
        start = 2
        for batch in out[1:]:  # the rows in order, each trimmed to its batch's span of real tokens
            n, span = batch["input_ids"].shape
            assert n * (span + 3) <= 2 * (width + 3) and set(batch) == set(inputs)
            assert batch["attention_mask"].sum() == mask[start:start + n].sum()  # no real token was cut
            assert torch.equal(batch["input_ids"] // width, (ids[start:start + n] // width)[:, :span])
            start += n
        assert start == len(lengths)
    # the golden batch bounds the rows: 10 short rows of a 256-token workload, 4 at a time
    many = torch.zeros(11, 256, dtype=torch.long)
    many[:, -2:] = 1
    shapes = [tuple(b["input_ids"].shape) for b in smoke_batches(
        {"input_ids": many, "attention_mask": many}, 1, batching=BATCHING_TRIMMED)]
    assert golden_batch(1, 256) == 4 and shapes == [(1, 256), (4, 2), (4, 2), (2, 2)]
    # no attention mask: nothing is known to be padding; a 1-D entry is split by rows only
    plain = {"input_ids": ids, "row_id": torch.arange(len(lengths))}
    shapes = [(tuple(b["input_ids"].shape), b["row_id"].tolist()) for b in smoke_batches(plain, 1, batching=BATCHING_TRIMMED)]
    assert shapes == [((1, 12), [0]), ((1, 12), [1]), ((1, 12), [2]), ((1, 12), [3]), ((1, 12), [4]), ((1, 12), [5]),
                      ((1, 12), [6])]
    assert list(smoke_batches({"input_ids": ids[:0], "attention_mask": left[:0]}, 2, batching=BATCHING_TRIMMED)) == []
    flat = [b["row_id"].tolist() for b in smoke_batches({"row_id": torch.arange(5)}, 2, batching=BATCHING_TRIMMED)]
    assert flat == [[0, 1], [2, 3], [4]]  # nothing with columns: plain batches
    padded = list(smoke_batches({"input_ids": ids, "attention_mask": left}, 3, batching=BATCHING_PADDED))
    assert [b["input_ids"].shape for b in padded] == [b["input_ids"].shape for b in batches({"input_ids": ids}, 3)]
    with pytest.raises(ValueError, match="batching"):
        list(smoke_batches({"input_ids": ids}, 3, batching="trimmed"))


def test_run_outputs_calls_after_first_once_the_first_batch_has_run(tiny_decoder):
    """The measuring process reads its meter there: after the first batch's generation, before
    any other batch's."""
    import torch

    from edgepack.smoke import BATCHING_TRIMMED, run_outputs

    model, inputs, _, _ = tiny_decoder
    rows = torch.cat([inputs["input_ids"]] * 2)
    doubled = {"input_ids": rows, "attention_mask": torch.ones_like(rows)}
    calls: list[int] = []
    seen: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = run_outputs(model, doubled, "text-generation", 1, new_tokens=4, batching=BATCHING_TRIMMED,
                          after_first=lambda: seen.append(len(calls)))
        alone = run_outputs(model, {k: v[:1] for k, v in doubled.items()}, "text-generation", 1, new_tokens=4)
    finally:
        handle.remove()
    assert seen == [4]  # the first batch's four generation steps, nothing after them
    assert len(calls) == 4 * 4 + 4  # then the three others (unpadded: one at a time), and the lone run
    assert torch.equal(out["tokens"][:1], alone["tokens"]) and out["tokens"].shape == (4, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process groups and sessions")
def test_the_measuring_process_leads_its_own_process_group_in_this_session():
    """Its own group, so a timeout kills all it started; this session, so that under autogroup
    scheduling a low-priority thread of the pack (the background hash) yields to it."""
    from edgepack.smoke import run_isolated

    proc = run_isolated([sys.executable, "-c", "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"], timeout=60)
    pid, group, session = (int(n) for n in proc.stdout.split())
    assert group == pid and session == os.getsid(0)
