"""The ``cuda`` target: one NVIDIA GPU through torch.cuda."""

from __future__ import annotations

import edgepack
from edgepack.interfaces import DeviceInfo, MemoryMeter, Probe, Target


class CudaAllocatorMeter(MemoryMeter):
    """Peak bytes held by torch's CUDA caching allocator above what it held at :meth:`start`."""

    scope = (
        "peak bytes allocated by torch's CUDA caching allocator on device 0 "
        "(torch.cuda.max_memory_allocated) above the allocation at start, while loading the "
        "bundle and running the smoke inputs at the declared batch size, in a fresh process"
    )

    def __init__(self) -> None:
        self._baseline = 0

    def start(self) -> None:
        """Reset the allocator's peak statistics and record the baseline."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._baseline = torch.cuda.memory_allocated()

    def peak_bytes(self) -> int:
        """Peak allocator bytes since start, above the baseline."""
        import torch

        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - self._baseline)


class CudaTarget(Target):
    """One CUDA GPU (device 0). Packing for it works anywhere; verifying needs the GPU."""

    name = "cuda"
    version = edgepack.__version__
    description = "one NVIDIA GPU (device 0) through torch.cuda"
    device_type = "cuda"
    reserve_fraction = 0.1

    def probe(self) -> Probe:
        """The first GPU's memory and the kernels its compute capability has."""
        import torch

        if not torch.cuda.is_available():
            # Packing for an absent GPU is allowed: assume what every supported GPU computes.
            detail = {"reason": "torch.cuda.is_available() is False", "capabilities": "assumed"}
            return Probe(self.name, False, (), frozenset({"fp32", "fp16", "bf16", "int8"}), detail)
        free, total = torch.cuda.mem_get_info(0)
        props = torch.cuda.get_device_properties(0)
        major, minor = props.major, props.minor
        caps = {"fp32", "fp16", "int8"}
        if torch.cuda.is_bf16_supported():
            caps.add("bf16")
        if (major, minor) >= (8, 0):
            caps.update({"int4-kernel", "2:4"})
        if (major, minor) >= (8, 9):
            caps.add("fp8")
        device = DeviceInfo(0, props.name, int(total), int(free))
        detail = {"compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}
        return Probe(self.name, True, (device,), frozenset(caps), detail)

    def memory_meter(self) -> MemoryMeter:
        """CUDA allocator meter (see :class:`CudaAllocatorMeter`)."""
        return CudaAllocatorMeter()


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the built-in ``cuda`` target."""
    register(CudaTarget)
