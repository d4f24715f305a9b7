"""The ``multi-gpu`` target: N devices that run one model sharded by the ``parallel`` plugin.

With two or more GPUs visible to torch.cuda the devices are those GPUs (NCCL). Without them the
target is *emulated*: the N devices are N CPU processes talking over gloo, so a multi-device
bundle can be packed, verified, run and benchmarked on any machine; the manifest's
``memory.scope`` says which it was. Each rank's memory is measured by its own meter: resident
memory of its process (emulated) or its GPU's allocator peak.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import edgepack
from edgepack.interfaces import DeviceInfo, MemoryMeter, Option, Probe, Size, Target

#: Devices of an emulated target when the options do not say.
DEFAULT_DEVICES = 2


class MultiGpuTarget(Target):
    """Several devices of one kind, one rank each; the model is split by ``parallel``."""

    name = "multi-gpu"
    version = edgepack.__version__
    description = ("N GPUs running one sharded model with torch.distributed (NCCL); without GPUs, "
                   "N CPU processes over gloo emulate them")
    device_type = "cuda"
    reserve_fraction = 0.1

    options = (
        Option("devices", int, minimum=2, maximum=1024, help="number of devices (ranks), e.g. 4"),
        Option("memory", Size, help="memory of each device (describe devices that are not here), e.g. 24GB"),
        Option("capability", str, help="compute capability MAJOR.MINOR of the GPUs, e.g. 8.0"),
    )

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        from edgepack.targets.cuda import check_capability_option

        check_capability_option(self, "8.0")

    # -- probing ---------------------------------------------------------------------------

    def probe(self) -> Probe:
        """The GPUs here when there are two or more; otherwise an emulation by CPU processes,
        each given an equal share of this machine's available memory."""
        import torch

        from edgepack.targets.cuda import capabilities_of

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count >= 2:
            devices, caps = [], None
            for index in range(count):
                free, total = torch.cuda.mem_get_info(index)
                props = torch.cuda.get_device_properties(index)
                devices.append(DeviceInfo(index, props.name, int(total), int(free)))
                here = frozenset(capabilities_of(props.major, props.minor))
                caps = here if caps is None else caps & here  # what every device computes
            props = torch.cuda.get_device_properties(0)
            detail = {"backend": "nccl", "emulated": False, "cuda": torch.version.cuda,
                      "compute_capability": f"{props.major}.{props.minor}"}
            return Probe(self.name, True, tuple(devices), caps or frozenset(), detail)
        from edgepack.targets.cpu import CpuTarget

        cpu = CpuTarget().probe()
        n = int(self.settings.get("devices") or DEFAULT_DEVICES)
        host = cpu.devices[0]
        devices = tuple(DeviceInfo(i, f"emulated device {i} (CPU process)", host.total_bytes // n,
                                   host.available_bytes // n) for i in range(n))
        detail = {
            "backend": "gloo", "emulated": True,
            "reason": f"{count} CUDA device(s) here: {n} CPU processes over gloo stand in for the GPUs",
            "cores": cpu.detail.get("cores"),
        }
        return Probe(self.name, True, devices, cpu.capabilities, detail)

    def describe(self, probe: Probe) -> Probe:
        """The devices the options describe: ``devices`` sets how many, ``memory`` the memory
        of each, ``capability`` their kernels; the probe fills the rest."""
        count, memory = self.settings.get("devices"), self.settings.get("memory")
        capability = self.settings.get("capability")
        if count is None and memory is None and capability is None:
            return probe
        from edgepack.targets.cuda import _capability, capabilities_of

        here = list(probe.devices)
        n = count or len(here) or DEFAULT_DEVICES
        devices = []
        for i in range(n):
            base = here[i] if i < len(here) else (here[-1] if here else None)
            name = base.name if base is not None and i < len(here) else f"described device {i}"
            if memory is not None:
                devices.append(DeviceInfo(i, name, memory, memory))
            elif base is not None:
                devices.append(DeviceInfo(i, name, base.total_bytes, base.available_bytes))
        caps = probe.capabilities if capability is None else frozenset(capabilities_of(*_capability(capability)))
        detail = dict(probe.detail, described=dict(self.settings))
        return replace(probe, devices=tuple(devices), capabilities=caps, detail=detail)

    def contradictions(self, probe: Probe) -> list[str]:
        """Fewer devices, less memory per device or a lower capability here than packed for."""
        problems = []
        count, memory = self.settings.get("devices"), self.settings.get("memory")
        if count is not None and not probe.detail.get("emulated") and len(probe.devices) < count:
            problems.append(f"the bundle was packed for multi-gpu:devices={count}, but this machine has "
                            f"{len(probe.devices)} GPU(s)")
        if memory is not None and probe.devices:
            smallest = min(d.total_bytes for d in probe.devices)
            if smallest < memory:
                problems.append(f"the bundle was packed for multi-gpu:memory={memory} bytes per device, but the "
                                f"smallest device here has {smallest} bytes")
        capability = self.settings.get("capability")
        here = probe.detail.get("compute_capability")
        if capability is not None and here is not None:
            from edgepack.targets.cuda import _capability

            if _capability(str(here)) < _capability(capability):
                problems.append(f"the bundle was packed for multi-gpu:capability={capability}, "
                                f"but these GPUs have {here}")
        return problems

    # -- running ---------------------------------------------------------------------------

    @staticmethod
    def rank_device(probe: Probe) -> str:
        """``cuda`` (each rank its own GPU, NCCL) or ``cpu`` (emulated ranks, gloo)."""
        return "cpu" if probe.detail.get("emulated") else "cuda"

    def place(self, model: Any, probe: Probe) -> Any:
        """Multi-device bundles are placed rank by rank when each rank loads its shard."""
        return model

    def memory_meter(self) -> MemoryMeter:
        """Each rank's own meter: its GPU's allocator peak, or its process's resident peak."""
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
            from edgepack.targets.cuda import CudaAllocatorMeter

            meter = CudaAllocatorMeter()
            meter.scope = meter.scope.replace("on device 0", "on the rank's own GPU")
            return meter
        from edgepack.targets.cpu import RssMeter

        meter = RssMeter()
        meter.scope = ("emulated device (one CPU process per rank, gloo): " + meter.scope)
        return meter


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the built-in ``multi-gpu`` target."""
    register(MultiGpuTarget)
