"""The ``cpu`` target: this machine's processor and main memory."""

from __future__ import annotations

import functools
import os
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import edgepack
from edgepack.interfaces import DeviceInfo, MemoryMeter, Option, Probe, Size, Target
from edgepack.memory import main_memory, process_status_bytes

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class RssMeter(MemoryMeter):
    """Peak resident memory of this process above the resident memory at :meth:`start`.

    On Linux the kernel's high-water mark (VmHWM) is reset at start by writing ``5`` to
    ``/proc/self/clear_refs``, so the peak covers exactly the measured window. Elsewhere the
    lifetime ``ru_maxrss`` is used, which can only over-count.
    """

    scope = (
        "peak resident set size (VmHWM) of a fresh process above its resident size after "
        "importing torch, transformers and edgepack and warming the runtime up (a one-layer copy "
        "of the architecture, then one load and batch of the bundle, freed), while loading the "
        "bundle, reading every weight once, and running the smoke inputs at the declared batch "
        "size and sequence length"
    )

    def __init__(self) -> None:
        self._baseline = 0
        self._reset = False

    def start(self) -> None:
        """Reset the high-water mark and record the baseline resident size."""
        try:
            _CLEAR_REFS.write_text("5")
            self._reset = True
        except OSError:
            self._reset = False
        current = process_status_bytes("VmRSS")
        self._baseline = current if current is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_bytes(self) -> int:
        """Peak resident bytes since start, above the baseline."""
        peak = process_status_bytes("VmHWM") if self._reset else None
        if peak is None:
            peak = self._maxrss()
        return max(0, peak - self._baseline)


class CpuTarget(Target):
    """This machine's CPU and main memory; one device."""

    name = "cpu"
    version = edgepack.__version__
    description = "the host CPU and its main memory"
    device_type = "cpu"
    reserve_fraction = 0.1

    def probe(self) -> Probe:
        """Memory total and available, core count, and which dtypes compute correctly here."""
        total, available = main_memory()
        flags = _cpu_flags()
        capabilities = {"fp32", "int8"}
        detail: dict[str, object] = {
            "cores": os.cpu_count() or 1,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
        }
        for dtype_name in ("bf16", "fp16"):
            if _computes(dtype_name):
                capabilities.add(dtype_name)
        # Native kernels make reduced precision fast, not just possible.
        native = {
            "bf16-native": {"avx512_bf16", "amx_bf16", "bf16"},
            "fp16-native": {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"},
            "int8-vnni": {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"},
        }
        for cap, needs in native.items():
            if flags & needs:
                capabilities.add(cap)
        if int8_gemm_fast():
            capabilities.add("int8-gemm")
        detail["flags_seen"] = sorted(flags & set().union(*native.values()))
        device = DeviceInfo(0, detail["processor"] or "cpu", total, available)
        return Probe(self.name, True, (device,), frozenset(capabilities), detail)

    def memory_meter(self) -> MemoryMeter:
        """Resident-memory meter (see :class:`RssMeter`)."""
        return RssMeter()

    options = (Option("memory", Size, help="main memory of the device to pack for, e.g. 4GB (default: this machine's)"),)

    def describe(self, probe: Probe) -> Probe:
        """This CPU with the memory the options state (a smaller device than this machine)."""
        memory = self.settings.get("memory")
        if memory is None:
            return probe
        name = probe.devices[0].name if probe.devices else "cpu"
        return replace(probe, devices=(DeviceInfo(0, name, memory, memory),),
                       detail=dict(probe.detail, described=dict(self.settings)))

    def contradictions(self, probe: Probe) -> list[str]:
        """Less main memory here than the bundle was packed for."""
        memory = self.settings.get("memory")
        if memory is not None and probe.devices and probe.devices[0].total_bytes < memory:
            return [f"the bundle was packed for {self.name}:memory={memory} bytes, but this machine has "
                    f"{probe.devices[0].total_bytes} bytes"]
        return []


def _computes(dtype_name: str) -> bool:
    """Whether a small matmul and layer norm in this dtype run and agree with fp32."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(8, 16, generator=gen)
        b = torch.randn(16, 8, generator=gen)
        ref = torch.nn.functional.layer_norm(a @ b, (8,))
        got = torch.nn.functional.layer_norm(a.to(dtype) @ b.to(dtype), (8,)).float()
        return bool(torch.allclose(ref, got, atol=0.1, rtol=0.05))
    except (RuntimeError, TypeError):
        return False


@functools.cache
def int8_gemm_fast() -> bool:
    """Whether torch's int8 x int8 matmul (``torch._int_mm``, int32 results) is correct here and
    takes under 0.8x the time of an fp32 matmul of the same shape (256 x 512 x 512, best of 5
    interleaved runs each, once per process; best of 3 already over 4x ends it early). The two
    paths differ 3-4x or 10-30x on the CPUs measured, so the decision has room for a noisy
    machine.

    Measured, not read from the CPU flags: oneDNN runs it in VNNI or AMX instructions where
    they exist (about 4x faster than fp32 on an avx512_vnni Xeon), and on CPUs without them it
    was 10-30x slower than fp32 (an avx2 EPYC); ``python examples/benchmark_speed.py --kernels``
    times it per shape."""
    import torch

    if not hasattr(torch, "_int_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (512, 512), dtype=torch.int8, generator=gen)
    a_float, b_float = a.float(), b.float()
    try:  # exact in float64, whatever precision fp32 matmuls are set to
        if not torch.equal(torch._int_mm(a, b), (a.double() @ b.double()).to(torch.int32)):
            return False
    except RuntimeError:
        return False
    best_int = best_float = float("inf")
    for attempt in range(5):
        start = time.perf_counter()
        a_float @ b_float
        best_float = min(best_float, time.perf_counter() - start)
        start = time.perf_counter()
        torch._int_mm(a, b)
        best_int = min(best_int, time.perf_counter() - start)
        if attempt >= 2 and best_int > 4 * best_float:  # a plain loop: no need to wait for the rest
            return False
    return best_int < 0.8 * best_float


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the built-in ``cpu`` target."""
    register(CpuTarget)
