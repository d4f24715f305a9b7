"""The two plugin interfaces, Compressor and Target, and the small dataclasses they exchange.

Nothing here imports torch: a plugin's class must be cheap to register, so that
``edgepack plugins`` and ``edgepack --help`` stay fast. Heavy imports happen inside methods.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from edgepack.errors import UsageError

COMPRESSOR_KINDS = ("prune", "quantize", "sparsify", "precision", "parallel", "other")

# Module kinds that weights are grouped by in a Footprint.
WEIGHT_KINDS = ("embedding", "linear", "norm", "other")


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class Option:
    """One option a compressor accepts on ``--apply NAME:KEY=VALUE``.

    :param name: the key as users spell it.
    :param type: ``str``, ``int``, ``float``, ``bool`` or ``list`` (a list of strings, spelt
        ``KEY=[a,b]`` in a spec, or a JSON/TOML array); raw strings are converted to it.
    :param choices: allowed values (after conversion); empty means any value of ``type``.
    :param default: value used when the option is not given; ``None`` means "not set".
    :param minimum: lower bound for numbers (inclusive).
    :param maximum: upper bound for numbers (inclusive).
    :param help: one line shown by ``edgepack plugins``.
    """

    name: str
    type: type = str
    choices: tuple[Any, ...] = ()
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def parse(self, raw: Any, where: str) -> Any:
        """Convert and check one raw value; ``where`` names the plugin for the error message."""
        if self.type is list:
            return self._parse_list(raw, where)
        if self.type is Size:
            from edgepack.memory import parse_size

            return parse_size(raw, f"option {where}:{self.name}")
        value: Any = raw
        try:
            if self.type is bool and isinstance(raw, str):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value = raw.lower() in ("1", "true", "yes")
            elif not isinstance(raw, self.type):
                value = self.type(raw)
        except (TypeError, ValueError):
            raise UsageError(
                f"option {where}:{self.name}={raw} is not a valid {self.type.__name__}"
            ) from None
        if isinstance(value, float) and value != value:  # NaN passes every comparison
            raise UsageError(f"option {where}:{self.name}={raw} is not a number")
        if self.choices and value not in self.choices:
            allowed = "|".join(str(c) for c in self.choices)
            raise UsageError(f"option {where}:{self.name}={raw} is not one of {allowed}")
        if self.minimum is not None and value < self.minimum:
            raise UsageError(f"option {where}:{self.name}={raw} is below its minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise UsageError(f"option {where}:{self.name}={raw} is above its maximum {self.maximum}")
        return value

    def _parse_list(self, raw: Any, where: str) -> list[str]:
        """A list of non-empty strings from ``[a,b]``, a bare ``a``, or a list."""
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items: Any = [item.strip() for item in text.split(",")] if text.strip() else []
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise UsageError(f"option {where}:{self.name}={raw} is not a list; spell it {self.name}=[a,b]")
        if not all(isinstance(item, str) and item for item in items):
            raise UsageError(f"option {where}:{self.name}={raw} must list non-empty strings, as {self.name}=[a,b]")
        if self.choices:
            for item in items:
                if item not in self.choices:
                    allowed = "|".join(str(c) for c in self.choices)
                    raise UsageError(f"option {where}:{self.name} item {item!r} is not one of {allowed}")
        return items

    def describe(self) -> str:
        """A short human description: ``scheme=int8|int4 (default int8)``."""
        if self.type is list:
            return f"{self.name}=[NAME,...]"
        if self.type is Size:
            return f"{self.name}=SIZE"
        values = "|".join(str(c) for c in self.choices) if self.choices else self.type.__name__.upper()
        text = f"{self.name}={values}"
        if self.default is not None:
            text += f" (default {self.default})"
        return text


class Size(int):
    """Option type for a number of bytes: ``8GB``, ``512MiB`` or plain bytes on the command line."""


def parse_spec(spec: str, flag: str, what: str) -> tuple[str, dict[str, str]]:
    """``NAME[:KEY=VALUE,...]`` → (NAME, {KEY: VALUE}); the commas inside ``[...]`` belong to a
    list value. ``flag`` and ``what`` name the option and the thing in errors."""
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"{flag} {spec!r} names no {what}; use {what.upper()}[:KEY=VALUE,...]")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in _split_options(spec, rest, flag))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{flag} {spec!r}: {part!r} is not KEY=VALUE")
        if key.strip() in options:
            raise UsageError(f"{flag} {spec!r} gives option {key.strip()!r} twice")
        options[key.strip()] = value.strip()
    return name, options


def _split_options(spec: str, rest: str, flag: str) -> list[str]:
    """Split ``KEY=VALUE`` pairs on the commas outside brackets, so that a list value
    (``keep=[layer.0.,layer.5.]``) stays one pair."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(rest):
        if char == "[":
            depth += 1
            if depth > 1:
                raise UsageError(f"{flag} {spec!r}: lists do not nest")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"{flag} {spec!r} has a ']' without its '['")
        elif char == "," and depth == 0:
            parts.append(rest[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"{flag} {spec!r} has a '[' without its ']'")
    parts.append(rest[start:])
    return parts


def parse_option_values(options: Sequence[Option], raw: Mapping[str, Any], where: str, kind: str) -> dict[str, Any]:
    """Check option names and values against ``options`` and fill defaults; UsageError names
    the key (``kind`` is "plugin" or "target", ``where`` its name)."""
    known = {o.name: o for o in options}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        valid = ", ".join(o.describe() for o in options) or "none"
        raise UsageError(f"{kind} {where!r} has no option {unknown[0]!r}; valid options: {valid}")
    parsed: dict[str, Any] = {}
    for opt in options:
        if opt.name in raw:
            parsed[opt.name] = opt.parse(raw[opt.name], where)
        elif opt.default is not None:
            parsed[opt.name] = opt.default
    return parsed


# ---------------------------------------------------------------------------------------------
# Facts, workload, footprint


@dataclass(frozen=True)
class ModelFacts:
    """What the planner knows about a model without touching its weights.

    Architecture numbers come from ``optimum.utils.NormalizedConfigManager`` where it knows the
    model type, else from the config's own attribute names.
    """

    model_type: str
    architecture: str
    task: str  # "feature-extraction" (encoders) or "text-generation" (decoders)
    num_parameters: int
    parameters_by_kind: Mapping[str, int]
    dtype: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    linear_shapes: tuple[tuple[int, int], ...] = ()  # (out, in) of every Linear, for estimates

    @property
    def is_decoder(self) -> bool:
        """Whether the model generates tokens (and so keeps a KV cache)."""
        return self.task == "text-generation"

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest."""
        data = dataclasses.asdict(self)
        data.pop("linear_shapes")
        data["parameters_by_kind"] = dict(self.parameters_by_kind)
        return data


@dataclass(frozen=True)
class Workload:
    """What the deployed model will be asked to do: batch size and sequence length.

    :param cache_len: for decoders, the KV-cache length (prompt plus generated tokens).
    """

    batch_size: int = 1
    seq_len: int = 128
    cache_len: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class WeightGroup:
    """Weights of one module kind as they will be stored.

    :param kind: one of :data:`WEIGHT_KINDS`.
    :param params: number of weight elements kept.
    :param bits: storage bits per element, scales and zero points included.
    :param density: fraction of elements that are nonzero (unstructured pruning lowers it;
        dense storage still stores every element, a sparse format only the nonzeros).
    """

    kind: str
    params: int
    bits: float
    density: float = 1.0

    @property
    def bytes(self) -> int:
        """Stored bytes of the group."""
        return int(round(self.params * self.bits / 8))


@dataclass(frozen=True)
class ScratchChunks:
    """Matmuls that dequantize their weight a slice of rows at a time: weights of at least
    ``min_elements`` elements and more than ``rows`` rows, with inputs of at most
    ``max_input_rows`` rows. Their scratch is ``rows`` rows of the weight and a copy of the
    result. ``scratch`` is the per-element scratch so sliced (``Footprint.weight_scratch`` when
    the slicing step set it): a larger one, from a later step, counts whole."""

    rows: int
    min_elements: int
    max_input_rows: int
    scratch: float = 0.0

    def applies(self, out_features: int, in_features: int, input_rows: int) -> bool:
        """Whether a matmul of ``input_rows`` rows with this weight is sliced."""
        return (out_features > self.rows and out_features * in_features >= self.min_elements
                and input_rows <= self.max_input_rows)


@dataclass(frozen=True)
class Footprint:
    """The memory a plan needs, by component; built by :mod:`edgepack.memory`.

    Compressors transform a footprint in ``estimate`` (pure arithmetic). The peak is computed
    from it by :func:`edgepack.memory.estimate_peak_bytes`.

    :param weights: stored weights by module kind.
    :param activation_bits: bits per activation element at run time (32 for fp32, 16 for bf16).
    :param row_width: typical input width of a weight row (the hidden size), for per-row scales.
    :param ffn_scale: fraction of FFN neurons kept (structured pruning shrinks it).
    :param heads_scale: fraction of attention heads kept (per rank, when heads are split).
    :param layer_scale: fraction of the layers one device runs (pipeline parallelism).
    :param notes: one line per compressor that changed the footprint.
    :param workspace_bytes: fixed extra memory of the kernels the plan runs on.
    :param weight_scratch: bytes of per-call scratch per element of the weight a matmul uses
        (a weight dequantized for one call: 4 in fp32); compressors add theirs.
    :param scratch_chunks: weights whose per-call scratch covers a slice of their rows only
        (see :class:`ScratchChunks`); None: every weight's scratch is whole.
    :param generation_workspace: bytes of a decoder's generation loop beyond the activations'
        logits phase; None: what transformers' ``generate`` needs
        (:data:`edgepack.memory.GENERATION_WORKSPACE_BYTES`).
    :param facts: the model's facts, for estimates that depend on its architecture.
    """

    weights: tuple[WeightGroup, ...]
    activation_bits: int = 32
    row_width: int = 1024
    ffn_scale: float = 1.0
    heads_scale: float = 1.0
    layer_scale: float = 1.0
    notes: tuple[str, ...] = ()
    workspace_bytes: int = 0
    weight_scratch: float = 0.0
    scratch_chunks: ScratchChunks | None = None
    generation_workspace: int | None = None
    facts: ModelFacts | None = field(default=None, compare=False, repr=False)

    @property
    def weights_bytes(self) -> int:
        """All stored weight bytes."""
        return sum(g.bytes for g in self.weights)

    def with_groups(self, kinds: Sequence[str], bits: float, note: str) -> "Footprint":
        """A copy whose groups of the given kinds are stored at ``bits`` bits per element."""
        groups = tuple(
            dataclasses.replace(g, bits=bits) if g.kind in kinds else g for g in self.weights
        )
        return dataclasses.replace(self, weights=groups, notes=self.notes + (note,))


# ---------------------------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class DeviceInfo:
    """One device a target can use: memory in bytes."""

    index: int
    name: str
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Probe:
    """What a target found on this machine.

    :param present: whether the target can run here at all.
    :param capabilities: names such as ``bf16``, ``fp16``, ``int8``, ``int4-kernel``, ``2:4``.
    :param detail: free-form facts for humans (core count, CPU flags, driver version).
    """

    target: str
    present: bool
    devices: tuple[DeviceInfo, ...]
    capabilities: frozenset[str]
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for ``edgepack targets --json``."""
        return {
            "target": self.target,
            "present": self.present,
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "capabilities": sorted(self.capabilities),
            "detail": dict(self.detail),
        }


class MemoryMeter(abc.ABC):
    """Measures peak memory of one process over a window; see ``Target.memory_meter``."""

    scope: ClassVar[str] = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Mark the baseline: what is in use now does not count."""

    @abc.abstractmethod
    def peak_bytes(self) -> int:
        """Peak bytes in use above the baseline since :meth:`start`."""


class Target(abc.ABC):
    """A kind of hardware a bundle can be packed for.

    Subclasses set ``name`` and implement :meth:`probe`. A target that is not present on this
    machine can still be packed for; ``verify`` on the target is what proves it runs there.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    #: torch device type that :meth:`place` moves models to.
    device_type: ClassVar[str] = "cpu"
    #: fraction of available memory kept back for the OS and other processes.
    reserve_fraction: ClassVar[float] = 0.1
    #: options that describe a device (``--target cuda:memory=8GB,capability=8.7``), so a
    #: bundle can be packed for a device that is not here.
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.settings: dict[str, Any] = parse_option_values(self.options, options or {}, self.name, "target")

    @abc.abstractmethod
    def probe(self) -> Probe:
        """Describe what is present on this machine: devices, memory, capabilities."""

    def describe(self, probe: Probe) -> Probe:
        """The device to pack for: ``probe`` (what is here) with what the options state laid
        over it; the default changes nothing. Planning uses this, loading uses :meth:`probe`."""
        return probe

    def planning_probe(self) -> Probe:
        """:meth:`describe` of :meth:`probe`: the device a bundle is packed for."""
        return self.describe(self.probe())

    def contradictions(self, probe: Probe) -> list[str]:
        """Sentences naming each option the present device ``probe`` falls short of (both
        numbers); verify refuses a bundle packed for a device this one is not."""
        return []

    def capacity(self, probe: Probe) -> int:
        """Usable bytes per device after the safety reserve (0 when the target is absent)."""
        if not probe.devices:
            return 0
        available = min(d.available_bytes for d in probe.devices)
        return int(available * (1.0 - self.reserve_fraction))

    def place(self, model: Any, probe: Probe) -> Any:
        """Move a loaded model onto this target's device(s) at load time."""
        return model.to(self.device_type)

    @abc.abstractmethod
    def memory_meter(self) -> MemoryMeter:
        """A meter for the peak memory a bundle uses on this target (see DESIGN section 5)."""

    # -- targets that compile the model into a program (ExecuTorch ...) ---------------------

    #: name of the program file a compiling target writes into ``model/`` in place of weights;
    #: None (the default): the bundle holds weights that transformers or a plugin loads.
    program: ClassVar[str | None] = None

    def estimate(self, estimate: Any, footprint: "Footprint", facts: "ModelFacts", workload: "Workload") -> Any:
        """The peak estimate (:class:`edgepack.memory.PeakEstimate`) of a plan as this target runs
        it. ``estimate`` models eager PyTorch; a target whose runtime differs (a compiled
        program) corrects it here. Pure arithmetic, like :meth:`Compressor.estimate`. The
        default changes nothing."""
        return estimate

    def refuses(self, compressor: "Compressor", options: Mapping[str, Any]) -> str | None:
        """Why this target cannot run what ``compressor`` with ``options`` makes (a sentence),
        or None. Asked at plan time for every step, so a plan the target cannot run is refused
        with its reason before anything is applied. The default refuses nothing."""
        return None

    def export(self, model: Any, model_dir: Path, *, task: str, workload: "Workload",
               example: Mapping[str, Any], progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
        """Compile the compressed eager ``model`` into :attr:`program` inside ``model_dir``
        for the declared ``workload`` (``example``: one batch of inputs) and return the
        manifest's ``model.program`` section (JSON: format, runtime version, methods and
        their signatures). Called instead of saving weights, only when :attr:`program` is set."""
        raise NotImplementedError(f"target {self.name} does not compile models")

    def load_program(self, model_dir: Path, program: Mapping[str, Any], task: str) -> Any:
        """Run the program that :meth:`export` wrote: a model-like object whose call on the
        inputs gives ``last_hidden_state`` (encoders) or ``logits`` (decoders, which also
        ``generate``), with a ``config`` carrying the token ids generation needs."""
        raise NotImplementedError(f"target {self.name} does not compile models")


# ---------------------------------------------------------------------------------------------
# Compressors


def format_option_value(value: Any) -> str:
    """An option value as ``--apply`` spells it: lists as ``[a,b]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class PlanStep:
    """One compressor with its parsed options, in the order it is applied."""

    plugin: str
    version: str
    options: Mapping[str, Any]

    def spec(self) -> str:
        """The ``--apply`` spelling of this step: ``quantize:scheme=int8``."""
        if not self.options:
            return self.plugin
        opts = ",".join(f"{k}={format_option_value(v)}" for k, v in sorted(self.options.items()))
        return f"{self.plugin}:{opts}"

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest's ``plan``."""
        return {"plugin": self.plugin, "version": self.version, "options": dict(self.options)}


@dataclass
class ApplyContext:
    """What a compressor may use while applying: the target, calibration inputs, progress.

    :param calibration: a list of model input dicts (tensors) for importance or statistics.
    :param progress: ``progress(message)`` prints one line for the user.
    :param later: the plan's steps after this one, in order.
    """

    target: Target
    probe: Probe
    facts: ModelFacts
    calibration: list[dict[str, Any]]
    progress: Callable[[str], None] = lambda message: None
    later: tuple[PlanStep, ...] = ()


class Compressor(abc.ABC):
    """A compression method. Subclasses set the class attributes and implement the methods.

    The planner calls :meth:`estimate` and :meth:`quality_cost` (no weights touched); ``pack``
    calls :meth:`apply`. A compressor whose result stock ``transformers`` cannot save and load
    implements :meth:`save` and :meth:`restore`, which write and read only safetensors and JSON.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "other"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    #: target capabilities every use of this compressor needs.
    requires: ClassVar[frozenset[str]] = frozenset()

    # -- options ---------------------------------------------------------------------------

    def parse_options(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Check option names and values and fill defaults; raises UsageError naming the key."""
        return parse_option_values(self.options, raw, self.name, "plugin")

    def check(self, options: Mapping[str, Any], probe: Probe, previous: Sequence[PlanStep]) -> str | None:
        """Why this step cannot run on ``probe`` after ``previous`` steps, or None if it can."""
        missing = sorted(self.requires - probe.capabilities)
        if missing:
            return f"{self.name} needs {', '.join(missing)}, which target {probe.target} lacks"
        return None

    def candidates(self, facts: ModelFacts, probe: Probe) -> list[dict[str, Any]]:
        """Option sets the planner may try for this model and target (raw, unparsed)."""
        return [{}]

    # -- planning --------------------------------------------------------------------------

    @abc.abstractmethod
    def estimate(self, footprint: Footprint, options: Mapping[str, Any], target: Probe) -> Footprint:
        """The footprint after this step: pure arithmetic, no weights touched."""

    @abc.abstractmethod
    def quality_cost(self, options: Mapping[str, Any], facts: ModelFacts) -> float:
        """A prior on the loss of quality (0 = lossless), used to rank plans before measuring."""

    # -- transformation --------------------------------------------------------------------

    @abc.abstractmethod
    def apply(self, model: Any, options: Mapping[str, Any], context: ApplyContext) -> Any:
        """Transform ``model`` (in place or not) and return the result."""

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        """Write the model's weights into ``model_dir`` when stock saving cannot.

        Return True when weights were written (the compressor then owns loading through
        :meth:`restore`); the default returns False and the stock ``save_pretrained`` is used.
        Only safetensors and JSON may be written.
        """
        return False

    def writes_own_file(self, options: Mapping[str, Any]) -> bool:
        """Whether :meth:`save` writes the weights itself as one whole file for these options
        (which pack's memory estimate counts whole) rather than in shards of ``--shard-size``
        (stock saving, or ``edgepack.model.save_safetensors(..., sharded=True)``). The default
        answers for any plugin that overrides :meth:`save`: yes."""
        return type(self).save is not Compressor.save

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        """Rebuild the model that :meth:`save` wrote. Only called when save returned True."""
        raise NotImplementedError(f"{self.name} wrote no weights of its own")

    def pack_scratch_bytes(self, facts: ModelFacts, options: Mapping[str, Any]) -> int:
        """Memory :meth:`apply` needs while it runs beyond the model it is given and the one it
        returns (statistics it collects, temporaries), in bytes. The planner adds it to the
        cost of packing a plan, which ``pack --work-memory`` caps. The default: three fp32
        copies of the largest weight (one weight's temporaries at a time)."""
        largest = max((o * i for o, i in facts.linear_shapes), default=facts.hidden_size * facts.vocab_size)
        return 3 * 4 * max(largest, facts.hidden_size * facts.vocab_size)

    def pack_held_bytes(self, footprint: Footprint, options: Mapping[str, Any], later: Sequence[PlanStep]) -> int:
        """Of the model :meth:`apply` returns (``footprint``, from :meth:`estimate`), the bytes the
        pack process holds as its own memory while the ``later`` steps run; the planner counts
        them in the cost of packing a plan. The default: all its weights. A step that leaves
        weights in the memory-mapped source for the next step to convert one at a time (the
        precision plugin before quantize) holds less."""
        return footprint.weights_bytes

    def details(self, model_dir: Path, options: Mapping[str, Any]) -> dict[str, Any] | None:
        """What :meth:`apply` decided beyond the options, read back from the saved ``model_dir``
        (JSON values), or None. Recorded as the plan step's ``details`` in the manifest (and so
        covered by the content digest: keep it deterministic). A ``modules`` map of
        ``{module: {"format", "bytes", "sensitivity"?}}`` is shown in the bundle's model card,
        most sensitive first. The default records nothing."""
        return None

    def complete(self, options: Mapping[str, Any], probe: Probe) -> dict[str, Any]:
        """Options with the values that follow from the target filled in (for example how many
        ranks a model is split into); called after :meth:`parse_options` for every plan step.
        The default changes nothing."""
        return dict(options)

    def prepare(self, model: Any, options: Mapping[str, Any], device: str, probe: Probe | None = None) -> Any:
        """Adjust a freshly loaded model for fast execution on this machine (swap kernels, never
        the stored weights). Called for every plan step at load time, also at pack time before
        fidelity and memory are measured; ``probe`` describes the target here. The default
        changes nothing."""
        return model
