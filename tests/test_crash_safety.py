"""Crash safety of ``pack`` (issue 11, item 5).

* SIGKILL at any point of a pack leaves at the final path either no bundle, the previous
  complete bundle (``--force``), or the new complete one (a kill after the publishing rename),
  never a mix. A stopped process writes nothing, so the state seen while a pack is stopped
  with SIGSTOP is exactly what a SIGKILL at that instant would leave: the real packs below are
  stopped and inspected at every progress line and every few tenths of a second, then killed
  for real. The writer's commit, which is too quick to hit from outside, is killed at each of
  its steps by a child process that pauses there, and at evenly spread times.
* What a killed pack leaves (its hidden ``.NAME.partial-*`` directory) is removed by the next
  writer of that bundle name, and only when its owner is gone: never a live pack's, never
  through a link, never another user's, machine's or bundle's.
* A full disk gives exit 2 and one line on stderr that says so and names the bundle, with no
  bundle and no staging directory left behind (injected at each step, and for real on a small
  tmpfs where this machine allows mounting one).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

import edgepack.smoke
from conftest import assert_one_error_line, format_manifest
from edgepack.bundle import writer as writer_module
from edgepack.bundle.manifest import MANIFEST
from edgepack.bundle.reader import check_integrity
from edgepack.bundle.writer import BundleWriter
from edgepack.cli import cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux (/proc, renameat2, signals)")

REPO = Path(__file__).resolve().parent.parent
# The real packs run three at a time: one intra-op thread each (their measuring processes
# still take one per core).
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", EDGEPACK_PROGRESS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
NAME = "crash-0.1.0-cpu"  # what ``pack --name crash --target cpu`` writes
PACK = ["--target", "cpu", "--budget", "200MB", "--apply", "precision:dtype=bf16", "--name", "crash"]
DISK_FULL = "no space left on device"


# ---------------------------------------------------------------------------------------------
# Helpers


def hidden(out: Path) -> list[str]:
    """The hidden entries of ``out`` (staging directories, an old bundle moved aside)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []


def stage(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def write_bundle(out: Path, readme: str, *, name: str = NAME) -> Path:
    """A small complete bundle written by the writer itself (README.md holds ``readme``)."""
    with BundleWriter(out, name, overwrite=True) as w:
        stage(w.staging, {"README.md": readme.encode(), "model/weights.bin": readme.encode() * 1000})
        return w.commit(format_manifest())


def state_of(final: Path, old_manifest: bytes | None) -> str:
    """``none`` (nothing at the final path), ``old`` (the previous bundle, byte for byte) or
    ``new`` (another bundle that passes its integrity check); fails on anything else."""
    if not os.path.lexists(final):
        return "none"
    assert final.is_dir() and not final.is_symlink(), f"{final} is not a bundle directory"
    manifest, failures = check_integrity(final)
    assert manifest is not None and failures == [], f"{final} is not a complete bundle: {failures}"
    return "old" if (final / MANIFEST).read_bytes() == old_manifest else "new"


def assert_next_writer_cleans_up(out: Path, name: str = NAME, *, restores: bool = False) -> None:
    """What the next pack of ``name`` does first: enter a writer. Afterwards only its own
    staging directory is hidden in ``out``, and the final path is left as it was (or, with
    ``restores``, holds the previous bundle a killed swap left aside)."""
    final = out / name
    before = (final / MANIFEST).read_bytes() if final.is_dir() else None
    with BundleWriter(out, name, overwrite=True) as w:
        assert hidden(out) == [w.staging.name]
        if restores:
            assert before is None and (final / MANIFEST).is_file()
        else:
            assert ((final / MANIFEST).read_bytes() if final.is_dir() else None) == before
    assert hidden(out) == []


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3 and later of /proc/PID/stat (state first), or None when there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def alive(pid: int, start: str) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (zombies do not)."""
    fields = proc_stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in ("Z", "X")


def measuring_children(pid: int) -> list[tuple[int, str, list[Path]]]:
    """``(pid, start time, its temporary directories)`` of the measuring processes that
    ``pid`` started (children whose command line ends with the spec file in its directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is None or fields[1] != str(pid):
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
            except OSError:
                continue
            spec = Path(os.fsdecode(argv[-2] if len(argv) > 1 and not argv[-1] else argv[-1]))
            if spec.name.startswith("spec-") and spec.suffix == ".json":
                found.append((int(entry), fields[19], [spec.parent, cwd]))
    return found


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = proc_stat(int(entry))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry))
    return found


def signal_children(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``'s children: a measuring process runs in a session of its own,
    which a signal to the pack's process group does not reach once it has left the group."""
    for child in children_of(pid):
        try:
            os.kill(child, sig)
        except ProcessLookupError:
            pass


def all_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (or the process is gone)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for task in tasks:
        try:
            data = Path(f"/proc/{pid}/task/{task}/stat").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if data[data.rindex(b")") + 2:][:1] not in (b"T", b"t", b"Z", b"X"):
            return False
    return True


def kill_if_alive(pid: int, start: str) -> None:
    if alive(pid, start):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# 1. The writer's commit, killed at each step and at evenly spread times
#
# The child process stages a bundle and commits it, pausing (printing PAUSED and sleeping) at
# one named step; the test then SIGKILLs it.

CHILD = r"""
import errno, json, os, sys, time
from pathlib import Path
import edgepack.bundle.writer as w

cfg = json.loads(sys.argv[1])
point, files = cfg["point"], cfg["files"]
out = Path(cfg["out"])

def reach(label):
    if label == point:
        print("PAUSED", flush=True)
        while True:
            time.sleep(60)

if cfg["fallback"]:  # no renameat2: the writer falls back to os.rename
    def unsupported(src, dst, flags):
        raise OSError(errno.ENOSYS, "no renameat2 (simulated)")
    w._renameat2 = unsupported
real_rename, renames = os.rename, []
def rename(src, dst):
    renames.append(dst)
    if len(renames) == 1:
        reach("publish")  # the fallback's first rename
    real_rename(src, dst)
    if len(renames) == 1 and cfg["force"]:
        reach("aside")  # the old bundle moved aside, the new one not yet in
os.rename = rename
real_renameat2 = w._renameat2
def renameat2(src, dst, flags):
    reach("publish")
    return real_renameat2(src, dst, flags)
w._renameat2 = renameat2
real_fsync_path, fsyncs = w._fsync_path, []
def fsync_path(path, *, directory):
    fsyncs.append(path)
    if Path(path) == out:
        reach("published")
    elif len(fsyncs) == 2:
        reach("fsync")
    return real_fsync_path(path, directory=directory)
w._fsync_path = fsync_path
real_remove = w._remove
def remove(path):
    if writer.committed:  # removing the old bundle: take part of it first, as rmtree would
        doomed = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for p in doomed[: len(doomed) // 2]:
            p.unlink()
        reach("removing-old")
    return real_remove(path)
w._remove = remove
class HalfWrite:  # writes half of the manifest, then pauses
    def __init__(self, path, mode):
        self.name, self.file = Path(path).name, open(path, mode)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def write(self, data):
        if self.name == "manifest.json" and point == "manifest":
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            reach("manifest")
        return self.file.write(data)
    def __getattr__(self, attr):
        return getattr(self.file, attr)
w.open = HalfWrite

writer = w.BundleWriter(out, cfg["name"], overwrite=cfg["force"])
with writer:
    reach("entered")
    items = sorted(files.items())
    for i, (rel, size) in enumerate(items):
        path = writer.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((rel.encode() * (size // len(rel) + 1))[:size])
        if i == len(items) // 2:
            reach("staging")
    print("READY", flush=True)
    started = time.monotonic()
    writer.commit(cfg["manifest"])
print("COMMITTED", time.monotonic() - started, flush=True)
"""

BEFORE_PUBLISH = ["entered", "staging", "manifest", "fsync", "publish"]
AFTER_PUBLISH = ["published"]


def run_child(out: Path, point: str, *, force: bool, fallback: bool = False, files: dict[str, int] | None = None,
              kill_after: float | None = None) -> str:
    """Run the writer child until it pauses at ``point`` (or, with ``kill_after``, that many
    seconds after it starts committing), SIGKILL it, and return its last line. With point
    ``none`` and no ``kill_after`` it runs to its end."""
    files = files or {"README.md": 3, "model/config.json": 100, "model/weights.bin": 300_000,
                      "smoke/inputs.bin": 2000, "smoke/tolerances.json": 50}
    cfg = dict(out=str(out), name=NAME, point=point, force=force, fallback=fallback, files=files,
               manifest=format_manifest())
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg)], stdout=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    try:
        if point == "none" and kill_after is None:
            return proc.communicate(timeout=120)[0].strip().splitlines()[-1]
        wanted = "READY" if kill_after is not None else "PAUSED"
        line = proc.stdout.readline().strip()
        while line == "READY" != wanted:  # staged; the pause is in the commit
            line = proc.stdout.readline().strip()
        assert line == wanted, f"the child stopped before {point!r}: {line!r}"
        if kill_after is not None:
            time.sleep(kill_after)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rest = proc.communicate()[0]
    return (rest.strip().splitlines() or [line])[-1]


@pytest.mark.parametrize("force, fallback, points", [
    (False, False, BEFORE_PUBLISH + AFTER_PUBLISH),
    (True, False, BEFORE_PUBLISH + AFTER_PUBLISH + ["removing-old"]),
    (True, True, ["publish", "aside", "published", "removing-old"]),
], ids=["new", "force", "force-without-renameat2"])
def test_commit_killed_at_each_step_leaves_no_bundle_or_a_complete_one(tmp_path, force, fallback, points):
    for point in points:
        out = tmp_path / point
        old = (write_bundle(out, "old") / MANIFEST).read_bytes() if force else None
        run_child(out, point, force=force, fallback=fallback)
        state = state_of(out / NAME, old)
        if point in AFTER_PUBLISH or point == "removing-old":
            assert state == "new", point
            assert (out / NAME / "README.md").read_bytes() == b"REA"
        elif point == "aside":
            # Only without renameat2: the previous bundle is moved aside and the final path is
            # empty for an instant. The next writer moves the previous bundle back.
            assert state == "none" and len(hidden(out)) == 2, hidden(out)
            assert_next_writer_cleans_up(out, restores=True)
            assert state_of(out / NAME, old) == "old"
            continue
        else:
            assert state == ("old" if force else "none"), point
        if force or point not in AFTER_PUBLISH:
            assert hidden(out), f"{point}: the killed writer left nothing to clean up?"
        assert_next_writer_cleans_up(out)
        assert state_of(out / NAME, old) == state


def test_commit_killed_at_spread_times_leaves_no_bundle_or_a_complete_one(tmp_path):
    """SIGKILL at evenly spread instants of a commit of 100 files, replacing a bundle."""
    files = {f"model/part-{i:03d}.bin": 3000 for i in range(100)}
    files["README.md"] = 3
    reference = tmp_path / "reference"
    write_bundle(reference, "old")
    last = run_child(reference, "none", force=True, files=files)
    assert last.startswith("COMMITTED"), last
    seconds = float(last.split()[1])
    seen = set()
    for i, fraction in enumerate([0.0, 0.25, 0.5, 0.75, 0.95, 1.2]):
        out = tmp_path / f"kill-{i}"
        old = (write_bundle(out, "old") / MANIFEST).read_bytes()
        run_child(out, "none", force=True, files=files, kill_after=seconds * fraction)
        state = state_of(out / NAME, old)
        assert state in ("old", "new")
        seen.add(state)
        assert_next_writer_cleans_up(out)
        assert state_of(out / NAME, old) == state
    assert "old" in seen  # the kills did land inside the commit


# ---------------------------------------------------------------------------------------------
# 2. Real packs through the command line, stopped and inspected throughout, then SIGKILLed


def drive_pack(args: list[str], *, kill_after: str, inspect: Callable[[str], None],
               wait_for_child: bool = False, period: float = 0.3, limit: float = 300.0) -> dict[str, Any]:
    """Run ``edgepack pack ARGS`` in its own process group. At every line it writes on stderr
    and every ``period`` seconds, SIGSTOP the group, call ``inspect(label)`` and SIGCONT it;
    right after the line holding ``kill_after`` (and, with ``wait_for_child``, once the pack
    has started its measuring process), SIGKILL the group."""
    proc = subprocess.Popen([sys.executable, "-m", "edgepack.cli", "pack", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    record: dict[str, Any] = {"lines": [], "inspections": [], "children": []}
    started = time.monotonic()
    try:
        while True:
            assert time.monotonic() - started < limit, f"the pack ran over {limit} s: {record['lines'][-5:]}"
            try:
                line = lines.get(timeout=period)
            except queue.Empty:
                line = ""
            if line is None:
                proc.wait()
                raise AssertionError(f"the pack ended (exit {proc.returncode}) before {kill_after!r}: "
                                     + "\n".join(record["lines"][-10:]))
            if line:
                record["lines"].append(line)
            if kill_after in line:
                while wait_for_child and not record["children"]:
                    assert time.monotonic() - started < limit and proc.poll() is None, "no measuring process"
                    record["children"] = measuring_children(proc.pid)
                    time.sleep(0.02)
                os.killpg(proc.pid, signal.SIGKILL)
                record["killed_at"] = line
                break
            label = line or f"at {time.monotonic() - started:.1f} s"
            stopped = False
            os.killpg(proc.pid, signal.SIGSTOP)
            try:
                # A parent inside vfork waits (state D, never T) for its child to exec; with the
                # child stopped too it never stops: skip that instant rather than wait forever.
                deadline = time.monotonic() + 2.0
                while not all_stopped(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.001)
                stopped = all_stopped(proc.pid)
                if stopped:
                    inspect(label)
            finally:
                os.killpg(proc.pid, signal.SIGCONT)
                # a child stopped with the group just before it left it (between vfork and setsid)
                # is out of the group now: continue it too, or the pack waits for it forever
                signal_children(proc.pid, signal.SIGCONT)
            if stopped:
                record["inspections"].append(label)
    finally:
        if proc.poll() is None:
            if "killed_at" not in record:  # a failed run (its children's death is not under test)
                signal_children(proc.pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(10)
    return record


@pytest.fixture(scope="module")
def real_packs(edgepack_tiny_encoder, tmp_path_factory):
    """Three real packs of the tiny encoder through the command line, run side by side (most
    of a pack's time is spent importing and loading, on one core):

    ``new``: into an empty --out, killed while its measuring process runs;
    ``force``: replacing a bundle, signed, killed as it signs the staged manifest (just before
    the bundle is published; the kill may land before or after publication);
    ``tmpfs``: into a 1 MB tmpfs (:func:`full_tmpfs_pack`).
    """
    root = tmp_path_factory.mktemp("real-packs")
    from edgepack.bundle.signing import keygen

    key = keygen(root / "release").private
    runs: dict[str, dict[str, Any]] = {}
    old = (write_bundle(root / "force", "old") / MANIFEST).read_bytes()
    plans = {
        "new": dict(args=[str(edgepack_tiny_encoder), *PACK, "--out", str(root / "new")], old=None,
                    kill_after="loading the packed model in a fresh process", wait_for_child=True),
        "force": dict(args=[str(edgepack_tiny_encoder), *PACK, "--force", "--sign", str(key),
                            "--out", str(root / "force")], old=old, kill_after="signing the manifest"),
    }

    def run(label: str, plan: dict[str, Any]) -> None:
        out, failures = root / label, []

        def inspect(when: str) -> None:
            try:
                state = state_of(out / NAME, plan["old"])
            except AssertionError as exc:
                state = f"broken ({exc})"
            if state != ("old" if plan["old"] else "none"):
                failures.append(f"{when}: {state}")

        try:
            record = drive_pack(plan["args"], kill_after=plan["kill_after"], inspect=inspect,
                                wait_for_child=plan.get("wait_for_child", False))
        except BaseException as exc:  # reported by the tests
            record = {"error": exc}
        record.update(out=out, old=plan["old"], failures=failures, hidden=hidden(out))
        if record.get("children"):
            time.sleep(1.0)  # a child that dies with the pack is gone by now
            record["lingering"] = [pid for pid, start, _ in record["children"] if alive(pid, start)]
            for pid, start, temporary in record["children"]:
                kill_if_alive(pid, start)
                for path in temporary:  # what the killed pack could not remove
                    if path.name.startswith("edgepack-probe-"):
                        shutil.rmtree(path, ignore_errors=True)
        runs[label] = record

    def run_full() -> None:
        try:
            runs["tmpfs"] = full_tmpfs_pack(edgepack_tiny_encoder, root / "tmpfs")
        except BaseException as exc:  # reported by the test
            runs["tmpfs"] = {"error": exc}

    threads = [threading.Thread(target=run, args=item) for item in plans.items()]
    threads.append(threading.Thread(target=run_full))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs


@pytest.mark.parametrize("label", ["new", "force"])
def test_sigkilled_pack_leaves_no_bundle_or_the_previous_one(real_packs, label):
    run = real_packs[label]
    if "error" in run:
        raise run["error"]
    assert run["failures"] == []
    assert len(run["inspections"]) >= 10, run["inspections"]  # stopped and inspected throughout
    assert any("writing model weights" in i for i in run["inspections"])
    state = state_of(run["out"] / NAME, run["old"])
    if label == "new":
        assert state == "none"
        assert run["children"], "the pack was killed before it started measuring"
    else:  # killed while signing: a kill just after the publishing rename leaves the new bundle
        assert state in ("old", "new")
        assert any("writing manifest" in i for i in run["inspections"])
    if state != "new":  # (a kill after publishing may also land after the old bundle's removal)
        assert run["hidden"], "a pack killed before publishing leaves its staging directory"
    assert_next_writer_cleans_up(run["out"])
    assert state_of(run["out"] / NAME, run["old"]) == state


def test_sigkilled_pack_leaves_no_measuring_process_behind(real_packs):
    """The measuring process runs in its own session (so that a timeout can kill all it
    started): it must still die with a SIGKILLed pack rather than run on for its full time."""
    run = real_packs["new"]
    if "error" in run:
        raise run["error"]
    assert run["children"]
    assert run["lingering"] == [], "the measuring process outlived the SIGKILLed pack"


# ---------------------------------------------------------------------------------------------
# 3. Leftovers: removed when their owner is gone, and only then


def _dead_process() -> tuple[int, str]:
    """``(pid, start time)`` of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    fields = proc_stat(proc.pid)
    proc.wait()
    assert fields is not None
    return proc.pid, fields[19]


def test_staging_name_records_its_owner(tmp_path):
    with BundleWriter(tmp_path, NAME) as w:
        pid, start, host, _ = w.staging.name[len(f".{NAME}.partial-"):].split("-", 3)
        assert int(pid) == os.getpid() and start == proc_stat(os.getpid())[19]
        assert host == writer_module._host_token() and len(host) == 8
        stage(w.staging, {"README.md": b"x"})
        final = w.commit(format_manifest())
    # The owner is in the directory's name: nothing of it is in the published bundle.
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["README.md", MANIFEST]
    assert [e["path"] for e in json.loads((final / MANIFEST).read_text())["files"]] == ["README.md"]


def test_staging_of_a_dead_or_replaced_owner_is_removed(tmp_path):
    host = writer_module._host_token()
    pid, start = _dead_process()
    me = os.getpid()
    dead = tmp_path / f".{NAME}.partial-{pid}-{start}-{host}-abc_123"
    reused = tmp_path / f".{NAME}.partial-{me}-{int(proc_stat(me)[19]) + 1}-{host}-zzzzzzzz"  # pid reused
    for path in (dead, reused):
        stage(path, {"model/w.bin": b"w", "README.md": b"r"})
    # What pack --sign writes beside its staging directory, left by a pack killed while signing.
    (tmp_path / f".{dead.name}.manifest.sig.json.x1y2z3.partial").write_text("{")
    assert_next_writer_cleans_up(tmp_path)


def test_live_staging_directories_are_never_removed(tmp_path):
    # Two writers of one bundle name in one process...
    with BundleWriter(tmp_path, NAME) as first:
        stage(first.staging, {"README.md": b"first"})
        with BundleWriter(tmp_path, NAME) as second:
            assert first.staging.is_dir() and (first.staging / "README.md").read_bytes() == b"first"
            assert second.staging != first.staging
        assert first.staging.is_dir()
    # ...and a live pack in another process, removed only once it has died.
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dict(
        out=str(tmp_path), name=NAME, point="staging", force=False, fallback=False,
        files={"a": 1, "b": 2, "c": 3}, manifest={}))], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "PAUSED"
        [theirs] = hidden(tmp_path)
        with BundleWriter(tmp_path, NAME) as w:
            assert hidden(tmp_path) == sorted([theirs, w.staging.name])
        assert hidden(tmp_path) == [theirs]
    finally:
        proc.kill()
        proc.communicate()
    assert_next_writer_cleans_up(tmp_path)


def test_cleanup_leaves_what_it_cannot_prove_stale(tmp_path):
    host = writer_module._host_token()
    pid, start = _dead_process()
    outside = tmp_path / "outside"
    stage(outside, {"precious.txt": b"keep"})
    out = tmp_path / "dist"
    out.mkdir()
    kept = {
        f".{NAME}.partial-{pid}-{start}-00000000-abcdefgh": "dir",  # another machine, container or boot
        f".{NAME}.partial-abcdefgh": "dir",  # no owner recorded (an older edgepack, or no /proc)
        f".{NAME}.partial-{pid}-{start}-{host}-link0000": "link",  # a link: never followed nor removed
        f".{NAME}.partial-{pid}-{start}-{host}-file0000": "file",
        f".{NAME}.partial-{pid}-{start}-{host}-other000": "other-user",
        f".other-{NAME}.partial-{pid}-{start}-{host}-abcdefgh": "dir",  # another bundle's
        f".{NAME}.partial-{pid}-{start}-{host}-abcdefgh.partial-{pid}-{start}-{host}-abcdefgh": "dir",
        f"..{NAME}.partial-{pid}-{start}-{host}-link0001.manifest.sig.json.abc.partial": "link",
        f"..{NAME}.partial-{pid}-{start}-{host}-abcdefgh.manifest.sig.json": "file",  # not a temporary file
        f"..{NAME}.partial-{os.getpid()}-{proc_stat(os.getpid())[19]}-{host}-live0000.x.partial": "file",  # live
    }
    for name, kind in kept.items():
        path = out / name
        if kind == "link":
            path.symlink_to(outside, target_is_directory=True)
        elif kind == "file":
            path.write_text("x")
        else:
            stage(path, {"README.md": b"r"})
            if kind == "other-user":
                if os.geteuid() != 0:
                    shutil.rmtree(path)
                    continue
                os.chown(path, 4242, 4242)
    expected = hidden(out)
    with BundleWriter(out, NAME) as w:
        assert hidden(out) == sorted(expected + [w.staging.name])
    assert hidden(out) == expected
    assert (outside / "precious.txt").read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------------
# 4. A full disk: exit 2, one line that says so and names the bundle, nothing left behind


@pytest.fixture
def fake_probe(monkeypatch):
    """The fresh-process measurement, replaced: the packed model reproduces the golden outputs."""
    from safetensors.torch import load_file

    def fake(bundle_dir, **kwargs):
        outputs = load_file(Path(bundle_dir) / "smoke/expected.safetensors")
        return edgepack.smoke.ProbeResult(10, "test scope", outputs, 0.0)

    monkeypatch.setattr(edgepack.smoke, "measure_in_fresh_process", fake)


def _enospc(filename: Any = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([os.fspath(filename)] if filename else []))


def _safetensors_enospc() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _full_at_smoke_files(monkeypatch):
    import safetensors.torch

    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a part written
        raise _safetensors_enospc()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _full_at_weights(monkeypatch):
    import edgepack.model

    def normalize(path):  # safetensors ran out of space part way through the weights
        Path(path).write_bytes(Path(path).read_bytes()[:1000])
        raise _safetensors_enospc()

    monkeypatch.setattr(edgepack.model, "normalize_safetensors", normalize)


def _full_at_config(monkeypatch):
    import edgepack.pipeline

    def save(model, steps, model_dir, *rest):
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / "config.json").write_text('{"archi')
        raise _enospc(Path(model_dir) / "config.json")

    monkeypatch.setattr(edgepack.pipeline, "_save_model", save)


def _full_at_readme(monkeypatch):
    import edgepack.pipeline

    def write_card(directory, manifest, *args, **kwargs):
        raise _enospc(directory / "README.md")

    monkeypatch.setattr(edgepack.pipeline, "write_card", write_card)


def _full_at_manifest(monkeypatch):
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise _enospc()

        def __getattr__(self, attr):
            return getattr(self.file, attr)

    monkeypatch.setattr(writer_module, "open", Full, raising=False)


def _full_at_fsync(monkeypatch):
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise _enospc()
        return real(fd)

    monkeypatch.setattr(writer_module.os, "fsync", fsync)


def _full_at_publish(monkeypatch):
    def renameat2(src, dst, flags):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src), None, os.fspath(dst))

    monkeypatch.setattr(writer_module, "_renameat2", renameat2)


@pytest.mark.parametrize("inject, where, force", [
    (_full_at_smoke_files, "", False),
    (_full_at_weights, "", False),
    (_full_at_weights, "", True),
    (_full_at_config, "(model/config.json)", False),
    (_full_at_readme, "(README.md)", False),
    (_full_at_manifest, "", False),
    (_full_at_manifest, "", True),
    (_full_at_fsync, "", False),
    (_full_at_publish, "", False),
    (_full_at_publish, "", True),
], ids=["smoke-files", "weights", "weights-force", "config", "readme", "manifest", "manifest-force", "fsync",
        "publish", "publish-force"])
def test_full_disk_gives_one_clear_error_and_no_bundle(edgepack_tiny_encoder, tmp_path, monkeypatch, fake_probe,
                                                      inject, where, force):
    out = tmp_path / "dist"
    old = (write_bundle(out, "old") / MANIFEST).read_bytes() if force else None
    inject(monkeypatch)
    result = CliRunner().invoke(cli, ["pack", str(edgepack_tiny_encoder), *PACK, "--out", str(out),
                                      *(["--force"] if force else [])])
    line = assert_one_error_line(result, 2, str(out / NAME), where)
    assert DISK_FULL in line.lower(), line
    if force:
        assert "the previous bundle is unchanged" in line, line
    assert state_of(out / NAME, old) == ("old" if force else "none")
    assert hidden(out) == []


def test_full_disk_while_searching_is_not_reported_as_no_plan_fitting(edgepack_tiny_encoder, tmp_path, monkeypatch,
                                                                       fake_probe):
    _full_at_weights(monkeypatch)
    out = tmp_path / "dist"
    result = CliRunner().invoke(cli, ["pack", str(edgepack_tiny_encoder), "--target", "cpu", "--budget", "200MB",
                                      "--name", "crash", "--out", str(out)])
    assert DISK_FULL in assert_one_error_line(result, 2, str(out / NAME)).lower()
    assert not out.exists()  # not even the --out directory


def _can_mount_tmpfs(where: Path) -> str | None:
    """None when ``unshare -rm`` can mount a tmpfs on ``where`` here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(where)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


def full_tmpfs_pack(model: Path, root: Path) -> dict[str, Any]:
    """Pack ``model`` with --out on a 1 MB tmpfs (the tiny bundle needs about 5 MB: the
    weights do not fit), in a user and mount namespace of its own; ``skip`` says why not."""
    mount = root / "small"
    mount.mkdir(parents=True)
    why = _can_mount_tmpfs(mount)
    if why:
        return {"skip": why}
    out, listing = mount / "dist", root / "listing"
    listing.write_text("")
    # Inside the namespace (the only place the tmpfs is seen): mount, pack, list what is left.
    script = ('mount -t tmpfs -o size=1m tmpfs "$1" && shift && "$@"; code=$?; '
              'if [ -d "$OUT" ]; then ls -A "$OUT" > "$LISTING"; fi; exit $code')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable, "-m", "edgepack.cli",
                           "pack", str(model), *PACK, "--out", str(out)],
                          capture_output=True, text=True, env=dict(ENV, OUT=str(out), LISTING=str(listing)), cwd=REPO,
                          timeout=300)
    return {"out": out, "returncode": proc.returncode, "stderr": proc.stderr, "left": listing.read_text()}


def test_full_disk_for_real_on_a_small_tmpfs(real_packs):
    run = real_packs["tmpfs"]
    if "error" in run:
        raise run["error"]
    if "skip" in run:
        pytest.skip(run["skip"])
    stderr = run["stderr"]
    assert run["returncode"] == 2, stderr
    assert "Traceback" not in stderr
    errors = [l for l in stderr.splitlines() if l.startswith("edgepack: error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
    assert DISK_FULL in errors[0].lower() and str(run["out"] / NAME) in errors[0], errors[0]
    assert run["left"] == "", f"left on the full disk: {run['left']}"
