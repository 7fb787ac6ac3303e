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
        dirs = self._dirs(sandbox_id)
        try:
            for d in set(dirs.values()):
                d.mkdir(exist_ok=True)
            v2 = self.version == 2
            if memory:
                _write(dirs["memory"] / ("memory.max" if v2 else "memory.limit_in_bytes"),
                       str(memory))
                swap = dirs["memory"] / "memory.swap.max"
                if v2 and swap.exists():  # the limit is a limit, not a cue to swap
                    _write(swap, "0")
            if pids:
                _write(dirs["pids"] / "pids.max", str(pids))
            if cpus:
                quota = max(1000, int(cpus * CPU_PERIOD_US))
                if v2:
                    _write(dirs["cpu"] / "cpu.max", f"{quota} {CPU_PERIOD_US}")
                else:
                    _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                    _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        except OSError:
            self.remove(sandbox_id)
            raise
        return sorted({str(d / "cgroup.procs") for d in dirs.values()})

    def oom_killed(self, sandbox_id: str) -> bool:
        """Whether the kernel's OOM killer killed a process of the sandbox."""
        if not self.version:
            return False
        d = self._dirs(sandbox_id)["memory"]
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
        for d in set(self._dirs(sandbox_id).values()):
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
