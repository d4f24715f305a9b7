"""``parallel``: split a model that does not fit one device into one shard per rank.

The core of the ``parallel`` compression plugin (DESIGN.md section 7): how a model is cut into
shards, how the shards are stored (safetensors + JSON, never pickle), how one rank loads only
its own shard, and how the ranks run together with ``torch.distributed`` (gloo on CPU, NCCL on
GPU; launched by ``torchrun``). It is a library; the lead wires it into pack / verify.

Modes
    ``tensor``   Attention heads (key/value heads with grouped-query attention) and FFN neurons
                 are split across ranks: q/k/v and the FFN input projections (gate/up, BERT's
                 ``intermediate.dense``, GPT-2's ``c_attn``/``c_fc``) column-wise (their output
                 features), the attention output and FFN output projections (``o_proj``,
                 ``down_proj``; BERT's ``attention.output.dense`` and ``output.dense``; GPT-2's
                 ``c_proj``) row-wise (their input features), followed by exactly one all-reduce
                 per attention or FFN block; the row-wise bias is added once, after the
                 all-reduce. The input embedding and the output head are split by vocabulary
                 (embedding: each rank looks up the ids in its slice, zeros elsewhere,
                 all-reduce; head: each rank computes its vocabulary slice of the logits, then
                 all-gather). Norms, position embeddings and BERT's pooler are replicated.
                 The world size must divide the attention heads, the key/value heads and the
                 FFN width; the vocabulary need not be divisible (slices differ by one row).
    ``pipeline`` Each rank holds a contiguous range of layers (at least one), balanced to
                 minimise the largest rank's weight bytes; the embeddings go with the first
                 rank, the final norm, head and pooler with the last. Hidden states pass from
                 rank to rank with ``send`` / ``recv``; the last rank's output is broadcast.
                 Decoders generate greedily with a KV cache per rank (each rank caches its own
                 layers); the next token is broadcast from the last rank.

Supported layouts: BERT-style encoders (``attention.self.query/key/value``), Llama-style
decoders (``self_attn.q/k/v/o_proj`` + ``mlp.gate/up/down_proj``: Llama, Qwen2, Mistral, ...)
and GPT-2 (``Conv1D``, fused ``c_attn``). Anything else is refused with a UsageError.

Why not ``torch.distributed.tensor.parallel`` (DTensor)
    ``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel`` expects the module
    with its *global* shapes and distributes it (or needs a meta-device model, a DeviceMesh and
    DTensor-aware state-dict loading to place local shards into DTensor parameters). A shard
    file would then hold local pieces of tensors whose names and shapes describe the global
    model, and every parameter becomes a DTensor whose dispatch and redistribution logic runs
    on each op — overhead that buys nothing at inference on CPU/gloo. Instead each rank builds
    an ordinary transformers model from a *local config* (``num_attention_heads / N``,
    ``num_key_value_heads / N``, ``intermediate_size / N``, ``head_dim`` kept; BERT and GPT-2
    cannot say fewer heads in their config, so their attention modules are resized and their
    head-count attributes patched after construction, as ``prune`` does), on the meta device,
    then assigns the tensors of its own shard (no full model is ever materialised, no copies)
    and swaps in four tiny modules: a row-parallel Linear / Conv1D (one ``all_reduce``, bias
    once), a vocabulary-parallel embedding and a vocabulary-parallel head. Attention kernels,
    masks, rotary embeddings and the KV cache are the stock ones: they see a model with fewer
    heads. The collectives are plain ``torch.distributed`` calls, the same on gloo and NCCL.

On disk (``save_shards``)::

    model_dir/config.json               the original config (shared; tokenizer files beside it)
    model_dir/rank-{i}/model.safetensors that rank's tensors, under the names its local model uses
    model_dir/rank-{i}/shard.json        format, mode, rank, world size, config overrides,
                                         module patches, head / FFN / vocabulary / layer ranges

API (all torch imports happen inside the functions)::

    shards = shard(model, world_size, mode)            # [{"rank", "tensors", "metadata"}] per rank
    save_shards(shards, model_dir, config=model.config) # rank-{i}/model.safetensors + shard.json
    rank_model = load_rank(model_dir, rank, world_size, device)  # reads config.json + rank-{i}/ only
    outputs = run_rank(model_dir, inputs, task)        # under torchrun: dict on rank 0, None elsewhere
    per_rank = rank_weight_bytes(model_or_dir, world_size, mode)  # exact stored bytes per rank
    worst = estimate_rank_bytes(model_or_dir, world_size, mode)   # max(per_rank)

    rank_model.run(inputs, task) / .forward(inputs) / .embeddings(inputs) / .generate(inputs, k)
                                   # collective: every rank calls it, every rank gets the result
    init_distributed(device)       # join torchrun's process group (gloo on CPU, NCCL on CUDA)
    copy_rank_view(model_dir, rank, dest)  # config + tokenizer + rank-{i}/ only, for one node

Rank-side runner (each rank of ``torchrun`` runs it; rank 0 writes the outputs)::

    torchrun --nproc-per-node N -m edgepack.plugins.parallel MODEL_DIR \\
        --inputs inputs.safetensors --task embeddings --out outputs.safetensors
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import Compressor, Option
from edgepack.smoke import BATCHING_PADDED, LOGITS_GENERATE

FORMAT = "edgepack.parallel/1"
SHARD_FILE = "model.safetensors"
SHARD_JSON = "shard.json"
MODES = ("tensor", "pipeline")
DEFAULT_MODE = "tensor"
TASKS = ("last_hidden_state", "embeddings", "logits", "next_token_logits", "generate")


def rank_dir(model_dir: str | os.PathLike, rank: int) -> Path:
    """The directory of one rank's shard: ``model_dir/rank-{rank}``."""
    return Path(model_dir) / f"rank-{rank}"


# ---------------------------------------------------------------------------------------------
# Model layout


@dataclass
class _Block:
    """One transformer layer: module names of the parts tensor parallelism splits."""

    name: str
    index: int
    attn: str  # the module holding the head-count attributes
    q: str | None = None
    k: str | None = None
    v: str | None = None
    c_attn: str | None = None  # GPT-2: fused q|k|v (Conv1D)
    o: str = ""
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: str = ""


@dataclass
class _Arch:
    """What sharding needs to know about a model, read from its (meta or real) modules."""

    layout: str  # "bert" | "llama" | "gpt2"
    model_type: str
    task: str
    container: str  # the ModuleList of layers, e.g. "model.layers"
    blocks: list[_Block]
    embed: str  # the input (word) embedding module
    head: str | None  # the output head (decoders)
    tied: bool
    first: list[str]  # modules that go with the first pipeline rank
    last_stubs: dict[str, str]  # module -> "identity" | "none", replaced on non-last ranks
    first_stubs: dict[str, str]  # module -> "absent" | "zeros" | "passthrough", on non-first ranks
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    conv1d: set[str] = field(default_factory=set)


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


def _name_of(model: Any, module: Any) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _arch(model: Any) -> _Arch:
    """The layout of ``model``; a UsageError for one this module does not know."""
    from edgepack.model import task_of

    blocks: list[_Block] = []
    layout = None
    for name, m in model.named_modules():
        attn = getattr(m, "attention", None)
        sa = getattr(attn, "self", None)
        mlp = getattr(m, "mlp", None)
        if (sa is not None and all(hasattr(sa, a) for a in ("query", "key", "value"))
                and hasattr(getattr(attn, "output", None), "dense")
                and hasattr(getattr(m, "intermediate", None), "dense") and hasattr(getattr(m, "output", None), "dense")):
            kind = "bert"
            block = _Block(name, -1, f"{name}.attention.self", q=f"{name}.attention.self.query",
                           k=f"{name}.attention.self.key", v=f"{name}.attention.self.value",
                           o=f"{name}.attention.output.dense", ffn_in=[f"{name}.intermediate.dense"],
                           ffn_out=f"{name}.output.dense")
        elif (getattr(m, "self_attn", None) is not None and mlp is not None
              and all(hasattr(m.self_attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
              and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj"))):
            kind = "llama"
            a = f"{name}.self_attn"
            block = _Block(name, -1, a, q=f"{a}.q_proj", k=f"{a}.k_proj", v=f"{a}.v_proj", o=f"{a}.o_proj",
                           ffn_in=[f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj"], ffn_out=f"{name}.mlp.down_proj")
        elif (_is_conv1d(getattr(getattr(m, "attn", None), "c_attn", None)) and mlp is not None
              and _is_conv1d(getattr(mlp, "c_fc", None)) and _is_conv1d(getattr(mlp, "c_proj", None))):
            if getattr(m, "crossattention", None) is not None:
                raise UsageError("parallel does not support GPT-2 models with cross-attention")
            kind = "gpt2"
            block = _Block(name, -1, f"{name}.attn", c_attn=f"{name}.attn.c_attn", o=f"{name}.attn.c_proj",
                           ffn_in=[f"{name}.mlp.c_fc"], ffn_out=f"{name}.mlp.c_proj")
        else:
            continue
        if layout not in (None, kind):
            raise UsageError(f"parallel found layers of two layouts ({layout}, {kind}) in one model")
        layout = kind
        blocks.append(block)
    config = model.config
    arch_name = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if not blocks:
        raise UsageError(
            f"parallel does not support {arch_name} (model_type {getattr(config, 'model_type', '?')}): it knows "
            "BERT-style encoders, Llama-style decoders (q/k/v/o_proj, gate/up/down_proj) and GPT-2"
        )
    containers = {b.name.rpartition(".")[0] for b in blocks}
    if len(containers) != 1:
        raise UsageError(f"parallel needs the layers of {arch_name} in one list; found {sorted(containers)}")
    container = containers.pop()
    for i, b in enumerate(blocks):
        tail = b.name.rpartition(".")[2]
        if tail != str(i):
            raise UsageError(f"parallel expects layer {i} of {arch_name} at {container}.{i}, found {b.name}")
        b.index = i
    modules = dict(model.named_modules())
    first_block = blocks[0]

    def out_features(name: str) -> int:
        mod = modules[name]
        if hasattr(mod, "qdata"):  # quantize's QuantLinear
            return int(mod.out_features)
        return mod.weight.shape[1] if _is_conv1d(mod) else mod.weight.shape[0]

    def in_features(name: str) -> int:
        mod = modules[name]
        if hasattr(mod, "qdata"):
            return int(mod.in_features)
        return mod.weight.shape[0] if _is_conv1d(mod) else mod.weight.shape[1]

    attn = modules[first_block.attn]
    if layout == "bert":
        d = int(attn.attention_head_size)
        heads = out_features(first_block.q) // d
        kv = heads
    elif layout == "llama":
        d = int(getattr(attn, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
        heads = out_features(first_block.q) // d
        kv = out_features(first_block.k) // d
    else:
        d = int(attn.head_dim)
        heads = int(attn.num_heads)
        kv = heads
    numbers = {(out_features(b.q) if b.q else out_features(b.c_attn), in_features(b.ffn_out)) for b in blocks}
    if len(numbers) != 1:
        raise UsageError(f"parallel needs the same heads and FFN width in every layer of {arch_name}; found {sorted(numbers)}")
    ffn = in_features(first_block.ffn_out)
    emb = model.get_input_embeddings()
    embed = _name_of(model, emb)
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = _name_of(model, head_module)
    quantized_emb = hasattr(emb, "qdata")
    tied = bool(head_module is not None and not quantized_emb and head_module.weight is emb.weight)
    emb_rows, emb_dim = ((emb.num_embeddings, emb.embedding_dim) if quantized_emb else tuple(emb.weight.shape))
    base = container.rpartition(".")[0]
    if layout == "bert":
        base = base.rpartition(".")[0]  # "encoder.layer" -> ""
        emb_container = _join(base, "embeddings")
        first = [emb_container]
        first_stubs = {emb_container: "passthrough"}
        pooler = _join(base, "pooler")
        last_stubs = {pooler: "none"} if modules.get(pooler) is not None else {}
    elif layout == "llama":
        first = [embed]
        first_stubs = {embed: "absent"}
        last_stubs = {n: "identity" for n in (_join(base, "norm"), head) if n and n in modules}
    else:
        wpe = _join(base, "wpe")
        first = [embed, wpe]
        first_stubs = {embed: "absent", wpe: "zeros"}
        last_stubs = {n: "identity" for n in (_join(base, "ln_f"), head) if n and n in modules}
    conv = {n for n, m in modules.items() if _is_conv1d(m)}
    return _Arch(layout, getattr(config, "model_type", "?"), task_of(config), container, blocks, embed, head,
                 tied, first, last_stubs, first_stubs, int(emb_dim), heads, kv, d, ffn, int(emb_rows), conv)


# ---------------------------------------------------------------------------------------------
# Planning: which slice of which tensor each rank stores


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for r in range(parts):
        size = base + (1 if r < extra else 0)
        ranges.append((start, start + size))
        start += size
    return ranges


#: One stored tensor of a rank: (global name, dim or None for the whole tensor, ranges on dim).
_Entry = tuple[str, "int | None", tuple[tuple[int, int], ...]]


def _unique_names(model: Any) -> list[tuple[str, Any]]:
    """(name, tensor) of the state dict, each parameter once (tied weights under the first name)."""
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append((name, tensor))
    return out


def unique_weights(model: Any) -> dict[str, Any]:
    """The model's state dict with tied weights once: what a single-device copy stores."""
    return dict(_unique_names(model))


def _check(arch: _Arch, world_size: int, mode: str, num_layers: int) -> None:
    if mode not in MODES:
        raise UsageError(f"parallel:mode must be tensor or pipeline, not {mode!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"parallel needs a world size of at least 1, not {world_size!r}")
    if mode == "tensor":
        for number, what in ((arch.heads, "attention heads"), (arch.kv_heads, "key/value heads"),
                             (arch.ffn, "FFN neurons")):
            if number % world_size:
                raise UsageError(
                    f"parallel:mode=tensor cannot split the {number} {what} of this {arch.model_type} model "
                    f"across {world_size} ranks: the world size must divide {number}"
                )
    elif world_size > num_layers:
        raise UsageError(
            f"parallel:mode=pipeline cannot give each of {world_size} ranks a layer: "
            f"this {arch.model_type} model has {num_layers} layers"
        )


def _balance(layer_bytes: Sequence[int], first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per rank (each non-empty), minimising the largest rank's
    bytes when the first rank also holds ``first`` bytes and the last ``last`` bytes; among
    splits with the same largest rank, the one with the smallest sum of squares (the other
    ranks as even as they can be)."""
    n = len(layer_bytes)
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    worst = (float("inf"), float("inf"))
    best = [[worst] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0, 0)
    for r in range(1, parts + 1):
        for j in range(r, n - (parts - r) + 1):
            if r == parts and j != n:
                continue
            for i in range(r - 1, j):
                if best[r - 1][i] == worst:
                    continue
                cost = prefix[j] - prefix[i] + (first if r == 1 else 0) + (last if r == parts else 0)
                value = (max(best[r - 1][i][0], cost), best[r - 1][i][1] + cost * cost)
                if value < best[r][j]:
                    best[r][j], choice[r][j] = value, i
    ranges, j = [], n
    for r in range(parts, 0, -1):
        i = choice[r][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def _entry_shape(shape: Sequence[int], dim: int | None, ranges: Sequence[tuple[int, int]]) -> list[int]:
    shape = list(shape)
    if dim is not None:
        shape[dim] = sum(e - s for s, e in ranges)
    return shape


def _plan(model: Any, world_size: int, mode: str) -> tuple[_Arch, list[dict[str, _Entry]], list[dict[str, Any]]]:
    """Per rank: the tensors it stores (local name -> entry) and its JSON metadata."""
    quantized = _quantized_modules(model)
    arch = _arch(model)
    num_layers = len(arch.blocks)
    _check(arch, world_size, mode, num_layers)
    named = _unique_names(model)
    odd = [(n, type(t.data).__name__) for n, t in named if type(t.data).__name__ not in ("Tensor", "Parameter")]
    if odd:
        raise UsageError(
            f"parallel needs plain tensors but {odd[0][0]} is a {odd[0][1]}: apply parallel before "
            "steps that change how weights are stored (quantize, sparsify)"
        )
    floats = [p for p in model.parameters() if p.is_floating_point()] or [t for _, t in named if t.is_floating_point()]
    dtype = str(floats[0].dtype).replace("torch.", "")
    config = model.config
    common = {
        "format": FORMAT, "mode": mode, "world_size": world_size, "layout": arch.layout,
        "model_type": arch.model_type, "task": arch.task, "dtype": dtype, "num_layers": num_layers,
        "hidden_size": arch.hidden,
    }
    row_units: dict[str, int] = {}  # a row-parallel quantized module's input features
    for name, info in quantized.items():
        if info["kind"] == "linear":
            row_units[name] = info["shape"][1]
    entries: list[dict[str, _Entry]] = [{} for _ in range(world_size)]
    metas: list[dict[str, Any]] = []
    if mode == "tensor":
        roles: dict[str, str] = {}
        for b in arch.blocks:
            for n in (b.q,):
                if n:
                    roles[n] = "q"
            for n in (b.k, b.v):
                if n:
                    roles[n] = "kv"
            if b.c_attn:
                roles[b.c_attn] = "c_attn"
            roles[b.o] = "o"
            for n in b.ffn_in:
                roles[n] = "ffn_in"
            roles[b.ffn_out] = "ffn_out"
        roles[arch.embed] = "vocab"
        if arch.head:
            roles[arch.head] = "vocab"
        hl, kvl, il, d = arch.heads // world_size, arch.kv_heads // world_size, arch.ffn // world_size, arch.head_dim
        vocab_ranges = _split(arch.vocab, world_size)
        row_parallel = [m for b in arch.blocks for m in (b.o, b.ffn_out)]
        for r in range(world_size):
            qr = (r * hl * d, (r + 1) * hl * d)
            kvr = (r * kvl * d, (r + 1) * kvl * d)
            fr = (r * il, (r + 1) * il)
            vr = vocab_ranges[r]
            sharded = replicated = 0
            for name, tensor in named:
                module, _, attr = name.rpartition(".")
                if arch.tied and name == f"{arch.head}.weight":
                    continue  # the head is the embedding: stored once, tied at load
                role = roles.get(module)
                conv = module in arch.conv1d
                out_dim, in_dim = (1, 0) if conv else (0, 1)
                is_weight = attr == "weight"
                dim, ranges = None, ()
                if role == "q":
                    dim, ranges = (out_dim if is_weight else 0), (qr,)
                elif role == "kv":
                    dim, ranges = (out_dim if is_weight else 0), (kvr,)
                elif role == "c_attn":
                    h = arch.hidden
                    dim = out_dim if is_weight else 0
                    ranges = (qr, (h + qr[0], h + qr[1]), (2 * h + qr[0], 2 * h + qr[1]))
                elif role == "ffn_in":
                    dim, ranges = (out_dim if is_weight else 0), (fr,)
                elif role in ("o", "ffn_out") and is_weight:
                    dim, ranges = in_dim, ((qr,) if role == "o" else (fr,))
                elif (role in ("o", "ffn_out") and module in quantized and attr in ("qdata", "scale", "offset")
                      and tensor.dim() == 2 and tensor.shape[1] > 1):  # a per-row scale stays whole
                    # quantized: columns are packed codes or groups; input features scale to them
                    dim, ranges = 1, _scaled((qr if role == "o" else fr), tensor.shape[1], row_units[module], name)
                elif role == "vocab":
                    dim, ranges = 0, (vr,)
                entries[r][name] = (name, dim, tuple(ranges))
                size = _entry_bytes(tensor, dim, ranges)
                if dim is None:
                    replicated += size
                else:
                    sharded += size
            overrides: dict[str, Any] = {}
            patches: dict[str, dict[str, Any]] = {}
            if arch.layout == "llama":
                overrides = {"num_attention_heads": hl, "num_key_value_heads": kvl, "head_dim": d,
                             "intermediate_size": il}
            elif arch.layout == "bert":
                overrides = {"intermediate_size": il}
                patches = {b.attn: {"num_attention_heads": hl, "all_head_size": hl * d} for b in arch.blocks}
            else:
                overrides = {"n_inner": il}
                patches = {b.attn: {"num_heads": hl, "split_size": hl * d} for b in arch.blocks}
            metas.append({
                **common, "rank": r, "config_overrides": overrides, "module_patches": patches,
                "heads": [r * hl, (r + 1) * hl], "kv_heads": [r * kvl, (r + 1) * kvl], "ffn": list(fr),
                "row_parallel": row_parallel,
                "vocab_embedding": {"module": arch.embed, "start": vr[0], "end": vr[1], "size": arch.vocab},
                "vocab_head": ({"module": arch.head, "start": vr[0], "end": vr[1], "size": arch.vocab}
                               if arch.head else None),
                "tie": arch.tied, "first": True, "last": True, "layers": [0, num_layers],
                "first_stubs": {}, "last_stubs": {},
                "sharded_bytes": sharded, "replicated_bytes": replicated,
                "quantized": _local_quantized(quantized, entries[r], state_shapes=dict(named)),
            })
        return arch, entries, metas

    # pipeline
    prefix = arch.container + "."
    layer_bytes = [0] * num_layers
    first_bytes = last_bytes = 0
    groups: dict[str, Any] = {}
    for name, tensor in named:
        size = _nbytes(tensor)
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            layer_bytes[index] += size
            groups[name] = index
        elif any(name.startswith(f + ".") for f in arch.first):
            first_bytes += size
            groups[name] = "first"
        else:
            last_bytes += size
            groups[name] = "last"
    head_weight = f"{arch.head}.weight" if arch.head else None
    embed_weight = f"{arch.embed}.weight"
    state = dict(named)
    if arch.tied and world_size > 1:
        last_bytes += _nbytes(state[embed_weight])  # the last rank keeps its own copy
    ranges = _balance(layer_bytes, first_bytes, last_bytes, world_size)
    layer_types = getattr(config, "layer_types", None)
    for r, (start, end) in enumerate(ranges):
        is_first, is_last = r == 0, r == world_size - 1
        for name, tensor in named:
            group = groups[name]
            if isinstance(group, int):
                if start <= group < end:
                    local = f"{prefix}{group - start}.{name[len(prefix):].split('.', 1)[1]}"
                    entries[r][local] = (name, None, ())
            elif (group == "first" and is_first) or (group == "last" and is_last):
                entries[r][name] = (name, None, ())
        tie = arch.tied and is_first and is_last
        if arch.tied and is_last and not is_first:
            entries[r][head_weight] = (embed_weight, None, ())
        overrides = {"num_hidden_layers": end - start}
        if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
            overrides["layer_types"] = list(layer_types[start:end])
        patches: dict[str, dict[str, Any]] = {}
        if arch.layout == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale = (arch.head_dim ** -0.5) if getattr(config, "scale_attn_weights", True) else 1.0
            patches = {f"{prefix}{i - start}.attn": {"scaling": scale / float(i + 1)} for i in range(start, end)}
        size = sum(_nbytes(state[g]) for g, _, _ in entries[r].values())
        metas.append({
            **common, "rank": r, "config_overrides": overrides, "module_patches": patches,
            "layers": [start, end], "first": is_first, "last": is_last, "tie": tie,
            "first_stubs": {} if is_first else arch.first_stubs,
            "last_stubs": {} if is_last else arch.last_stubs,
            "row_parallel": [], "vocab_embedding": None, "vocab_head": None,
            "sharded_bytes": size, "replicated_bytes": 0,
            "quantized": _local_quantized(quantized, entries[r], state_shapes=state),
        })
    return arch, entries, metas


def _quantized_modules(model: Any) -> dict[str, dict[str, Any]]:
    """Modules whose weights ``quantize`` stored as codes (its QuantLinear / QuantEmbedding;
    torchao int8 tensors are first turned into them): name -> {kind, bits, shape, padding_idx}.
    int8-dynamic (torchao's activation-quantized Linear) has no sharded form: UsageError."""
    from edgepack.plugins import quantize

    quantize._define_modules()

    def odd_weight(module: Any) -> bool:  # a tensor subclass (torchao), not a plain weight
        return type(getattr(module, "weight", None)).__name__ not in ("Tensor", "Parameter", "NoneType")

    if any(odd_weight(m) for m in model.modules()):
        quantize.Quantize()._swap_torchao(model, {"scheme": "int8"})
        odd = [n for n, m in model.named_modules()
               if odd_weight(m) and not isinstance(m, (quantize.QuantLinear, quantize.QuantEmbedding))]
        if odd:
            raise UsageError(f"parallel cannot shard {odd[0]}: its weight is a "
                             f"{type(model.get_submodule(odd[0]).weight).__name__} (int8-dynamic has no sharded form)")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, quantize.QuantLinear):
            found[name] = {"kind": "linear", "bits": module.bits, "shape": [module.out_features, module.in_features]}
        elif isinstance(module, quantize.QuantEmbedding):
            found[name] = {"kind": "embedding", "bits": module.bits, "padding_idx": module.padding_idx,
                           "shape": [module.num_embeddings, module.embedding_dim],
                           "dtype": str(module.out_dtype).replace("torch.", "")}
    return found


def _scaled(features: tuple[int, int], columns: int, in_features: int, name: str) -> tuple[tuple[int, int]]:
    """A range of input features as a range of a quantized tensor's ``columns`` (packed codes:
    in/2; group scales: in/group); UsageError when a rank's share does not fall on whole columns."""
    start, end = features
    if (start * columns) % in_features or (end * columns) % in_features:
        raise UsageError(
            f"parallel cannot split {name} ({columns} quantized columns for {in_features} inputs) at input "
            f"{start}..{end}: each rank's share must hold whole int4 groups; use fewer ranks or a smaller group_size"
        )
    return ((start * columns // in_features, end * columns // in_features),)


def _local_quantized(quantized: Mapping[str, Any], entries: Mapping[str, _Entry],
                     state_shapes: Mapping[str, Any]) -> dict[str, Any]:
    """The quantized modules of one rank under its local names, with their local shapes."""
    out = {}
    for local, (global_name, dim, ranges) in entries.items():
        module, _, attr = local.rpartition(".")
        gmodule = global_name.rpartition(".")[0]
        if attr != "qdata" or gmodule not in quantized:
            continue
        info = dict(quantized[gmodule])
        rows, cols = info["shape"]
        if dim == 0:
            rows = sum(e - s for s, e in ranges)
        elif dim == 1:
            full = state_shapes[global_name].shape[1]
            cols = cols * sum(e - s for s, e in ranges) // full
        info["shape"] = [rows, cols]
        out[module] = info
    return out


def _entry_bytes(tensor: Any, dim: int | None, ranges: Sequence[tuple[int, int]]) -> int:
    shape = _entry_shape(tensor.shape, dim, ranges)
    count = 1
    for s in shape:
        count *= s
    return count * tensor.element_size()


def _take(tensor: Any, dim: int | None, ranges: Sequence[tuple[int, int]]) -> Any:
    import torch

    tensor = tensor.detach()
    if dim is None:
        return tensor.contiguous().clone()
    parts = [tensor.narrow(dim, s, e - s) for s, e in ranges]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous().clone()


# ---------------------------------------------------------------------------------------------
# Public API: shard, save, estimate


def shard(model: Any, world_size: int, mode: str = DEFAULT_MODE) -> list[dict[str, Any]]:
    """Split ``model`` (a loaded transformers model) into ``world_size`` shards.

    Returns one dict per rank: ``{"rank": r, "tensors": {name: tensor}, "metadata": {...}}``;
    ``tensors`` uses the names of that rank's local model, ``metadata`` is plain JSON (mode,
    world size, ``config_overrides`` for the local config, ``module_patches``, head / KV-head /
    FFN / vocabulary ranges or the layer range, which modules are row-parallel, stored bytes).
    Refuses (UsageError) a world size that does not divide the heads, KV heads or FFN width
    (tensor) or exceeds the number of layers (pipeline).
    """
    _, entries, metas = _plan(model, world_size, mode)
    state = dict(_unique_names(model))
    shards = []
    for r in range(world_size):
        tensors = {local: _take(state[g], dim, ranges) for local, (g, dim, ranges) in entries[r].items()}
        meta = dict(metas[r])
        meta["tensor_bytes"] = sum(_nbytes(t) for t in tensors.values())
        shards.append({"rank": r, "tensors": tensors, "metadata": meta})
    return shards


def save_shards(shards: Sequence[Mapping[str, Any]], model_dir: str | os.PathLike, config: Any = None) -> list[Path]:
    """Write ``model_dir/rank-{i}/model.safetensors`` and ``rank-{i}/shard.json`` for every shard
    (and ``model_dir/config.json`` when ``config`` is given); returns the rank directories."""
    from safetensors.torch import save_file

    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        config.save_pretrained(root)
    dirs = []
    for s in shards:
        d = rank_dir(root, int(s["rank"]))
        d.mkdir(parents=True, exist_ok=True)
        save_file(dict(s["tensors"]), d / SHARD_FILE, metadata={"format": FORMAT})
        (d / SHARD_JSON).write_text(json.dumps(s["metadata"], indent=2, sort_keys=True) + "\n", encoding="utf-8")
        dirs.append(d)
    return dirs


def _meta_model(model_dir: Path, dtype: Any = None) -> Any:
    """The model of ``model_dir/config.json`` on the meta device, in the dtype of its weights."""
    import torch

    from edgepack.model import empty_model, safetensors_header

    if dtype is None:
        dtype = torch.float32
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for f in sorted(model_dir.glob("*.safetensors")):
            header = safetensors_header(f)
            floats = [v["dtype"] for k, v in header.items() if k != "__metadata__" and v.get("dtype") in names]
            if floats:
                dtype = names[max(set(floats), key=floats.count)]
                break
    return empty_model(model_dir, dtype)


def rank_weight_bytes(model: Any, world_size: int, mode: str = DEFAULT_MODE) -> list[int]:
    """Exact bytes of the tensors each rank stores (and loads), from shapes alone.

    ``model`` is a model (real or on the meta device) or a Hugging Face model directory (its
    config and safetensors header are read, no weights). Equals each shard's tensor bytes.
    """
    if isinstance(model, (str, os.PathLike)):
        model = _meta_model(Path(model))
    _, entries, _ = _plan(model, world_size, mode)
    state = dict(_unique_names(model))
    return [sum(_entry_bytes(state[g], dim, ranges) for g, dim, ranges in rank.values()) for rank in entries]


def estimate_rank_bytes(model: Any, world_size: int, mode: str = DEFAULT_MODE) -> int:
    """The worst (largest) rank's weight bytes: ``max(rank_weight_bytes(...))``."""
    return max(rank_weight_bytes(model, world_size, mode))


# ---------------------------------------------------------------------------------------------
# Parallel modules (torch is imported on first use)


def _dist_active(world_size: int) -> bool:
    if world_size <= 1:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(
            f"this shard belongs to a {world_size}-rank model: start it with torchrun and call "
            "init_distributed() (or run_rank) first"
        )
    return True


@functools.lru_cache(maxsize=None)
def _nn() -> Any:
    """The torch modules of this plugin, defined on first use (keeps torch out of plugin import)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers.pytorch_utils import Conv1D

    def _reduce_add_bias(y, bias, world_size):
        """Sum the partial products of all ranks, then add the bias once. In 16-bit dtypes the
        sum and the bias are done in float32 and rounded once, as one device's matmul does."""
        low = y.dtype in (torch.bfloat16, torch.float16)
        acc = y.float() if low else y
        if _dist_active(world_size):
            dist.all_reduce(acc)
        if bias is not None:
            acc = acc + bias.to(acc.dtype)
        return acc.to(y.dtype) if low else acc

    class RowParallelLinear(torch.nn.Linear):
        """A Linear holding some input features: partial product, one all-reduce, bias once."""

        world_size = 1

        def forward(self, x):  # noqa: D401
            return _reduce_add_bias(F.linear(x, self.weight), self.bias, self.world_size)

    class RowParallelQuant(torch.nn.Module):
        """A quantized Linear (``quantize``'s QuantLinear, no bias) holding some input
        features: partial product, one all-reduce, bias once."""

        def __init__(self, inner, bias, world_size):
            super().__init__()
            self.inner, self.world_size = inner, world_size
            self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

        def forward(self, x):
            return _reduce_add_bias(self.inner(x), self.bias, self.world_size)

    class VocabParallelQuantEmbedding(torch.nn.Module):
        """Rows ``[start, end)`` of a quantized embedding (``quantize``'s QuantEmbedding):
        ids outside give zeros; all-reduce."""

        def __init__(self, inner, start, end, size, world_size):
            super().__init__()
            self.inner, self.start, self.end, self.size, self.world_size = inner, start, end, size, world_size
            self.embedding_dim, self.num_embeddings = inner.embedding_dim, size

        def forward(self, ids):
            outside = (ids < self.start) | (ids >= self.end)
            local = (ids - self.start).masked_fill(outside, 0)
            y = self.inner(local).masked_fill(outside.unsqueeze(-1), 0.0)
            if _dist_active(self.world_size):
                dist.all_reduce(y)
            return y

    class RowParallelConv1D(Conv1D):
        """GPT-2's Conv1D (weight in x out) holding some input features."""

        world_size = 1

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            y = torch.mm(x.reshape(-1, x.size(-1)), self.weight)
            return _reduce_add_bias(y, self.bias, self.world_size).view(size_out)

    class VocabParallelEmbedding(torch.nn.Module):
        """Rows ``[start, end)`` of the embedding: ids outside give zeros; all-reduce."""

        def __init__(self, start, end, size, dim, world_size, dtype=None):
            super().__init__()
            self.start, self.end, self.size, self.world_size = start, end, size, world_size
            self.embedding_dim = dim
            self.num_embeddings = size
            self.weight = torch.nn.Parameter(torch.empty(end - start, dim, dtype=dtype, device="meta"),
                                             requires_grad=False)

        def forward(self, ids):
            outside = (ids < self.start) | (ids >= self.end)
            local = (ids - self.start).masked_fill(outside, 0)
            y = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
            if _dist_active(self.world_size):
                dist.all_reduce(y)
            return y

    class VocabParallelHead(torch.nn.Module):
        """Rows ``[start, end)`` of the output head: local logits, then all-gather."""

        def __init__(self, start, end, size, dim, world_size, bias=False, dtype=None):
            super().__init__()
            self.start, self.end, self.size, self.world_size = start, end, size, world_size
            self.in_features, self.out_features = dim, size
            self.weight = torch.nn.Parameter(torch.empty(end - start, dim, dtype=dtype, device="meta"),
                                             requires_grad=False)
            self.bias = (torch.nn.Parameter(torch.empty(end - start, dtype=dtype, device="meta"), requires_grad=False)
                         if bias else None)

        def forward(self, x):
            return _gather_vocab(F.linear(x, self.weight, self.bias), self.size, self.world_size)

    class VocabParallelQuantHead(torch.nn.Module):
        """Rows of a quantized output head (``quantize``'s QuantLinear): local logits, then
        all-gather."""

        def __init__(self, inner, size, world_size):
            super().__init__()
            self.inner, self.size, self.world_size = inner, size, world_size
            self.in_features, self.out_features = inner.in_features, size

        def forward(self, x):
            return _gather_vocab(self.inner(x), self.size, self.world_size)

    def _gather_vocab(y, size, world_size):
        """Every rank's slice of the logits (rows of a vocabulary of ``size``), side by side."""
        if not _dist_active(world_size):
            return y
        ranges = _split(size, world_size)
        width = max(e - s for s, e in ranges)
        if y.shape[-1] < width:
            y = F.pad(y, (0, width - y.shape[-1]))
        pieces = [torch.empty_like(y) for _ in ranges]
        dist.all_gather(pieces, y.contiguous())
        return torch.cat([p[..., : e - s] for p, (s, e) in zip(pieces, ranges)], dim=-1)

    class Absent(torch.nn.Module):
        """Stands for a module another pipeline rank holds; calling it is a bug."""

        def forward(self, *args, **kwargs):
            raise RuntimeError("this pipeline rank does not hold the input embedding")

    class ZeroPositions(torch.nn.Module):
        """GPT-2's position embedding on ranks after the first: it was added on rank 0."""

        def __init__(self, dim, dtype=None):
            super().__init__()
            self.dim, self.dtype = dim, dtype

        def forward(self, ids):
            return torch.zeros((*ids.shape, self.dim), dtype=self.dtype, device=ids.device)

    class PassThroughEmbeddings(torch.nn.Module):
        """BERT's embeddings on ranks after the first: the hidden states arrive ready."""

        def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
            return inputs_embeds

    return type("ParallelModules", (), {
        "RowParallelLinear": RowParallelLinear, "RowParallelConv1D": RowParallelConv1D,
        "VocabParallelEmbedding": VocabParallelEmbedding, "VocabParallelHead": VocabParallelHead,
        "VocabParallelQuantHead": VocabParallelQuantHead,
        "RowParallelQuant": RowParallelQuant, "VocabParallelQuantEmbedding": VocabParallelQuantEmbedding,
        "Absent": Absent, "ZeroPositions": ZeroPositions, "PassThroughEmbeddings": PassThroughEmbeddings,
        "Conv1D": Conv1D,
    })


def _replace(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------------------------
# Loading one rank


def _read_shard_json(model_dir: Path, rank: int) -> dict[str, Any]:
    path = rank_dir(model_dir, rank) / SHARD_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: the model in {model_dir} has no shard for rank {rank}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read as JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not in format {FORMAT}")
    return meta


def load_rank(model_dir: str | os.PathLike, rank: int, world_size: int | None = None,
              device: Any = "cpu") -> "RankModel":
    """Load rank ``rank``'s part of the sharded model in ``model_dir``.

    Reads only ``model_dir/config.json`` and ``model_dir/rank-{rank}/`` (``shard.json`` and
    ``model.safetensors``): the other ranks' directories may be absent. Builds the local model on
    the meta device from the config and the shard's overrides, swaps in the parallel modules and
    assigns the shard's tensors (no copies). ``world_size``, when given, must match the shard's.
    Returns a :class:`RankModel`; running it needs the process group (``init_distributed``)
    when the world size is above 1.
    """
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from edgepack.model import auto_class

    root = Path(model_dir)
    meta = _read_shard_json(root, rank)
    if meta.get("rank") != rank:
        raise UsageError(f"{rank_dir(root, rank) / SHARD_JSON} says rank {meta.get('rank')}, not {rank}")
    if world_size is not None and meta.get("world_size") != world_size:
        raise UsageError(
            f"{rank_dir(root, rank) / SHARD_JSON} was made for {meta.get('world_size')} ranks, not {world_size}"
        )
    world = int(meta["world_size"])
    dtype = getattr(torch, meta.get("dtype", "float32"))
    config = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
    for key, value in meta.get("config_overrides", {}).items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):
        model = auto_class(meta["task"]).from_config(config, dtype=dtype)
    nn = _nn()

    for name, kind in {**meta.get("first_stubs", {}), **meta.get("last_stubs", {})}.items():
        if kind == "none":
            _replace(model, name, None)
        elif kind == "identity":
            _replace(model, name, torch.nn.Identity())
        elif kind == "absent":
            _replace(model, name, nn.Absent())
        elif kind == "zeros":
            _replace(model, name, nn.ZeroPositions(int(meta["hidden_size"]), dtype))
        elif kind == "passthrough":
            _replace(model, name, nn.PassThroughEmbeddings())
        else:
            raise UsageError(f"{rank_dir(root, rank) / SHARD_JSON} names an unknown stub {kind!r}")

    file = rank_dir(root, rank) / SHARD_FILE
    try:
        tensors = load_file(file, device=str(device))
    except Exception as exc:  # safetensors has its own error types
        raise UsageError(f"{file} cannot be read as safetensors: {exc}") from None

    row_parallel = set(meta.get("row_parallel", []))
    handled = _place_quantized(model, meta, tensors, row_parallel, world, nn)
    modules = {n: m for n, m in model.named_modules() if n not in handled}
    with torch.device("meta"):
        for name, module in modules.items():
            weight = tensors.get(f"{name}.weight")
            is_linear = isinstance(module, torch.nn.Linear)
            if weight is None or not (is_linear or _is_conv1d(module)):
                continue
            has_bias = module.bias is not None
            if is_linear:
                out_f, in_f = weight.shape
                cls = nn.RowParallelLinear if name in row_parallel else torch.nn.Linear
                if cls is torch.nn.Linear and tuple(module.weight.shape) == (out_f, in_f):
                    continue
                new = cls(in_f, out_f, bias=has_bias, dtype=dtype)
            else:
                in_f, out_f = weight.shape
                cls = nn.RowParallelConv1D if name in row_parallel else nn.Conv1D
                if cls is nn.Conv1D and tuple(module.weight.shape) == (in_f, out_f):
                    continue
                new = cls(out_f, in_f)
            if name in row_parallel:
                new.world_size = world
            _replace(model, name, new)
    for key in ("vocab_embedding", "vocab_head"):
        spec = meta.get(key)
        if not spec or spec["module"] in handled:
            continue
        old = model.get_submodule(spec["module"])
        dim = int(meta["hidden_size"])
        if key == "vocab_embedding":
            new = nn.VocabParallelEmbedding(spec["start"], spec["end"], spec["size"], dim, world, dtype)
        else:
            new = nn.VocabParallelHead(spec["start"], spec["end"], spec["size"], dim, world,
                                       bias=getattr(old, "bias", None) is not None, dtype=dtype)
        _replace(model, spec["module"], new)

    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise UsageError(f"{file} has tensors the rank's model does not: {unexpected[:3]}")
    if meta.get("tie"):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for name, attrs in meta.get("module_patches", {}).items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, value)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise UsageError(f"{file} lacks weights for {still_meta[:3]}")
    model.to(device)  # the buffers (rotary frequencies, position ids); the weights are there already
    model.eval()
    return RankModel(model, meta, device)


def _place_quantized(model: Any, meta: Mapping[str, Any], tensors: dict[str, Any], row_parallel: set[str],
                     world: int, nn: Any) -> set[str]:
    """Build the rank's quantized modules (``quantize``'s QuantLinear / QuantEmbedding) from its
    shard's codes, scales and offsets (popped from ``tensors``), wrapped for row or vocabulary
    parallelism where the shard says; returns their names."""
    quantized = meta.get("quantized") or {}
    if not quantized:
        return set()
    import torch

    from edgepack.plugins import quantize

    quantize._define_modules()
    vocab, head = meta.get("vocab_embedding") or {}, meta.get("vocab_head") or {}
    for name, info in quantized.items():
        p = f"{name}."
        codes, scale, offset = tensors.pop(p + "qdata"), tensors.pop(p + "scale"), tensors.pop(p + "offset", None)
        rows, cols = info["shape"]
        if info["kind"] == "embedding":
            dtype = getattr(torch, info.get("dtype") or meta.get("dtype", "float32"))
            new = quantize.QuantEmbedding(rows, cols, int(info["bits"]), codes, scale, offset, None, dtype)
            if vocab.get("module") == name and world > 1:
                new = nn.VocabParallelQuantEmbedding(new, vocab["start"], vocab["end"], vocab["size"], world)
        else:
            bias = tensors.pop(p + "bias", None)
            if name in row_parallel:
                new = nn.RowParallelQuant(quantize.QuantLinear(cols, rows, int(info["bits"]), codes, scale, offset),
                                          bias, world)
            else:
                new = quantize.QuantLinear(cols, rows, int(info["bits"]), codes, scale, offset, bias)
                if head.get("module") == name and world > 1:  # a quantized head (quantize:head=true)
                    new = nn.VocabParallelQuantHead(new, head["size"], world)
        _replace(model, name, new)
    return set(quantized)


# ---------------------------------------------------------------------------------------------
# Running one rank


class RankModel:
    """One rank's part of a sharded model, and the protocol that runs it with the other ranks.

    Every method is collective: all ranks call it with the same inputs, and every rank gets
    the full result (tensor mode computes it everywhere; pipeline mode broadcasts it from the
    last rank). ``module`` is the rank's local transformers model.
    """

    def __init__(self, module: Any, info: Mapping[str, Any], device: Any) -> None:
        self.module = module
        self.info = dict(info)
        self.device = device
        self.rank = int(info["rank"])
        self.world_size = int(info["world_size"])
        self.mode = info["mode"]
        self.is_decoder = info["task"] == "text-generation"

    def _cache_key(self) -> str:
        import inspect

        params = inspect.signature(self.module.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _step(self, inputs: Mapping[str, Any], cache: Any = None, last_only: bool = False) -> Any:
        """One forward over ``inputs``; returns the final hidden states (encoders) or logits
        (decoders) where this rank has them (every rank in tensor mode, the last in pipeline
        mode), else None. ``last_only``: decoders compute the logits of the last position only
        (a [batch, 1, vocab] tensor instead of [batch, seq, vocab])."""
        import torch
        import torch.distributed as dist

        allowed = ("input_ids", "attention_mask", "position_ids") + (() if self.is_decoder else ("token_type_ids",))
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if v is not None and k in allowed}
        if cache is not None:
            kwargs[self._cache_key()] = cache
            kwargs["use_cache"] = True
        elif self.is_decoder:
            kwargs["use_cache"] = False
        pipeline = self.mode == "pipeline" and self.world_size > 1
        if last_only and self.is_decoder and (not pipeline or self.info["last"]):
            kwargs["logits_to_keep"] = 1  # the head's rank; the others pass every position on
        if pipeline and not self.info["first"]:
            ids = kwargs.pop("input_ids")
            kwargs.pop("token_type_ids", None)
            dtype = getattr(torch, self.info["dtype"])
            hidden = torch.empty((*ids.shape, int(self.info["hidden_size"])), dtype=dtype, device=self.device)
            dist.recv(hidden, src=self.rank - 1)
            kwargs["inputs_embeds"] = hidden
        with torch.no_grad():
            out = self.module(**kwargs)
        y = out.logits if self.is_decoder else out.last_hidden_state
        if pipeline and not self.info["last"]:
            dist.send(y.to(getattr(torch, self.info["dtype"])).contiguous(), dst=self.rank + 1)
            return None
        return y

    def _broadcast_from_last(self, y: Any, shape: Sequence[int], dtype: Any) -> Any:
        import torch
        import torch.distributed as dist

        if self.mode != "pipeline" or self.world_size == 1:
            return y
        if y is None:
            y = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        else:
            y = y.contiguous()
        dist.broadcast(y, src=self.world_size - 1)
        return y

    def forward(self, inputs: Mapping[str, Any], last_only: bool = False) -> Any:
        """``last_hidden_state`` (encoders, B x T x hidden) or ``logits`` (decoders, B x T x
        vocab; B x 1 x vocab with ``last_only``) on every rank."""
        import torch

        ids = inputs["input_ids"]
        y = self._step(inputs, last_only=last_only)
        width = int(self.info["hidden_size"]) if not self.is_decoder else self._vocab_size()
        length = 1 if last_only and self.is_decoder else ids.shape[1]
        return self._broadcast_from_last(y, (ids.shape[0], length, width), getattr(torch, self.info["dtype"]))

    __call__ = forward

    def _vocab_size(self) -> int:
        return int(self.module.config.vocab_size)

    def embeddings(self, inputs: Mapping[str, Any]) -> Any:
        """Mean-pooled last hidden states over the attention mask (sentence-transformers
        pooling, not normalised), B x hidden."""
        hidden = self.forward(inputs)
        mask = inputs.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def generate(self, inputs: Mapping[str, Any], max_new_tokens: int = 8, first_logits: bool = False) -> Any:
        """Greedy continuation of ``max_new_tokens`` tokens (B x k), with a KV cache on every
        rank; positions follow the attention mask (left padding works). With ``first_logits``
        it returns ``(tokens, logits)``: the first step's next-token logits (B x vocab, fp32),
        on every rank."""
        import torch
        import torch.distributed as dist
        from transformers import DynamicCache

        if not self.is_decoder:
            raise UsageError("generate needs a decoder; this sharded model is an encoder")
        ids = inputs["input_ids"].to(self.device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.module.config)
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        tokens, first = [], None
        for _ in range(max_new_tokens):
            logits = self._step(step, cache, last_only=True)
            if logits is not None:
                nxt = logits[:, -1, :].argmax(-1)
            else:
                nxt = torch.empty(ids.shape[0], dtype=torch.long, device=self.device)
            if self.mode == "pipeline" and self.world_size > 1:
                dist.broadcast(nxt, src=self.world_size - 1)
            if first_logits and first is None:
                first = self._broadcast_from_last(None if logits is None else logits[:, -1, :].float(),
                                                  (ids.shape[0], self._vocab_size()), torch.float32)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            step = {"input_ids": nxt[:, None], "attention_mask": mask, "position_ids": positions}
        tokens = torch.stack(tokens, dim=1)
        return (tokens, first) if first_logits else tokens

    def run(self, inputs: Mapping[str, Any], task: str, max_new_tokens: int = 8) -> dict[str, Any]:
        """One of :data:`TASKS`; returns ``{name: tensor}`` on every rank."""
        if task == "auto":
            task = "generate" if self.is_decoder else "embeddings"
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if task in ("logits", "next_token_logits", "generate") and not self.is_decoder:
            raise UsageError(f"task {task} needs a decoder; this sharded model is an encoder")
        if task in ("last_hidden_state", "embeddings") and self.is_decoder:
            raise UsageError(f"task {task} needs an encoder; this sharded model is a decoder")
        if task == "embeddings":
            return {"embeddings": self.embeddings(inputs)}
        if task == "generate":
            return {"tokens": self.generate(inputs, max_new_tokens)}
        y = self.forward(inputs)
        if task == "next_token_logits":
            return {"next_token_logits": y[:, -1, :].contiguous()}
        return {task: y}


def init_distributed(device: Any = None, timeout: float | None = None) -> tuple[int, int, str]:
    """Join the process group from torchrun's environment (gloo on CPU, NCCL on CUDA) unless
    already joined; returns (rank, world size, device). ``device`` None or "cuda" picks this
    rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU. ``timeout``: seconds a
    collective may wait for the other ranks (torch's default when None)."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    device = str(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if timeout is not None:
            import datetime

            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
        else:
            dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), device


def run_rank(model_dir: str | os.PathLike, inputs: Mapping[str, Any], task: str = "auto", *,
             max_new_tokens: int = 8, device: Any = None) -> dict[str, Any] | None:
    """Run one rank of a sharded model under torchrun: join the process group, load this
    rank's shard (``load_rank``), run ``task`` on ``inputs`` (a dict of tensors:
    ``input_ids``, ``attention_mask``, ``token_type_ids``; the same on every rank) and return
    the outputs on rank 0 (``{"last_hidden_state" | "embeddings" | "logits" |
    "next_token_logits" | "tokens": tensor}``), None on the other ranks.

    ``model_dir`` may contain ``{rank}``, replaced by this rank (when each rank's files sit in
    their own directory). Tasks: ``last_hidden_state``, ``embeddings`` (mean-pooled) for
    encoders; ``logits``, ``next_token_logits``, ``generate`` (``max_new_tokens`` greedy tokens)
    for decoders; ``auto`` = embeddings / generate.
    """
    rank, world, device = init_distributed(device)
    path = str(model_dir).replace("{rank}", str(rank))
    model = load_rank(path, rank, world, device)
    out = model.run(inputs, task, max_new_tokens)
    return {k: v.detach().cpu() for k, v in out.items()} if rank == 0 else None


# ---------------------------------------------------------------------------------------------
# Command line for torchrun


def _main(argv: Sequence[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m edgepack.plugins.parallel MODEL_DIR --inputs FILE
    --task TASK --out FILE`` or ``... --jobs JOBS.json`` (a list of {model_dir, inputs, task,
    max_new_tokens, out}, run in order in one process group)."""
    import argparse

    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    parser = argparse.ArgumentParser(prog="python -m edgepack.plugins.parallel",
                                     description="Run one rank of an edgepack tensor/pipeline-parallel model.")
    parser.add_argument("model_dir", nargs="?", help="directory with config.json and rank-{i}/ ({rank} is replaced)")
    parser.add_argument("--inputs", help="safetensors file of input tensors (input_ids, attention_mask, ...)")
    parser.add_argument("--task", default="auto", choices=("auto",) + TASKS)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", help="safetensors file rank 0 writes the outputs to")
    parser.add_argument("--device", default=None, help="cpu, cuda (this rank's GPU) or a device name")
    parser.add_argument("--jobs", help="JSON list of jobs instead of the single-job arguments")
    args = parser.parse_args(argv)
    if args.jobs:
        jobs = json.loads(Path(args.jobs).read_text(encoding="utf-8"))
    elif args.model_dir and args.inputs and args.out:
        jobs = [{"model_dir": args.model_dir, "inputs": args.inputs, "task": args.task,
                 "max_new_tokens": args.max_new_tokens, "out": args.out}]
    else:
        parser.error("give MODEL_DIR --inputs FILE --out FILE, or --jobs FILE")
    try:
        for job in jobs:
            inputs = load_file(job["inputs"])
            out = run_rank(job["model_dir"], inputs, job.get("task", "auto"),
                           max_new_tokens=int(job.get("max_new_tokens", 8)), device=args.device)
            if out is not None:
                Path(job["out"]).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in out.items()}, job["out"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def copy_rank_view(model_dir: str | os.PathLike, rank: int, dest: str | os.PathLike) -> Path:
    """Copy what rank ``rank`` needs (every top-level file and ``rank-{rank}/``, no other rank)
    to ``dest``: the files one node needs when ranks do not share a file system."""
    src, out = Path(model_dir), Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    shutil.copytree(rank_dir(src, rank), rank_dir(out, rank), dirs_exist_ok=True)
    return out



# ---------------------------------------------------------------------------------------------
# Writing shards rank by rank


def save_sharded(model: Any, world_size: int, mode: str, model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Split ``model`` and write ``model_dir/rank-{i}/`` one rank at a time (only one rank's
    tensors are in memory at once), with ``config.json`` (and ``generation_config.json`` for
    decoders) beside them; returns each rank's metadata."""
    from safetensors.torch import save_file

    _, entries, metas = _plan(model, world_size, mode)
    state = dict(_unique_names(model))
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the shards say how their weights are stored
        del config.quantization_config
    config.save_pretrained(root)
    generation = getattr(model, "generation_config", None)
    if generation is not None and metas and metas[0]["task"] == "text-generation":
        generation.save_pretrained(root)
    out = []
    for r in range(world_size):
        tensors = {local: _take(state[g], dim, ranges) for local, (g, dim, ranges) in entries[r].items()}
        meta = dict(metas[r], tensor_bytes=sum(_nbytes(t) for t in tensors.values()))
        d = rank_dir(root, r)
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, d / SHARD_FILE, metadata={"format": FORMAT})
        (d / SHARD_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        del tensors
        out.append(meta)
    return out


def smoke_outputs(model: "RankModel", inputs: Mapping[str, Any], task: str, batch_size: int,
                  new_tokens: int, logits_from: str = LOGITS_GENERATE, batching: str = BATCHING_PADDED,
                  after_first: Callable[[], Any] | None = None) -> dict[str, Any]:
    """What :func:`edgepack.smoke.run_outputs` returns for a single-device model, computed by
    all ranks together (collective; every rank gets the result): mean-pooled, normalised
    embeddings for encoders; next-token logits (taken as ``logits_from`` says) and
    ``new_tokens`` greedy tokens for decoders. The batches, ``batching`` and ``after_first``
    are :func:`edgepack.smoke.run_outputs`'s."""
    import torch

    from edgepack.smoke import check_logits_from, eos_ids, finish_tokens, mean_pool, pad_id, smoke_batches

    check_logits_from(logits_from)
    collected: dict[str, list[Any]] = {}
    with torch.inference_mode():
        generated = new_tokens if task == "text-generation" else 0
        for batch in smoke_batches(dict(inputs), batch_size, batching=batching, new_tokens=generated):
            if task == "text-generation":
                if logits_from == LOGITS_GENERATE:
                    tokens, logits = model.generate(batch, new_tokens, first_logits=True)
                else:
                    logits = model.forward(batch, last_only=True)[:, -1, :]
                    tokens = model.generate(batch, new_tokens)
                logits, tokens = logits.float().cpu().clone(), tokens.cpu()
                pad = pad_id(model.module)
                parts = {"logits": logits, "tokens": finish_tokens(tokens, new_tokens, eos_ids(model.module), pad)}
            else:
                hidden = model.forward(batch)
                parts = {"embeddings": mean_pool(hidden, batch["attention_mask"].to(hidden.device)).cpu()}
            for key, value in parts.items():
                collected.setdefault(key, []).append(value)
            if after_first is not None:
                after_first()
                after_first = None
    return {k: torch.cat(v) for k, v in collected.items()}


# ---------------------------------------------------------------------------------------------
# The compression plugin


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_parameters(facts: Any, world_size: int, mode: str) -> list[dict[str, int]]:
    """Parameters by weight kind that each rank stores, from the model's facts alone (the
    arithmetic twin of :func:`rank_weight_bytes`, for the planner)."""
    kinds = {k: int(facts.parameters_by_kind.get(k, 0)) for k in ("embedding", "linear", "norm", "other")}
    layers = max(1, int(facts.num_layers))
    shapes = list(facts.linear_shapes)
    extra = len(shapes) % layers if shapes else 0
    # Linears outside the layers (BERT's pooler) are replicated / go with the last rank.
    outside = sum(o * i + o for o, i in shapes[len(shapes) - extra:]) if extra else 0
    outside = min(outside, kinds["linear"])
    in_layers = kinds["linear"] - outside
    word = int(facts.vocab_size) * int(facts.hidden_size)
    word = min(word, kinds["embedding"])
    head = word if kinds["other"] >= word and facts.is_decoder else 0  # an untied output head
    if mode == "tensor":
        vocab_share = _ceil_div(int(facts.vocab_size), world_size) * int(facts.hidden_size)
        per = {
            "embedding": kinds["embedding"] - word + vocab_share,
            "linear": _ceil_div(in_layers, world_size) + outside,
            "norm": kinds["norm"],
            "other": kinds["other"] - head + (vocab_share if head else 0),
        }
        return [dict(per) for _ in range(world_size)]
    norm_layer = kinds["norm"] * 2 // (2 * layers + 1)
    layer = in_layers // layers + norm_layer
    first = kinds["embedding"] + (kinds["norm"] - norm_layer * layers if not facts.is_decoder else 0)
    last = kinds["other"] + outside + (kinds["norm"] - norm_layer * layers if facts.is_decoder else 0)
    tied = facts.is_decoder and not head
    if tied and world_size > 1:
        last += word  # the last rank keeps its own copy of the tied head
    ranges = _balance([layer] * layers, first, last, world_size)
    out = []
    for r, (start, end) in enumerate(ranges):
        n = end - start
        per = {"embedding": 0, "linear": n * (in_layers // layers), "norm": n * norm_layer, "other": 0}
        if r == 0:
            per["embedding"] += kinds["embedding"]
        if r == world_size - 1:
            per["other"] += kinds["other"]
            per["linear"] += outside
            if tied and world_size > 1:
                per["embedding"] += word
        if r == 0 and not facts.is_decoder:
            per["norm"] += kinds["norm"] - norm_layer * layers
        if r == world_size - 1 and facts.is_decoder:
            per["norm"] += kinds["norm"] - norm_layer * layers
        per["layers"] = n
        out.append(per)
    return out


def feasible_modes(facts: Any, world_size: int) -> dict[str, str | None]:
    """Each mode, with why it cannot split this model across ``world_size`` ranks (None: it can)."""
    reasons: dict[str, str | None] = {}
    bad = [f"{n} {what}" for n, what in ((facts.num_attention_heads, "attention heads"),
                                         (facts.num_key_value_heads, "key/value heads"),
                                         (facts.intermediate_size, "FFN neurons")) if n % world_size]
    reasons["tensor"] = (f"{world_size} ranks do not divide the model's {', '.join(bad)}" if bad else None)
    reasons["pipeline"] = (f"the model has {facts.num_layers} layers, fewer than {world_size} ranks"
                           if facts.num_layers < world_size else None)
    return reasons


#: Per-rank workspace of tensor parallelism's collectives while a decoder generates (two
#: all-reduces per layer and the head's all-gather at every step, each step's shapes new to the
#: backend); an encoder's single forward adds nothing measurable. Fitted to gloo runs of
#: MiniLM and a small Llama (``examples/benchmark_parallel.py``).
TENSOR_GENERATION_COMM_BYTES = 3_800_000
#: A rank's greedy generation loop (:meth:`RankModel.generate`), as a rank measures it; fitted
#: as above (transformers' ``generate`` in one process measures nothing beyond the activations'
#: logits phase: :data:`edgepack.memory.GENERATION_WORKSPACE_BYTES`).
RANK_GENERATION_BYTES = 2_800_000


class Parallel(Compressor):
    """Split the model across the target's devices: one shard per rank (DESIGN section 7)."""

    name = "parallel"
    kind = "parallel"
    version = "1"
    description = ("shard across devices with torch.distributed: tensor (heads, FFN neurons, vocabulary) "
                   "or pipeline (contiguous layers) parallel")
    options = (
        Option("mode", str, choices=MODES,
               help="tensor: split heads/FFN/vocabulary; pipeline: contiguous layers per rank "
                    "(default: the one whose worst rank needs less memory)"),
        Option("ranks", int, minimum=2, maximum=1024,
               help="number of ranks (default: the target's devices)"),
    )
    #: plan steps that may come before parallel: they keep weights as plain dense tensors
    composes = ("precision",)

    def complete(self, options: Mapping[str, Any], probe: Any) -> dict[str, Any]:
        """``ranks`` defaults to the number of devices the target has."""
        options = dict(options)
        if options.get("ranks") is None and len(probe.devices) > 1:
            options["ranks"] = len(probe.devices)
        return options

    def check(self, options: Mapping[str, Any], probe: Any, previous: Sequence[Any]) -> str | None:
        devices = len(probe.devices)
        if devices < 2:
            return (f"parallel splits a model across several devices, but target {probe.target} has "
                    f"{devices or 'no'} device{'s' if devices != 1 else ''}; use --target multi-gpu")
        if options.get("ranks") not in (None, devices):
            return f"parallel:ranks={options['ranks']} but target {probe.target} has {devices} devices"
        for step in previous:
            plain = step.plugin in self.composes or (
                step.plugin == "prune" and "sparsity" in step.options and not
                any(k in step.options for k in ("heads", "ffn")))
            if step.plugin == "quantize":
                if step.options.get("scheme") not in ("int8", "int4"):
                    return (f"parallel cannot shard quantize:scheme={step.options.get('scheme')} (its activation-"
                            "quantized Linear has no sharded form); use scheme=int8 or int4")
                if step.options.get("awq"):
                    return "parallel cannot yet shard quantize:awq=true's per-channel input scales; use awq=false"
                continue
            if not plain:
                return (f"parallel cannot yet shard the weights {step.plugin} produces; it composes with "
                        f"{', '.join(self.composes)}, quantize (int8, int4) and unstructured prune")
        return None

    def candidates(self, facts: Any, probe: Any) -> list[dict[str, Any]]:
        world = len(probe.devices)
        return [{"mode": m} for m, why in feasible_modes(facts, world).items() if why is None]

    def estimate(self, footprint: Any, options: Mapping[str, Any], target: Any) -> Any:
        import dataclasses

        facts = footprint.facts
        world = int(options.get("ranks") or len(target.devices) or 1)
        mode = options.get("mode") or DEFAULT_MODE
        if facts is None or world < 2:
            return footprint
        per_rank = rank_parameters(facts, world, mode)
        bits = {g.kind: g.bits for g in footprint.weights}
        scale = {g.kind: (g.params / max(1, int(facts.parameters_by_kind.get(g.kind, 0))))
                 for g in footprint.weights}

        def rank_bytes(p: Mapping[str, int]) -> float:
            return sum(p[k] * scale.get(k, 1.0) * bits.get(k, 32) / 8 for k in bits)

        worst = max(per_rank, key=rank_bytes)
        groups = tuple(dataclasses.replace(g, params=int(worst[g.kind] * scale.get(g.kind, 1.0)))
                       for g in footprint.weights)
        note = f"parallel: {mode} across {world} ranks (worst rank's share)"
        common = dict(weights=groups, notes=footprint.notes + (note,), generation_workspace=RANK_GENERATION_BYTES)
        if mode == "tensor":
            return dataclasses.replace(
                footprint, heads_scale=footprint.heads_scale / world, ffn_scale=footprint.ffn_scale / world,
                workspace_bytes=footprint.workspace_bytes + (TENSOR_GENERATION_COMM_BYTES if facts.is_decoder else 0),
                **common)
        return dataclasses.replace(footprint, layer_scale=footprint.layer_scale * worst["layers"] / max(1, facts.num_layers),
                                   **common)

    def quality_cost(self, options: Mapping[str, Any], facts: Any) -> float:
        return 0.0  # the same arithmetic, only the order of the sums differs

    def apply(self, model: Any, options: Mapping[str, Any], context: Any) -> Any:
        world = int(options.get("ranks") or len(context.probe.devices))
        mode = options.get("mode")
        if mode is None:  # the planner fills it; here only when no mode can split the model
            reasons = feasible_modes(context.facts, world)
            raise UsageError(f"parallel cannot split this model across {world} ranks: "
                         + "; ".join(f"{m}: {why}" for m, why in reasons.items() if why))
        arch = _arch(model)
        _check(arch, world, mode, len(arch.blocks))
        per_rank = rank_weight_bytes(model, world, mode)
        from edgepack.memory import format_size

        context.progress(f"  parallel: {mode} across {world} ranks; weights per rank "
                         f"{', '.join(format_size(b) for b in per_rank)}")
        return model  # shards are cut while saving, one rank at a time

    def save(self, model: Any, model_dir: Path, options: Mapping[str, Any]) -> bool:
        world = int(options["ranks"])
        save_sharded(model, world, options.get("mode") or DEFAULT_MODE, model_dir)
        return True

    def restore(self, model_dir: Path, options: Mapping[str, Any], device: str) -> Any:
        raise UsageError(
            f"this bundle is split into {options.get('ranks')} shards and runs as one process per rank: "
            "use edgepack run / verify / bench, which launch the ranks with torchrun, or the launch "
            "command in its manifest (parallel.launch)"
        )


@edgepack.hookimpl
def edgepack_register_compressors(register):
    """Register the built-in ``parallel`` compressor."""
    register(Parallel)


if __name__ == "__main__":
    raise SystemExit(_main())
