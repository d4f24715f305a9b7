"""The bundle manifest (format 1.0): schema, canonical JSON, file hashing and integrity.

Everything a reader takes from a manifest is checked here before it is used: the text is
parsed strictly (:func:`strict_json`: no key twice in one object, no NaN or Infinity, bounded
integers and nesting), the schema (:func:`schema_failures`) validates the type and range of every
field that edgepack reads (``verify``, ``inspect``, ``load``) and bounds the number of files and
the length of paths, and :func:`integrity_failures` compares the bundle tree with the manifest's
``files`` without following links.

Format versions: another major version is refused. A manifest of this edgepack's minor version
(or an older one) must hold only the keys this edgepack knows; one of a newer minor version may
hold top-level keys it does not know, which are kept (they stay in the manifest, its hash and
its signature) but never read or trusted (:func:`untrusted_keys`; ``verify`` lists them).

Links: nothing inside a bundle may be a symbolic link (file or directory) or a special file
(FIFO, socket, device); the tree is walked with ``lstat`` and never through a link. The bundle
root itself is the path the user named and may be a link (``dist/latest -> dist/x-0.1.0``):
it is outside the bundle's content, so it is followed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepack.errors import UsageError
from edgepack.smoke import BATCHINGS, LOGITS_FROM

FORMAT = "edgepack.bundle"
FORMAT_VERSION = "1.1"
#: The first format version whose manifests must carry a content digest (``content``).
CONTENT_SINCE = "1.1"
#: The definition of the content digest a manifest's ``content.scheme`` names (see
#: :func:`content_view`); a manifest naming another scheme is refused, never skipped.
CONTENT_SCHEME = "edgepack-content/1"
#: The model card's chart (peak memory against quality), drawn when matplotlib is installed.
CARD_CHART = "memory-quality.png"
#: The content schemes this edgepack reads, each with the files its digest leaves out (the model
#: card, which reports one build's measurements). /2 also leaves out the card's chart; a bundle
#: without a chart is written as /1, which every edgepack since format 1.1 reads. Both digest
#: the same view (marked /1), so the same content gives the same digest with or without a chart.
CONTENT_SCHEMES = {CONTENT_SCHEME: ("README.md",), "edgepack-content/2": ("README.md", CARD_CHART)}
MANIFEST = "manifest.json"
#: The detached signature beside the manifest (see :mod:`edgepack.bundle.signing`): the one
#: file of a bundle that ``files`` does not list, since it signs the manifest that lists them.
SIGNATURE = "manifest.sig.json"
#: A signature file larger than this is refused before it is read (a real one is under 1 kB).
MAX_SIGNATURE_BYTES = 64 * 2**10

#: A manifest larger than this is refused before it is read (real ones are a few kB).
MAX_MANIFEST_BYTES = 64 * 2**20
#: Bounds on what a manifest may hold (real ones list tens of files and nest six levels deep):
#: files listed, bytes of one path and of one path component, JSON nesting, integer magnitude
#: (a 64-bit reader in another language must read the same numbers).
MAX_FILES = 100_000
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
MAX_DEPTH = 32
MAX_INT = 2**63 - 1
#: The hash algorithms a ``files`` entry may use; any other is refused, never skipped.
HASH_ALGORITHMS = ("sha256",)

#: The tasks a bundle can declare (``model.task``).
TASKS = ("feature-extraction", "text-generation")

#: Top-level keys and the JSON type each must have.
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": str,
    "bundle": dict,
    "producer": dict,
    "source": dict,
    "target": dict,
    "workload": dict,
    "budget": dict,
    "plan": list,
    "candidates": list,
    "memory": dict,
    "fidelity": dict,
    "smoke": dict,
    "files": list,
    "model": dict,
}

#: Keys required inside the nested objects.
NESTED: dict[str, tuple[str, ...]] = {
    "bundle": ("name", "version", "created"),
    "producer": ("edgepack", "python", "torch", "transformers", "plugins"),
    "source": ("model", "sha256"),
    "target": ("name", "devices", "capabilities"),
    "workload": ("batch_size", "seq_len"),
    "budget": ("bytes_per_device", "source"),
    "memory": ("budget_bytes", "predicted_peak_bytes", "measured_peak_bytes", "scope"),
    "fidelity": ("metric", "value", "floor"),
    "smoke": ("inputs", "expected", "tolerances"),
    "model": ("task", "loader"),
}

#: Keys of each plan entry.
PLAN_KEYS = ("plugin", "version", "options")

#: Keys of each files entry.
FILE_KEYS = ("path", "size", "sha256")

#: The smoke keys that name files in the bundle.
SMOKE_FILES = ("inputs", "expected", "tolerances")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FORMAT_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
#: A content digest as written: ``sha256:`` and 64 lowercase hexadecimal digits.
CONTENT_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Failure:
    """One failed check: which check, the file or key at fault, and what was wrong."""

    check: str
    path: str
    detail: str

    def to_json(self) -> dict[str, str]:
        """Plain-JSON form for ``verify --json``."""
        return asdict(self)


def canonical_json(data: Any) -> bytes:
    """UTF-8 JSON with sorted keys and a trailing newline: the same data, the same bytes."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Strict JSON: one text, one meaning


class StrictJSONError(ValueError):
    """JSON text that parses but is refused: ``key`` is the dotted key at fault (``""`` for the
    whole document) and ``detail`` the rest of one sentence."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}" if key else detail)
        self.key = key
        self.detail = detail


class _NonFinite:
    """Stands for NaN, Infinity or an overflowing number until the walk names its key."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def strict_json(text: str | bytes) -> Any:
    """Parse JSON text that every reader reads alike, or raise.

    Refused beyond what :func:`json.loads` refuses (StrictJSONError naming the key): a key
    twice in one object (a reader keeping the first value and one keeping the last would
    disagree), ``NaN``, ``Infinity`` and numbers that overflow to them (not JSON), integers
    beyond 64 bits, and nesting deeper than :data:`MAX_DEPTH`. Malformed text raises
    ValueError (UnicodeDecodeError for bytes that are not UTF-8) or RecursionError as
    json.loads does.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    duplicates: dict[int, tuple[dict[str, Any], str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj and id(obj) not in duplicates:
                duplicates[id(obj)] = (obj, key)  # holding obj keeps its id from being reused
            obj[key] = value
        return obj

    def number(literal: str) -> Any:
        value = float(literal)
        return value if math.isfinite(value) else _NonFinite(literal)

    data = json.loads(text, object_pairs_hook=pairs, parse_constant=_NonFinite, parse_float=number)
    problem = _strict_problem(data, "", 0, duplicates)
    if problem is not None:
        raise StrictJSONError(*problem)
    return data


def _strict_problem(value: Any, key: str, depth: int,
                    duplicates: dict[int, tuple[dict[str, Any], str]]) -> tuple[str, str] | None:
    """The first refused value below ``value`` (document order) as (dotted key, detail)."""
    if isinstance(value, _NonFinite):
        return key, f"is {value.text}, which is not a JSON number (only finite numbers are allowed)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return key, f"is an integer beyond 64 bits ({str(value)[:20]}...), which readers disagree on"
    if not isinstance(value, (dict, list)):
        return None
    if depth >= MAX_DEPTH:
        return key, f"nests JSON objects and arrays deeper than {MAX_DEPTH} levels"
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (problem := _strict_problem(item, f"{key}[{i}]", depth + 1, duplicates)) is not None:
                return problem
        return None
    if id(value) in duplicates and duplicates[id(value)][0] is value:
        twice = duplicates[id(value)][1]
        return (f"{key}.{twice}" if key else twice,
                "appears twice in one JSON object; a reader keeping the first value and one keeping "
                "the last would disagree")
    for sub, item in value.items():
        if (problem := _strict_problem(item, f"{key}.{sub}" if key else sub, depth + 1, duplicates)) is not None:
            return problem
    return None


# ---------------------------------------------------------------------------------------------
# Paths, the link-free tree walk, and hashing without following links


def path_problem(rel: Any) -> str | None:
    """Why ``rel`` is not a safe bundle-relative path, or None when it is one.

    A safe path is a non-empty, normalised POSIX path below the bundle directory: not absolute,
    no ``..``, ``.`` or empty components, no backslash or NUL.
    """
    if not isinstance(rel, str):
        return "must be a string naming a file in the bundle"
    if rel == "":
        return "must not be empty"
    if rel.startswith(("/", "\\")) or Path(rel).is_absolute() or ".." in rel.split("/"):
        return "path escapes the bundle directory"
    if "\\" in rel or "\0" in rel:
        return "must be a POSIX path without backslashes or NUL characters"
    if posixpath.normpath(rel) != rel or rel == ".":
        return "must be a normalised relative path (no '.', empty components or trailing '/')"
    encoded = rel.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        return f"is {len(encoded)} bytes long, more than the {MAX_PATH_BYTES} a bundle path may have"
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in rel.split("/")):
        return f"has a component longer than the {MAX_NAME_BYTES} bytes a file name may have"
    return None


def unsafe_path(rel: str) -> bool:
    """Whether a manifest or archive path could escape the bundle directory or is not normalised."""
    return path_problem(rel) is not None


def path_sort_key(rel: str) -> list[str]:
    """Sort by path components (as ``sorted(Path...)`` does), not as plain strings."""
    return rel.split("/")


@dataclass
class TreeScan:
    """What is below a bundle directory, found without following any link.

    :param files: regular files, by bundle-relative path, with their ``lstat``.
    :param dirs: directories, by bundle-relative path.
    :param problems: links, special files and unreadable entries, each with a sentence.
    """

    files: dict[str, os.stat_result] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


LINK_REFUSED = "is a symbolic link; a bundle holds regular files and directories only, links are refused"
SPECIAL_REFUSED = ("is not a regular file or directory (a FIFO, socket or device); "
                   "a bundle holds regular files and directories only")


def scan_tree(root: Path) -> TreeScan:
    """Walk ``root`` with ``os.scandir`` and ``lstat`` only: links are reported, never followed."""
    scan = TreeScan()
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        directory = os.path.join(os.fspath(root), rel_dir) if rel_dir else os.fspath(root)
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError as exc:
            scan.problems[rel_dir or "."] = f"directory cannot be read: {exc.strerror or exc}"
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError as exc:
                scan.problems[rel] = f"cannot be read: {exc.strerror or exc}"
                continue
            if stat.S_ISLNK(info.st_mode):
                scan.problems[rel] = LINK_REFUSED
            elif stat.S_ISDIR(info.st_mode):
                scan.dirs.append(rel)
                pending.append(rel)
            elif stat.S_ISREG(info.st_mode):
                scan.files[rel] = info
            else:
                scan.problems[rel] = SPECIAL_REFUSED
    scan.dirs.sort(key=path_sort_key)
    return scan


class NotRegularFile(OSError):
    """A path that was a regular file when listed is not one when opened (a link or FIFO)."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_regular(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of ``path``, refusing (never following) a link and never blocking
    on a FIFO. Raises NotRegularFile when ``path`` is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if os.path.islink(path):
            raise NotRegularFile(exc.errno, LINK_REFUSED) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(0, SPECIAL_REFUSED)
    return fd


def hash_regular(path: str | os.PathLike[str], chunk: int = 1 << 20) -> tuple[int, str]:
    """(size, hex sha256) of a regular file, read through a descriptor that refused links."""
    fd = open_regular(path)
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb", closefd=True) as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """``{path, size, sha256}`` of every file below ``root`` except the manifest and its
    signature, by path.

    Raises UsageError when the tree holds a link or a special file: a bundle holds regular
    files and directories only, and links are never followed.
    """
    root = Path(root)
    scan = scan_tree(root)
    if scan.problems:
        rel = sorted(scan.problems, key=path_sort_key)[0]
        raise UsageError(f"{root / rel} {scan.problems[rel]}")
    entries = []
    for rel in sorted(scan.files):
        if rel in (MANIFEST, SIGNATURE):
            continue
        try:
            size, digest = hash_regular(root / rel)
        except OSError as exc:
            raise UsageError(f"{root / rel} cannot be read: {exc.strerror or exc}") from None
        entries.append({"path": rel, "size": size, "sha256": digest})
    return entries


def major(version: str) -> int | None:
    """The major number of a ``MAJOR.MINOR`` version string, or None if malformed."""
    head = str(version).split(".", 1)[0]
    return int(head) if head.isdigit() else None


def format_version_problem(version: Any) -> str | None:
    """Why a manifest's ``format_version`` cannot be read by this edgepack, or None.

    Another major version is refused; a newer minor version of this major one is read (its
    unknown top-level keys are kept but not trusted: see :func:`untrusted_keys`)."""
    if major(version) != major(FORMAT_VERSION):
        return (f"bundle format {version} is not supported; this edgepack reads format "
                f"{major(FORMAT_VERSION)}.x (upgrade edgepack to read it)")
    if not (isinstance(version, str) and _FORMAT_VERSION.fullmatch(version)):
        return f"must be a version MAJOR.MINOR such as {FORMAT_VERSION!r}, got {_show(version)}"
    return None


def _minor(manifest: dict[str, Any]) -> int:
    """The minor number of the manifest's format version of this major one; -1 otherwise."""
    version = manifest.get("format_version")
    if not (isinstance(version, str) and _FORMAT_VERSION.fullmatch(version)) or major(version) != major(FORMAT_VERSION):
        return -1
    return int(version.split(".")[1])


def _newer_minor(manifest: dict[str, Any]) -> bool:
    """Whether the manifest is of a newer minor version of the format than this edgepack's."""
    return _minor(manifest) > int(FORMAT_VERSION.split(".")[1])


def _unknown_keys(manifest: dict[str, Any]) -> list[str]:
    return sorted(k for k in manifest if k not in SCHEMA and k not in OPTIONAL)


def untrusted_keys(manifest: dict[str, Any]) -> list[str]:
    """Top-level keys of a newer minor format version that this edgepack does not know: kept
    in the manifest (and covered by its hash and signature) but never read or acted on."""
    return _unknown_keys(manifest) if _newer_minor(manifest) else []


# ---------------------------------------------------------------------------------------------
# The schema


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # pragma: no cover - manifests come from JSON
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(value: Any) -> str | None:
    return None if _is_int(value) and value > 0 else f"must be a positive integer, got {_show(value)}"


def _peak(value: Any) -> str | None:
    if value is None or (_is_int(value) and value >= 0):
        return None
    return f"must be a non-negative integer or null, got {_show(value)}"


def _peaks(value: Any) -> str | None:
    if _peak(value) is None:
        return None
    if isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
        return None  # a sharded bundle: one peak per rank
    return f"must be a non-negative integer, a list of them (one per rank) or null, got {_show(value)}"


def _shard_dirs(value: Any) -> str | None:
    if isinstance(value, list) and value and all(isinstance(v, str) and path_problem(v) is None for v in value):
        return None
    return f"must be a non-empty list of bundle-relative directories, got {_show(value)}"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {_show(value)}"


def _name(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string, got {_show(value)}"


def _number(value: Any) -> str | None:
    return None if _is_number(value) else f"must be a finite number, got {_show(value)}"


def _strings(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    return f"must be a list of strings, got {_show(value)}"


_CODE_FILE = re.compile(r"model/[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.py")


def _code_files(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) and _CODE_FILE.fullmatch(v) for v in value) \
            and len(set(value)) == len(value):
        return None
    return f"must be a list of distinct Python files directly in model/ (model/NAME.py), got {_show(value)}"


def _object(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"must be a JSON object, got {_show(value)}"


def _string_map(value: Any) -> str | None:
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return None
    return f"must be a JSON object of strings, got {_show(value)}"


def _sha256_map(value: Any) -> str | None:
    if isinstance(value, dict) and all(isinstance(v, str) and _SHA256.fullmatch(v) for v in value.values()):
        return None
    return f"must map file names to sha256 digests (64 lowercase hexadecimal digits), got {_show(value)}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {_show(value)}"
    return check


def _loader(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return None
    return f"must be a plugin name or null, got {_show(value)}"


def _program(value: Any) -> str | None:
    """``model.program``: a compiling target's program (format, file in model/, runtime,
    backend, and each method's inputs and outputs)."""
    if not isinstance(value, dict):
        return f"must be a JSON object, got {_show(value)}"
    for key in ("format", "file", "runtime", "backend"):
        if not isinstance(value.get(key), str) or not value[key]:
            return f"needs '{key}', a non-empty string, got {_show(value.get(key))}"
    problem = path_problem(value["file"])
    if problem is not None or "/" in value["file"]:
        return f"'file' must name a file directly in model/, got {_show(value['file'])}"
    methods = value.get("methods")
    if not isinstance(methods, dict) or not methods:
        return f"needs 'methods', an object of at least one method, got {_show(methods)}"
    for name, signature in methods.items():
        if not (isinstance(signature, dict) and isinstance(signature.get("inputs"), list)
                and isinstance(signature.get("outputs"), list)
                and all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("shape"), list)
                        for t in signature["inputs"] + signature["outputs"])):
            return (f"method {name!r} needs 'inputs' and 'outputs', lists of {{name, dtype, shape}}, "
                    f"got {_show(signature)}")
    return None


def _smoke_file(value: Any) -> str | None:
    problem = path_problem(value)
    if problem is None and value in (MANIFEST, SIGNATURE):
        problem = f"must name a smoke file, not {value}"
    return None if problem is None else f"{problem}, got {_show(value)}"


#: ``section.key`` -> check returning a sentence when the value is wrong. Required keys are
#: listed in NESTED (reported as missing); the others are checked only when present.
FIELDS: dict[str, Callable[[Any], str | None]] = {
    "bundle.name": _name,
    "bundle.version": _name,
    "bundle.created": _string,
    "producer.edgepack": _string,
    "producer.python": _string,
    "producer.torch": _string,
    "producer.transformers": _string,
    "producer.plugins": _string_map,
    "producer.requires": _string_map,
    "source.model": _string,
    "source.sha256": _sha256_map,
    "source.code": _sha256_map,
    "target.name": _name,
    "target.devices": _positive_int,
    "target.capabilities": _strings,
    "target.options": _object,
    "workload.batch_size": _positive_int,
    "workload.seq_len": _positive_int,
    "workload.cache_len": _positive_int,
    "budget.bytes_per_device": _positive_int,
    "budget.source": _one_of("user", "target"),
    "memory.budget_bytes": _positive_int,
    "memory.predicted_peak_bytes": _peak,
    "memory.measured_peak_bytes": _peaks,
    "memory.scope": _string,
    "fidelity.metric": _name,
    "fidelity.value": _number,
    "fidelity.floor": _number,
    "smoke.inputs": _smoke_file,
    "smoke.expected": _smoke_file,
    "smoke.tolerances": _smoke_file,
    "smoke.new_tokens": _positive_int,
    "smoke.logits_from": _one_of(*LOGITS_FROM),
    "smoke.batching": _one_of(*BATCHINGS),
    "model.task": _one_of(*TASKS),
    "model.loader": _loader,
    "model.code": _code_files,
    "model.program": _program,
    "parallel.world_size": _positive_int,
    "parallel.mode": _name,
    "parallel.shards": _shard_dirs,
    "parallel.backend": _string,
    "parallel.launch": _string,
    "content.scheme": _one_of(*CONTENT_SCHEMES),
    "content.digest": lambda value: None if isinstance(value, str) and CONTENT_DIGEST.fullmatch(value) else (
        f"must be 'sha256:' and 64 lowercase hexadecimal digits, got {_show(value)}"),
}

#: Optional top-level keys (a sharded bundle's ``parallel``; ``content``, which format 1.0
#: manifests lack and later ones must hold) and the keys each requires.
OPTIONAL: dict[str, tuple[str, ...]] = {"parallel": ("world_size", "mode", "shards", "launch"),
                                        "content": ("scheme", "digest")}


def _plan_failures(plan: list[Any]) -> list[tuple[str, str]]:
    problems = []
    for i, step in enumerate(plan):
        key = f"plan[{i}]"
        if not isinstance(step, dict):
            problems.append((key, f"must be a JSON object with plugin, version and options, got {_show(step)}"))
            continue
        for sub in PLAN_KEYS:
            if sub not in step:
                problems.append((f"{key}.{sub}", "required key is missing"))
        if "plugin" in step and (problem := _name(step["plugin"])):
            problems.append((f"{key}.plugin", problem))
        if "version" in step and (problem := _string(step["version"])):
            problems.append((f"{key}.version", problem))
        if "options" in step and not isinstance(step["options"], dict):
            problems.append((f"{key}.options", f"must be a JSON object, got {_show(step['options'])}"))
        if "details" in step and not isinstance(step["details"], dict):
            problems.append((f"{key}.details", f"must be a JSON object, got {_show(step['details'])}"))
    return problems


def _files_failures(files: list[Any]) -> list[tuple[str, str]]:
    if len(files) > MAX_FILES:
        return [("files", f"lists {len(files)} files, more than the {MAX_FILES} a bundle may hold")]
    problems = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(files):
        key = f"files[{i}]"
        if not (isinstance(entry, dict) and all(k in entry for k in FILE_KEYS)):
            problems.append((key, "needs path, size and sha256"))
            continue
        for extra in sorted(set(entry) - set(FILE_KEYS)):
            # A digest of another algorithm would be a claim nobody checks: refused, not skipped.
            known = ", ".join(HASH_ALGORITHMS)
            problems.append((f"{key}.{extra}", f"is not a key of a files entry (path, size, sha256); "
                                               f"this edgepack knows no hash algorithm but {known}"))
        path, size, digest = entry["path"], entry["size"], entry["sha256"]
        if (problem := path_problem(path)) is not None:
            problems.append((f"{key}.path", f"{problem}, got {_show(path)}"))
        elif path in (MANIFEST, SIGNATURE):
            problems.append((f"{key}.path", f"must not list {path}, which sits beside the listed files"))
        elif path in seen:
            problems.append((f"{key}.path", f"lists {path} more than once (also files[{seen[path]}])"))
        else:
            seen[path] = i
        if not (_is_int(size) and size >= 0):
            problems.append((f"{key}.size", f"must be a non-negative integer, got {_show(size)}"))
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            problems.append((f"{key}.sha256", f"must be 64 lowercase hexadecimal digits, got {_show(digest)}"))
    return problems


def schema_failures(manifest: Any) -> list[Failure]:
    """Every way ``manifest`` departs from format 1.0 (empty when it conforms).

    Checks the top-level keys and their JSON types (an unknown key is refused unless the
    manifest is of a newer minor format version), the required nested keys, and the type and
    range of every field edgepack reads (see :data:`FIELDS`), each plan and candidate entry,
    and each ``files`` entry (a safe path of bounded length, listed once; a size; a sha256 and
    no other digest), at most :data:`MAX_FILES` of them. That the smoke files are among
    ``files`` is :func:`reference_failures`.
    """
    if not isinstance(manifest, dict):
        return [Failure("schema", MANIFEST, "the manifest is not a JSON object")]
    failures = []

    def add(key: str, detail: str) -> None:
        failures.append(Failure("schema", f"{MANIFEST}:{key}", detail))

    if manifest.get("format") != FORMAT:
        add("format", f"expected {FORMAT!r}, got {_show(manifest.get('format'))}")
    if not _newer_minor(manifest):  # a newer minor version's unknown keys are kept, not trusted
        for key in _unknown_keys(manifest):
            add(key, f"is not a key of format {manifest.get('format_version')} manifests, "
                     f"which this edgepack reads in full; an unknown key is refused")
    for key, kind in SCHEMA.items():
        if key not in manifest:
            add(key, "required key is missing")
        elif not isinstance(manifest[key], kind):
            add(key, f"must be a JSON {kind.__name__}")
    for key, inner in NESTED.items():
        if isinstance(manifest.get(key), dict):
            for sub in inner:
                if sub not in manifest[key]:
                    add(f"{key}.{sub}", "required key is missing")
    if "content" not in manifest and _minor(manifest) >= int(CONTENT_SINCE.split(".")[1]):
        add("content", f"required key is missing (format {CONTENT_SINCE} and later manifests carry a content digest)")
    for key, inner in OPTIONAL.items():
        if key in manifest:
            if not isinstance(manifest[key], dict):
                add(key, "must be a JSON object")
                continue
            for sub in inner:
                if sub not in manifest[key]:
                    add(f"{key}.{sub}", "required key is missing")
    for dotted, check in FIELDS.items():
        section, sub = dotted.split(".")
        node = manifest.get(section)
        if isinstance(node, dict) and sub in node and (problem := check(node[sub])):
            add(dotted, problem)
    if isinstance(manifest.get("plan"), list):
        for key, problem in _plan_failures(manifest["plan"]):
            add(key, problem)
    if isinstance(manifest.get("candidates"), list):
        for i, candidate in enumerate(manifest["candidates"]):
            if not isinstance(candidate, dict):
                add(f"candidates[{i}]", f"must be a JSON object, got {_show(candidate)}")
    if isinstance(manifest.get("files"), list):
        for key, problem in _files_failures(manifest["files"]):
            add(key, problem)
    model, plan = manifest.get("model"), manifest.get("plan")
    if isinstance(model, dict) and "program" in model:  # a compiling target's bundle: its target runs it
        target_name = (manifest.get("target") or {}).get("name") if isinstance(manifest.get("target"), dict) else None
        if model.get("loader") != target_name:
            add("model.loader", f"must name the target ({_show(target_name)}) that runs model.program, "
                                f"got {_show(model.get('loader'))}")
    elif isinstance(model, dict) and isinstance(model.get("loader"), str) and model["loader"] and isinstance(plan, list):
        plugins = {s.get("plugin") for s in plan if isinstance(s, dict)}
        if model["loader"] not in plugins:
            add("model.loader", f"names plugin {model['loader']!r}, which is not in the plan")
    return failures


def reference_failures(manifest: dict[str, Any]) -> list[Failure]:
    """Fields that name bundle files but name none of the files listed in ``files``
    (``smoke.inputs``, ``smoke.expected``, ``smoke.tolerances``, ``model.code``), and Python
    files in ``model/`` that ``model.code`` does not declare; for a schema-valid manifest."""
    listed = {e["path"] for e in manifest.get("files", []) if isinstance(e, dict)}
    failures = []
    smoke = manifest.get("smoke")
    if isinstance(smoke, dict):
        for key in SMOKE_FILES:
            rel = smoke.get(key)
            if isinstance(rel, str) and rel not in listed:
                failures.append(Failure("schema", f"{MANIFEST}:smoke.{key}",
                                        f"names {rel}, which is not among the bundle's listed files"))
    code = (manifest.get("model") or {}).get("code") or []
    for rel in code:
        if rel not in listed:
            failures.append(Failure("schema", f"{MANIFEST}:model.code",
                                    f"names {rel}, which is not among the bundle's listed files"))
    for rel in sorted(listed, key=path_sort_key):  # model/ is where transformers imports a model's code from
        if rel.startswith("model/") and rel.endswith(".py") and rel not in code:
            failures.append(Failure("code", rel, "is a Python file that the manifest does not declare in "
                                                 "model.code; a bundle holds no code it does not declare"))
    program = (manifest.get("model") or {}).get("program")
    if isinstance(program, dict) and f"model/{program.get('file')}" not in listed:
        failures.append(Failure("schema", f"{MANIFEST}:model.program.file",
                                f"names model/{program.get('file')}, which is not among the bundle's listed files"))
    failures.extend(_sharding_failures(manifest, listed))
    return failures


def _sharding_failures(manifest: dict[str, Any], listed: set[str]) -> list[Failure]:
    """A sharded bundle's ``parallel`` section against the rest: one shard directory per rank,
    each holding listed files, the loader, and one measured peak per rank."""
    failures = []
    parallel = manifest.get("parallel")
    peaks = (manifest.get("memory") or {}).get("measured_peak_bytes")
    if not isinstance(parallel, dict):
        if isinstance(peaks, list):
            failures.append(Failure("schema", f"{MANIFEST}:memory.measured_peak_bytes",
                                    "is a list of per-rank peaks, but the bundle has no parallel section"))
        return failures
    world, shards = parallel.get("world_size"), parallel.get("shards")
    if isinstance(shards, list) and _is_int(world) and len(shards) != world:
        failures.append(Failure("schema", f"{MANIFEST}:parallel.shards",
                                f"lists {len(shards)} shard directories for world size {world}"))
    for i, shard in enumerate(shards if isinstance(shards, list) else []):
        if isinstance(shard, str) and not any(p.startswith(shard + "/") for p in listed):
            failures.append(Failure("schema", f"{MANIFEST}:parallel.shards[{i}]",
                                    f"names {shard}, which holds none of the bundle's listed files"))
    if isinstance(peaks, list) and _is_int(world) and len(peaks) != world:
        failures.append(Failure("schema", f"{MANIFEST}:memory.measured_peak_bytes",
                                f"has {len(peaks)} per-rank peaks for world size {world}"))
    return failures


def tolerances_problem(tolerances: Any) -> str | None:
    """What is wrong with a parsed ``smoke/tolerances.json`` (None when it is well formed):
    an object with ``metric`` (a string) and ``min_value`` and ``min_worst`` (numbers)."""
    if not isinstance(tolerances, dict):
        return f"must hold a JSON object with metric, min_value and min_worst, got {_show(tolerances)}"
    problems = []
    for key, check, kind in (("metric", _name, "a string"), ("min_value", _number, "a number"),
                             ("min_worst", _number, "a number")):
        if key not in tolerances:
            problems.append(f"{key} is missing")
        elif check(tolerances[key]):
            problems.append(f"{key} must be {kind}, got {_show(tolerances[key])}")
    return f"malformed tolerances: {'; '.join(problems)}" if problems else None


# ---------------------------------------------------------------------------------------------
# Integrity


def integrity_failures(root: Path, manifest: dict[str, Any]) -> list[Failure]:
    """Files changed, missing, unlisted, unreadable, links or special files, compared with the
    manifest's ``files`` (the manifest and its signature, :data:`SIGNATURE`, are the two files
    it does not list; the signature is checked by :mod:`edgepack.bundle.signing`). Links are reported and never followed; nothing raises for a
    malformed tree (unreadable files and directories are failures naming the path)."""
    root = Path(root)
    scan = scan_tree(root)
    problems = dict(scan.problems)
    blocked = set(scan.problems)
    failures = []
    listed: set[str] = set()
    for i, entry in enumerate(manifest.get("files", [])):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            failures.append(Failure("files", f"{MANIFEST}:files[{i}]", "needs path, size and sha256"))
            continue
        rel = entry["path"]
        listed.add(rel)
        if unsafe_path(rel):
            failures.append(Failure("files", rel, path_problem(rel) or "unsafe path"))
            continue
        if rel in problems:
            failures.append(Failure("files", rel, problems.pop(rel)))
            continue
        parts = rel.split("/")
        if any("/".join(parts[:n]) in blocked for n in range(1, len(parts))):
            continue  # below a link or an unreadable directory: reported once, for that path
        info = scan.files.get(rel)
        if info is None:
            failures.append(Failure("files", rel, "listed in the manifest but missing"))
            continue
        if info.st_size != entry.get("size"):
            failures.append(Failure("files", rel, f"size expected {entry.get('size')}, actual {info.st_size}"))
            continue
        try:
            size, digest = hash_regular(root / rel)
        except NotRegularFile as exc:
            failures.append(Failure("files", rel, exc.strerror or SPECIAL_REFUSED))
            continue
        except OSError as exc:
            failures.append(Failure("files", rel, f"cannot be read: {exc.strerror or exc}"))
            continue
        if size != entry.get("size"):
            failures.append(Failure("files", rel, f"size expected {entry.get('size')}, actual {size}"))
        elif digest != entry.get("sha256"):
            failures.append(Failure("files", rel, f"sha256 expected {entry.get('sha256')}, actual {digest}"))
    parents = {"/".join(p.split("/")[:n]) for p in listed for n in range(1, p.count("/") + 1)}
    rest = list(problems.items())
    rest += [(rel, "not listed in the manifest") for rel in scan.files
             if rel not in (MANIFEST, SIGNATURE) and rel not in listed]
    rest += [(rel, "not listed in the manifest") for rel in scan.dirs if rel not in parents and rel not in listed]
    for rel, detail in sorted(rest, key=lambda item: path_sort_key(item[0])):
        failures.append(Failure("files", rel, detail))
    return failures


# ---------------------------------------------------------------------------------------------
# The content digest: what the bundle is, apart from how and where it was made

#: The manifest fields the content digest covers (scheme ``edgepack-content/1``): a section
#: name maps to the keys of it that are covered, or to None for the whole section. Everything
#: else is the record of the build, which varies by nature and is not covered: ``bundle.created``,
#: ``producer`` (but ``requires``, what loading needs), ``source.model`` (a path on the packing
#: machine), ``target.probed``, ``budget`` (negotiated from this machine's memory), ``candidates``
#: and ``memory`` (measured), ``fidelity`` (measured; its effect on the tolerances is covered
#: through ``smoke/``), and unknown keys of newer format versions.
CONTENT_FIELDS: dict[str, tuple[str, ...] | None] = {
    "format": None,
    "bundle": ("name", "version"),
    "producer": ("requires",),
    "source": ("sha256",),
    "model": None,
    "target": ("name", "devices", "capabilities", "options"),
    "workload": None,
    "plan": None,
    "smoke": None,
    "parallel": None,
}
#: Every file some content scheme leaves out (the model card and its chart).
CONTENT_EXCLUDED_FILES = tuple(sorted({f for files in CONTENT_SCHEMES.values() for f in files}))


def content_scheme(manifest: dict[str, Any]) -> str:
    """The scheme a manifest's content is digested by: the recorded one when this edgepack
    knows it; for a manifest being written, /2 when it lists the card's chart, else /1."""
    recorded = manifest.get("content")
    if isinstance(recorded, dict) and recorded.get("scheme") in CONTENT_SCHEMES:
        return recorded["scheme"]
    files = manifest.get("files") or []
    return "edgepack-content/2" if any(isinstance(e, dict) and e.get("path") == CARD_CHART for e in files) \
        else CONTENT_SCHEME


def content_view(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a (schema-valid) manifest that the content digest covers: the fields of
    :data:`CONTENT_FIELDS` and every ``files`` entry but those its scheme leaves out
    (:data:`CONTENT_SCHEMES`), which through their hashes cover every byte of ``model/`` and
    ``smoke/``."""
    excluded = CONTENT_SCHEMES[content_scheme(manifest)]
    view: dict[str, Any] = {"scheme": CONTENT_SCHEME}
    for section, keys in CONTENT_FIELDS.items():
        if section not in manifest:
            continue
        value = manifest[section]
        if keys is not None and isinstance(value, dict):
            value = {k: value[k] for k in keys if k in value}
        view[section] = value
    view["files"] = [e for e in manifest.get("files", [])
                     if not (isinstance(e, dict) and e.get("path") in excluded)]
    return view


def content_digest(manifest: dict[str, Any]) -> str:
    """``sha256:`` and the hex SHA-256 of the canonical JSON of :func:`content_view`: equal for
    two bundles of the same content, whenever and wherever each was packed."""
    return "sha256:" + hashlib.sha256(canonical_json(content_view(manifest))).hexdigest()


def recorded_digest(manifest: dict[str, Any]) -> str:
    """The manifest's recorded content digest; for a format 1.0 manifest, which records none,
    the digest its content gives."""
    recorded = manifest.get("content")
    return recorded["digest"] if isinstance(recorded, dict) else content_digest(manifest)


def content_section(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest's ``content`` object for a manifest whose ``files`` are final."""
    return {"scheme": content_scheme(manifest), "digest": content_digest(manifest)}


def content_failures(manifest: dict[str, Any]) -> list[Failure]:
    """The recorded content digest against the one the manifest's own content gives (for a
    schema-valid manifest whose files passed :func:`integrity_failures`); empty for a format 1.0
    manifest, which has none."""
    recorded = manifest.get("content")
    if not isinstance(recorded, dict):
        return []
    actual = content_digest(manifest)
    if recorded.get("digest") != actual:
        return [Failure("content", f"{MANIFEST}:content.digest",
                        f"records {recorded.get('digest')}, but the manifest's content gives {actual}")]
    return []


def content_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the covered content of two manifests differs: ``(key or file path, what)`` pairs,
    fields first, then files in path order; empty when their content digests are equal."""
    va, vb = content_view(a), content_view(b)
    out: list[tuple[str, str]] = []
    for key in sorted((set(va) | set(vb)) - {"files"}):
        if va.get(key) == vb.get(key):
            continue
        if isinstance(va.get(key), dict) and isinstance(vb.get(key), dict):
            for sub in sorted(set(va[key]) | set(vb[key])):
                if va[key].get(sub) != vb[key].get(sub):
                    out.append((f"{key}.{sub}", f"{_show(va[key].get(sub))} against {_show(vb[key].get(sub))}"))
        else:
            out.append((key, f"{_show(va.get(key))} against {_show(vb.get(key))}"))
    fa = {e["path"]: e for e in va["files"] if isinstance(e, dict) and "path" in e}
    fb = {e["path"]: e for e in vb["files"] if isinstance(e, dict) and "path" in e}
    for path in sorted(set(fa) | set(fb), key=path_sort_key):
        if path not in fb:
            out.append((path, "only in the first bundle"))
        elif path not in fa:
            out.append((path, "only in the second bundle"))
        elif fa[path].get("sha256") != fb[path].get("sha256"):
            out.append((path, f"differs ({fa[path].get('size')} bytes, sha256 {str(fa[path].get('sha256'))[:12]}... "
                              f"against {fb[path].get('size')} bytes, {str(fb[path].get('sha256'))[:12]}...)"))
    return out
