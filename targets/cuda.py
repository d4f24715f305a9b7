"""The ``cuda`` target: one NVIDIA GPU through torch.cuda."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import DeviceInfo, MemoryMeter, Option, Probe, Size, Target


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

    options = (
        Option("memory", Size, help="memory of the GPU (describe one that is not here), e.g. 8GB"),
        Option("capability", str, help="compute capability MAJOR.MINOR, e.g. 8.7 (Jetson Orin)"),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        check_capability_option(self, "8.7")

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
        caps = capabilities_of(major, minor)
        if not torch.cuda.is_bf16_supported():
            caps.discard("bf16")
        device = DeviceInfo(0, props.name, int(total), int(free))
        detail = {"compute_capability": f"{major}.{minor}", "cuda": torch.version.cuda}
        return Probe(self.name, True, (device,), frozenset(caps), detail)

    def describe(self, probe: Probe) -> Probe:
        """The GPU the options describe, the probe filling what they do not say: ``memory``
        replaces the device's memory, ``capability`` its kernels."""
        memory, capability = self.settings.get("memory"), self.settings.get("capability")
        if memory is None and capability is None:
            return probe
        devices = probe.devices
        if memory is not None:
            name = devices[0].name if devices else f"described GPU ({capability or 'capability unknown'})"
            devices = (DeviceInfo(0, name, memory, memory),)
        caps = probe.capabilities if capability is None else frozenset(capabilities_of(*_capability(capability)))
        detail = dict(probe.detail, described=dict(self.settings))
        if capability is not None:
            detail["compute_capability"] = capability
            detail.pop("capabilities", None)  # no longer assumed
        return replace(probe, devices=devices, capabilities=caps, detail=detail)

    def contradictions(self, probe: Probe) -> list[str]:
        """The options this GPU falls short of: less memory, or a lower compute capability."""
        problems = []
        memory, capability = self.settings.get("memory"), self.settings.get("capability")
        if memory is not None and probe.devices and probe.devices[0].total_bytes < memory:
            problems.append(f"the bundle was packed for cuda:memory={memory} bytes, but this GPU has "
                            f"{probe.devices[0].total_bytes} bytes")
        here = probe.detail.get("compute_capability")
        if capability is not None and here is not None and _capability(str(here)) < _capability(capability):
            problems.append(f"the bundle was packed for cuda:capability={capability}, but this GPU has {here}")
        return problems

    def memory_meter(self) -> MemoryMeter:
        """CUDA allocator meter (see :class:`CudaAllocatorMeter`)."""
        return CudaAllocatorMeter()


def check_capability_option(target: Target, example: str) -> None:
    """UsageError when ``target``'s ``capability`` option is not MAJOR.MINOR."""
    capability = target.settings.get("capability")
    if capability is not None and _capability(capability) is None:
        raise UsageError(f"option {target.name}:capability={capability} is not MAJOR.MINOR, e.g. {example}")


def _capability(text: str) -> tuple[int, int] | None:
    """(major, minor) of ``8.7``; None when malformed."""
    match = re.fullmatch(r"\s*(\d{1,2})\.(\d{1,2})\s*", str(text))
    return (int(match.group(1)), int(match.group(2))) if match else None


def capabilities_of(major: int, minor: int) -> set[str]:
    """The kernels a GPU of compute capability ``major.minor`` has (bf16 from Ampere, 8.0)."""
    caps = {"fp32", "fp16", "int8"}
    if (major, minor) >= (8, 0):
        caps.update({"bf16", "int4-kernel", "2:4"})
    if (major, minor) >= (8, 9):
        caps.add("fp8")
    return caps


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the built-in ``cuda`` target."""
    register(CudaTarget)
