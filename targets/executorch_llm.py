"""Decoders as ExecuTorch programs with a KV cache (the ``executorch`` target's text generation).

Export: transformers' own ``TorchExportableModuleForDecoderOnlyLM`` (its ExecuTorch
integration) wraps the model with a static cache of ``cache_len`` positions held as buffers that
the program mutates in place; one method, ``forward(input_ids [1, seq], cache_position [seq])``
returning the logits of the last position, with ``seq`` dynamic up to the declared ``seq_len`` so
a prompt is prefilled in one call and each new token is one more call. It is exported with
``strict=True``: the non-strict tracer captures the cache tensors as constants that alias the
buffers, which ExecuTorch's lowering rejects. ExecuTorch's own LLM export
(``executorch.extension.llm``) was not used: it runs ExecuTorch's Llama definition, not the
transformers model edgepack compressed, and its converters need torchtune.

Run: :class:`DecoderProgram` generates greedily one row at a time (batch 1, as the cache was
exported), starting each prompt at position 0; cache entries left by a longer earlier prompt lie
beyond the current position, where the causal mask hides them, so nothing needs clearing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

from edgepack.errors import UsageError


def export_decoder(model: Any, path: Path, *, workload: Any, backend: str,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """Export a causal LM with a static KV cache of ``workload.cache_len`` positions and
    prompts of up to ``workload.seq_len`` tokens; returns the method signatures."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from edgepack.targets.executorch import _lower_and_write

    seq = int(workload.seq_len)
    cache_len = int(workload.cache_len or seq)
    if cache_len <= seq:
        raise UsageError(f"--cache-len {cache_len} leaves no room to generate after a prompt of --seq-len {seq} tokens")
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=cache_len)
    # only the last position's logits leave the program: a prefill of seq tokens would otherwise
    # return (and plan memory for) seq x vocab floats that generation never reads
    model.forward = functools.partial(model.forward, logits_to_keep=1)
    length = torch.export.Dim("seq", min=1, max=seq)
    example = min(8, seq)
    progress(f"exporting the model with torch.export (prompts of up to {seq} tokens, KV cache of {cache_len})")
    with torch.no_grad():
        exported = wrapper.export(input_ids=torch.zeros(1, example, dtype=torch.long),
                                  cache_position=torch.arange(example, dtype=torch.long),
                                  dynamic_shapes={"input_ids": {1: length}, "cache_position": {0: length}},
                                  strict=True)
    _lower_and_write(exported, path, backend, progress)
    bound = f"seq<={seq}"
    return {"forward": {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, bound]},
                   {"name": "cache_position", "dtype": "int64", "shape": [bound]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 1, int(model.config.vocab_size)]}],
        "cache_len": cache_len,
    }}


class DecoderProgram:
    """A decoder's ``.pte`` called like the eager model: ``program(input_ids=, attention_mask=)``
    gives the last position's ``logits`` and ``program.generate(...)`` greedy continuations
    (left-padded rows, as transformers returns them: the prompt, then the new tokens, rows that
    ended padded with ``pad_token_id``)."""

    def __init__(self, model_dir: Path, program: Mapping[str, Any]) -> None:
        from edgepack.targets.executorch import json_attributes, open_method

        self.config = json_attributes(model_dir / "config.json")
        generation = model_dir / "generation_config.json"
        self.generation_config = json_attributes(generation) if generation.is_file() else None
        forward = program["methods"]["forward"]
        self.max_seq_len = int(str(forward["inputs"][0]["shape"][1]).rsplit("<=", 1)[-1])
        self.cache_len = int(forward["cache_len"])
        self._program, self._method = open_method(model_dir, program)

    def eval(self) -> "DecoderProgram":
        return self

    def _prefill(self, row: Any) -> Any:
        """Run one prompt (1-D token ids) from position 0; its last position's logits [vocab]."""
        import torch

        if row.numel() > self.max_seq_len:
            raise UsageError(f"a prompt of {row.numel()} tokens is longer than the {self.max_seq_len} the program "
                             "was exported for (pack with a larger --seq-len)")
        logits = self._method.execute([row.reshape(1, -1).contiguous(), torch.arange(row.numel())])[0]
        return logits[0, -1].clone()

    def _step(self, token: int, position: int) -> Any:
        import torch

        return self._method.execute([torch.tensor([[token]]), torch.tensor([position])])[0][0, -1].clone()

    @staticmethod
    def _rows(input_ids: Any, attention_mask: Any | None) -> list[Any]:
        """Each row's real tokens (padding removed by the attention mask)."""
        if attention_mask is None:
            return list(input_ids)
        return [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]

    def __call__(self, input_ids: Any, attention_mask: Any | None = None, **_: Any) -> Any:
        import torch
        from types import SimpleNamespace

        logits = torch.stack([self._prefill(row) for row in self._rows(input_ids, attention_mask)])
        return SimpleNamespace(logits=logits[:, None, :])

    def generate(self, input_ids: Any, attention_mask: Any | None = None, max_new_tokens: int = 32,
                 min_new_tokens: int = 0, pad_token_id: int | None = None, do_sample: bool = False,
                 output_logits: bool = False, return_dict_in_generate: bool = False, **_: Any) -> Any:
        """Greedy decoding of every row; ``do_sample`` must be False. With
        ``return_dict_in_generate`` it returns ``sequences`` and, with ``output_logits``, each
        step's logits as transformers does ([rows, vocab] per step; NaN for a row that had
        already ended, whose decoding stopped)."""
        import torch
        from types import SimpleNamespace

        from edgepack.smoke import eos_ids

        if do_sample:
            raise UsageError("the program generates greedily; sampling is not supported")
        eos = set(eos_ids(self))
        pad = int(pad_token_id if pad_token_id is not None else (getattr(self.config, "pad_token_id", None) or 0))
        generated, step_logits = [], []
        for row in self._rows(input_ids, attention_mask):
            if row.numel() + max_new_tokens > self.cache_len:
                raise UsageError(f"a prompt of {row.numel()} tokens and {max_new_tokens} new ones need "
                                 f"{row.numel() + max_new_tokens} cache positions; the program has {self.cache_len} "
                                 "(pack with a larger --cache-len, or generate fewer with --max-new-tokens)")
            logits = [self._prefill(row)]
            tokens = [int(logits[-1].argmax())]
            while len(tokens) < max_new_tokens and (tokens[-1] not in eos or len(tokens) < min_new_tokens):
                logits.append(self._step(tokens[-1], row.numel() + len(tokens) - 1))
                tokens.append(int(logits[-1].argmax()))
            generated.append(tokens)
            step_logits.append(logits)
        width = max(len(t) for t in generated)
        new = torch.full((len(generated), width), pad, dtype=torch.long)
        for i, tokens in enumerate(generated):
            new[i, :len(tokens)] = torch.tensor(tokens)
        sequences = torch.cat([input_ids.to(torch.long), new], dim=1)
        if not return_dict_in_generate:
            return sequences
        steps = None
        if output_logits:
            blank = torch.full_like(step_logits[0][0], float("nan"), dtype=torch.float32)
            steps = tuple(torch.stack([row[i].float() if i < len(row) else blank for row in step_logits])
                          for i in range(width))
        return SimpleNamespace(sequences=sequences, logits=steps)


