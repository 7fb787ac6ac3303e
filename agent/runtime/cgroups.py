"""Per-sandbox cgroups for the local runtime, where the host lets us write them.

Memory, pids and CPU limits that hold for a sandbox's whole process tree (setrlimit
is per process, and root ignores its process count), the kernel's OOM killer with a
count we can read (so an out-of-memory death is reported as such), and a complete
kill list: every process in the group, even one that left the tree. cgroup v2 (one
unified hierarchy) and v1 (a hierarchy per controller) are both handled; with
neither writable, ``Cgroups.version`` is 0 and every method is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("aviato.agent.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class Cgroups:
    def __init__(self, root: str = "/sys/fs/cgroup", name: str = "aviato") -> None:
        self.root = Path(root)
        self.name = name
        self.version = 0
        try:
            self.version = self._setup()
        except OSError as exc:
            log.info("no cgroup limits for local sandboxes (%s): setrlimit only", exc)
        if self.version:
            log.info("local sandboxes get cgroup v%d limits under %s", self.version, self.root)
            self._sweep_parked()

    def _sweep_parked(self) -> None:
        """Groups of processes parked by an agent that was killed: they exited (their
        pipe closed), their groups stayed. Named ``park-<agent pid>-...``: those of a
        dead agent go (rmdir refuses a group that still holds a process)."""
        bases = (
            [self.root / self.name]
            if self.version == 2
            else [self.root / c / self.name for c in CONTROLLERS]
        )
        for base in bases:
            for d in base.glob("park-*-*"):
                owner = d.name.split("-")[1]
                if owner.isdigit() and not _alive(int(owner)):
                    with contextlib.suppress(OSError):
                        d.rmdir()

    def _setup(self) -> int:
        if (self.root / "cgroup.controllers").exists():  # v2: one unified tree
            base = self.root / self.name
            base.mkdir(exist_ok=True)
            wanted = " ".join(f"+{c}" for c in CONTROLLERS)
            for parent in (self.root, base):  # let the controllers reach the sandboxes
                _write(parent / "cgroup.subtree_control", wanted)
            return 2
        if all((self.root / c / "cgroup.procs").exists() for c in CONTROLLERS):
            for c in CONTROLLERS:
                (self.root / c / self.name).mkdir(exist_ok=True)
            return 1
        raise OSError("no writable cgroup hierarchy with memory, pids and cpu")

    def _dirs(self, sandbox_id: str) -> dict[str, Path]:
        if self.version == 2:
            d = self.root / self.name / sandbox_id
            return {c: d for c in CONTROLLERS}
        return {c: self.root / c / self.name / sandbox_id for c in CONTROLLERS}

    def make(
        self, sandbox_id: str, *, memory: int | None, pids: int | None, cpus: float | None
    ) -> list[str]:
        """Create the sandbox's group(s) with its limits; returns the ``cgroup.procs``
        files its first process must write its pid to (before it execs)."""
        if not self.version:
            return []
        limited = {"memory": bool(memory), "pids": bool(pids), "cpu": bool(cpus)}
        # Only the hierarchies with a limit: each join may cost an RCU grace period.
        wanted = [c for c in CONTROLLERS if limited[c]]
        if not wanted:
            return []
        procs = self._create(sandbox_id, wanted)
        self.set_limits(sandbox_id, memory=memory, pids=pids, cpus=cpus)
        return procs

    def create_all(self, name: str) -> list[str]:
        """Groups in every hierarchy, no limits yet (see ``set_limits``): for a
        process parked ahead of need, whose limits are not known yet."""
        return self._create(name, list(CONTROLLERS)) if self.version else []

    def _create(self, name: str, controllers: list[str]) -> list[str]:
        dirs = self._dirs(name)
        try:
            for d in {dirs[c] for c in controllers}:
                d.mkdir(exist_ok=True)
        except OSError:
            self.remove(name)
            raise
        return sorted({str(dirs[c] / "cgroup.procs") for c in controllers})

    def set_limits(
        self, name: str, *, memory: int | None, pids: int | None, cpus: float | None
    ) -> None:
        """Set (or lift: None) each limit on the groups that exist for ``name``."""
        dirs = self._dirs(name)
        v2 = self.version == 2
        try:
            if dirs["memory"].exists():
                # The limit is a limit, not a cue to swap: no swap beyond it where the
                # kernel accounts swap (v2: memory.swap.max; v1: memory.memsw.*).
                memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
                memsw_on = not v2 and memsw.exists()
                if memsw_on:  # v1 refuses a memory limit above memsw: lift it first
                    _write(memsw, "-1")
                _write(
                    dirs["memory"] / ("memory.max" if v2 else "memory.limit_in_bytes"),
                    str(memory) if memory else ("max" if v2 else "-1"),
                )
                if memsw_on and memory:
                    _write(memsw, str(memory))  # memory + swap: no more than memory
                swap = dirs["memory"] / "memory.swap.max"
                if v2 and swap.exists():
                    _write(swap, "0" if memory else "max")
            if dirs["pids"].exists():
                _write(dirs["pids"] / "pids.max", str(pids) if pids else "max")
            if dirs["cpu"].exists():
                quota = max(1000, int(cpus * CPU_PERIOD_US)) if cpus else None
                if v2:
                    _write(dirs["cpu"] / "cpu.max", f"{quota or 'max'} {CPU_PERIOD_US}")
                else:
                    _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota or -1))
        except OSError:
            self.remove(name)
            raise

    def oom_killed(self, sandbox_id: str) -> bool:
        """Whether the kernel's OOM killer killed a process of the sandbox."""
        if not self.version:
            return False
        d = self._dirs(sandbox_id)["memory"]
        if not d.exists():
            return False
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in (d / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
            if self.version == 1:  # kernels without the oom_kill count
                return int((d / "memory.failcnt").read_text()) > 0
        return False

    def pids(self, sandbox_id: str) -> set[int]:
        found: set[int] = set()
        for d in set(self._dirs(sandbox_id).values()) if self.version else ():
            with contextlib.suppress(OSError, ValueError):
                found |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        return found

    def remove(self, sandbox_id: str, timeout: float = 2.0) -> None:
        """Kill whatever is still in the group, then remove it (a group goes only once
        empty: killed processes take a moment to be reaped)."""
        if not self.version:
            return
        deadline = time.monotonic() + timeout
        for d in {d for d in self._dirs(sandbox_id).values() if d.exists()}:
            while d.exists():
                for pid in self.pids(sandbox_id):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    d.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("cgroup %s still busy; left in place", d)
                        break
                    time.sleep(0.02)
