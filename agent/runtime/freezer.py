"""The cgroup freezer, for pausing a local sandbox: every process of it stopped where
it is (memory kept, no CPU used) until thawed.

cgroup v2: ``cgroup.freeze`` of the sandbox's own group (made, and its processes moved
in, when it has none). cgroup v1: a group per sandbox in the ``freezer`` hierarchy,
which the sandbox's processes join at pause time (joining costs an RCU grace period,
so it is not done at create). A process that forks during the move is caught by the
next pass: its parent was moved, or it is found in the tree and moved; a task that
joins a frozen group is frozen as it joins. With neither writable, ``version`` is 0
and pausing is refused by the runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("aviato.agent.freezer")

#: How long freezing may take before it is given up (the kernel waits for each task
#: to reach a safe point: a task in an uninterruptible sleep delays it).
FREEZE_SECONDS = 10.0
#: Passes over the sandbox's processes looking for ones that escaped the group.
PASSES = 20


class FreezeError(OSError):
    """The freezer could not freeze (or thaw) the group in time."""


class Freezer:
    def __init__(self, root: str = "/sys/fs/cgroup", name: str = "aviato") -> None:
        self.root = Path(root)
        self.name = name
        self.version = 0
        try:
            if (self.root / "cgroup.controllers").exists():
                base = self.root / name
                base.mkdir(exist_ok=True)
                self.version = 2
            elif (self.root / "freezer" / "cgroup.procs").exists():
                (self.root / "freezer" / name).mkdir(exist_ok=True)
                self.version = 1
        except OSError as exc:
            log.info("no cgroup freezer for local sandboxes (%s): pause is refused", exc)

    def _dir(self, group: str) -> Path:
        if self.version == 2:
            return self.root / self.name / group
        return self.root / "freezer" / self.name / group

    def freeze(self, group: str, pids: Callable[[], set[int]]) -> None:
        """Freeze ``group``, first moving into it every process ``pids()`` names."""
        d = self._dir(group)
        d.mkdir(exist_ok=True)
        self._move(d, pids)
        if self.version == 2:
            (d / "cgroup.freeze").write_text("1")
        else:
            (d / "freezer.state").write_text("FROZEN")
        self._wait(d, frozen=True)
        for _ in range(PASSES):  # forked during the move, or left the tree: caught now
            if not self._move(d, pids):
                return
        log.warning("freezer %s: processes still escaping after %d passes", d, PASSES)

    def thaw(self, group: str) -> None:
        d = self._dir(group)
        if not d.exists():
            return
        if self.version == 2:
            (d / "cgroup.freeze").write_text("0")
        else:
            (d / "freezer.state").write_text("THAWED")
        self._wait(d, frozen=False)

    def frozen(self, group: str) -> bool:
        d = self._dir(group)
        with contextlib.suppress(OSError):
            if self.version == 2:
                return "frozen 1" in (d / "cgroup.events").read_text()
            return (d / "freezer.state").read_text().strip() == "FROZEN"
        return False

    def remove(self, group: str, timeout: float = 2.0) -> None:
        """Thaw and remove the group (v1: its own; v2: the group is the sandbox's and
        removed with it). What is still in it is killed (the sandbox is being stopped)."""
        if self.version != 1:
            return
        d = self._dir(group)
        if not d.exists():
            return
        with contextlib.suppress(OSError):
            self.thaw(group)
        deadline = time.monotonic() + timeout
        while d.exists():
            for pid in _procs(d):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            try:
                d.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    log.warning("freezer group %s still busy; left in place", d)
                    return
                time.sleep(0.02)

    def _move(self, d: Path, pids: Callable[[], set[int]]) -> bool:
        """Move into ``d`` the processes not in it yet; whether there were any."""
        inside = _procs(d)
        stray = sorted(pids() - inside)  # parents (lower pids, mostly) first
        for pid in stray:
            with contextlib.suppress(ProcessLookupError, OSError):
                (d / "cgroup.procs").write_text(str(pid))
        return bool(stray)

    def _wait(self, d: Path, *, frozen: bool) -> None:
        deadline = time.monotonic() + FREEZE_SECONDS
        v2 = self.version == 2
        while True:
            if v2:
                state = "frozen 1" in (d / "cgroup.events").read_text()
            else:
                state = (d / "freezer.state").read_text().strip() == "FROZEN"
            if state == frozen:
                return
            if time.monotonic() > deadline:
                raise FreezeError(f"{d} did not {'freeze' if frozen else 'thaw'} in time")
            time.sleep(0.005)


def _procs(d: Path) -> set[int]:
    with contextlib.suppress(OSError, ValueError):
        return {int(p) for p in (d / "cgroup.procs").read_text().split()}
    return set()
