"""A spare memfd, zeroed ahead of time, for the next large frame sent in shared memory.

A fresh memfd's pages are allocated and zeroed by the kernel as the frame is copied in:
about a third of the copy's time for 100 MB. A spare is made (``fallocate``) by a
background thread while the process waits for its reply, so the copy that matters only
copies. Safety is unchanged: a spare is used once, for one frame, then sealed (writes,
growth, shrinking) and given away like a fresh memfd; nothing here ever writes to a
memfd that has left the process, and no other process ever saw a spare before it was
filled. At most one spare exists per process, at most ``max_bytes`` large, closed after
``idle`` seconds unused, and only made while the process's memory cgroup has room for
it twice over (its pages count against a sandbox's memory limit).

Shared by the client (aviato/_lane.py) and the worker inside a sandbox (copied beside
it as ``aviato_spare``): builtin modules only at import.
"""

from __future__ import annotations

import _thread
import os

__all__ = [
    "CGROUP",
    "ENABLED",
    "GRAIN",
    "IDLE_SECONDS",
    "MAX_BYTES",
    "MIN_BYTES",
    "Spare",
    "cgroup_room",
]

TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable

    #: A spare: its memfd, size and writable mapping.
    _Ready = tuple[int, int, mmap.mmap]

#: Frames smaller than this go in a fresh memfd: little to save, and on a busy machine
#: the background thread's work slowed 10 MB round trips more than it saved.
MIN_BYTES = int(os.environ.get("AVIATO_SHM_SPARE_MIN_BYTES", 32 << 20))
#: The largest spare kept (its memory is idle until the next frame).
MAX_BYTES = int(os.environ.get("AVIATO_SHM_SPARE_MAX_BYTES", 256 << 20))
IDLE_SECONDS = 2.0
#: Spares are made in whole units of this.
GRAIN = 1 << 20
ENABLED = os.environ.get("AVIATO_SHM_SPARE", "1") != "0"
CGROUP = "/sys/fs/cgroup"


def cgroup_room(size: int, root: str = CGROUP) -> bool:
    """Whether this process's memory cgroup can hold ``size`` more bytes twice over
    (unknown or unlimited: yes). As a container sees it: cgroup v2's files at the root,
    or v1's memory controller (Docker on a v1 host)."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            with open(f"{root}/{limit_file}") as f:
                limit = f.read().strip()
            if limit == "max":
                return True
            with open(f"{root}/{usage_file}") as f:
                current = int(f.read())
            return current + 2 * size <= int(limit)
        except (OSError, ValueError):
            continue
    return True


def _seal(fd: int) -> None:
    import fcntl  # not builtin: loaded on first use, not at a worker's start

    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)


def _discard(ready: _Ready) -> None:
    ready[2].close()
    os.close(ready[0])


def _memfd(name: str) -> int:
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


class Spare:
    """Makes sealed memfds holding given bytes, from a pre-zeroed spare when one fits."""

    def __init__(
        self,
        name: str,
        *,
        min_bytes: int = MIN_BYTES,
        max_bytes: int = MAX_BYTES,
        idle: float = IDLE_SECONDS,
        room: Callable[[int], bool] = cgroup_room,
        enabled: bool = ENABLED,
    ) -> None:
        self.name = name
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.idle = idle
        self._room = room
        self.enabled = enabled
        self._lock = _thread.allocate_lock()
        #: The ready spare (or None), and whether a thread is making one.
        self._ready: _Ready | None = None
        self._making = False
        #: Released when the ready spare is taken (the maker then stops waiting).
        self._taken: _thread.LockType | None = None
        #: Counts, for tests and benchmarks: frames sent from a spare / from a fresh memfd.
        self.used = 0
        self.fresh = 0

    @property
    def ready(self) -> int:
        """The ready spare's size (0: none)."""
        ready = self._ready
        return ready[1] if ready else 0

    @property
    def making(self) -> bool:
        return self._making

    def sealed_copy(self, view: memoryview) -> int:
        """A sealed memfd holding exactly ``view``'s bytes; the caller owns (closes) it."""
        size = view.nbytes
        spare = self._take(size)
        fd = spare[0] if spare else _memfd(self.name)
        try:
            if spare:
                # A plain copy into mapped pages; unmapped before sealing (a writable
                # mapping would make sealing fail).
                with spare[2], memoryview(spare[2]) as into:
                    into[:size] = view
            else:
                offset = 0
                while offset < size:
                    offset += os.pwrite(fd, view[offset:], offset)
            if spare and spare[1] != size:
                os.ftruncate(fd, size)  # the tail's pages are freed
            _seal(fd)
        except BaseException:
            os.close(fd)
            raise
        if spare:
            self.used += 1
        else:
            self.fresh += 1
        self._want(size)
        return fd

    def _take(self, size: int) -> _Ready | None:
        with self._lock:
            ready = self._ready
            if ready is None or ready[1] < size:
                return None
            self._ready = None
            taken, self._taken = self._taken, None
        if taken is not None:
            taken.release()
        return ready

    def _want(self, size: int) -> None:
        if not self.enabled or size < self.min_bytes or size > self.max_bytes:
            return
        stale = None
        with self._lock:
            if self._making or (self._ready is not None and self._ready[1] >= size):
                return
            if self._ready is not None:  # too small for frames this size: replaced
                stale, self._ready = self._ready, None
                taken, self._taken = self._taken, None
                if taken is not None:
                    taken.release()
            self._making = True
        if stale is not None:
            _discard(stale)
        # Some headroom (cut off again when used): the next frame is often a bit larger.
        size = min(self.max_bytes, -(-(size + size // 16) // GRAIN) * GRAIN)
        try:
            _thread.start_new_thread(self._make, (size,))
        except RuntimeError:  # no thread to be had: fresh memfds, as without spares
            with self._lock:
                self._making = False

    def _make(self, size: int) -> None:
        """The background thread: make one spare, offer it, close it if unused."""
        fd = -1
        try:
            if not self._room(size):
                return
            fd = _memfd(self.name)
            os.posix_fallocate(fd, 0, size)  # pages allocated and zeroed here, not later
            import mmap

            # Mapped with its page tables filled (MAP_POPULATE), so the copy that
            # matters takes no page faults either.
            region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError:
            if fd >= 0:
                os.close(fd)
            fd = -1
        finally:
            if fd < 0:
                with self._lock:
                    self._making = False
        if fd < 0:
            return
        taken = _thread.allocate_lock()
        taken.acquire()
        with self._lock:
            self._ready = (fd, size, region)
            self._taken = taken
            self._making = False
        if taken.acquire(timeout=self.idle):
            return  # used: its new owner closes it
        with self._lock:
            if self._taken is not taken:
                return  # taken just now
            self._ready = None
            self._taken = None
        _discard((fd, size, region))

    def close(self) -> None:
        """Drop the ready spare now (one being made still is: when ``idle`` has passed)."""
        with self._lock:
            ready, self._ready = self._ready, None
            taken, self._taken = self._taken, None
        if ready is not None:
            _discard(ready)
        if taken is not None:
            taken.release()
