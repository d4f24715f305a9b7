"""``edge-board``: an 8 GB edge board whose CPU and accelerator share one memory with the OS.

The board (a Jetson-Orin-Nano or RK3588 class single-board computer) has no memory of its own
for models: the operating system, its display and drivers, and the model all live in the same
LPDDR. So the usable memory is the board's memory less an OS reserve (``os_reserve``, default
1.5 GiB: a headless Linux image with its drivers and carve-outs), less 10% of what is left for
allocator headroom; for the default 8 GiB board that is 5.85 GiB. It computes in fp32 and
fp16 but not bf16, so ``precision:dtype=bf16`` is refused for it by precision's capability
check, with the reason.

Packing needs no board: planning uses the board the options describe (``--target
edge-board:memory=4GB``). Verifying and running use this machine: on the board itself (Linux
on a 64-bit ARM machine that describes itself in ``/proc/device-tree/model``) the probe reads
its real memory; anywhere else this machine's CPU *emulates* the board: the probe says
``emulated`` (with the reason), the device is the described board with only the board's
capabilities (so no bf16 kernel is picked at load time), and the memory meter's scope, which
the manifest records, says the peak was measured on the emulation. Memory is measured as the
``cpu`` target measures it (:class:`edgepack.targets.cpu.RssMeter`): the board's CPU and
accelerator share that memory, so resident memory is what the model takes from it.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import edgepack
from edgepack.errors import UsageError
from edgepack.interfaces import DeviceInfo, MemoryMeter, Option, Probe, Size, Target

from edgepack_lowrank import __version__

#: The edgepack plugin API this module was written for.
EDGEPACK_PLUGIN_API = 1

#: The board described when ``memory=`` is not given.
DEFAULT_MEMORY = 8 * 2**30
#: What the OS, its drivers and carve-outs keep of the shared memory when ``os_reserve=`` is not given.
DEFAULT_OS_RESERVE = 3 * 2**29  # 1.5 GiB
#: What the board computes in: no bf16 (its CPU and accelerator have no bf16 units).
BOARD_CAPABILITIES = frozenset({"fp32", "fp16"})

#: Where an ARM board's firmware names the board; absent on PCs and servers.
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def board_model() -> str | None:
    """The board's name when edgepack runs on an ARM board (64-bit ARM with a device tree),
    else None: then the board is emulated."""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return None
    try:
        return DEVICE_TREE_MODEL.read_text(errors="replace").strip("\x00\n ") or None
    except OSError:
        return None


class EdgeBoardTarget(Target):
    """An 8 GB shared-memory edge board (fp32, fp16; no bf16); emulated by this CPU elsewhere."""

    name = "edge-board"
    version = __version__
    description = ("an 8 GB edge board whose memory is shared with the OS (fp32, fp16, no bf16); "
                   "emulated by this machine's CPU when not run on the board")
    device_type = "cpu"
    #: allocator headroom, on what the OS reserve leaves
    reserve_fraction = 0.1
    options = (
        Option("memory", Size, default=DEFAULT_MEMORY,
               help="the board's memory, shared with the OS (default 8GiB)"),
        Option("os_reserve", Size, default=DEFAULT_OS_RESERVE,
               help="what the OS, drivers and carve-outs keep of it (default 1.5GiB)"),
    )

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if self.settings["os_reserve"] >= self.settings["memory"]:
            raise UsageError(f"target edge-board: os_reserve={self.settings['os_reserve']} bytes leaves nothing of "
                             f"memory={self.settings['memory']} bytes for the model")

    # -- probing ---------------------------------------------------------------------------

    def probe(self) -> Probe:
        """On the board: its memory and what it computes. Elsewhere: an emulation by this CPU
        of the board the options describe, saying so (``detail["emulated"]``, with the reason);
        fp16 is claimed only if this CPU computes it correctly."""
        from edgepack.targets.cpu import CpuTarget

        host = CpuTarget().probe()
        model = board_model()
        if model is not None:
            here = host.devices[0]
            device = DeviceInfo(0, model, here.total_bytes, here.available_bytes)
            return Probe(self.name, True, (device,), BOARD_CAPABILITIES & host.capabilities,
                         {"emulated": False, "board": model, "os_reserve": self.settings["os_reserve"]})
        memory, reserve = self.settings["memory"], self.settings["os_reserve"]
        device = DeviceInfo(0, "edge board (emulated by this machine's CPU)", memory, memory - reserve)
        detail = {
            "emulated": True,
            "reason": f"not an ARM board ({platform.machine()}): this machine's CPU stands in for the board",
            "host": host.detail.get("processor"),
            "host_memory_bytes": host.devices[0].total_bytes,
            "os_reserve": reserve,
        }
        return Probe(self.name, True, (device,), BOARD_CAPABILITIES & host.capabilities, detail)

    def describe(self, probe: Probe) -> Probe:
        """The board the options describe, for planning: its memory less the OS reserve, and
        the board's capabilities whatever this machine computes."""
        memory, reserve = self.settings["memory"], self.settings["os_reserve"]
        name = probe.devices[0].name if probe.devices else "edge board"
        return replace(probe, devices=(DeviceInfo(0, name, memory, memory - reserve),),
                       capabilities=BOARD_CAPABILITIES, detail=dict(probe.detail, described=dict(self.settings)))

    def capacity(self, probe: Probe) -> int:
        """What is left for a model: the smaller of what is available and the memory less the
        OS reserve, less the allocator headroom (``reserve_fraction``)."""
        if not probe.devices:
            return 0
        device = probe.devices[0]
        usable = min(device.available_bytes, device.total_bytes - self.settings["os_reserve"])
        return int(max(0, usable) * (1.0 - self.reserve_fraction))

    def contradictions(self, probe: Probe) -> list[str]:
        """On a real board: less memory than the bundle was packed for. An emulation refuses
        nothing it can stand in for: this CPU runs what the board would, and verify checks the
        bundle's measured peak against its budget, which the described board's capacity bounds."""
        if probe.detail.get("emulated"):
            return []
        memory, reserve = self.settings["memory"], self.settings["os_reserve"]
        # a board reports a little less than its nominal memory (firmware, carve-outs), so the
        # test is whether the model's share of the packed-for board fits in this one
        if probe.devices and probe.devices[0].total_bytes < memory - reserve:
            return [f"the bundle was packed for edge-board:memory={memory} bytes ({memory - reserve} bytes after the "
                    f"OS reserve), but this board has {probe.devices[0].total_bytes} bytes"]
        return []

    # -- running ---------------------------------------------------------------------------

    def memory_meter(self) -> MemoryMeter:
        """The cpu target's resident-memory meter; its scope says when the board is emulated."""
        from edgepack.targets.cpu import RssMeter

        meter = RssMeter()
        if board_model() is None:
            meter.scope = "emulated edge-board (this machine's CPU stands in for the board): " + meter.scope
        else:
            meter.scope = "edge-board (shared CPU/accelerator memory): " + meter.scope
        return meter


@edgepack.hookimpl
def edgepack_register_targets(register):
    """Register the ``edge-board`` target with edgepack."""
    register(EdgeBoardTarget)
