"""Launching a sharded bundle's ranks with torchrun's launcher (``torch.distributed.run``).

A multi-device bundle (one shard per rank, written by the ``parallel`` plugin) runs as one
process per rank. :func:`launch_ranks` starts them the way users do, through
``python -m torch.distributed.run --standalone --nproc-per-node N``, isolated like the
single-device probe (``python -I`` in an empty directory, edgepack imported from where this
process found it), with every rank killed when the launcher dies (``PR_SET_PDEATHSIG``), so a
timeout or an interrupt leaves no process behind. Each rank writes its own report; a rank that
fails, dies or hangs is named with its reason.

The rank side is :func:`edgepack.probe.rank_main`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import VerificationError

#: Test hook: ``RANK:die`` or ``RANK:hang`` makes that rank die (SIGKILL) or hang after joining
#: the process group, so the failure paths can be exercised.
FAULT_ENV = "EDGEPACK_RANK_FAULT"

#: Stages a rank reports, in order (the last one it reached is named when it fails or hangs).
STAGES = ("starting", "joining the process group", "warming up", "loading its shard",
          "running the smoke inputs", "done")

_RANK_ENTRY = """\
import ctypes, signal
try:  # die with the launcher: no rank outlives a killed or timed-out run
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
except Exception:
    pass
"""


def rank_bootstrap() -> str:
    """The ``python -I -c`` program of each rank: the probe's bootstrap (user site, edgepack
    from the parent's location) calling :func:`edgepack.probe.rank_entry`."""
    from edgepack.smoke import _BOOTSTRAP

    body = _BOOTSTRAP.replace("from edgepack.probe import _entry\nsys.exit(_entry(sys.argv[3]))",
                              "from edgepack.probe import rank_entry\nsys.exit(rank_entry(sys.argv[3]))")
    assert body != _BOOTSTRAP
    return _RANK_ENTRY + body


def torchrun_command(world_size: int, spec_path: str | Path) -> list[str]:
    """``python -I -m torch.distributed.run --standalone --nproc-per-node N --no-python --
    python -I -c <bootstrap> SITE_DIRS EDGEPACK_ROOT SPEC``: the launcher and every rank in
    isolated mode."""
    from edgepack.smoke import probe_command

    single = probe_command(spec_path)  # [python, -I, -c, bootstrap, site_dirs, root, spec]
    return [sys.executable, "-I", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(int(world_size)), "--max-restarts", "0", "--no-python", "--",
            sys.executable, "-I", "-c", rank_bootstrap(), *single[4:]]


def launch_command(world_size: int, bundle: str = "BUNDLE") -> str:
    """What a user types to run the bundle's ranks on one node (recorded in the manifest)."""
    return (f"torchrun --nproc-per-node {world_size} -m edgepack.plugins.parallel {bundle}/model "
            f"--inputs INPUTS.safetensors --out OUTPUTS.safetensors")


@dataclass
class RankReports:
    """What every rank reported: ``reports[r]`` is rank r's JSON report."""

    reports: list[dict[str, Any]]
    stdout: str = ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stage(reports_dir: Path, rank: int) -> dict[str, Any]:
    return _read_json(reports_dir / f"rank-{rank}.stage.json") or {"stage": "not started"}


def _kill_leftovers(reports_dir: Path, world_size: int, marker: str) -> None:
    """SIGKILL any rank still alive (normally none: ranks die with their launcher)."""
    for rank in range(world_size):
        pid = _stage(reports_dir, rank).get("pid")
        if not isinstance(pid, int) or pid <= 1:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline:  # our rank, not a process that reused the id
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _root_cause(output: str) -> tuple[int | None, int | None]:
    """(rank, exit code) of the first failure torchrun observed, from its summary."""
    text = output.split("Root Cause", 1)[-1] if "Root Cause" in output else output
    rank = re.search(r"rank\s*:\s*(\d+)", text)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", text)
    return (int(rank.group(1)) if rank else None, int(code.group(1)) if code else None)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return str(-code)


def failure_sentence(reports_dir: Path, world_size: int, output: str, *, timed_out: float | None = None) -> str:
    """Which rank failed and why: its own error, the signal that killed it, or (after a
    timeout) the ranks that did not finish and the stage each reached."""
    if timed_out is not None:
        waiting = []
        for rank in range(world_size):
            if _read_json(reports_dir / f"rank-{rank}.json") is None:
                waiting.append(f"rank {rank} (last stage: {_stage(reports_dir, rank).get('stage')})")
        return (f"{', '.join(waiting) or 'the ranks'} did not finish within {timed_out:g} s and "
                f"{'were' if len(waiting) != 1 else 'was'} killed (set EDGEPACK_PROBE_TIMEOUT to allow longer)")
    errors = {}
    for rank in range(world_size):
        report = _read_json(reports_dir / f"rank-{rank}.json")
        if report is not None and report.get("error"):
            errors[rank] = str(report["error"])
    root, code = _root_cause(output)
    if root is not None and root not in errors and code is not None:
        stage = _stage(reports_dir, root).get("stage")
        how = (f"was killed by signal {_signal_name(code)}" + (" (out of memory?)" if code == -9 else "")
               if code < 0 else f"exited with code {code}")
        return f"rank {root} {how} while {stage}"
    if errors:
        rank = root if root in errors else min(errors)
        return f"rank {rank} failed: {errors[rank]}"
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the ranks exited without a report"


def launch_ranks(spec: dict[str, Any], world_size: int, *, timeout: float, threads: int, workdir: Path) -> RankReports:
    """Run every rank of ``spec`` (see :func:`edgepack.probe.rank_main`) through torchrun and
    return their reports; VerificationError names the rank that failed, died or hung."""
    from edgepack.smoke import probe_env, run_isolated

    reports_dir = workdir / "ranks"
    reports_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, reports=str(reports_dir), timeout=float(timeout), threads=threads)
    spec_path = workdir / "ranks-spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = probe_env(threads)
    env.setdefault("LOGLEVEL", "WARNING")
    command = torchrun_command(world_size, spec_path)
    try:
        proc = run_isolated(command, timeout=timeout, env=env)
    except VerificationError:
        _kill_leftovers(reports_dir, world_size, str(spec_path))
        raise VerificationError(failure_sentence(reports_dir, world_size, "", timed_out=timeout)) from None
    except BaseException:
        _kill_leftovers(reports_dir, world_size, str(spec_path))
        raise
    _kill_leftovers(reports_dir, world_size, str(spec_path))
    output = (proc.stdout or "") + "\n" + (proc.stderr or "")
    reports = [_read_json(reports_dir / f"rank-{r}.json") for r in range(world_size)]
    if proc.returncode != 0 or any(r is None or r.get("error") for r in reports):
        raise VerificationError(f"the bundle's ranks could not be run: "
                                f"{failure_sentence(reports_dir, world_size, output)}")
    return RankReports([r for r in reports if r is not None], proc.stdout or "")
