"""Property tests (fuzzing) of what reads untrusted bundles (issue 11, item 6).

Random mutations of a valid bundle -- its manifest bytes and structure, its files, a
safetensors header, its archive (and random tar files), its signature -- never end in a
traceback (readers return Failure lists; only EdgepackError is raised), never write outside
the extraction destination, and never pass verification unless the bundle is intact.

Every property runs a fixed number of examples with ``derandomize=True`` and no example
database: CI runs the same inputs on every run, and a failure is reproduced by running the
test again. The whole module takes about 20 seconds (``--hypothesis-show-statistics`` shows
what the inputs reached: refused, read, extracted, accepted).

The bugs these properties found (a non-string dtype or a deeply nested safetensors header
raised TypeError / RecursionError instead of UsageError; untrusted names put line breaks into
extraction errors) are fixed, and kept as regression tests at the end of the module.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import random
import shutil
import stat
import struct
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

import edgepack.smoke
from edgepack.bundle.archive import create_archive, safe_extract
from edgepack.bundle.manifest import MANIFEST, SIGNATURE, Failure, canonical_json, file_entries, strict_json
from edgepack.bundle.reader import check_integrity, parse_manifest, read_manifest, read_verified
from edgepack.bundle.verify import verify
from edgepack.errors import EdgepackError, UsageError, VerificationError
from edgepack.model import safetensors_layout
from test_bundle_hardening import NAME, make_bundle

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def fuzz(examples: int) -> settings:
    """Reproducible settings: ``examples`` inputs, the same ones on every run."""
    return settings(max_examples=examples, **_SETTINGS)


# ---------------------------------------------------------------------------------------------
# Shared strategies: byte-level mutations, JSON values, and JSON text with what json.dumps
# cannot write (a key twice in one object, raw literals)


class _Pairs:
    """A JSON object written with these (key, value) pairs, in order, a key possibly twice."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return f"_Pairs({self.pairs!r})"


class _Raw:
    """JSON text written as it is (deep nesting, 1e999, a lone surrogate escape)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"_Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def _dumps(value: Any) -> str:
    """Compact JSON text of ``value`` (NaN and Infinity written as Python writes them)."""
    if isinstance(value, _Raw):
        return value.text
    if isinstance(value, _Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)


def _plain(value: Any) -> bool:
    """Whether ``value`` holds no _Pairs or _Raw (json.dumps can write it)."""
    if isinstance(value, (_Pairs, _Raw)):
        return False
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return True


def _nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


_STRINGS = ["", " ", "../x", "/etc/passwd", "model/../../x", "model/config.json", "model//x", "./model",
            "smoke/expected.safetensors", MANIFEST, SIGNATURE, "a\\b", "a\x00b", "\u202e", "0" * 64, "A" * 64,
            "1.0", "1.1", "2.0", "01.0", "edgepack.bundle", "F32", "sha256", "__metadata__", "x" * 300]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30]),
    st.floats(), st.text(max_size=12), st.sampled_from(_STRINGS),
)
_JSON = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                          max_size=3),
                     max_leaves=8)
_ODD = st.one_of(
    st.integers(1, 40).map(_nested),  # around the manifest's nesting bound (32)
    st.sampled_from([_Raw("[" * 5000 + "]" * 5000), _Raw('"\\ud800"'), _Raw("1e999"), _Raw("-1e999"), _Raw("-0"),
                     _Raw("1E400"), _Raw("123456789012345678901234567890"), _Raw("0.1e-400"), _Raw("NaN")]),
)
#: Any JSON value, plus the values strict readers refuse: NaN, huge numbers, deep nesting.
VALUES = st.one_of(_JSON, _ODD)

_POS = st.one_of(st.integers(0, 15), st.integers(0, 2**20))
#: Mutations that keep the length (so that offsets and length prefixes still point where they did).
_SAME_LENGTH_OP = st.one_of(
    st.tuples(st.just("flip"), _POS, st.integers(1, 255)),
    st.tuples(st.just("set"), _POS, st.sampled_from(b'"{}[],:0129af\\ \n\x00\xff-.eE')),
    st.tuples(st.just("hex"), _POS, st.sampled_from(b"0123456789abcdef")),  # a digit of a number or digest
)
_BYTE_OP = st.one_of(
    _SAME_LENGTH_OP,
    st.tuples(st.just("insert"), _POS, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), _POS, st.integers(1, 16)),
    st.tuples(st.just("repeat"), _POS, st.integers(1, 64)),
    st.tuples(st.just("truncate"), _POS),
)
BYTE_OPS = st.lists(_BYTE_OP, min_size=1, max_size=4)


def apply_byte_ops(data: bytes, ops: list[tuple]) -> bytes:
    """``data`` with each op applied at its position modulo the current length."""
    buf = bytearray(data)
    for kind, pos, *args in ops:
        pos %= len(buf) + 1
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= args[0]
        elif kind == "set" and pos < len(buf):
            buf[pos] = args[0]
        elif kind == "hex":
            digits = [i for i in range(pos, len(buf)) if buf[i] in b"0123456789abcdef"]
            if digits:
                buf[digits[0]] = args[0]
        elif kind == "insert":
            buf[pos:pos] = args[0]
        elif kind == "delete":
            del buf[pos:pos + args[0]]
        elif kind == "repeat":
            buf[pos:pos] = buf[pos:pos + args[0]]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


def _node_paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _node_paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _node_paths(item, path + (i,))


_TREE_OP = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 10**6), VALUES),
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("add"), st.integers(0, 10**6), st.one_of(st.text(max_size=8), st.sampled_from(_STRINGS)),
              VALUES),
    st.tuples(st.just("twice"), st.integers(0, 10**6), st.integers(0, 10**6), st.one_of(st.none(), VALUES)),
)


def apply_tree_op(doc: Any, op: tuple) -> Any:
    """``doc`` (changed in place where it can be) after one structural mutation at a node
    chosen by index: replace its value, delete it, add a key, or write one of its keys twice."""
    kind, index, *args = op
    paths = list(_node_paths(doc))
    path = paths[index % len(paths)]
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    node = parent[path[-1]] if path else doc
    if kind == "replace":
        if not path:
            return args[0]
        parent[path[-1]] = args[0]
    elif kind == "delete" and path:
        del parent[path[-1]]
    elif kind == "add":
        key, value = args
        if isinstance(node, dict):
            node[key] = value
        elif isinstance(node, list):
            node.insert(len(key) % (len(node) + 1), value)
    elif kind == "twice" and isinstance(node, dict) and node:
        which, value = args
        keys = list(node)
        key = keys[which % len(keys)]
        twice = _Pairs(list(node.items()) + [(key, node[key] if value is None else value)])
        if not path:
            return twice
        parent[path[-1]] = twice
    return doc


# ---------------------------------------------------------------------------------------------
# Fixtures: one valid bundle, built by hand (no model is packed), and scratch directories


class _Quiet:
    """Fixture values shown by name, not by content, in Hypothesis' failing-example report."""

    label = "fixture"

    def __repr__(self) -> str:
        return f"<{self.label}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class _Files(_Quiet, dict):
    label = "the base bundle's files"


class _Blob(_Quiet, bytes):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid bundle: a few files under model/ and smoke/, and a canonical manifest listing them."""
    root = make_bundle(tmp_path_factory.mktemp("fuzz-base") / NAME)
    manifest, failures = check_integrity(root)
    assert failures == [] and manifest is not None
    assert manifest["files"] == file_entries(root)
    assert (root / MANIFEST).read_bytes() == canonical_json(manifest)
    assert parse_manifest((root / MANIFEST).read_bytes()) == (manifest, [])
    return root


@pytest.fixture(scope="module")
def base_files(base) -> dict[str, bytes]:
    """The bundle's listed files and their bytes."""
    return _Files({e["path"]: (base / e["path"]).read_bytes() for e in file_entries(base)})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-scratch")


@contextlib.contextmanager
def fresh_dir(scratch: Path) -> Iterator[Path]:
    """A new empty directory for one example, removed after it."""
    work = scratch / uuid.uuid4().hex[:12]
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work)


def _copy_bundle(base: Path, work: Path) -> Path:
    root = work / NAME
    shutil.copytree(base, root, symlinks=True)
    return root


def assert_failures(failures: Any) -> None:
    """A reader's answer: a list of Failures, each with a check, a path and one sentence."""
    assert isinstance(failures, list)
    for failure in failures:
        assert isinstance(failure, Failure), failure
        assert isinstance(failure.check, str) and failure.check
        assert isinstance(failure.path, str)
        assert isinstance(failure.detail, str) and failure.detail and "\n" not in failure.detail, failure


def listed(manifest: dict[str, Any]) -> list[tuple[str, int, str]]:
    """The (path, size, sha256) a schema-valid manifest lists, in path order."""
    return sorted((e["path"], e["size"], e["sha256"]) for e in manifest["files"])


# ---------------------------------------------------------------------------------------------
# 1. The manifest reader: mutated manifest bytes are failures, never a traceback, and pass the
#    integrity check exactly when they still list the bundle's files as they are


@pytest.fixture(scope="module")
def manifest_tree(base, tmp_path_factory) -> Path:
    """A copy of the bundle whose manifest each example overwrites (its files are never changed)."""
    root = tmp_path_factory.mktemp("fuzz-manifest") / NAME
    shutil.copytree(base, root)
    return root


def check_manifest_bytes(data: bytes, tree: Path, base: Path) -> None:
    """The reader properties for manifest bytes ``data`` in a bundle whose files are intact."""
    manifest, failures = parse_manifest(data)
    assert_failures(failures)
    assert (manifest is None) == bool(failures)
    (tree / MANIFEST).write_bytes(data)
    assert read_manifest(tree) == (manifest, failures)
    checked, integrity = check_integrity(tree)
    assert_failures(integrity)
    event(f"manifest: {'refused, ' + failures[0].check if manifest is None else 'read'}")
    if manifest is None:
        assert checked is None and integrity == failures
        with pytest.raises(VerificationError):
            read_verified(tree)
        return
    assert isinstance(manifest, dict) and checked == manifest
    original = listed(json.loads((base / MANIFEST).read_bytes()))
    # The files are intact: the check passes exactly when the manifest still lists them as they are.
    event(f"manifest: lists {'other' if listed(manifest) != original else 'the same'} files")
    if listed(manifest) != original:
        assert integrity, f"a manifest listing {listed(manifest)} passed the integrity check"
    else:
        assert integrity == []


@fuzz(300)
@given(ops=st.lists(st.one_of(_SAME_LENGTH_OP, _SAME_LENGTH_OP, _BYTE_OP), min_size=1, max_size=3))
@example(ops=[("truncate", 0)])
@example(ops=[("insert", 1, b'"files": [], ')])  # the first key twice
def test_manifest_byte_mutations_are_failures(base, manifest_tree, ops):
    data = apply_byte_ops((base / MANIFEST).read_bytes(), ops)
    check_manifest_bytes(data, manifest_tree, base)


_SIZES = st.one_of(st.integers(-3, 3), st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64, 10**20]))
_FILES_OP = st.one_of(
    st.tuples(st.just("size"), st.integers(0, 99), st.booleans(), _SIZES),  # relative or absolute
    st.tuples(st.just("digit"), st.integers(0, 99), st.integers(0, 63), st.sampled_from("0123456789abcdefABCDEF")),
    st.tuples(st.just("hash-of"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("path-of"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("path"), st.integers(0, 99), st.sampled_from(["./", "/", "../", "x/", "model/", ""]),
              st.sampled_from(["", "/", "~", " ", ".bak", "/.", "\x00"]), st.booleans()),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99), st.sampled_from(["path", "size", "sha256"])),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("copy"), st.integers(0, 99)),
    st.tuples(st.just("reorder"), st.randoms(use_true_random=False)),
    st.tuples(st.just("missing"), st.sampled_from(["model/extra.bin", "extra", "smoke/x.json", "model"])),
    st.tuples(st.just("key"), st.integers(0, 99), st.sampled_from(["sha512", "blake3", "size ", "mode"]), VALUES),
)


def apply_files_op(files: list[dict[str, Any]], op: tuple) -> None:
    """One mutation of the manifest's ``files`` entries, in place."""
    kind, *args = op
    if not files:
        return
    entry = files[args[0] % len(files)] if isinstance(args[0], int) else None
    if kind == "size":
        relative, value = args[1:]
        entry["size"] = entry["size"] + value if relative else value
    elif kind == "digit":
        position, char = args[1:]
        digest = entry["sha256"]
        entry["sha256"] = digest[:position] + char + digest[position + 1:]
    elif kind == "hash-of":
        entry["sha256"] = files[args[1] % len(files)]["sha256"]
    elif kind == "path-of":
        entry["path"] = files[args[1] % len(files)]["path"]
    elif kind == "path":
        prefix, suffix, upper = args[1:]
        path = prefix + entry["path"] + suffix
        entry["path"] = path.upper() if upper else path
    elif kind == "swap":
        other, key = files[args[1] % len(files)], args[2]
        entry[key], other[key] = other[key], entry[key]
    elif kind == "drop":
        files.remove(entry)
    elif kind == "copy":
        files.append(dict(entry))
    elif kind == "reorder":
        args[0].shuffle(files)
    elif kind == "missing":
        files.append({"path": args[0], "size": 0, "sha256": hashlib.sha256(b"").hexdigest()})
    elif kind == "key":
        entry[args[1]] = args[2]


@fuzz(300)
@given(files_ops=st.lists(_FILES_OP, max_size=3), tree_ops=st.lists(_TREE_OP, max_size=2),
       canonical=st.booleans())
@example(files_ops=[("reorder", random.Random(1))], tree_ops=[], canonical=True)
@example(files_ops=[("swap", 0, 1, "path")], tree_ops=[], canonical=True)
@example(files_ops=[], tree_ops=[("twice", 0, 3, None)], canonical=False)
def test_structured_manifest_mutations_are_failures(base, manifest_tree, files_ops, tree_ops, canonical):
    doc = json.loads((base / MANIFEST).read_bytes())
    for op in files_ops:
        apply_files_op(doc["files"], op)
    for op in tree_ops:
        doc = apply_tree_op(doc, op)
    data = (canonical_json(doc) if canonical and _plain(doc) else _dumps(doc).encode("utf-8", "surrogatepass"))
    check_manifest_bytes(data, manifest_tree, base)


# ---------------------------------------------------------------------------------------------
# 2. File mutations: any change to the bundle's tree is a failure naming the path


_NEW_NAMES = st.one_of(
    st.sampled_from(["extra", "model/extra.bin", "smoke/x", "deep/er/file", "manifest.json.bak", ".hidden",
                     "model/config.json.orig", "MANIFEST.JSON", " ", "model/ ", "smoke/inputs.safetensors~"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12)
    .filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255),
)
_FILE_OP = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 99), _POS, st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 99), _POS),
    st.tuples(st.just("append"), st.integers(0, 99), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("rewrite"), st.integers(0, 99), st.binary(max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, 99)),
    st.tuples(st.just("directory"), st.integers(0, 99)),
    st.tuples(st.just("symlink"), st.integers(0, 99)),  # to an identical copy outside the bundle
    st.tuples(st.just("fifo"), st.integers(0, 99)),
    st.tuples(st.just("add-file"), _NEW_NAMES, st.binary(max_size=16)),
    st.tuples(st.just("add-dir"), _NEW_NAMES),
    st.tuples(st.just("add-symlink"), _NEW_NAMES),
)


def apply_file_op(root: Path, outside: Path, paths: list[str], op: tuple) -> str | None:
    """Apply one mutation to the bundle tree at ``root``; the new path it added, if any."""
    kind, target, *args = op
    if kind.startswith("add-"):
        path = root / target
        if target in (MANIFEST, SIGNATURE) or os.path.lexists(path):
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a parent is a file, a link or a FIFO now
            return None
        if kind == "add-file":
            path.write_bytes(args[0])
        elif kind == "add-dir":
            path.mkdir()
        else:
            path.symlink_to(outside)
        return target
    rel = paths[target % len(paths)]
    path = root / rel
    regular = os.path.lexists(path) and stat.S_ISREG(os.lstat(path).st_mode)
    if kind in ("flip", "truncate", "append", "rewrite"):
        if not regular:
            return None
        data = bytearray(path.read_bytes())
        if kind == "flip" and data:
            data[args[0] % len(data)] ^= args[1]
        elif kind == "truncate":
            del data[args[0] % (len(data) + 1):]
        elif kind == "append":
            data += args[0]
        elif kind == "rewrite":
            data = bytearray(args[0])
        path.write_bytes(bytes(data))
        return None
    content = path.read_bytes() if regular else b""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        twin = outside / uuid.uuid4().hex
        twin.write_bytes(content)
        path.symlink_to(twin)
    elif kind == "fifo":
        os.mkfifo(path)
    return None


def _intact(path: Path, data: bytes) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and path.read_bytes() == data


def mutate_tree(root: Path, outside: Path, base_files: dict[str, bytes], ops: list[tuple]) -> set[str]:
    """Apply ``ops``; the paths a check must name: listed files no longer intact, paths added."""
    paths = sorted(base_files)
    added = {new for op in ops if (new := apply_file_op(root, outside, paths, op)) is not None}
    damaged = {rel for rel in paths if not _intact(root / rel, base_files[rel])}
    added = {new for new in added if os.path.lexists(root / new)}
    return damaged | added


def _named(rel: str, names: set[str]) -> bool:
    """Whether ``rel`` or a directory above it is among the failures' paths."""
    parts = rel.split("/")
    return any("/".join(parts[:n]) in names for n in range(1, len(parts) + 1))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@fuzz(150)
@given(ops=st.lists(_FILE_OP, min_size=1, max_size=3))
@example(ops=[("flip", 0, 3, 1), ("flip", 0, 3, 1)])  # flipped back: intact, and it must pass
@example(ops=[("symlink", 2)])
def test_file_mutations_are_failures_naming_the_file(base, base_files, scratch, ops):
    with fresh_dir(scratch) as work:
        root = _copy_bundle(base, work)
        outside = work / "outside"
        outside.mkdir()
        expected = mutate_tree(root, outside, base_files, ops)
        manifest, failures = check_integrity(root)
        assert manifest is not None
        assert_failures(failures)
        names = {f.path for f in failures}
        event(f"files: {'damaged' if expected else 'intact'}")
        for rel in expected:
            assert _named(rel, names), f"{rel} changed but no failure names it: {failures}"
        assert bool(failures) == bool(expected), (expected, failures)
        if failures:
            with pytest.raises(VerificationError):
                read_verified(root)
        else:
            assert read_verified(root)[1] == manifest


# ---------------------------------------------------------------------------------------------
# 3. Safetensors headers: every malformed header is a UsageError naming the file; a header
#    that is accepted tiles the data region exactly (checked here independently)


def _itemsizes() -> dict[str, int]:
    import torch

    names = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "U16": "uint16", "I16": "int16", "F16": "float16", "BF16": "bfloat16", "U32": "uint32",
             "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64"}
    return {name: getattr(torch, dtype).itemsize for name, dtype in names.items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> bytes:
    """A small valid safetensors file of several dtypes (one tensor empty), with metadata."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz-weights") / "w.safetensors"
    save_file({
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2, 3], dtype=torch.int64),
        "c": torch.ones(3, 2, dtype=torch.bfloat16),
        "d": torch.arange(5, dtype=torch.uint8),
        "e": torch.tensor([[True, False]]),
        "f": torch.zeros(0, 3, dtype=torch.float16),
    }, str(path), metadata={"format": "pt", "note": "fuzz"})
    data = path.read_bytes()
    header, start = safetensors_layout(path)
    assert sorted(header) == ["__metadata__", "a", "b", "c", "d", "e", "f"] and start < len(data)
    blob = _Blob(data)
    blob.label = "the base safetensors file"
    return blob


_LAYOUT_PROBLEMS = ("header size", "unreadable header", "not a JSON object", "__metadata__", "not described",
                    "unknown dtype", "shape", "data_offsets", "takes", "overlaps", "belong to no tensor")


def check_layout(path: Path) -> None:
    """safetensors_layout(path) returns a layout that is consistent, or raises UsageError
    naming ``path``; what it accepts, safetensors reads without crashing, and the same way."""
    try:
        header, start = safetensors_layout(path)
    except UsageError as exc:
        assert str(path) in str(exc), exc
        assert "\n" not in str(exc)
        event(f"layout: refused ({next((w for w in _LAYOUT_PROBLEMS if w in str(exc)), 'other')})")
        return
    event("layout: accepted")
    blob = path.read_bytes()
    assert start == 8 + int.from_bytes(blob[:8], "little")
    assert json.dumps(header, sort_keys=True) == json.dumps(json.loads(blob[8:start]), sort_keys=True)
    meta = header.get("__metadata__")
    assert meta is None or (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()))
    itemsizes = _itemsizes()
    data_bytes = len(blob) - start
    owner: list[str | None] = [None] * data_bytes
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        assert type(dtype) is str and dtype in itemsizes, dtype
        assert all(type(d) is int and d >= 0 for d in shape), shape
        assert type(begin) is int and type(end) is int and 0 <= begin <= end <= data_bytes
        assert end - begin == math.prod(shape) * itemsizes[dtype], (name, info)
        for i in range(begin, end):
            assert owner[i] is None, f"byte {i} belongs to {owner[i]} and {name}"
            owner[i] = name
    assert None not in owner, "a data byte belongs to no tensor"

    from safetensors import safe_open

    try:  # a Python exception is fine here; a Rust panic (a BaseException) or a crash is not
        with safe_open(str(path), framework="pt") as handle:
            read = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        event(f"layout: accepted, safetensors refuses ({type(exc).__name__})")
        return
    event("layout: accepted, safetensors reads it")
    assert set(read) == set(tensors)
    for name, tensor in read.items():
        assert list(tensor.shape) == tensors[name]["shape"], name
        assert tensor.element_size() == itemsizes[tensors[name]["dtype"]], name


@fuzz(300)
@given(prefix_ops=st.lists(_SAME_LENGTH_OP.map(lambda op: (op[0], op[1] % 8, *op[2:])), max_size=2),
       header_ops=st.lists(st.one_of(_SAME_LENGTH_OP, _BYTE_OP), max_size=3), data_ops=st.lists(_BYTE_OP, max_size=2),
       fit=st.booleans())
@example(prefix_ops=[], header_ops=[("truncate", 0)], data_ops=[], fit=False)
@example(prefix_ops=[("set", 0, ord("0"))], header_ops=[], data_ops=[], fit=False)
def test_safetensors_byte_mutations(weights, scratch, prefix_ops, header_ops, data_ops, fit):
    size = int.from_bytes(weights[:8], "little")
    header = apply_byte_ops(weights[8:8 + size], header_ops)
    prefix = struct.pack("<Q", len(header)) if fit else weights[:8]  # fit: the length prefix follows the header
    data = apply_byte_ops(prefix, prefix_ops) + header + apply_byte_ops(weights[8 + size:], data_ops)
    assume(data != weights)
    with fresh_dir(scratch) as work:
        path = work / "model.safetensors"
        path.write_bytes(data)
        check_layout(path)


_DTYPES = st.sampled_from(["F32", "I64", "BF16", "U8", "BOOL", "F16", "F64", "F8_E4M3", "f32", "float32", "", "Q4"])
_HEADER_OP = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 99), st.sampled_from([0, 1]),
              st.one_of(st.integers(-8, 120), st.sampled_from([2**63, 2**64, -(2**63), 10**30]))),
    st.tuples(st.just("shift"), st.integers(0, 99), st.integers(-16, 16)),
    st.tuples(st.just("dtype"), st.integers(0, 99), st.one_of(_DTYPES, VALUES)),
    st.tuples(st.just("shape"), st.integers(0, 99),
              st.one_of(st.lists(st.one_of(st.integers(-2, 7), st.sampled_from([2**32, 2**64, 2**70])), max_size=4),
                        VALUES)),
    st.tuples(st.just("key"), st.integers(0, 99), st.sampled_from(["extra", "dtype ", "offsets"]), VALUES),
    st.tuples(st.just("metadata"), st.one_of(VALUES, st.dictionaries(st.text(max_size=4), VALUES, max_size=2))),
    st.tuples(st.just("tensor"), st.one_of(st.text(max_size=6), st.sampled_from(["a", "__metadata__", ""])),
              _DTYPES, st.lists(st.integers(0, 4), max_size=2), st.integers(0, 120), st.integers(0, 120)),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("tree"), _TREE_OP),
)


def apply_header_op(header: dict[str, Any], op: tuple) -> Any:
    """One mutation of a parsed safetensors header (in place where it can be); the header."""
    kind, *args = op
    names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    info = header[names[args[0] % len(names)]] if names and isinstance(args[0], int) else None
    if kind == "tree":
        return apply_tree_op(header, args[0])
    if not isinstance(header, dict):
        return header
    if kind == "metadata":
        header["__metadata__"] = args[0]
    elif kind == "tensor":
        name, dtype, shape, begin, end = args
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    if not isinstance(info, dict):
        return header
    offsets = info.get("data_offsets")
    if kind == "offset" and isinstance(offsets, list) and len(offsets) == 2:
        offsets[args[1]] = args[2]
    elif kind == "shift" and isinstance(offsets, list) and all(isinstance(o, int) for o in offsets):
        info["data_offsets"] = [o + args[1] for o in offsets]
    elif kind == "dtype":
        info["dtype"] = args[1]
    elif kind == "shape":
        info["shape"] = args[1]
    elif kind == "key":
        info[args[1]] = args[2]
    elif kind == "drop":
        del header[names[args[0] % len(names)]]
    elif kind == "swap":
        other = header[names[args[1] % len(names)]]
        if isinstance(other, dict):
            info["data_offsets"], other["data_offsets"] = other.get("data_offsets"), offsets
    return header


@fuzz(300)
@given(ops=st.lists(_HEADER_OP, min_size=1, max_size=3),
       length=st.one_of(st.none(), st.integers(-9, 9), st.integers(0, 2**64 - 1)),
       pad=st.booleans(), tail=st.one_of(st.none(), st.integers(-40, -1), st.binary(min_size=1, max_size=24)))
@example(ops=[("swap", 0, 1)], length=None, pad=True, tail=None)
@example(ops=[("shape", 5, [0, 2**70])], length=None, pad=True, tail=None)  # accepted; safetensors refuses it
@example(ops=[("dtype", 0, "F32")], length=2**64 - 1, pad=False, tail=None)
def test_safetensors_header_mutations(weights, scratch, ops, length, pad, tail):
    size = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8:8 + size])
    data = weights[8 + size:]
    for op in ops:
        header = apply_header_op(header, op)
    text = _dumps(header).encode("utf-8", "surrogatepass")
    if pad:
        text += b" " * (-len(text) % 8)
    prefix = len(text) if length is None else (len(text) + length if abs(length) < 10 else length)
    if isinstance(tail, int):
        data = data[:tail]
    elif tail is not None:
        data += tail
    with fresh_dir(scratch) as work:
        path = work / "model.safetensors"
        path.write_bytes(struct.pack("<Q", prefix % 2**64) + text + data)
        check_layout(path)


# ---------------------------------------------------------------------------------------------
# 4. The archive extractor: a returned path inside dest or an EdgepackError, nothing written
#    outside dest, and nothing left in dest when it raises


def snapshot(top: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Everything below ``top`` (without following links, ``skip``'s subtree left out): type,
    permissions and content (bytes' sha256, a link's target)."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(top):
        return out
    pending = [top]
    while pending:
        directory = pending.pop()
        for entry in os.scandir(directory):
            path = Path(entry.path)
            if skip is not None and path == skip:
                continue
            info = entry.stat(follow_symlinks=False)
            rel = str(path.relative_to(top))
            if stat.S_ISDIR(info.st_mode):
                out[rel] = ("dir", stat.S_IMODE(info.st_mode))
                pending.append(path)
            elif stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                out[rel] = ("file", stat.S_IMODE(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("special", info.st_mode)
    return out


DEST_STATES = st.sampled_from(["absent", "empty", "planted-link", "existing"])


def prepare(work: Path, top: str, state: str) -> Path:
    """The destination (three levels below ``work``, so that ``../..`` stays inside it), and
    ``work/outside/canary``, a file nothing may touch."""
    outside = work / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(b"precious")
    dest = work / "d1" / "d2" / "dest"
    dest.parent.mkdir(parents=True)
    if state != "absent":
        dest.mkdir()
    if state == "planted-link":
        (dest / top).symlink_to(outside, target_is_directory=True)
    elif state == "existing":
        (dest / top).mkdir()
        (dest / top / "old").write_bytes(b"old")
    return dest


def check_extract(archive: Path, work: Path, dest: Path) -> Path | None:
    """safe_extract's promises; the bundle directory it returned, or None when it raised (with
    an error of one line, whatever the untrusted names in the archive)."""
    before, before_dest = snapshot(work, skip=dest), snapshot(dest)
    try:
        root = safe_extract(archive, dest)
    except EdgepackError as exc:
        assert isinstance(exc, (VerificationError, UsageError)), exc
        assert "\n" not in str(exc), exc
        event(f"extract: refused ({' '.join(str(exc).replace(str(archive), '').split()[:3]).split(chr(39))[0]})")
        root = None
    assert snapshot(work, skip=dest) == before, "safe_extract changed something outside its destination"
    after_dest = snapshot(dest)
    if root is None:  # "never leave half an archive behind"
        assert after_dest == before_dest
        return None
    assert root.parent == dest and root.is_dir() and not root.is_symlink()
    assert root.name not in before_dest, "extracted into a directory that was already there"
    assert {rel: v for rel, v in after_dest.items() if not _named_under(rel, root.name)} == before_dest
    kinds = {v[0] for rel, v in after_dest.items() if _named_under(rel, root.name)}
    assert kinds <= {"dir", "file"}, kinds
    event("extract: extracted")
    return root


def _named_under(rel: str, top: str) -> bool:
    return rel == top or rel.startswith(top + "/")


@pytest.fixture(scope="module")
def archive_bytes(base, tmp_path_factory) -> bytes:
    """The bundle's archive, as create_archive writes it; it extracts to an intact bundle."""
    root = tmp_path_factory.mktemp("fuzz-archive") / NAME
    shutil.copytree(base, root)
    archive = create_archive(root)
    extracted = safe_extract(archive, tmp_path_factory.mktemp("fuzz-extracted"))
    assert check_integrity(extracted)[1] == []
    blob = _Blob(archive.read_bytes())
    blob.label = "the base bundle's archive"
    return blob


_TAR_FIELDS = st.one_of(st.sampled_from([0, 1, 3, 100, 124, 125, 134, 135, 148, 156, 157, 257, 263, 329, 345]),
                        st.integers(0, 511))
_TAR_VALUES = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"L", b"K", b"x", b"g", b"\x00",
                     b"../", b"/", b"..", b"\x80" + b"\x00" * 10 + b"\x01", b"\xff" * 12, b"77777777777",
                     b"00000000000", b"ustar\x00", b"ustar  \x00"]),
)
_TAR_OP = st.tuples(st.integers(0, 99), _TAR_FIELDS, _TAR_VALUES, st.sampled_from([True, True, True, False]))


def _members(tar_bytes: bytes) -> list[tuple[int, int]]:
    """(header offset, data size) of each member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [(m.offset, m.size) for m in tar.getmembers()]


def _fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block[:512])


@fuzz(200)
@given(layer=st.sampled_from(["gz", "tar", "tar", "raw"]), ops=st.lists(_BYTE_OP, max_size=2),
       header_ops=st.lists(_TAR_OP, max_size=2),
       data_flips=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 2**20), st.integers(1, 255)), max_size=2),
       state=DEST_STATES)
@example(layer="gz", ops=[("truncate", 100)], header_ops=[], data_flips=[], state="empty")
@example(layer="tar", ops=[], header_ops=[(3, 156, b"2", True)], data_flips=[], state="absent")  # file -> symlink
@example(layer="tar", ops=[], header_ops=[(0, 0, b"..", True)], data_flips=[], state="absent")
def test_mutated_archives_extract_safely(base, base_files, archive_bytes, scratch, layer, ops, header_ops,
                                         data_flips, state):
    if layer == "gz":
        data = apply_byte_ops(archive_bytes, ops)
    else:  # the tar inside: its member headers (checksum fixed or not), its members' bytes, anything
        tar = bytearray(gzip.decompress(archive_bytes))
        members = _members(bytes(tar))
        for member, field, value, fix in header_ops:
            start = members[member % len(members)][0]
            block = bytearray(tar[start:start + 512])
            block[field:field + len(value)] = value
            block = block[:512]
            if fix:
                _fix_checksum(block)
            tar[start:start + 512] = block
        for member, position, mask in data_flips:
            start, size = members[member % len(members)]
            if size:
                tar[start + 512 + position % size] ^= mask
        data = apply_byte_ops(bytes(tar), ops)
        data = data if layer == "raw" else gzip.compress(data, mtime=0)
    assume(data != archive_bytes)
    with fresh_dir(scratch) as work:
        archive = work / (NAME + (".tar" if layer == "raw" else ".tar.gz"))
        archive.write_bytes(data)
        dest = prepare(work, NAME, state)
        root = check_extract(archive, work, dest)
        if root is None:
            return
        _, failures = check_integrity(root)
        assert_failures(failures)
        event(f"extract: integrity {'fails' if failures else 'passes'}")
        if not failures:  # it passes only when every file is the original
            extracted = {e["path"]: (root / e["path"]).read_bytes() for e in file_entries(root)}
            assert extracted == base_files


_COMPONENTS = st.one_of(
    st.sampled_from(["model", "smoke", "x", MANIFEST, SIGNATURE, "..", ".", "", "a" * 256, "\\", "c\\d", "é",
                     " ", "x\ny"]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), min_size=1, max_size=6),
)
_UNDER_TOP = st.lists(_COMPONENTS, min_size=1, max_size=3).map(lambda parts: "b/" + "/".join(parts))
_ODD_NAMES = st.one_of(
    st.sampled_from(["b", "b/", "../x", "/x", "{WORK}/outside/escape", "{WORK}/d1/d2/dest/b/x", "b/../../x",
                     "b/../../../../x", "b/x/../../../y", "./b/x", "b//x", "b/./x", "b/x/", "c/x", "b/" + "y" * 300,
                     "b/" + "/".join(["z"] * 200), "..", ".", "", "b/\x00x", "b/model/x", "b/model"]),
    st.lists(_COMPONENTS, min_size=1, max_size=2).map("/".join),  # another top
)
#: Member names: nine in ten below the top directory ``b`` (so the checks get past the first one).
_NAMES = st.integers(0, 9).flatmap(lambda i: _UNDER_TOP if i < 9 else _ODD_NAMES)
_LINKS = st.sampled_from(["../outside/canary", "{WORK}/outside/canary", "{WORK}/outside", "/etc/passwd", "x",
                          "b/x", "b/model", "..", ""])
_KINDS = st.one_of(st.just(tarfile.REGTYPE), st.just(tarfile.DIRTYPE),
                   st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE,
                                    tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                                    tarfile.FIFOTYPE]))
_MEMBERS = st.lists(st.tuples(_NAMES, _KINDS, st.binary(max_size=24), _LINKS), max_size=7)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def build_tar(path: Path, work: Path, members: list[tuple], manifest: tuple | None, doc: dict[str, Any],
              fmt: int, compress: bool) -> dict[str, bytes]:
    """Write a tar of ``members`` and a manifest ``doc`` listing some of them (``manifest`` is
    ``(member kind, position, listed mask, size delta, right hashes)``); the regular members'
    data by name."""
    regular: dict[str, bytes] = {}
    entries = []
    if manifest is not None:
        kind, position, mask, delta, hashes = manifest
        for i, (name, member_kind, data, _) in enumerate(members):
            if mask >> i & 1 and name.startswith("b/"):
                entries.append({"path": name[2:], "size": max(0, len(data) + delta),
                                "sha256": hashlib.sha256(data).hexdigest() if hashes else "0" * 64})
        text = canonical_json(dict(doc, files=entries))
        members = list(members)
        members.insert(position % (len(members) + 1), (f"b/{MANIFEST}", kind, text, "x"))
    buf = io.BytesIO()
    try:
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, kind, data, link in members:
                info = tarfile.TarInfo(name.replace("{WORK}", str(work)))
                info.type = kind
                info.linkname = link.replace("{WORK}", str(work))
                info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
                if kind in _REGULAR:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    regular[info.name] = data
                else:
                    tar.addfile(info)
    except (ValueError, UnicodeError):  # a name tarfile cannot write in this format
        assume(False)
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0) if compress else buf.getvalue())
    return regular


@fuzz(200)
@given(members=_MEMBERS,
       manifest=st.tuples(st.integers(0, 9), st.tuples(  # one time in ten, no manifest
           st.sampled_from([tarfile.REGTYPE] * 8 + [tarfile.DIRTYPE, tarfile.SYMTYPE]), st.integers(0, 9),
           st.one_of(st.just(2**7 - 1), st.integers(0, 2**7 - 1)),  # which members it lists
           st.sampled_from([0, 0, 0, 1, -1, 10**6]), st.booleans())).map(lambda t: t[1] if t[0] < 9 else None),
       fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]), compress=st.booleans(), state=DEST_STATES)
@example(members=[("b/x", tarfile.SYMTYPE, b"", "{WORK}/outside"), ("b/x/escape", tarfile.REGTYPE, b"1", "")],
         manifest=(tarfile.REGTYPE, 0, 3, 0, True), fmt=tarfile.PAX_FORMAT, compress=True, state="absent")
@example(members=[("b/x", tarfile.LNKTYPE, b"", "{WORK}/outside/canary")],
         manifest=(tarfile.REGTYPE, 0, 1, 0, True), fmt=tarfile.GNU_FORMAT, compress=False, state="absent")
@example(members=[("b/x", tarfile.REGTYPE, b"1", ""), ("b/y", tarfile.REGTYPE, b"22", "")],
         manifest=(tarfile.REGTYPE, 1, 3, 0, True), fmt=tarfile.PAX_FORMAT, compress=True, state="empty")
def test_random_tar_files_extract_safely(base, scratch, members, manifest, fmt, compress, state):
    doc = json.loads((base / MANIFEST).read_bytes())
    with fresh_dir(scratch) as work:
        archive = work / ("b.tar.gz" if compress else "b.tar")
        regular = build_tar(archive, work, members, manifest, doc, fmt, compress)
        dest = prepare(work, "b", state)
        root = check_extract(archive, work, dest)
        if root is None:
            return
        assert root == dest / "b"
        for rel, value in snapshot(root).items():  # each file holds its member's bytes
            if value[0] == "file":
                assert value[2] == hashlib.sha256(regular[f"b/{rel}"]).hexdigest(), rel
        _, failures = check_integrity(root)
        assert_failures(failures)


# ---------------------------------------------------------------------------------------------
# 5. verify end to end: a mutated bundle fails at the integrity check, before anything is loaded


@fuzz(20)
@given(file_ops=st.lists(_FILE_OP, max_size=2), files_ops=st.lists(_FILES_OP, max_size=2))
@example(file_ops=[], files_ops=[])  # the intact bundle verifies
@example(file_ops=[("append", 1, b"x")], files_ops=[])
def test_verify_refuses_mutated_bundles_before_loading(base, base_files, scratch, file_ops, files_ops):
    from safetensors.torch import load_file

    loads: list[Path] = []

    def fake_probe(bundle_dir, **kwargs):  # the "model" reproduces the golden outputs exactly
        loads.append(Path(bundle_dir))
        outputs = load_file(Path(bundle_dir) / "smoke/expected.safetensors")
        return edgepack.smoke.ProbeResult(10, "test scope", outputs, 0.0)

    with fresh_dir(scratch) as work, pytest.MonkeyPatch.context() as patch:
        patch.setattr(edgepack.smoke, "measure_in_fresh_process", fake_probe)
        root = _copy_bundle(base, work)
        outside = work / "outside"
        outside.mkdir()
        expected = mutate_tree(root, outside, base_files, file_ops)
        doc = json.loads((root / MANIFEST).read_bytes())
        for op in files_ops:
            apply_files_op(doc["files"], op)
        data = canonical_json(doc)
        (root / MANIFEST).write_bytes(data)
        manifest, _ = parse_manifest(data)
        _, integrity = check_integrity(root)
        report = verify(root)
        assert_failures(report.failures)
        original = listed(json.loads((base / MANIFEST).read_bytes()))
        if not expected and manifest is not None and listed(manifest) == original:
            assert report.ok and loads == [root], report.failures
            return
        event(f"verify: {report.checks}")
        assert integrity and not report.ok
        assert set(integrity) <= set(report.failures)
        assert loads == [] and "load" not in report.checks and "weights" not in report.checks


# ---------------------------------------------------------------------------------------------
# 6. The signature file: a mutated signature or manifest never passes, and never raises


@pytest.fixture(scope="module")
def signed(base, tmp_path_factory) -> tuple[Path, Path]:
    """A signed copy of the bundle and the public key that signed it."""
    from edgepack.bundle.signing import check, keygen, sign

    work = tmp_path_factory.mktemp("fuzz-signed")
    root = work / NAME
    shutil.copytree(base, root)
    keys = keygen(work / "k")
    sign(root, keys.private)
    assert check(root, [keys.public]).state == "trusted"
    return root, keys.public


def _same_signature(data: bytes, original: dict[str, Any]) -> bool:
    """Whether signature file bytes say what ``original`` says (base64 text may differ in its
    unused padding bits and still decode to the same signature)."""
    try:
        document = strict_json(data)
    except (ValueError, RecursionError):
        return False
    if not (isinstance(document, dict) and set(document) == set(original)):
        return False
    if any(document[k] != original[k] for k in original if k != "signature"):
        return False
    if not isinstance(document["signature"], str):
        return False
    try:
        raw = base64.b64decode(document["signature"], validate=True)
    except (binascii.Error, ValueError):
        return False
    return raw == base64.b64decode(original["signature"])


@fuzz(150)
@given(target=st.sampled_from([SIGNATURE, SIGNATURE, MANIFEST]), ops=st.lists(_BYTE_OP, max_size=3),
       tree_ops=st.lists(_TREE_OP, max_size=2), trusted=st.booleans())
@example(target=SIGNATURE, ops=[], tree_ops=[], trusted=True)
@example(target=MANIFEST, ops=[], tree_ops=[("replace", 2, "tiny2")], trusted=False)
def test_mutated_signatures_never_pass(signed, scratch, target, ops, tree_ops, trusted):
    from edgepack.bundle.signing import check

    source, public = signed
    original = {name: (source / name).read_bytes() for name in (MANIFEST, SIGNATURE)}
    data = original[target]
    if tree_ops:
        doc = json.loads(data)
        for op in tree_ops:
            doc = apply_tree_op(doc, op)
        data = _dumps(doc).encode("utf-8", "surrogatepass")
    data = apply_byte_ops(data, ops)
    with fresh_dir(scratch) as work:
        root = _copy_bundle(source, work)
        (root / target).write_bytes(data)
        result = check(root, [public] if trusted else [])
        assert result.state in ("failed", "trusted" if trusted else "signed"), result
        assert isinstance(result.detail, str) and "\n" not in result.detail
        if target == MANIFEST:
            passes = data == original[MANIFEST]
        else:
            passes = _same_signature(data, json.loads(original[SIGNATURE]))
        assert result.ok == passes, (result, data[:200])
        event(f"signature: {result.state}")


# ---------------------------------------------------------------------------------------------
# Regression tests of the bugs these properties found


def _safetensors_file(path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("dtype", ["[]", "{}", '["F32"]'])
def test_layout_refuses_a_dtype_that_is_not_a_string(tmp_path, dtype):
    path = _safetensors_file(tmp_path / "w.safetensors", f'{{"w":{{"dtype":{dtype},"shape":[0],"data_offsets":[0,0]}}}}')
    with pytest.raises(UsageError, match="unknown dtype"):
        safetensors_layout(path)


def test_layout_refuses_a_deeply_nested_header(tmp_path):
    path = _safetensors_file(tmp_path / "w.safetensors", '{"w":' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UsageError, match="not a safetensors file"):
        safetensors_layout(path)


def test_verify_reports_a_weights_file_with_a_list_dtype(tmp_path, base_files):
    files = dict(base_files)
    bad = _safetensors_file(tmp_path / "bad.safetensors", '{"w":{"dtype":[],"shape":[0],"data_offsets":[0,0]}}')
    files["model/model.safetensors"] = bad.read_bytes()
    root = make_bundle(tmp_path / NAME, files=files)
    assert check_integrity(root)[1] == []  # the manifest lists the bad file as it is
    report = verify(root)
    assert not report.ok
    assert [(f.check, f.path) for f in report.failures] == [("weights", "model/model.safetensors")]


@pytest.mark.parametrize("name, data", [("x\ny/model.bin", b"1"), (f"b/{MANIFEST}", b'{"a\\nb": NaN}')],
                         ids=["top-directory", "manifest-key"])
def test_extract_errors_name_untrusted_text_on_one_line(tmp_path, name, data):
    archive = tmp_path / "x.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(VerificationError) as caught:
        safe_extract(archive, tmp_path / "dest")
    assert "\n" not in str(caught.value)
