"""ModelSource: facts read from safetensors headers match the model's real modules."""

from __future__ import annotations

import os
import sys

import pytest

from edgepack.errors import UsageError
from edgepack.model import ModelSource, auto_class, count_parameters, safetensors_header


def _skeleton_counts(source):
    import torch

    with torch.device("meta"):
        skeleton = auto_class(source.facts.task).from_config(source.config)
    return count_parameters(skeleton)


def test_minilm_facts_match_its_modules(model_dir):
    source = ModelSource.open(model_dir)
    counts, shapes = _skeleton_counts(source)
    assert dict(source.facts.parameters_by_kind) == counts
    assert source.facts.num_parameters == 22_713_216
    assert sorted(source.facts.linear_shapes) == sorted(shapes)
    assert source.facts.dtype == "float32"
    assert source.facts.task == "feature-extraction"
    assert (source.facts.hidden_size, source.facts.num_layers, source.facts.num_attention_heads) == (384, 6, 12)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_facts_match_their_modules(kind, tmp_path):
    from edgepack.testing import build_decoder

    source = ModelSource.open(build_decoder(kind, tmp_path / kind))
    counts, _ = _skeleton_counts(source)
    assert dict(source.facts.parameters_by_kind) == counts
    assert source.facts.task == "text-generation"


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(UsageError, match="not a safetensors file"):
        safetensors_header(bad)


# ---------------------------------------------------------------------------------------------
# Reproducible weight files


def test_safetensors_metadata_is_written_in_one_order(tmp_path):
    """safetensors writes its metadata map in a random order; save_safetensors (and
    normalize_safetensors on a file written elsewhere) give one byte sequence for the same
    tensors and metadata, and the file reads back the same."""
    import hashlib

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edgepack.model import normalize_safetensors, save_safetensors

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    metadata = {"format": "x/1", "group_size": "32", "quantized": '{"layer.é": 1}', "dtype": "float32"}
    written = set()
    for i in range(6):
        save_safetensors(tensors, tmp_path / f"ours-{i}.safetensors", metadata)
        written.add(hashlib.sha256((tmp_path / f"ours-{i}.safetensors").read_bytes()).hexdigest())
    assert len(written) == 1
    stock = tmp_path / "stock.safetensors"
    save_file(tensors, stock, metadata=metadata)
    normalize_safetensors(stock)
    assert stock.read_bytes() == (tmp_path / "ours-0.safetensors").read_bytes()
    loaded = load_file(stock)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(stock, "pt") as handle:
        assert handle.metadata() == metadata


def test_safetensors_files_are_laid_out_with_aligned_tensor_data(tmp_path, monkeypatch):
    """normalize_safetensors starts every tensor at a multiple of the largest power of two (up
    to 64) dividing its size (so a memory-mapped int8 weight suits the CPU kernels' aligned
    loads); the tensors, metadata and file mode stay as they were, a second pass changes nothing,
    and a rewrite that fails leaves the file as it was and no temporary file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edgepack.model import SAFETENSORS_ALIGNMENT, normalize_safetensors, safetensors_layout

    tensors = {"bias": torch.rand(3), "weight": torch.randint(-128, 128, (48, 64), dtype=torch.int8),
               "half": torch.rand(5).bfloat16(), "odd": torch.randint(-9, 9, (7,), dtype=torch.int8),
               "wide": torch.rand(4, 16), "narrow": torch.randint(-9, 9, (3, 16), dtype=torch.int8)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"z": "1", "a": "2"})
    header, start = safetensors_layout(path)
    assert (start + header["weight"]["data_offsets"][0]) % SAFETENSORS_ALIGNMENT  # safetensors' own layout
    before = path.read_bytes()

    def no_room(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", no_room)
    with pytest.raises(OSError):
        normalize_safetensors(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    monkeypatch.undo()
    path.chmod(0o644)
    assert normalize_safetensors(path) and not normalize_safetensors(path)
    assert path.stat().st_mode & 0o777 == 0o644  # rewritten through a temporary file, the mode kept
    header, start = safetensors_layout(path)
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        assert (start + header[name]["data_offsets"][0]) % min(SAFETENSORS_ALIGNMENT, size & -size) == 0, name
    assert (start + header["narrow"]["data_offsets"][0]) % 16 == 0  # 48 bytes: an int8 weight 16 wide
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    assert list(header["__metadata__"]) == ["a", "z"]
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"a": "2", "z": "1"}
        assert handle.get_tensor("weight").data_ptr() % SAFETENSORS_ALIGNMENT == 0
    assert not list(tmp_path.glob("*.edgepack-layout"))


def test_two_saves_of_a_stock_int8_model_are_byte_identical(tmp_path):
    """Stock transformers writes one metadata entry per torchao tensor, in a random order: the
    pipeline normalises every weight file it writes, so two packs of one int8 plan agree."""
    import transformers

    from edgepack.pipeline import _save_model
    from edgepack.plugins.quantize import Quantize
    from edgepack.testing import decoder_config

    quantize = Quantize()
    options = quantize.parse_options({"scheme": "int8"})
    files = []
    for i in range(3):
        transformers.set_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(decoder_config("llama", 500)).eval()
        _save_model(quantize.apply(model, options, None), [(quantize, options)], tmp_path / str(i))
        files.append((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]


@pytest.mark.parametrize("extra,needle", [
    ({"auto_map": {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "configuration_evil.EvilConfig"}},
     "auto_map: configuration_evil.EvilConfig, modeling_evil.EvilModel"),
    ({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}, "tokenization_evil.EvilTokenizer"),
    ({"trust_remote_code": True}, "trust_remote_code: true"),
])
def test_a_source_asking_for_its_own_code_is_refused(tmp_path, model_dir, extra, needle):
    """A config that asks for the model directory's own Python code is refused before
    transformers reads it, with what it asked for; nothing of the directory is imported."""
    import json
    import shutil

    from click.testing import CliRunner

    from edgepack.cli import cli

    source = tmp_path / "custom"
    source.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **extra}))
    shutil.copy(next(model_dir.glob("*.safetensors")), source / "model.safetensors")
    (source / "modeling_evil.py").write_text("raise SystemExit('model code was run')\n")
    with pytest.raises(UsageError, match="asks to run the model's own code") as info:
        ModelSource.open(source)
    assert needle in str(info.value)
    result = CliRunner().invoke(cli, ["plan", str(source), "--budget", "100MB"])
    assert result.exit_code == 2 and "asks to run the model's own code" in result.output


# ---------------------------------------------------------------------------------------------
# safetensors headers are validated before use


def _raw_safetensors(path, header, data: bytes, size: int | None = None):
    import json
    import struct

    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if size is None else size) + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [2, 2], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("header,data,size,needle", [
    (GOOD, bytes(12), 10**9, "header size"),
    ({**GOOD, "a": {**GOOD["a"], "dtype": "F33"}}, bytes(12), None, "unknown dtype 'F33'"),
    ({**GOOD, "a": {**GOOD["a"], "shape": [-2]}}, bytes(12), None, "not a list of non-negative integers"),
    ({**GOOD, "b": {**GOOD["b"], "data_offsets": [8, 40]}}, bytes(12), None, "outside the 12 bytes of data"),
    ({**GOOD, "b": {**GOOD["b"], "shape": [3, 2]}}, bytes(12), None, "takes 4 bytes, but I8 of shape [3, 2] takes 6"),
    ({**GOOD, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None, "4 bytes before tensor 'a'"),
    (GOOD, bytes(20), None, "8 bytes after the last tensor"),
    ({**GOOD, "__metadata__": {"format": 1}}, bytes(12), None, "__metadata__ must map strings to strings"),
    ({**GOOD, "b": {**GOOD["b"], "data_offsets": [8]}}, bytes(12), None, "not two integers"),
])
def test_a_malformed_safetensors_header_is_one_sentence(tmp_path, header, data, size, needle):
    from edgepack.model import safetensors_layout

    path = _raw_safetensors(tmp_path / "w.safetensors", header, data, size)
    with pytest.raises(UsageError, match="w.safetensors") as info:
        safetensors_layout(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_well_formed_header_passes(tmp_path):
    from edgepack.model import safetensors_layout

    header, start = safetensors_layout(_raw_safetensors(tmp_path / "w.safetensors", GOOD, bytes(12)))
    assert set(header) == {"a", "b"} and start == (tmp_path / "w.safetensors").stat().st_size - 12


def test_weights_are_hashed_in_the_background_at_the_lowest_priority_and_finished_by_the_caller(tmp_path, monkeypatch):
    """A pack hashes the source's weights on such a thread while it computes (its manifest
    needs them only at the end); asking for them stops the thread and finishes at the caller's
    priority, with the same hashes, and an error in the thread reaches the caller."""
    import threading

    import edgepack.model as model_module
    from edgepack.model import FileHashes, ModelSource, sha256_file

    files = []
    for name, size in (("a.safetensors", 3 * FileHashes.CHUNK + 5), ("b.safetensors", 0), ("c.safetensors", 7)):
        (tmp_path / name).write_bytes(os.urandom(size))
        files.append(tmp_path / name)
    expected = {f.name: sha256_file(f) for f in files}
    source = ModelSource(tmp_path, None, None, weight_files=files)
    assert source.weights_sha256() == expected  # never started: hashed here

    niceness = []
    real_step = FileHashes._step
    gate = threading.Event()

    def step(self):  # the thread hashes one chunk, notes its priority, then waits to be stopped
        if threading.current_thread() is not threading.main_thread():
            niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            if len(niceness) > 1:
                gate.wait(5)
                return True
        return real_step(self)

    monkeypatch.setattr(FileHashes, "_step", step)
    source = ModelSource(tmp_path, None, None, weight_files=files)
    source.hash_in_background()
    source.hash_in_background()  # once only
    while len(niceness) < 2:
        threading.Event().wait(0.01)
    gate.set()
    assert source.weights_sha256() == expected  # the caller took over after the thread's first chunk
    if sys.platform.startswith("linux"):
        assert niceness[0] == 19

    monkeypatch.setattr(FileHashes, "_step", real_step)
    real_pread = model_module.os.pread
    monkeypatch.setattr(model_module.os, "pread", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    opened = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    broken = FileHashes(files)
    broken.start()
    with pytest.raises(OSError, match="I/O error"):
        broken.result()
    if opened is not None:
        assert len(os.listdir("/proc/self/fd")) == opened  # the failed file was closed
    monkeypatch.setattr(model_module.os, "pread", real_pread)
    assert broken.result() == expected  # and is read again

    (tmp_path / "other").mkdir()  # two files of one name: each hashed once, in order, the last one kept
    (tmp_path / "other" / "c.safetensors").write_bytes(b"other")
    twice = FileHashes([files[2], tmp_path / "other" / "c.safetensors"])
    assert twice.result() == {"c.safetensors": sha256_file(tmp_path / "other" / "c.safetensors")}


def test_a_failed_pack_stops_hashing_its_source(tmp_path, monkeypatch):
    import edgepack.pipeline as pipeline
    from edgepack.model import ModelSource
    from edgepack.pipeline import PackRequest

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    source = ModelSource(tmp_path, None, None, weight_files=[tmp_path / "model.safetensors"])
    stopped = []
    monkeypatch.setattr(source, "stop_hashing", lambda: stopped.append(True))
    request = PackRequest.from_settings(dict(target="cpu", out=str(tmp_path / "out")))
    with pytest.raises(RuntimeError):
        with pipeline._hashing(source, request):
            assert source._hashes is not None  # started: the weights fit in memory, no --work-memory
            raise RuntimeError("a plan failed")
    assert stopped == [True]
    capped = ModelSource(tmp_path, None, None, weight_files=[tmp_path / "model.safetensors"])
    with pipeline._hashing(capped, PackRequest.from_settings(dict(target="cpu", out=str(tmp_path), work_memory="1GB"))):
        assert capped._hashes is None  # under --work-memory the hashes are computed at the end
