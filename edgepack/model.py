"""ModelSource: a local Hugging Face model directory, its facts, and loading it offline."""

from __future__ import annotations

import contextlib
import contextvars
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgepack.errors import UsageError
from edgepack.interfaces import ModelFacts

#: Files that define a tokenizer; a model directory needs at least one of them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")

#: Suffixes of pickled checkpoints: never read (unpickling runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickled_files(directory: Path) -> list[Path]:
    """Pickled checkpoint files directly in ``directory``, by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))


# Files copied next to the weights so that the bundle's model/ is a complete model directory.
_SIDE_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "generation_config.json",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileHashes:
    """sha256 of files, computed a chunk at a time by whoever holds the work: a background
    thread of the lowest scheduling priority (:meth:`start`; on Linux a thread's own nice
    value), which takes only CPU time the rest of the process and its children leave idle, and
    then :meth:`result`, which stops that thread after its current chunk and finishes what is
    left at the caller's priority. So an idle machine hashes while a pack computes, and a busy
    one never makes the caller wait on a starved thread. A daemon thread does not keep a
    failing command alive; an error in it is met again, and raised, by :meth:`result`."""

    CHUNK = 1 << 20

    def __init__(self, files: list[Path]) -> None:
        self._files = list(files)
        self._digests: dict[str, str] = {}
        self._next = 0  # the index of the file in hand, or of the next one
        self._current: tuple[int, Any, int] | None = None  # (descriptor, digest, offset) of the file in hand
        self._thread: Any = None
        self._stop: Any = None

    def _step(self) -> bool:
        """Hash one chunk (or finish one file); False once every file is done. A failed read
        closes the file and starts it again next time."""
        if self._next == len(self._files):
            return False
        if self._current is None:
            self._current = (os.open(self._files[self._next], os.O_RDONLY), hashlib.sha256(), 0)
        fd, digest, offset = self._current
        try:
            block = os.pread(fd, self.CHUNK, offset)
        except BaseException:
            os.close(fd)
            self._current = None
            raise
        if block:
            digest.update(block)
            self._current = (fd, digest, offset + len(block))
            return True
        os.close(fd)
        self._digests[self._files[self._next].name] = digest.hexdigest()
        self._current = None
        self._next += 1
        return True

    def start(self) -> None:
        """Hash on a background thread until done or :meth:`result` takes over (once)."""
        import threading

        if self._thread is not None:
            return
        self._stop = threading.Event()

        def run() -> None:
            if sys.platform.startswith("linux"):
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread alone
            with contextlib.suppress(Exception):  # result() meets the same error and raises it
                while not self._stop.is_set() and self._step():
                    pass

        self._thread = threading.Thread(target=run, name="edgepack-hash", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread after its current chunk (what is done stays done)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def result(self) -> dict[str, str]:
        """Every file's sha256 by file name, finished here."""
        self.stop()
        while self._step():
            pass
        return dict(self._digests)


def _resolve(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise UsageError(
                f"model {text!r} is neither a directory nor a hub id in the local Hugging Face cache"
            ) from None
    raise UsageError(f"model path {text} does not exist")


def custom_code(raw_config: Any) -> str:
    """What in a raw ``config.json`` asks for the model directory's own Python code (``auto_map``,
    ``trust_remote_code``), as a short phrase; empty when nothing does."""
    if not isinstance(raw_config, dict):
        return ""
    found = []
    auto_map = raw_config.get("auto_map")
    if auto_map:
        targets = sorted({str(v if isinstance(v, str) else v[0]) for v in auto_map.values()}) \
            if isinstance(auto_map, dict) else [str(auto_map)]
        found.append("auto_map: " + ", ".join(targets[:3]) + (", ..." if len(targets) > 3 else ""))
    if raw_config.get("trust_remote_code"):
        found.append("trust_remote_code: true")
    return "; ".join(found)


# ---------------------------------------------------------------------------------------------
# A model's own code: never run, unless the user allowed it for that directory (--allow-code)

#: Directories (real paths) whose own Python code the user allowed this process to run. Only
#: for them does edgepack pass ``trust_remote_code=True`` to transformers (see
#: :func:`code_kwargs`); nothing else ever runs a model directory's code.
_CODE_ALLOWED: set[str] = set()


def allow_code_of(model_dir: str | os.PathLike) -> None:
    """Let this process run the Python code of ``model_dir`` (``--allow-code``)."""
    _CODE_ALLOWED.add(os.path.realpath(model_dir))


def code_kwargs(where: Any) -> dict[str, Any]:
    """``{"trust_remote_code": True}`` for a directory (or a config read from one) whose code
    the user allowed, else ``{}``: transformers then uses its own classes and runs nothing."""
    path = getattr(where, "_name_or_path", where)
    try:
        allowed = bool(path) and os.path.realpath(path) in _CODE_ALLOWED
    except (TypeError, ValueError):
        allowed = False
    return {"trust_remote_code": True} if allowed else {}


def code_files(model_dir: Path) -> list[str]:
    """The Python files of a model directory (its top level, where transformers looks for
    ``auto_map`` modules), sorted; links are not followed."""
    return sorted(p.name for p in Path(model_dir).glob("*.py") if p.is_file() and not p.is_symlink())


def task_of(config: Any) -> str:
    """``text-generation`` for causal-LM architectures, else ``feature-extraction``."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "text-generation"
    return "feature-extraction"


def auto_class(task: str) -> Any:
    """The transformers Auto class that loads models of ``task``."""
    import transformers

    return transformers.AutoModelForCausalLM if task == "text-generation" else transformers.AutoModel


def module_kind(module: Any) -> str:
    """Weight kind of a module: embedding, linear, norm or other."""
    import torch

    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
        return "linear"
    if "Norm" in type(module).__name__:
        return "norm"
    return "other"


def count_parameters(model: Any) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Parameters by module kind (tied weights counted once; output heads as "other") and the
    (out, in) of each Linear."""
    by_kind = {"embedding": 0, "linear": 0, "norm": 0, "other": 0}
    seen: set[int] = set()
    shapes: list[tuple[int, int]] = []
    for name, module in model.named_modules():
        kind = "other" if name.split(".", 1)[0] in OUTPUT_HEADS else module_kind(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            by_kind[kind] += param.numel()
            if kind == "linear" and param.dim() == 2:
                out_f, in_f = param.shape
                if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                    in_f, out_f = param.shape
                shapes.append((int(out_f), int(in_f)))
    return by_kind, shapes


#: Bytes per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


def safetensors_layout(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (name → {dtype, shape, data_offsets}) and the file
    offset where its tensor data begins; the one parser of safetensors headers in edgepack.

    The header is validated before anything uses it, as the format requires: its length within
    the file, a JSON object of tensors with known dtypes, whole non-negative shapes, and data
    offsets that match each shape's byte size and tile the data region exactly (in range, no
    overlap, no gap, nothing after the last tensor); ``__metadata__`` maps strings to strings.
    UsageError, one sentence naming the file and the tensor, otherwise."""
    try:
        size_on_disk = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= size <= min(100 * 2**20, size_on_disk - 8):
                raise UsageError(f"{path} is not a safetensors file (header size {size} for a file of "
                                 f"{size_on_disk} bytes)")
            raw = handle.read(size)
    except OSError as exc:
        raise UsageError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))  # UTF-8, as the format says (bytes would also be read as UTF-16/32)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deeply
        raise UsageError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path} is not a safetensors file (its header is not a JSON object)")
    problem = _layout_problem(header, size_on_disk - 8 - size)
    if problem:
        raise UsageError(f"{path} is not a valid safetensors file: {problem}")
    return header, 8 + size


def _layout_problem(header: dict[str, Any], data_bytes: int) -> str | None:
    """What is wrong with a safetensors header whose data region holds ``data_bytes``, or None."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                 for k, v in meta.items())):
        return "__metadata__ must map strings to strings"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {name!r} is not described by an object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
            return f"tensor {name!r} has unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers"
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            return f"tensor {name!r} has data_offsets {offsets!r}, not two integers"
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            return f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {data_bytes} bytes of data"
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * SAFETENSORS_DTYPE_BYTES[dtype]:
            return (f"tensor {name!r} takes {end - begin} bytes, but {dtype} of shape {shape} takes "
                    f"{count * SAFETENSORS_DTYPE_BYTES[dtype]}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            return f"tensor {name!r} overlaps the tensor before it"
        if begin > position:
            return f"{begin - position} bytes before tensor {name!r} belong to no tensor"
        position = end
    if position != data_bytes:
        return f"{data_bytes - position} bytes after the last tensor belong to no tensor"
    return None


#: Byte alignment of tensor data in the safetensors files edgepack writes
#: (:func:`normalize_safetensors`): the CPU kernels' vector loads want it (torch 2.13's fused int8
#: kernel reads its weight with 16-byte aligned loads on AVX-512), and a memory-mapped tensor
#: is exactly as aligned as its offset in the file.
SAFETENSORS_ALIGNMENT = 64


def normalize_safetensors(path: Path) -> bool:
    """Put ``path`` in edgepack's canonical layout, in place; True when the bytes changed.

    * The ``__metadata__`` keys in sorted order: safetensors (0.8) writes the map in a random
      order, so saving the same tensors and metadata twice gives different bytes whenever there
      are two keys or more (stock transformers' files and plugins' own formats alike), and a
      bundle's hashes would change between identical packs.
    * Tensor data aligned in the file: each tensor starts at a multiple of the largest power of
      two, up to :data:`SAFETENSORS_ALIGNMENT`, that divides its size (tensors in decreasing
      order of that, each group in the writer's order, after a header padded with spaces, as
      safetensors pads it, to the alignment). So an int8 weight whose rows are a multiple of 16
      wide starts at least 16-byte aligned, and one whose size is a multiple of 64 bytes
      64-byte aligned.
      safetensors aligns only to 8 bytes, and it puts int8 weights after every wider tensor,
      at whatever offset the wider ones leave.

    When only the metadata order changes, the header is rewritten where it is; otherwise the
    file is rewritten beside itself, tensor by tensor, and renamed over it (no more memory
    than one tensor)."""
    header, start = safetensors_layout(path)
    meta = header.get("__metadata__")
    spans = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    def alignment(name: str) -> int:  # the largest power of two up to the alignment dividing its size
        size = spans[name][1] - spans[name][0]
        return min(SAFETENSORS_ALIGNMENT, size & -size) if size else SAFETENSORS_ALIGNMENT

    order = sorted(spans, key=lambda k: (-alignment(k), spans[k][0]))
    ordered: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if isinstance(meta, dict) else {}
    position = 0
    for name in order:
        size = spans[name][1] - spans[name][0]
        ordered[name] = dict(header[name], data_offsets=[position, position + size])
        position += size
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    moved = any(ordered[k]["data_offsets"] != spans[k] for k in spans)
    if not moved and start % SAFETENSORS_ALIGNMENT == 0 and len(text) <= start - 8:
        with open(path, "r+b") as handle:  # the data stays where it is: the header alone
            handle.seek(8)
            old = handle.read(start - 8)
            text = text.ljust(len(old), b" ")
            if text == old:
                return False
            handle.seek(8)
            handle.write(text)
        return True
    text = text.ljust(-(-(8 + len(text)) // SAFETENSORS_ALIGNMENT) * SAFETENSORS_ALIGNMENT - 8, b" ")
    handle, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".edgepack-layout", dir=path.parent)
    temporary = Path(name)
    try:
        with open(path, "rb") as source, os.fdopen(handle, "wb") as target:
            target.write(len(text).to_bytes(8, "little") + text)
            for name in order:
                begin, end = spans[name]
                source.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = source.read(min(remaining, 1 << 24))
                    if not chunk:
                        raise UsageError(f"{path} ends inside tensor {name!r}")
                    target.write(chunk)
                    remaining -= len(chunk)
        shutil.copymode(path, temporary)  # mkstemp makes it 0600: the file keeps its own mode
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return True


#: The largest file :func:`save_safetensors` writes with ``sharded=True`` (pack's ``--shard-size``,
#: set around a plugin's ``save`` by :func:`shard_limit`); None: one file, however large.
_SHARD_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("edgepack_shard_limit", default=None)

#: Index of a safetensors file written in shards (Hugging Face's convention, as
#: ``model.safetensors.index.json`` for ``model.safetensors``): ``<name>.index.json``
SHARD_INDEX_SUFFIX = ".index.json"


@contextlib.contextmanager
def shard_limit(max_bytes: int | None) -> Iterator[None]:
    """Within the block, :func:`save_safetensors` with ``sharded=True`` writes files larger than
    ``max_bytes`` as shards with an index."""
    token = _SHARD_LIMIT.set(max_bytes)
    try:
        yield
    finally:
        _SHARD_LIMIT.reset(token)


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None, *,
                     sharded: bool = False) -> None:
    """``safetensors.torch.save_file``, then edgepack's layout (:func:`normalize_safetensors`):
    the same tensors and metadata give the same bytes, with tensor data aligned. Plugins with a
    weight format of their own save through this.

    With ``sharded=True``, weights larger than the pack's ``--shard-size`` (:func:`shard_limit`)
    are written as shards, ``model.int4-00001-of-00003.safetensors`` ... for ``path`` =
    ``model.int4.safetensors``, each with the same ``metadata``, and an index
    ``model.int4.safetensors.index.json`` naming each tensor's shard, as stock saving does for
    ``model.safetensors``: safetensors serialises a file in memory, so saving holds one shard's
    bytes at a time. An earlier save of ``path`` (the file, its index, its shards) is removed
    first; ``path`` must not be stock saving's ``model.safetensors``. :func:`load_safetensors`,
    :func:`read_format_metadata` and :func:`shard_files` read either form."""
    from safetensors.torch import save_file

    path = Path(path)
    index = path.with_name(path.name + SHARD_INDEX_SUFFIX)
    stem, pattern = _shard_stem(path), _shard_pattern(path)
    shards = [p for p in path.parent.glob(f"{glob.escape(stem)}-*-of-*.safetensors") if pattern.fullmatch(p.name)]
    for stale in [path, index, *shards]:
        stale.unlink(missing_ok=True)  # an earlier save's, of either form: the new one replaces it
    limit = _SHARD_LIMIT.get() if sharded else None
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    if limit is None or sum(sizes.values()) <= limit:
        save_file(tensors, str(path), metadata=metadata)
        normalize_safetensors(path)
        return
    groups: list[list[str]] = [[]]
    held = 0
    for name, size in sizes.items():  # in the given order; a tensor over the limit alone in its shard
        if groups[-1] and held + size > limit:
            groups.append([])
            held = 0
        groups[-1].append(name)
        held += size
    weight_map = {}
    for number, names in enumerate(groups, 1):
        shard = path.with_name(f"{stem}-{number:05d}-of-{len(groups):05d}.safetensors")
        save_file({name: tensors[name] for name in names}, str(shard), metadata=metadata)
        normalize_safetensors(shard)
        weight_map.update(dict.fromkeys(names, shard.name))
    listing = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    index.write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")


def _shard_stem(path: Path) -> str:
    """``model.int4`` for ``model.int4.safetensors``: what its shards' names begin with."""
    return path.name[:-len(".safetensors")] if path.name.endswith(".safetensors") else path.name


def _shard_pattern(path: Path) -> re.Pattern[str]:
    """The names of ``path``'s shards: ``<stem>-NNNNN-of-NNNNN.safetensors``."""
    return re.compile(re.escape(_shard_stem(path)) + r"-(\d{5})-of-(\d{5})\.safetensors")


def shard_map(path: Path) -> dict[str, Path]:
    """For a safetensors file written by :func:`save_safetensors`: ``{tensor: file holding it}``,
    from its index where it was written in shards, else ``{}`` for the single file ``path``.

    The index comes from a bundle, so it is checked as untrusted input: a JSON object whose
    ``weight_map`` names, for each tensor, a shard of ``path``'s own name in its own directory
    (``<stem>-NNNNN-of-NNNNN.safetensors``, numbered 1 to N of N; nothing elsewhere) that exists
    and is no link. UsageError, naming the file, otherwise, and when neither ``path`` nor its
    index exists, or both do, or either is a link."""
    path = Path(path)
    index = path.with_name(path.name + SHARD_INDEX_SUFFIX)
    for link in (path, index):
        if link.is_symlink():
            raise UsageError(f"{link} is a symbolic link; weights are read only from plain files")
    if not index.is_file():
        if not path.is_file():
            raise UsageError(f"{path} is missing (and there is no {index.name} of shards)")
        return {}
    if path.exists():
        raise UsageError(f"{path.parent} holds both {path.name} and {index.name}: one of them does not belong")
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"{index} cannot be read as JSON: {getattr(exc, 'strerror', None) or exc}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{index} has no weight_map of tensor names to shard files")
    stem, pattern = _shard_stem(path), _shard_pattern(path)
    files: dict[str, Path] = {}
    for tensor, name in weight_map.items():
        match = pattern.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise UsageError(f"{index}: tensor {tensor!r} is mapped to {name!r}, not a shard "
                             f"{stem}-NNNNN-of-NNNNN.safetensors beside it")
        if name not in files:
            files[name] = path.with_name(name)
            if not files[name].is_file() or files[name].is_symlink():
                raise UsageError(f"{index} names the shard {name}, which is not a file in {path.parent}")
    numbers = sorted((int(m[1]), int(m[2])) for m in map(pattern.fullmatch, files))
    if numbers != [(i, len(numbers)) for i in range(1, len(numbers) + 1)]:
        raise UsageError(f"{index} names shards {', '.join(sorted(files))}, not 1 to {len(numbers)} of {len(numbers)}")
    return {tensor: files[name] for tensor, name in weight_map.items()}


def safetensors_saved(path: Path) -> bool:
    """Whether the safetensors file ``path`` was written, whole or in shards with an index."""
    path = Path(path)
    return path.is_file() or path.with_name(path.name + SHARD_INDEX_SUFFIX).is_file()


def shard_files(path: Path) -> list[Path]:
    """The files that hold the safetensors file ``path``: ``[path]``, or its shards in order
    (:func:`shard_map`)."""
    return sorted(set(shard_map(path).values())) or [Path(path)]


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Every tensor of the safetensors file ``path``, written whole or in shards by
    :func:`save_safetensors` (``safetensors.torch.load_file`` per file, memory-mapped on CPU).
    UsageError, naming the file, for one that cannot be read or shards that do not hold the
    tensors their index says."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    where = shard_map(path)
    tensors: dict[str, Any] = {}
    for file in sorted(set(where.values())) or [Path(path)]:
        try:
            if where:  # names first: nothing is loaded from a shard that holds what its index does not say
                with safe_open(file, "pt") as handle:
                    stray = [name for name in handle.keys() if where.get(name) != file]
                if stray:
                    raise UsageError(f"{file} holds {stray[0]!r}, which its index does not place there")
            tensors.update(load_file(file, device=device))
        except UsageError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise UsageError(f"{file} cannot be read as safetensors: {exc}") from None
    missing = [name for name in where if name not in tensors]
    if missing:
        raise UsageError(f"{where[missing[0]]} lacks {missing[0]!r}, which its index places there")
    return tensors


def stored_layout(path: Path) -> dict[str, Any]:
    """The headers of the safetensors file ``path`` (whole or in shards), merged: name →
    {dtype, shape, data_offsets within its own file}. The shards' contents are not checked
    against the index (their names are, by :func:`shard_files`): for reading back what this
    process saved (a plan step's details at pack time)."""
    header: dict[str, Any] = {}
    for file in shard_files(path):
        header.update(safetensors_layout(file)[0])
    header.pop("__metadata__", None)
    return header


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name → {dtype, shape, data_offsets}."""
    return safetensors_layout(path)[0]


#: top-level names of output heads: counted as "other", which compressors leave alone
OUTPUT_HEADS = ("lm_head", "embed_out")


def _kind_of_tensor(name: str, shape: list[int], names: set[str]) -> str:
    """Weight kind of a stored tensor from its name and shape (no model code imported)."""
    lowered = name.lower()
    if name.split(".", 1)[0] in OUTPUT_HEADS:
        return "other"
    module = name.rsplit(".", 1)[0]
    if len(shape) == 1:
        if "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_"):
            return "norm"
        sibling = module + ".weight"
        if sibling != name and sibling in names:
            return "embedding" if _is_embedding(sibling) else "linear"
        return "other"
    if len(shape) == 2:
        return "embedding" if _is_embedding(name) else "linear"
    return "other"


def _is_embedding(name: str) -> bool:
    lowered = name.lower()
    return "embed" in lowered or lowered.rsplit(".", 2)[-2:][0] in ("wte", "wpe")


def count_stored_parameters(files: list[Path]) -> tuple[dict[str, int], list[tuple[int, int]], str]:
    """Parameters by weight kind, 2-D Linear shapes and the dominant float dtype, read from the
    safetensors headers alone: fast, and nothing of the model's code is imported."""
    by_kind = {"embedding": 0, "linear": 0, "norm": 0, "other": 0}
    shapes: list[tuple[int, int]] = []
    bits_count: dict[str, int] = {}
    entries = {}
    for file in files:
        header = safetensors_header(file)
        entries.update({k: v for k, v in header.items() if k != "__metadata__"})
    names = set(entries)
    for name, info in entries.items():
        shape = list(info.get("shape", []))
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if name.endswith(("position_ids", "inv_freq", "masked_bias")) or info.get("dtype") in ("I64", "BOOL"):
            continue  # buffers, not weights
        kind = _kind_of_tensor(name, shape, names)
        by_kind[kind] += numel
        if kind == "linear" and len(shape) == 2:
            shapes.append((int(shape[0]), int(shape[1])))
        bits_count[info.get("dtype", "F32")] = bits_count.get(info.get("dtype", "F32"), 0) + numel
    dominant = max(bits_count, key=bits_count.get) if bits_count else "F32"
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(dominant, "float32")
    return by_kind, shapes, dtype


def _architecture_numbers(config: Any, config_path: Path) -> dict[str, int]:
    """hidden size, layers, heads, kv heads, head dim, FFN size, vocab, positions."""
    numbers: dict[str, Any] = {}
    try:
        from optimum.utils import NormalizedConfigManager

        normalized = NormalizedConfigManager.get_normalized_config_class(config.model_type)(config)
        for key in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size"):
            try:
                numbers[key] = getattr(normalized, key)
            except AttributeError:
                pass
    except (KeyError, ImportError, AttributeError):
        pass  # optimum does not know this model type: the config's own names follow
    fallbacks = {
        "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
        "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
        "vocab_size": ("vocab_size",),
    }
    for key, names in fallbacks.items():
        if numbers.get(key) is None:
            numbers[key] = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
    missing = [k for k, v in numbers.items() if v is None]
    if missing:
        raise UsageError(f"{config_path} gives no {missing[0]} (looked for {', '.join(fallbacks[missing[0]])})")
    heads = int(numbers["num_attention_heads"])
    hidden = int(numbers["hidden_size"])
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = (
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    )
    positions = (
        getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 0
    )
    return {
        "hidden_size": hidden,
        "num_layers": int(numbers["num_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(intermediate),
        "vocab_size": int(numbers["vocab_size"]),
        "max_positions": int(positions),
    }


@dataclass
class ModelSource:
    """A local Hugging Face model directory opened for packing (offline, safetensors only)."""

    path: Path
    config: Any
    facts: ModelFacts
    weight_files: list[Path] = field(default_factory=list)
    #: sha256 of the directory's Python files by name, when its code was allowed and asked for.
    code: dict[str, str] = field(default_factory=dict)
    _hashes: FileHashes | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, model: str | os.PathLike, *, allow_code: bool = False) -> "ModelSource":
        """Open a model directory (or a cached hub id) and read its facts on the meta device.

        A config that asks for the directory's own code (``auto_map``, ``trust_remote_code``)
        is refused unless ``allow_code``; then that code runs in this process when the model is
        read (see :func:`allow_code_of`), and :attr:`code` holds its files' sha256.

        Raises UsageError for a missing path, a directory that is not a model, or pickled weights.
        """
        path = _resolve(model)
        if not path.is_dir():
            raise UsageError(f"model path {path} is not a directory")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UsageError(f"{path} is not a Hugging Face model directory: it has no config.json")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            if pickled_files(path):
                raise UsageError(
                    f"{path} holds only pickled weights (*.bin); edgepack reads safetensors only, "
                    "never unpickling: convert them with save_pretrained(..., safe_serialization=True)"
                )
            raise UsageError(f"{path} is not a Hugging Face model directory: it has no *.safetensors weights")
        try:
            raw_config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{config_path} is not valid JSON: {exc}") from None
        code = custom_code(raw_config)
        code_hashes: dict[str, str] = {}
        if code and not allow_code:
            raise UsageError(
                f"{config_path} asks to run the model's own code ({code}); edgepack runs only the model "
                "classes that ship with transformers unless you pass --allow-code (after reading that code)"
            )
        if code:
            code_hashes = {name: sha256_file(path / name) for name in code_files(path)}
            if not code_hashes:
                raise UsageError(f"{config_path} asks for the model's own code ({code}), but {path} holds no "
                                 "Python files")
            allow_code_of(path)

        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **code_kwargs(path))
        except (ValueError, KeyError, OSError) as exc:
            raise UsageError(f"{config_path} is not a config transformers can read: {exc}") from None
        task = task_of(config)
        by_kind, shapes, dtype = count_stored_parameters(weights)
        archs = getattr(config, "architectures", None) or [config.model_type]
        facts = ModelFacts(
            model_type=config.model_type,
            architecture=archs[0],
            task=task,
            num_parameters=sum(by_kind.values()),
            parameters_by_kind=by_kind,
            dtype=dtype,
            linear_shapes=tuple(shapes),
            **_architecture_numbers(config, config_path),
        )
        return cls(path=path, config=config, facts=facts, weight_files=weights, code=code_hashes)

    @property
    def slug(self) -> str:
        """A bundle-name-friendly name of the model: its directory name, lower case."""
        name = self.path.name
        if name in ("model", "snapshots") or len(name) == 40:  # package or hub-cache layouts
            name = self.path.parent.name
        clean = "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-.")
        return clean or "model"

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of every weight file, by file name (finishing what :meth:`hash_in_background`
        started)."""
        if self._hashes is None:
            self._hashes = FileHashes(self.weight_files)
        return self._hashes.result()

    def hash_in_background(self) -> None:
        """Start hashing the weight files on a background thread of the lowest priority
        (:class:`FileHashes`), so that :meth:`weights_sha256` is ready, or nearly, when a pack
        writes its manifest: sha256 reads about 0.2 GB/s on one core without SHA extensions
        (16 s for a 0.94 B model's fp32 weights), time a pack otherwise spends once its
        measuring process has ended. Starting it twice does nothing."""
        if self._hashes is None:
            self._hashes = FileHashes(self.weight_files)
        self._hashes.start()

    def stop_hashing(self) -> None:
        """Stop the background hashing (a pack that failed); :meth:`weights_sha256` still works."""
        if self._hashes is not None:
            self._hashes.stop()

    def load(self) -> Any:
        """Load the model in float32 on the CPU, in eval mode, without touching the network."""
        import torch

        cls = auto_class(self.facts.task)
        # use_safetensors: never fall back to a pickled checkpoint lying beside the weights
        model = cls.from_pretrained(self.path, local_files_only=True, dtype=torch.float32, use_safetensors=True,
                                    **code_kwargs(self.path))
        return model.eval()

    def ignored_files(self) -> list[str]:
        """Pickled checkpoints in the directory that edgepack does not read (it reads only the
        safetensors weights and never unpickles)."""
        return [p.name for p in pickled_files(self.path)]

    def tokenizer(self) -> Any:
        """The model's tokenizer (from the same directory), checked against the model: a
        directory without tokenizer files would otherwise get a stand-in tokenizer that maps
        every word to the unknown token, and every smoke test would compare nothing."""
        import transformers

        present = [name for name in TOKENIZER_FILES if (self.path / name).is_file()]
        if not present:
            raise UsageError(
                f"{self.path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer beside the model with tokenizer.save_pretrained(...)"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"{self.path} has no tokenizer transformers can load: {exc}") from None
        # Added special tokens may lie past vocab_size as long as no input uses them: the smoke
        # inputs are checked for that once tokenized; the base vocabulary must fit.
        vocab = self.facts.vocab_size
        size = len(tokenizer)
        base = getattr(tokenizer, "vocab_size", size)
        if base > vocab:
            raise UsageError(
                f"{self.path}: the tokenizer has {base} tokens but config.json's vocab_size is {vocab}; "
                "token ids past the embedding table would crash the model (is it the model's own tokenizer?)"
            )
        if size < max(2, vocab // 2):
            raise UsageError(
                f"{self.path}: the tokenizer has {size} tokens but config.json's vocab_size is {vocab}; "
                "it does not look like this model's tokenizer"
            )
        return tokenizer

    def side_files(self) -> list[Path]:
        """Relative paths of extra files worth copying into the bundle (pooling configs ...)."""
        return [Path(rel) for rel in _SIDE_FILES if (self.path / rel).is_file()]


# ---------------------------------------------------------------------------------------------
# Helpers for plugins that store weights in a format of their own (Compressor.restore)


def read_format_metadata(file: Path, expected_format: str) -> dict[str, str]:
    """The JSON-string metadata of a plugin's safetensors file (whole or in shards, which all
    carry the same), after checking its format tag."""
    from safetensors import safe_open

    metas = []
    for part in shard_files(file):
        try:
            with safe_open(part, "pt") as handle:
                metas.append(handle.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types, OSError when missing
            raise UsageError(f"{part} cannot be read as safetensors: {exc}") from None
        if metas[-1].get("format") != expected_format:
            raise UsageError(f"{part} is not in format {expected_format}")
        if metas[-1] != metas[0]:
            raise UsageError(f"{part} has metadata other than its first shard's")
    return metas[0]


def empty_model(model_dir: Path, dtype: Any) -> Any:
    """The model of ``model_dir/config.json`` with parameters on the meta device (no memory)
    and buffers real, ready for :func:`assign_weights`."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True, **code_kwargs(model_dir))
    with init_empty_weights(include_buffers=False):
        return auto_class(task_of(config)).from_config(config, dtype=dtype, **code_kwargs(model_dir))


def assign_weights(model: Any, tensors: dict[str, Any], file: Path) -> Any:
    """Put ``tensors`` into an :func:`empty_model` (no copies), re-tie shared weights, and
    refuse a file with tensors the model lacks or without tensors the model needs."""
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise UsageError(f"{file} has tensors the model does not: {unexpected[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise UsageError(f"{file} lacks weights for {still_meta[:3]}")
    return model.eval()


def replace_module(model: Any, name: str, module: Any) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def unique_tensors(model: Any, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The model's state dict, contiguous, with tied weights stored once (safetensors refuses
    shared storage; :func:`assign_weights` re-ties them) and the keys in ``skip`` left out."""
    tensors: dict[str, Any] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if key in skip or storage in seen:
            continue
        seen.add(storage)
        tensors[key] = tensor.detach().contiguous()
    return tensors


def float_dtype_name(model: Any) -> str:
    """``float32`` / ``bfloat16`` / ...: the dtype of the model's first floating-point parameter."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return str(dtype).replace("torch.", "")
