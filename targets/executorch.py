"""The ``executorch`` target: a ``.pte`` program for the ExecuTorch runtime, lowered to XNNPACK.

Phones, boards and kiosks rarely run Python; they run ExecuTorch's small C++ runtime. A bundle
for this target holds ``model/model.pte`` (and the tokenizer files) in place of weights: the
compressed model is exported with ``torch.export`` for the declared workload (batch and sequence
length as upper bounds of dynamic dimensions), lowered with ``to_edge_transform_and_lower`` and
the XNNPACK partitioner (or, with ``backend=portable``, left to ExecuTorch's portable kernels),
and serialised by ExecuTorch. Smoke tests, ``verify``, ``run`` and ``bench`` run that program in
the ExecuTorch runtime: no model code and no transformers model is involved.

A ``.pte`` is a flatbuffer of operator calls into kernels the runtime already holds and of the
backends' compiled graphs; loading it runs no Python and unpickles nothing.

Which plan steps the program can run is decided at plan time (:meth:`ExecutorchTarget.refuses`):
structured pruning (a smaller dense model) and ``quantize`` with ``scheme=int8`` (int8 weights per
channel, activations quantized per token at run time: XNNPACK's dynamic quantization, with
int8 embeddings looked up by ExecuTorch's quantized kernels) or ``scheme=int4`` (the same with
int4 weights in groups). Sparse formats, reduced-precision floats, ``parallel`` and the
int4 schemes that need edgepack's own kernels are refused with the reason.

Needs ``pip install 'edgepack[executorch]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import edgepack
from edgepack.errors import UsageError, VerificationError
from edgepack.interfaces import MemoryMeter, Option, Probe, Size
from edgepack.targets.cpu import CpuTarget, RssMeter

#: What to install when the runtime is missing (one line, in every message that needs it).
INSTALL_HINT = "the ExecuTorch runtime is not installed: pip install 'edgepack[executorch]'"
#: The program file inside ``model/``.
PROGRAM_FILE = "model.pte"
BACKENDS = ("xnnpack", "portable")

_INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")


def installed() -> bool:
    """Whether the ExecuTorch package is importable here (without importing it)."""
    return importlib.util.find_spec("executorch") is not None


def runtime_version() -> str:
    """The installed ExecuTorch version."""
    from importlib.metadata import version

    return version("executorch")


def load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (int8 embedding lookups, per-token quantization)
    with its Python runtime, which holds only the portable and optimized kernels by default.
    The C++ runtime on a device links them in its build (``quantized_ops_lib``)."""
    import ctypes

    import executorch
    from executorch.extension.pybindings import portable_lib

    if any(name.startswith("quantized_decomposed::embedding_byte") for name in portable_lib._get_operator_names()):
        return
    library = Path(list(executorch.__path__)[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if not library.is_file():
        raise VerificationError(f"ExecuTorch's quantized kernels ({library.name}) are missing from {library.parent}")
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


class ProgramRssMeter(RssMeter):
    """The CPU target's resident-memory meter, with the scope of a program: what loading the
    ``.pte`` and running it adds."""

    scope = (
        "peak resident set size (VmHWM) of a fresh process above its resident size after importing "
        "torch, edgepack and the ExecuTorch runtime and warming the runtime up (one load and batch "
        "of the program, freed), while loading the program and running the smoke inputs at the "
        "declared batch size and sequence length"
    )


class ExecutorchTarget(CpuTarget):
    """This machine's CPU through the ExecuTorch runtime: the bundle is a ``.pte`` program.
    Memory options, ``describe`` and ``contradictions`` are the cpu target's."""

    name = "executorch"
    version = edgepack.__version__
    description = "a .pte program for the ExecuTorch C++ runtime (XNNPACK on CPUs of every kind)"
    device_type = "cpu"
    reserve_fraction = 0.1
    program = PROGRAM_FILE

    options = (
        Option("backend", str, BACKENDS, "xnnpack",
               help="what runs the program's operators: xnnpack (CPU kernels for x86 and Arm) or portable "
                    "(ExecuTorch's reference kernels, no delegate)"),
        Option("memory", Size, help="main memory of the device to pack for, e.g. 2GB (default: this machine's)"),
    )

    def probe(self) -> Probe:
        """This CPU (as the cpu target sees it) when the ExecuTorch runtime is installed."""
        if not installed():
            return Probe(self.name, False, (), frozenset(), {"reason": INSTALL_HINT})
        cpu = CpuTarget().probe()
        detail = dict(cpu.detail, executorch=runtime_version(), backend=self.settings["backend"])
        # The program computes in fp32 and, quantized, int8 (XNNPACK's dynamic quantization).
        capabilities = frozenset({"fp32", "int8", "executorch", f"executorch-{self.settings['backend']}"})
        return Probe(self.name, True, cpu.devices, capabilities, detail)

    def memory_meter(self) -> MemoryMeter:
        """Resident-memory meter (see :class:`ProgramRssMeter`)."""
        return ProgramRssMeter()

    def estimate(self, estimate: Any, footprint: Any, facts: Any, workload: Any) -> Any:
        """The program's peak: the stored weights (the runtime reads them from the .pte), the
        activations and KV cache as in eager PyTorch (XNNPACK's quantized kernels hold int8
        copies of their inputs where eager dequantizes a weight), and, while the program loads,
        a second copy of the largest weight XNNPACK packs into its own layout (one partition at
        a time; a decoder's output head, fp32, is the largest; the portable kernels pack
        nothing); no transformers generation loop."""
        from dataclasses import replace as replaced

        from edgepack.memory import WORKSPACE_FIXED_BYTES, WORKSPACE_WEIGHT_FRACTION

        linear_bits = next((g.bits for g in footprint.weights if g.kind == "linear"), 32)
        largest = max((o * i for o, i in facts.linear_shapes), default=0) * linear_bits / 8
        if facts.is_decoder:
            largest = max(largest, facts.vocab_size * facts.hidden_size * 4)
        if self.settings["backend"] != "xnnpack":  # the portable kernels read the weights where they lie
            largest = 0
        workspace = WORKSPACE_FIXED_BYTES + WORKSPACE_WEIGHT_FRACTION * estimate.weights_bytes + footprint.workspace_bytes
        return replaced(estimate, workspace_bytes=int(workspace + largest))

    # -- what the program can run ------------------------------------------------------------

    def refuses(self, compressor: Any, options: Mapping[str, Any]) -> str | None:
        """The plan steps whose result the program cannot run, each with the reason."""
        backend = self.settings["backend"]
        if compressor.kind == "parallel":
            return "an ExecuTorch program runs in one process on one device; it cannot be split into ranks"
        if compressor.kind == "sparsify":
            return (f"the {backend} backend has no sparse kernels: the program would hold and run the dense "
                    "weights, saving nothing")
        if compressor.kind == "precision":
            return (f"reduced-precision floats are not supported on executorch:backend={backend} in this version "
                    "(the program computes in fp32; quantize:scheme=int8 is what makes it smaller)")
        if compressor.name == "quantize":
            scheme = options.get("scheme")
            if scheme not in ("int8", "int4"):
                return (f"quantize:scheme={scheme} stores modules the program cannot run; on executorch use "
                        "scheme=int8 (int8 weights, dynamically quantized activations) or scheme=int4")
            if scheme == "int4" and options.get("method") == "gptq":
                return ("quantize:scheme=int4 on executorch rounds to nearest (torchao's ExecuTorch-ready int4 "
                        "config); GPTQ's rounding is not carried into the program: use method=rtn")
            if options.get("head"):
                return "quantize:head=true selects edgepack's fused decoding kernel, which the program does not have"
            if options.get("awq"):
                return ("quantize:awq=true scales the inputs of edgepack's own int4 Linear, which the program does "
                        "not have (torchao's ExecuTorch-ready int4 rounds to nearest)")
            if backend == "portable":
                return "quantized Linear layers need executorch:backend=xnnpack (the portable kernels run fp32)"
        return None

    # -- compiling and running ----------------------------------------------------------------

    def export(self, model: Any, model_dir: Path, *, task: str, workload: Any, example: Mapping[str, Any],
               progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
        """Export ``model`` for ``workload`` and write ``model_dir/model.pte`` (and config.json)."""
        import warnings

        if not installed():
            raise UsageError(INSTALL_HINT)
        with warnings.catch_warnings():  # ExecuTorch's passes use torch APIs that torch now calls deprecated
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # a KV cache is a mutated buffer whose initial contents are not stored: the program
            # writes every position before it reads it
            warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
            warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
            if task == "text-generation":
                from edgepack.targets.executorch_llm import export_decoder

                methods = export_decoder(model, model_dir / PROGRAM_FILE, workload=workload,
                                         backend=self.settings["backend"], progress=progress)
            else:
                methods = _export_encoder(model, model_dir / PROGRAM_FILE, workload=workload, example=example,
                                          backend=self.settings["backend"], progress=progress)
        model_dir.mkdir(parents=True, exist_ok=True)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(model_dir)
        return {"format": "executorch", "file": PROGRAM_FILE, "runtime": f"executorch {runtime_version()}",
                "backend": self.settings["backend"], "methods": methods}

    def load_program(self, model_dir: Path, program: Mapping[str, Any], task: str) -> Any:
        """The program in the ExecuTorch runtime, wrapped to be called like the eager model."""
        if not installed():
            raise VerificationError(INSTALL_HINT)
        if task == "text-generation":
            from edgepack.targets.executorch_llm import DecoderProgram

            return DecoderProgram(model_dir, program)
        return EncoderProgram(model_dir, program)


# ---------------------------------------------------------------------------------------------
# Encoders


def _export_encoder(model: Any, path: Path, *, workload: Any, example: Mapping[str, Any], backend: str,
                    progress: Callable[[str], None]) -> dict[str, Any]:
    """Export an encoder's ``last_hidden_state`` for the declared workload's static shape,
    ``[batch_size, seq_len]``: every buffer is planned at export, and lowering is twice as
    fast as with dynamic dimensions (measured on MiniLM). Callers pad shorter inputs (masked
    positions change nothing the attention mask hides)."""
    import torch

    names = [n for n in _INPUT_ORDER if n in example]
    module = _encoder_module(model).eval()
    batch, seq = workload.batch_size, workload.seq_len
    args = tuple(_pad(example[n][:batch, :seq], batch, seq) for n in names)
    progress(f"exporting the model with torch.export (batch {batch}, {seq} tokens)")
    with torch.no_grad():
        exported = torch.export.export(module, args, strict=False)
    _lower_and_write(exported, path, backend, progress)
    shape = [batch, seq]
    return {"forward": {"inputs": [{"name": n, "dtype": "int64", "shape": shape} for n in names],
                        "outputs": [{"name": "last_hidden_state", "dtype": "float32",
                                     "shape": shape + [int(model.config.hidden_size)]}]}}


def _lower_and_write(exported: Any, path: Path, backend: str, progress: Callable[[str], None]) -> None:
    """Lower an exported program to ``backend`` and write the ``.pte`` to ``path``."""
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    partitioner = []
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]
    progress(f"lowering to ExecuTorch ({backend})")
    edge = to_edge_transform_and_lower(exported, partitioner=partitioner)
    program = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        program.write_to_file(out)


def _encoder_module(model: Any) -> Any:
    """``model`` as a module of its input tensors, in :data:`_INPUT_ORDER` (token types optional),
    returning the last hidden state: what ``torch.export`` traces."""
    import torch

    class EncoderModule(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
            return self.model(**inputs).last_hidden_state

    return EncoderModule(model)


def json_attributes(path: Path) -> Any:
    """A JSON object file (``config.json``, ``generation_config.json``) as attributes: the token
    ids and sizes a program's caller needs, read without transformers."""
    from types import SimpleNamespace

    try:
        return SimpleNamespace(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise VerificationError(f"{path} cannot be read as a JSON object: {exc}") from None


def _pad(tensor: Any, rows: int, columns: int) -> Any:
    """``tensor`` ([r <= rows, c <= columns], int64) padded with zeros at the end of each
    dimension to exactly [rows, columns]: the attention mask's zeros hide the padding."""
    import torch

    out = torch.zeros(rows, columns, dtype=torch.long)
    out[: tensor.shape[0], : tensor.shape[1]] = tensor
    return out


@contextlib.contextmanager
def _runtime_log() -> Iterator[list[str]]:
    """Hold what the runtime's C++ code writes to standard error (file descriptor 2) while
    a program loads: XNNPACK's thread pool logs how it read this CPU's identity on every first
    load. The lines are handed to the caller, which shows them only when loading fails."""
    import sys
    import tempfile

    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines.extend(held.read().decode("utf-8", "replace").splitlines())


def open_method(model_dir: Path, program: Mapping[str, Any], method: str = "forward") -> tuple[Any, Any]:
    """Load ``model_dir``'s program in the ExecuTorch runtime; (program, method)."""
    from executorch.runtime import Runtime

    load_quantized_kernels()
    path = model_dir / str(program.get("file", PROGRAM_FILE))
    log: list[str] = []
    try:
        with _runtime_log() as log:
            loaded = Runtime.get().load_program(path)
            return loaded, loaded.load_method(method)
    except (RuntimeError, ValueError) as exc:
        said = "; ".join(line for line in log if "cpuinfo" not in line)[-500:]
        raise VerificationError(f"{path} could not be loaded by ExecuTorch {runtime_version()}: {exc}"
                                + (f" ({said})" if said else "")) from None


class EncoderProgram:
    """An encoder's ``.pte`` called like the eager model: ``program(input_ids=..., attention_mask=...)``
    gives an object with ``last_hidden_state``. Inputs are padded to the exported shape (more
    rows run in slices of the exported batch); sequences longer than it are refused."""

    def __init__(self, model_dir: Path, program: Mapping[str, Any]) -> None:
        self.config = json_attributes(model_dir / "config.json")
        signature = program["methods"]["forward"]
        self.names = [i["name"] for i in signature["inputs"]]
        self.batch, self.max_seq_len = (int(n) for n in signature["inputs"][0]["shape"])
        self._program, self._method = open_method(model_dir, program)

    def eval(self) -> "EncoderProgram":
        return self

    def __call__(self, **inputs: Any) -> Any:
        import torch
        from types import SimpleNamespace

        missing = [n for n in self.names if n not in inputs]
        if missing:
            raise UsageError(f"the program needs the input {missing[0]}")
        tensors = [inputs[n].to(torch.long).contiguous() for n in self.names]
        rows, seq = tensors[0].shape
        if seq > self.max_seq_len:
            raise UsageError(f"a sequence of {seq} tokens is longer than the {self.max_seq_len} the program "
                             "was exported for (pack with a larger --seq-len)")
        parts = []
        for start in range(0, rows, self.batch):
            chunk = [_pad(t[start:start + self.batch], self.batch, self.max_seq_len) for t in tensors]
            hidden = self._method.execute(chunk)[0].clone()  # the output may alias the planned memory
            parts.append(hidden[: min(self.batch, rows - start), :seq])
        return SimpleNamespace(last_hidden_state=torch.cat(parts) if len(parts) > 1 else parts[0])


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the built-in ``executorch`` target."""
    register(ExecutorchTarget)
