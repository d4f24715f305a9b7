"""Smoke tests: sample inputs, golden outputs of the original model, and their comparison.

For encoders (``feature-extraction``) the outputs are mean-pooled, L2-normalised sentence
embeddings and the metric is their cosine similarity to the original model's. For decoders
(``text-generation``) they are the next-token logits of every prompt and the greedy
continuation; the metric is top-1 agreement of the continuation with the original's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from edgepack.errors import UsageError

#: Built-in smoke sentences: varied length, domain, punctuation, numbers and casing.
DEFAULT_SAMPLES = (
    "An edge device has little memory.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps 32-bit floats to 8-bit integers with a per-channel scale.",
    "What time does the last train to Edinburgh leave on Sundays?",
    "She sold 1,250 shares at $43.17 each on 3 March 2024.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "ERROR: connection refused (errno 111) while contacting the license server",
    "I loved the film, although the ending felt rushed and a little predictable.",
    "Pour the batter into a greased tin and bake for 35 minutes at 180 degrees.",
    "The court held that the contract was void for lack of consideration.",
    "def add(a, b): return a + b",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Mitochondria are the powerhouse of the cell.",
    "Please reset my password; I no longer have access to the old e-mail address.",
    "Transformers use self-attention to mix information across all positions of a sequence.",
    "ok",
)

DEFAULT_NEW_TOKENS = 8

#: Where a decoder's smoke logits come from (the manifest's ``smoke.logits_from``): the first
#: step of the greedy generation, whose positions follow the attention mask, so the prompt is
#: run once per sample ...
LOGITS_GENERATE = "generate"
#: ... or, in bundles packed before that key existed, a plain forward over the left-padded
#: prompt (positions 0 .. seq_len - 1, padding included), run before the generation.
LOGITS_FORWARD = "forward"
LOGITS_FROM = (LOGITS_GENERATE, LOGITS_FORWARD)


def check_logits_from(value: str) -> None:
    """ValueError unless ``value`` is one of :data:`LOGITS_FROM`."""
    if value not in LOGITS_FROM:
        raise ValueError(f"logits_from must be one of {', '.join(LOGITS_FROM)}, not {value!r}")

#: A golden batch holds about this many tokens at the declared length (see :func:`golden_batch`).
GOLDEN_BATCH_TOKENS = 1024

INPUTS_FILE = "smoke/inputs.safetensors"
EXPECTED_FILE = "smoke/expected.safetensors"
TOLERANCES_FILE = "smoke/tolerances.json"


def read_samples(path: str | Path) -> list[str]:
    """Sample texts from a file: a JSON list of strings, or one text per line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"samples file {file} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"samples file {file} is not UTF-8 text") from None
    if file.suffix == ".json":
        try:
            samples = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"samples file {file} is not valid JSON: {exc}") from None
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise UsageError(f"samples file {file} must hold a JSON list of strings")
    else:
        samples = [line.strip() for line in text.splitlines() if line.strip()]
    if not samples:
        raise UsageError(f"samples file {file} holds no samples")
    return samples


def tokenize(tokenizer: Any, samples: list[str], seq_len: int, task: str) -> dict[str, Any]:
    """Tokenize samples padded to exactly ``seq_len`` tokens, so a smoke run has the declared
    workload's shape (and so its memory)."""
    if task == "text-generation":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # generation continues from the right edge
    encoded = tokenizer(
        samples, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    keys = ("input_ids", "attention_mask") if task == "text-generation" else ("input_ids", "attention_mask", "token_type_ids")
    return {k: v for k, v in encoded.items() if k in keys}


def golden_batch(batch_size: int, seq_len: int) -> int:
    """About :data:`GOLDEN_BATCH_TOKENS` tokens' worth of rows at the declared length, never
    fewer than the declared batch: under :data:`BATCHING_TRIMMED`, the most rows a trimmed smoke
    batch holds (golden outputs and bundle alike); under :data:`BATCHING_PADDED`, the rows per
    batch of the original model's golden outputs (every input padded to the declared length,
    so a row's outputs do not depend on the batch it runs in, and a decoder's generation steps,
    which read every weight once per step whatever the batch, run a few times instead of once
    per sample; the bundle itself runs at the declared batch)."""
    return max(batch_size, GOLDEN_BATCH_TOKENS // max(1, seq_len))


def batches(inputs: dict[str, Any], batch_size: int) -> Iterator[dict[str, Any]]:
    """Split input tensors into consecutive batches of ``batch_size`` rows."""
    rows = next(iter(inputs.values())).shape[0]
    for start in range(0, rows, batch_size):
        yield {k: v[start : start + batch_size] for k, v in inputs.items()}


#: How a smoke run batches its inputs (the manifest's ``smoke.batching``): every batch of the
#: declared batch size, padded to the declared length, as bundles were packed before the key
#: existed (its absence means this) ...
BATCHING_PADDED = "padded"
#: ... or the first batch so, then the other rows trimmed of their padding (see
#: :func:`smoke_batches`). The stored golden outputs depend on exactly how rows are grouped, so
#: a change to the grouping (or to :data:`GOLDEN_BATCH_TOKENS`) is a new value, and the old
#: one stays for the bundles that name it.
BATCHING_TRIMMED = "trimmed-1"
BATCHINGS = (BATCHING_PADDED, BATCHING_TRIMMED)

#: What a measuring process adds to its meter's scope under :data:`BATCHING_TRIMMED`.
TRIMMED_SCOPE = ("; the peak is read once the first batch of smoke inputs (the declared batch and length) has run; "
                 "the other inputs then run trimmed of their padding, in batches of no more tokens than the first")


def check_batching(value: str) -> None:
    """ValueError unless ``value`` is one of :data:`BATCHINGS`."""
    if value not in BATCHINGS:
        raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, not {value!r}")


def smoke_batches(inputs: dict[str, Any], batch_size: int, *, batching: str = BATCHING_PADDED,
                  new_tokens: int = 0) -> Iterator[dict[str, Any]]:
    """The batches a smoke run computes, in order of the rows (``new_tokens``: the tokens a
    decoder generates per row; 0 for encoders).

    :data:`BATCHING_PADDED`: consecutive batches of ``batch_size`` rows as stored, every one
    padded to the declared length. :data:`BATCHING_TRIMMED`: the first ``batch_size`` rows as
    stored, the declared workload's shape, whose run the memory meter counts; then the other
    rows in consecutive groups, each trimmed of the padding columns all its rows share (an
    attention mask of 0 on every row; without a mask every column is kept), each holding as
    many rows as fit in the first batch's tokens (generated ones included), and no more than
    :func:`golden_batch` rows (always one at least). So no later batch needs more activation or
    KV-cache memory than the measured first one; what grows per row alone, a decoding step's
    logits over the vocabulary, is a golden batch's at most. The smoke samples are short, so
    this computes a small part of the padded run's tokens. The golden outputs run the same
    batches as the bundle, so a row trimmed of positions it was padded with (left padding and
    absolute positions) is compared with the same computation on both sides."""
    check_batching(batching)
    rows = next(iter(inputs.values())).shape[0] if inputs else 0
    if rows == 0:
        return
    widths = [v.shape[1] for v in inputs.values() if v.dim() >= 2]
    if batching == BATCHING_PADDED or not widths:  # (without widths nothing has columns to trim)
        yield from batches(inputs, batch_size)
        return
    head = min(int(batch_size), rows)
    yield {k: v[:head] for k, v in inputs.items()}
    width = max(widths)
    max_tokens = int(batch_size) * (width + int(new_tokens))
    max_rows = golden_batch(int(batch_size), width)
    mask = inputs.get("attention_mask")
    spans = [(0, width - 1)] * rows
    if mask is not None:
        columns = [row.nonzero().flatten().tolist() for row in mask != 0]
        spans = [(c[0], c[-1]) if c else (width - 1, width - 1) for c in columns]  # an all-padding row: one column
    start = head
    while start < rows:
        lo, hi = spans[start]
        end = start + 1
        while end < rows and end - start < max_rows:
            wider = (min(lo, spans[end][0]), max(hi, spans[end][1]))
            if (end + 1 - start) * (wider[1] - wider[0] + 1 + int(new_tokens)) > max_tokens:
                break
            (lo, hi), end = wider, end + 1
        yield {k: v[start:end, lo : hi + 1] if v.dim() >= 2 else v[start:end] for k, v in inputs.items()}
        start = end


def mean_pool(hidden: Any, attention_mask: Any) -> Any:
    """Mean of token states over the attention mask, L2-normalised (sentence-transformers style)."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def run_outputs(model: Any, inputs: dict[str, Any], task: str, batch_size: int,
                new_tokens: int = DEFAULT_NEW_TOKENS, device: str = "cpu",
                logits_from: str = LOGITS_GENERATE, batching: str = BATCHING_PADDED,
                after_first: Callable[[], Any] | None = None,
                stop: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Run the model over the smoke inputs in batches and return its outputs (fp32, on CPU).

    The batches are :func:`smoke_batches`'s, as ``batching`` says; ``after_first`` is called
    once the first batch has run (the measuring process reads its memory meter there).
    ``stop`` is given each batch's outputs in turn: when it returns True the run ends there,
    with the outputs of the rows run so far (:class:`FloorWatch`).

    For decoders, ``tokens`` always has exactly ``new_tokens`` columns: generation ends a batch
    early once every row has emitted an end-of-sequence token, and a row that ended holds the
    pad id after its end-of-sequence token (see :func:`finish_tokens`), whichever batch it ran in.
    ``logits`` are the next-token logits of each prompt, taken as ``logits_from`` says (see
    :data:`LOGITS_GENERATE`, :data:`LOGITS_FORWARD`).
    """
    import torch

    check_logits_from(logits_from)
    collected: dict[str, list[Any]] = {}
    with torch.inference_mode():
        generated = new_tokens if task == "text-generation" else 0
        for batch in smoke_batches(inputs, batch_size, batching=batching, new_tokens=generated):
            batch = {k: v.to(device) for k, v in batch.items()}
            if task == "text-generation":
                parts = _generate(model, batch, new_tokens, logits_from)
            else:
                out = model(**batch)
                parts = {"embeddings": mean_pool(out.last_hidden_state, batch["attention_mask"]).cpu()}
            for key, value in parts.items():
                collected.setdefault(key, []).append(value)
            if after_first is not None:
                after_first()
                after_first = None
            if stop is not None and stop(parts):
                break
    return {k: torch.cat(v) for k, v in collected.items()}


def _generate(model: Any, batch: dict[str, Any], new_tokens: int, logits_from: str) -> dict[str, Any]:
    """One batch of a decoder's smoke outputs: next-token ``logits`` and ``new_tokens`` greedy
    ``tokens`` (see :func:`run_outputs`)."""
    pad = pad_id(model)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    rows = batch["input_ids"].shape[0]
    logits = None
    if logits_from == LOGITS_GENERATE:  # the prompt runs once: its logits are generation's first step
        generated, logits = _generate_with_first_logits(model, batch, kwargs)
        if logits is not None and logits.shape[0] != rows:  # beam search: each prompt's beams start alike
            logits = logits.reshape(rows, -1, logits.shape[-1])[:, 0]
    else:
        generated = model.generate(**batch, **kwargs)
    if logits is None:  # a plain forward of the prompt (and a program whose generate gives tokens only)
        try:  # only the last position's logits: a full [batch, seq, vocab] is not needed
            logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        except TypeError:
            logits = model(**batch).logits[:, -1, :]
    tokens = generated[:, batch["input_ids"].shape[1]:].cpu()
    return {"logits": logits.float().cpu(), "tokens": finish_tokens(tokens, new_tokens, eos_ids(model), pad)}


def _generate_with_first_logits(model: Any, batch: dict[str, Any], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Greedy generation and the logits of its first step (None when a program's ``generate``
    cannot return them). A torch model's are copied by a forward hook from its first call, so
    no other step's logits are kept (``output_logits`` would hold every step's, memory a
    deployed model never uses); a program (not a torch module) is asked for ``output_logits``."""
    import torch

    if isinstance(model, torch.nn.Module):
        first: list[Any] = []

        def keep_first(module: Any, args: Any, output: Any) -> None:
            if not first:
                first.append(output.logits[:, -1, :].float())

        handle = model.register_forward_hook(keep_first)
        try:
            generated = model.generate(**batch, **kwargs)
        finally:
            handle.remove()
        return generated, first[0]
    try:
        out = model.generate(**batch, **kwargs, output_logits=True, return_dict_in_generate=True)
    except TypeError:  # a program's generate without these options
        return model.generate(**batch, **kwargs), None
    if getattr(out, "logits", None):
        return out.sequences, out.logits[0]
    return getattr(out, "sequences", out), None


def pad_id(model: Any) -> int:
    """The id generation pads ended rows with: the config's pad token, else its first
    end-of-sequence token, else 0."""
    for value in (getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def eos_ids(model: Any) -> list[int]:
    """The end-of-sequence token ids ``generate`` stops at: those of the model's generation
    config (which may have none, so that generation always runs to full length)."""
    generation_config = getattr(model, "generation_config", None)
    source = generation_config if generation_config is not None else model.config
    eos = getattr(source, "eos_token_id", None)
    if eos is None:
        return []
    if hasattr(eos, "tolist"):
        eos = eos.tolist()
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def finish_tokens(tokens: Any, new_tokens: int, eos: list[int], pad_id: int) -> Any:
    """Generated ``tokens`` ([rows, <= new_tokens]) as exactly ``new_tokens`` columns, with
    every position after a row's first end-of-sequence token set to ``pad_id``: a row that ended
    reads the same whether its batch went on generating or stopped early."""
    import torch

    tokens = tokens[:, :new_tokens]
    if tokens.shape[1] < new_tokens:
        fill = tokens.new_full((tokens.shape[0], new_tokens - tokens.shape[1]), int(pad_id))
        tokens = torch.cat([tokens, fill], dim=1)
    if eos and tokens.numel():
        is_eos = torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype))
        ended_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an eos earlier in the row
        tokens = tokens.masked_fill(ended_before, int(pad_id))
    return tokens


@dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model's outputs follow the original's.

    :param metric: ``mean_cosine`` (encoders) or ``top1_agreement`` (decoders).
    :param value: the metric over all smoke inputs.
    :param worst: the worst single input (row cosine, or row agreement).
    :param extra: other figures, such as the maximum logit error.
    """

    metric: str
    value: float
    worst: float
    extra: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form for the manifest."""
        return {"metric": self.metric, "value": round(self.value, 6), "worst": round(self.worst, 6), **self.extra}


def sample_scores(expected: dict[str, Any], actual: dict[str, Any], task: str) -> Any:
    """Each input's score, at most 1, whose mean is the fidelity metric: a decoder's share of
    greedy tokens equal to the golden ones, an encoder's embedding cosine."""
    import torch

    if task == "text-generation":
        want, got = _same_width(expected["tokens"], actual["tokens"])
        return (want == got).float().mean(dim=1)
    return torch.nn.functional.cosine_similarity(expected["embeddings"], actual["embeddings"], dim=-1)


def compare(expected: dict[str, Any], actual: dict[str, Any], task: str) -> Fidelity:
    """Fidelity of ``actual`` outputs to ``expected`` (golden) ones."""
    scores = sample_scores(expected, actual, task)
    if task == "text-generation":
        logit_err = (expected["logits"] - actual["logits"]).abs().max().item()
        top1 = (expected["logits"].argmax(-1) == actual["logits"].argmax(-1)).float().mean().item()
        return Fidelity(
            "top1_agreement", scores.mean().item(), scores.min().item(),
            {"next_token_top1": round(top1, 6), "max_logit_error": round(logit_err, 6)},
        )
    return Fidelity("mean_cosine", scores.mean().item(), scores.min().item(), {})


def best_possible(mean: float, done: int, total: int) -> float:
    """The highest fidelity ``total`` inputs can reach when the first ``done`` scored ``mean``:
    every other input scoring the most there is, 1."""
    return (mean * done + (total - done)) / total


class FloorWatch:
    """Tells a smoke run to stop once its fidelity is proven below ``floor``: when even a
    perfect score on every input not yet run would leave the mean under it. Pack's measuring
    process runs a candidate with it: a plan that misses the floor is rejected without running
    all its inputs, with the same decision a full run gives (the scores are the same ones,
    :func:`sample_scores`, computed by the same process)."""

    def __init__(self, expected: dict[str, Any], task: str, floor: float) -> None:
        self.expected, self.task, self.floor = expected, task, float(floor)
        self.total = next(iter(expected.values())).shape[0]
        self.done, self.sum = 0, 0.0

    def __call__(self, parts: dict[str, Any]) -> bool:
        """Score one batch's outputs (the next rows); True when the run may stop."""
        rows = next(iter(parts.values())).shape[0]
        want = {k: v[self.done:self.done + rows] for k, v in self.expected.items()}
        self.sum += float(sample_scores(want, parts, self.task).sum())
        self.done += rows
        return self.done < self.total and best_possible(self.sum / self.done, self.done, self.total) < self.floor


def _same_width(expected: Any, actual: Any) -> tuple[Any, Any]:
    """Token tables of equal width: a missing position (a run that produced fewer tokens) is
    filled with -1, which matches no token, so it counts as a disagreement and never
    broadcasts against the other table."""
    import torch

    width = max(expected.shape[1], actual.shape[1])

    def widen(tokens: Any) -> Any:
        if tokens.shape[1] == width:
            return tokens
        return torch.cat([tokens, tokens.new_full((tokens.shape[0], width - tokens.shape[1]), -1)], dim=1)

    return widen(expected), widen(actual)


def tolerances(fidelity: Fidelity, floor: float) -> dict[str, Any]:
    """Tolerances verify applies: the floor for the metric, and a bound per input a little
    below the worst input measured at pack time (so a different CPU's rounding passes but a
    broken runtime does not)."""
    worst_floor = fidelity.worst - max(0.002, 0.5 * (1.0 - fidelity.worst))
    return {"metric": fidelity.metric, "min_value": floor, "min_worst": round(max(0.0, worst_floor), 6)}


def check(fidelity: Fidelity, tol: dict[str, Any]) -> list[str]:
    """Sentences describing each tolerance that ``fidelity`` misses (empty when all hold)."""
    problems = []
    if fidelity.value < tol["min_value"]:
        problems.append(f"{fidelity.metric} {fidelity.value:.6f} is below the floor {tol['min_value']}")
    if fidelity.worst < tol["min_worst"]:
        problems.append(f"worst input scored {fidelity.worst:.6f}, below its tolerance {tol['min_worst']}")
    return problems


# ---------------------------------------------------------------------------------------------
# The peak-memory probe: load and run a bundle in a fresh process, so nothing loaded before
# counts, and the same definition serves pack and verify. The child side is edgepack.probe.

#: Seconds a measuring process may run before it is killed; the environment variable
#: EDGEPACK_PROBE_TIMEOUT overrides it.
PROBE_TIMEOUT = 900.0
TIMEOUT_ENV = "EDGEPACK_PROBE_TIMEOUT"

#: The measuring process computes on min(cores here, this many) threads.
MAX_PROBE_THREADS = 4

#: glibc allocator settings of the measuring process: one arena (threads do not each grow
#: their own heap, depending on timing) and fixed mmap and trim thresholds (glibc otherwise
#: raises them as large blocks are freed, so whether a tensor is reused from the heap or
#: mapped afresh depends on what ran before). The heap then grows and shrinks the same way on
#: every run, and a freed large tensor goes straight back to the system.
ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_TOP_PAD_": "131072",
}

#: Run by ``python -I -c`` in the measuring process: add the user site directory when the
#: parent used one (argv[1], else empty; ``-I`` leaves it out), import edgepack from the
#: directory the parent imported it from (argv[2]; only the ``edgepack`` package is looked up
#: there, so nothing else in that directory can shadow a library), then measure the spec (argv[3]).
_BOOTSTRAP = """\
import sys
from importlib.machinery import PathFinder

if sys.argv[1]:
    import os, site
    for directory in sys.argv[1].split(os.pathsep):
        site.addsitedir(directory)

class _EdgepackFromParent:
    root = sys.argv[2]

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "edgepack" and cls.root:
            return PathFinder.find_spec(name, [cls.root])
        return None

sys.meta_path.insert(0, _EdgepackFromParent)
from edgepack.probe import _entry
sys.exit(_entry(sys.argv[3]))
"""


@dataclass
class ProbeResult:
    """What a fresh process measured: the peak memory, its scope, and the smoke outputs.

    :param peak_bytes: the peak reported (the largest of ``peaks``).
    :param peaks: every measurement, one per fresh process (``repeats``), in the order run.
    :param threads: the intra-op thread count the measuring process ran on.
    :param stopped_after: the inputs run when the run stopped once its fidelity was proven
        below the floor (``outputs`` holds theirs); None for a full run.
    """

    peak_bytes: int
    scope: str
    outputs: dict[str, Any]
    seconds: float
    peaks: list[int] = field(default_factory=list)
    threads: int | None = None
    rank_peaks: list[int] | None = None
    stopped_after: int | None = None
    #: the largest of the measuring processes' own resident high-water marks in main memory
    #: (what one more such process needs there); None where it cannot be read
    host_peak_bytes: int | None = None

    @property
    def spread_bytes(self) -> int:
        """Largest minus smallest of the measurements (0 for a single one)."""
        return max(self.peaks) - min(self.peaks) if self.peaks else 0

    def with_more(self, more: "ProbeResult") -> "ProbeResult":
        """This result with ``more``'s measurements added (outputs and scope stay this one's)."""
        peaks = list(self.peaks or [self.peak_bytes]) + list(more.peaks or [more.peak_bytes])
        ranks = self.rank_peaks
        if ranks is not None and more.rank_peaks is not None:
            ranks = [max(a, b) for a, b in zip(ranks, more.rank_peaks)]
        hosts = [b for b in (self.host_peak_bytes, more.host_peak_bytes) if b is not None]
        return ProbeResult(max(peaks), self.scope, self.outputs, self.seconds, peaks=peaks, threads=self.threads,
                           rank_peaks=ranks, stopped_after=self.stopped_after,
                           host_peak_bytes=max(hosts) if hosts else None)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def probe_threads() -> int:
    """The thread count measuring processes use on this machine: min(usable cores, 4)."""
    return max(1, min(usable_cores(), MAX_PROBE_THREADS))


def probe_timeout(timeout: float | None = None) -> float:
    """The measuring process's time limit in seconds: ``timeout`` when given, else
    EDGEPACK_PROBE_TIMEOUT, else :data:`PROBE_TIMEOUT`."""
    import os

    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return PROBE_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
        if timeout <= 0:
            raise UsageError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return float(timeout)


def probe_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The measuring process's environment: the caller's, offline and quiet, with a fixed
    thread count and the allocator settings of :data:`ALLOCATOR_ENV`."""
    import os

    env = dict(os.environ if base is None else base)
    env.update(ALLOCATOR_ENV)
    env.update({
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    })
    return env


#: Site directories the measuring processes add to their path, besides site-packages and the
#: user site: where a plugin lives that is installed for one test or session only
#: (:func:`edgepack.testing.registered`). Nothing else from the caller's path reaches them.
PROBE_SITE_DIRS: list[str] = []


def probe_command(spec_path: str | Path, root: str | Path | None = None) -> list[str]:
    """The measuring process's command line: this interpreter in isolated mode (``-I``: no
    PYTHON* variables, no user site, no current or script directory on sys.path), importing
    edgepack from ``root`` (by default the directory this edgepack was imported from, so a
    checkout found only through PYTHONPATH works too). The user site directory is kept when
    this process uses it, and the directories of :data:`PROBE_SITE_DIRS` are added as site
    directories (their ``.pth`` files are read)."""
    import os
    import site
    import sys

    if root is None:
        import edgepack

        root = Path(edgepack.__file__).resolve().parent.parent if getattr(edgepack, "__file__", None) else ""
    sites = []
    if site.ENABLE_USER_SITE and site.USER_SITE and site.USER_SITE in sys.path:
        sites.append(site.USER_SITE)  # where a ``pip install --user`` put edgepack or its libraries
    sites += [d for d in PROBE_SITE_DIRS if d not in sites]
    return [sys.executable, "-I", "-c", _BOOTSTRAP, os.pathsep.join(sites), str(root), str(spec_path)]


#: Linux: the shim that makes a command die with the process that started it (the parent death
#: signal survives exec), so a SIGKILLed pack or verify leaves no measuring process running.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"  # PR_SET_PDEATHSIG
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(137)\n"  # the parent died before the line above took effect
    # a process group of its own, in the caller's session: with autogroup scheduling a new
    # session would be a scheduling group of its own, beside which a low-priority thread of
    # the caller's (the background hash) would get as much CPU as the whole measurement
    "os.setpgid(0, 0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _dying_with_parent(command: list[str]) -> list[str]:
    """``command``, run through :data:`_DIE_WITH_PARENT` on Linux."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def run_isolated(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> Any:
    """Run ``command`` in its own process group with an empty temporary working directory and
    no standard input, capturing its output; a subprocess.CompletedProcess. On Linux the
    command dies with this process (a SIGKILLed pack leaves no measuring process behind) and
    stays in this session (see :data:`_DIE_WITH_PARENT`); elsewhere it gets a session of its own.

    Raises VerificationError when it runs longer than ``timeout`` seconds, after killing its
    whole process group (the child and anything it started)."""
    return run_isolated_together([command], timeout=timeout, env=env)[0]


def run_isolated_together(commands: list[list[str]], *, timeout: float,
                          env: dict[str, str] | None = None) -> list[Any]:
    """:func:`run_isolated` for several commands running at the same time, each in its own
    process group, sharing one empty working directory; their CompletedProcess in order. Their
    output goes to files, not pipes, so no child waits on a full pipe while another is awaited.

    Raises VerificationError when they have not all ended ``timeout`` seconds after the start,
    after killing every group still running; any other exception here (an interrupt) kills them
    all too, so nothing is left running."""
    import subprocess
    import sys
    import tempfile
    import time

    from edgepack.errors import VerificationError

    with tempfile.TemporaryDirectory(prefix="edgepack-probe-cwd-") as empty, \
            tempfile.TemporaryDirectory(prefix="edgepack-probe-out-") as logs:
        procs: list[Any] = []
        try:
            for index, command in enumerate(commands):
                with open(Path(logs) / f"{index}.out", "wb") as out, open(Path(logs) / f"{index}.err", "wb") as err:
                    procs.append(subprocess.Popen(
                        _dying_with_parent(command), cwd=empty, env=env, stdin=subprocess.DEVNULL, stdout=out,
                        stderr=err, start_new_session=not sys.platform.startswith("linux")))
            deadline = time.monotonic() + timeout
            for proc in procs:
                _wait_then_end_group(proc, deadline)
        except subprocess.TimeoutExpired:
            _kill_running(procs)
            what = "the measuring process" if len(procs) == 1 else f"the {len(procs)} measuring processes run at once"
            raise VerificationError(
                f"{what} timed out after {timeout:g} s and {'was' if len(procs) == 1 else 'were'} killed "
                f"(set {TIMEOUT_ENV} to allow longer)"
            ) from None
        except BaseException:  # interrupted: leave nothing running
            _kill_running(procs)
            raise

        def read(index: int, stream: str) -> str:
            return (Path(logs) / f"{index}.{stream}").read_bytes().decode(errors="replace")

        return [subprocess.CompletedProcess(command, proc.returncode, read(i, "out"), read(i, "err"))
                for i, (command, proc) in enumerate(zip(commands, procs))]


def _wait_then_end_group(proc: Any, deadline: float) -> None:
    """Wait until ``proc`` has exited, then kill what is left of its process group (anything it
    started that outlived it) and reap it; subprocess.TimeoutExpired past ``deadline``
    (time.monotonic), with ``proc`` still running. The exit is seen without reaping
    (``waitid``'s WNOWAIT), so the group's id cannot have passed to another process when it is
    killed. Where there is no ``waitid`` (Windows), it only waits."""
    import os
    import subprocess
    import time

    if not hasattr(os, "waitid"):
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        return
    pause = 0.001
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(min(pause, left))
        pause = min(2 * pause, 0.05)
    _kill_group(proc)
    proc.wait()


def _kill_running(procs: list[Any]) -> None:
    """Kill the process group of each of ``procs`` not yet reaped, then reap them."""
    for proc in procs:
        if proc.returncode is None:
            _kill_group(proc)
    for proc in procs:
        proc.wait()


def _kill_group(proc: Any) -> None:
    """SIGKILL the process group ``proc`` leads (it is not reaped yet, so its id is ours)."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):
        proc.kill()


def failure_reason(proc: Any) -> str:
    """Why a measuring process failed, in words: the signal that killed it, or the last line
    it wrote on standard error, or its exit code."""
    import signal

    code = proc.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the measuring process was killed by signal {name}{hint}"
    lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"the measuring process exited with code {code}"


def measure_in_fresh_process(bundle_dir: Path, *, task: str, steps: list[Any], loader: str | None,
                             target: str, batch_size: int, new_tokens: int = DEFAULT_NEW_TOKENS,
                             timeout: float | None = None, repeats: int = 1,
                             threads: int | None = None, ranks: int = 1,
                             target_options: dict[str, Any] | None = None,
                             device: str = "cpu", allow_code: bool = False,
                             program: dict[str, Any] | None = None,
                             logits_from: str = LOGITS_GENERATE, batching: str = BATCHING_PADDED,
                             peak_only: bool = False, floor: float | None = None, at_once: int = 1) -> ProbeResult:
    """Load ``bundle_dir/model`` in a fresh, isolated Python process, run
    ``smoke/inputs.safetensors``, and return the target meter's peak with the outputs.

    :param timeout: seconds each measuring process may run (default :func:`probe_timeout`).
    :param repeats: how many fresh processes measure; the peak reported is the largest, all
        are in ``ProbeResult.peaks`` and the outputs are the first run's.
    :param threads: intra-op threads of the measuring process (default :func:`probe_threads`).
    :param target_options: the target's options as the manifest records them (the probe
        and the loading run on the target they describe).
    :param allow_code: the measuring process may run the bundle's own code (``model.code``,
        ``--allow-code``); without it, that code is never run.
    :param program: the manifest's ``model.program``: the target's runtime runs that program.
    :param logits_from: where a decoder's logits come from (the manifest's ``smoke.logits_from``).
    :param batching: how the smoke inputs are batched (the manifest's ``smoke.batching``,
        :func:`smoke_batches`); under :data:`BATCHING_TRIMMED` the peak is read once the first
        batch has run, and a process whose outputs are not wanted runs that batch alone.
    :param peak_only: the outputs are not wanted (``ProbeResult.outputs`` is empty): more
        measurements of a close call. Only the first of ``repeats`` gives outputs in any case.
    :param floor: a fidelity floor: the run stops once its outputs prove the bundle's fidelity
        to ``smoke/expected.safetensors`` below it (:class:`FloorWatch`;
        ``ProbeResult.stopped_after``). Not for sharded bundles, which run every input.
    :param at_once: how many of the ``repeats`` processes may run at the same time (a peak
        measured in one process does not depend on another's; their speed does, so not for
        timings), together within ``timeout`` times their number. Not for sharded bundles,
        whose ranks run one launch at a time.
    :param ranks: for a sharded bundle, how many ranks it runs on: they are launched through
        torchrun (:mod:`edgepack.launch`) on ``device`` (``cpu``: gloo, ``cuda``: NCCL), each
        measured by its own meter; ``ProbeResult.rank_peaks`` holds each rank's peak.

    Raises VerificationError when the bundle cannot be loaded or run there, when the process
    runs out of time, or when it is killed."""
    import tempfile

    from safetensors.torch import load_file

    from edgepack.errors import VerificationError

    limit = probe_timeout(timeout)
    if ranks > 1:
        threads = max(1, probe_threads() // ranks) if threads is None else max(1, int(threads))
        return _measure_ranks(bundle_dir, task=task, steps=steps, target=target, batch_size=batch_size,
                              new_tokens=new_tokens, timeout=limit, repeats=repeats, threads=threads, ranks=ranks,
                              target_options=target_options or {}, device=device, logits_from=logits_from,
                              batching=batching, peak_only=peak_only)
    threads = probe_threads() if threads is None else max(1, int(threads))
    env = probe_env(threads)
    reports: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgepack-probe-") as tmp:
        outputs_path = Path(tmp) / "outputs.safetensors"  # the first process's; the others measure only
        specs: list[Path] = []
        for attempt in range(max(1, int(repeats))):
            spec = {
                "bundle_dir": str(Path(bundle_dir).resolve()),
                "task": task,
                "steps": [s.to_json() for s in steps],
                "loader": loader,
                "target": target,
                "target_options": target_options or {},
                "batch_size": batch_size,
                "new_tokens": new_tokens,
                "logits_from": logits_from,
                "batching": batching,
                "threads": threads,
                "outputs": None if attempt or peak_only else str(outputs_path),
                "allow_code": bool(allow_code),
                "program": program,
                "floor": floor,
            }
            specs.append(Path(tmp) / f"spec-{attempt}.json")
            specs[-1].write_text(json.dumps(spec))
        step = max(1, int(at_once))
        for first in range(0, len(specs), step):
            batch = specs[first:first + step]  # each has the time it would have had alone, one after another
            for proc in run_isolated_together([probe_command(p) for p in batch], timeout=limit * len(batch), env=env):
                if proc.returncode != 0:
                    raise VerificationError(
                        f"the bundle could not be loaded and run in a fresh process: {failure_reason(proc)}"
                    )
                try:
                    reports.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                except (IndexError, ValueError):
                    raise VerificationError(
                        "the bundle could not be loaded and run in a fresh process: the measuring process "
                        "printed no report"
                    ) from None
        if not peak_only:
            outputs = load_file(outputs_path)
    peaks = [int(r["peak_bytes"]) for r in reports]
    hosts = [int(r["host_peak_bytes"]) for r in reports if "host_peak_bytes" in r]
    return ProbeResult(max(peaks), reports[0]["scope"], outputs, reports[0]["seconds"],
                       peaks=peaks, threads=reports[0].get("threads", threads),
                       stopped_after=reports[0].get("stopped_after"), host_peak_bytes=max(hosts) if hosts else None)


def _measure_ranks(bundle_dir: Path, *, task: str, steps: list[Any], target: str, batch_size: int, new_tokens: int,
                   timeout: float, repeats: int, threads: int, ranks: int, target_options: dict[str, Any],
                   device: str, logits_from: str, batching: str, peak_only: bool) -> ProbeResult:
    """:func:`measure_in_fresh_process` for a sharded bundle: every rank through torchrun."""
    import tempfile

    from safetensors.torch import load_file

    from edgepack.launch import launch_ranks

    rank_peaks: list[int] | None = None
    peaks: list[int] = []
    outputs: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for attempt in range(max(1, int(repeats))):
        with tempfile.TemporaryDirectory(prefix="edgepack-ranks-") as tmp:
            spec = {
                "bundle_dir": str(Path(bundle_dir).resolve()), "task": task, "steps": [s.to_json() for s in steps],
                "target": target, "target_options": target_options, "device": device,
                "batch_size": batch_size, "new_tokens": new_tokens, "logits_from": logits_from,
                "batching": batching,
                "outputs": None if attempt or peak_only else str(Path(tmp) / "outputs.safetensors"),
            }
            result = launch_ranks(spec, ranks, timeout=timeout, threads=threads, workdir=Path(tmp))
            this = [int(r["peak_bytes"]) for r in sorted(result.reports, key=lambda r: r["rank"])]
            rank_peaks = this if rank_peaks is None else [max(a, b) for a, b in zip(rank_peaks, this)]
            peaks.append(max(this))
            if attempt == 0:
                first = result.reports[0]
            if spec["outputs"] is not None:
                outputs = load_file(spec["outputs"])
    return ProbeResult(max(peaks), first["scope"], outputs, first["seconds"], peaks=peaks,
                       threads=first.get("threads", threads), rank_peaks=rank_peaks)


#: Pack keeps a plan only when its measured peak leaves this margin under the budget, as a
#: fraction of the peak ...
MEASURE_MARGIN = 0.05
#: ... but never less than this many bytes (the run-to-run spread is largely a fixed amount of
#: transient activation memory, not a fraction of the weights) ...
MARGIN_FLOOR_BYTES = 1 << 20
#: ... nor less than this multiple of the spread seen over repeated measurements.
SPREAD_FACTOR = 2.0
#: How many fresh processes pack measures a plan in when one measurement is a close call.
PACK_REPEATS = 3


def margin_bytes(result: ProbeResult) -> int:
    """The margin a measured plan must leave under its budget for a repeat measurement (verify,
    on the same machine) to stay within it: max(1 MiB, 5% of the peak, twice the spread of the
    measurements taken)."""
    return int(max(MARGIN_FLOOR_BYTES, MEASURE_MARGIN * result.peak_bytes, SPREAD_FACTOR * result.spread_bytes))


def acceptance_limit(budget_bytes: int, result: ProbeResult) -> int:
    """The largest peak pack may accept under ``budget_bytes``: the budget less
    :func:`margin_bytes`. Pack keeps a plan when ``result.peak_bytes <= acceptance_limit(...)``."""
    return int(budget_bytes) - margin_bytes(result)


def close_call(budget_bytes: int, result: ProbeResult) -> bool:
    """Whether ``result`` needs more measurements before pack decides: fewer than
    :data:`PACK_REPEATS` were taken and its peak is within three margins of the budget."""
    return len(result.peaks or [result.peak_bytes]) < PACK_REPEATS and (
        result.peak_bytes + 3 * margin_bytes(result) > int(budget_bytes)
    )


def concurrent_repeats(result: ProbeResult, repeats: int, device_type: str) -> int:
    """How many of ``repeats`` more measuring processes like ``result``'s may run at the same
    time: on a CPU target as many as this machine's usable cores and half its available main
    memory take, each needing the resident memory ``result``'s process reached
    (``host_peak_bytes``); one at a time on an accelerator (they would share the device) or
    where that memory is unknown. A peak measured in one process does not depend on the
    others, so this only shortens the wait."""
    from edgepack.memory import main_memory

    if device_type != "cpu" or not result.host_peak_bytes or repeats <= 1:
        return 1
    fit = main_memory()[1] // 2 // int(result.host_peak_bytes)
    return int(max(1, min(repeats, usable_cores(), fit)))


#: Calibration texts for compressors that score importance or gather statistics; kept apart
#: from the smoke inputs so that fidelity is judged on inputs the compression never saw.
CALIBRATION_SAMPLES = (
    "A small language model can run on a phone if its weights are compressed.",
    "The museum opens at nine and closes at five, except on public holidays.",
    "Researchers measured the boiling point of water at different altitudes.",
    "Can you recommend a good book about the history of mathematics?",
    "The invoice total was 4,820 euros, due within thirty days.",
    "Heavy rain caused flooding in several villages along the river.",
    "SELECT name, email FROM users WHERE active = 1 ORDER BY name;",
    "My flight was delayed by three hours because of a technical problem.",
    "The patient reported mild headaches and occasional dizziness.",
    "Neural networks learn representations by adjusting millions of parameters.",
    "Der Zug nach Berlin fährt um halb acht vom Hauptbahnhof ab.",
    "He scored twice in the second half and the team won the cup.",
    "Store the container in a cool, dry place away from direct sunlight.",
    "The committee postponed its decision until the next quarterly meeting.",
    "Why is the sky blue during the day but red at sunset?",
    "Version 2.3 fixes a memory leak in the image decoder.",
)


#: Texts for judging fidelity outside the bundle (tests, benchmarks): neither smoke inputs nor
#: calibration texts, so no compression has seen them.
HELD_OUT_SAMPLES = (
    "The ferry to the island runs every two hours in summer.",
    "Backpropagation computes gradients layer by layer from the output.",
    "Add the onions and fry them until they turn golden.",
    "The telescope detected a faint signal from a distant galaxy.",
    "Refunds are processed within five working days of the request.",
    "Les enfants jouent dans le parc après l'école.",
    "while queue: node = queue.pop(0)",
    "The jury found the defendant not guilty on all counts.",
    "Solar panels produce less electricity on cloudy days.",
    "How many bones are there in the human hand?",
    "The committee postponed the vote until next Thursday.",
    "Fresh basil loses its aroma quickly once it is cut.",
    "Our flight was delayed because of fog over the airport.",
    "Compile the kernel with debugging symbols enabled.",
    "She practised the violin for three hours every morning.",
    "The river flooded the lower part of the village last spring.",
)
