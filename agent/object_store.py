"""The agent's object store (issue 14 part 3): objects as opaque frames (a pickle and its
out-of-band buffers, never unpickled here), by object id. They are held in memory up to
a budget; past it the least recently used are spilled to files in a directory of the
agent's, up to a disk cap; past that a put is refused (``ObjectStoreFullError``).
No sockets here: the agent's side of the wire is agent/objects.py."""

from __future__ import annotations

import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aviato.exceptions import ConfigurationError, ObjectLostError, ObjectStoreFullError
from aviato.protocol import Payload

__all__ = [
    "DEFAULT_DISK_BUDGET",
    "DEFAULT_MEMORY_BUDGET",
    "Entry",
    "ObjectStore",
    "budgets_from_env",
    "object_id_problem",
]

DEFAULT_MEMORY_BUDGET = 2 << 30
DEFAULT_DISK_BUDGET = 20 << 30
#: Frames smaller than this are copied when stored: they may be views of a read buffer
#: that is used again (larger ones are read into buffers of their own).
_COPY_BELOW = 64 * 1024
_OBJECT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def object_id_problem(object_id: str) -> str:
    """Why ``object_id`` is not one ("" when it is): it names a file when spilled."""
    if _OBJECT_ID.match(object_id):
        return ""
    return f"object id {object_id[:80]!r} is not 1 to 64 letters, digits, '-' or '_'"


def budgets_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(memory budget, disk cap) in bytes: ``AVIATO_OBJECT_MEMORY_BYTES`` and
    ``AVIATO_OBJECT_DISK_BYTES``, else the defaults."""
    env = dict(os.environ) if env is None else env
    out = []
    for name, default in (
        ("AVIATO_OBJECT_MEMORY_BYTES", DEFAULT_MEMORY_BUDGET),
        ("AVIATO_OBJECT_DISK_BYTES", DEFAULT_DISK_BUDGET),
    ):
        text = env.get(name, "")
        try:
            value = int(text) if text else default
        except ValueError:
            raise ConfigurationError(f"{name}={text!r} is not a number of bytes") from None
        if value < 0:
            raise ConfigurationError(f"{name}={text!r} is negative")
        out.append(value)
    return out[0], out[1]


@dataclass(slots=True)
class Entry:
    object_id: str
    session_id: str
    sizes: tuple[int, ...]
    #: In memory: the frames; None once spilled to ``path``.
    frames: list[Payload] | None
    path: Path | None = None

    @property
    def size(self) -> int:
        return sum(self.sizes)


class ObjectStore:
    """Objects by id, least recently used first (``entries``' order)."""

    def __init__(
        self,
        directory: Callable[[], Path],
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        disk_budget: int = DEFAULT_DISK_BUDGET,
    ) -> None:
        #: Where spilled objects go: asked for at the first spill, made then (0700).
        self._directory = directory
        self._made: Path | None = None
        self.memory_budget = memory_budget
        self.disk_budget = disk_budget
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.memory_bytes = 0
        self.disk_bytes = 0

    def __contains__(self, object_id: str) -> bool:
        return object_id in self.entries

    def put(self, object_id: str, session_id: str, frames: Sequence[Payload]) -> Entry:
        """Hold ``frames`` as ``object_id`` (replacing one of that id); spills others,
        or this one, past the memory budget. ObjectStoreFullError when even the disk
        cap leaves no room (nothing is changed then)."""
        problem = object_id_problem(object_id)
        if problem:
            raise ValueError(problem)
        if not frames:
            raise ValueError(f"object {object_id} has no frames")
        sizes = tuple(memoryview(f).nbytes for f in frames)
        size = sum(sizes)
        old = self.entries.get(object_id)
        freed_memory = old.size if old is not None and old.frames is not None else 0
        freed_disk = old.size if old is not None and old.frames is None else 0
        in_memory = size <= self.memory_budget
        # What must go to disk: this object, or enough of the least recently used.
        to_spill: list[Entry] = []
        if in_memory:
            over = self.memory_bytes - freed_memory + size - self.memory_budget
            for entry in self.entries.values():
                if over <= 0:
                    break
                if entry.frames is not None and entry is not old:
                    to_spill.append(entry)
                    over -= entry.size
        disk_needed = sum(e.size for e in to_spill) + (0 if in_memory else size)
        if self.disk_bytes - freed_disk + disk_needed > self.disk_budget:
            raise ObjectStoreFullError(
                f"object {object_id} ({size} bytes) does not fit: this agent holds "
                f"{self.memory_bytes} bytes in memory (budget {self.memory_budget}) and "
                f"{self.disk_bytes} on disk (cap {self.disk_budget}); release refs you no "
                "longer need (ref.release()) or raise AVIATO_OBJECT_MEMORY_BYTES / "
                "AVIATO_OBJECT_DISK_BYTES on the agent"
            )
        if old is not None:
            self._remove(old)
        for entry in to_spill:
            self._spill(entry)
            self.memory_bytes -= entry.size
        kept = [bytes(f) if memoryview(f).nbytes < _COPY_BELOW else f for f in frames]
        entry = Entry(object_id, session_id, sizes, kept)
        self.entries[object_id] = entry
        if in_memory:
            self.memory_bytes += size
        else:
            self._spill(entry)
        return entry

    def get(self, object_id: str) -> list[Payload]:
        """The object's frames (read back from its file when spilled: it stays there)."""
        entry = self.entries.get(object_id)
        if entry is None:
            raise ObjectLostError(
                f"object {object_id} is not held by this agent: it was released, its "
                "session closed, or the agent restarted; put the value again"
            )
        self.entries.move_to_end(object_id)
        if entry.frames is not None:
            return list(entry.frames)
        assert entry.path is not None
        data = memoryview(entry.path.read_bytes())
        out: list[Payload] = []
        at = 0
        for n in entry.sizes:
            out.append(data[at : at + n])
            at += n
        return out

    def release(self, object_ids: Iterable[str] = (), session_id: str = "") -> list[Entry]:
        """Free these objects, and all of ``session_id``'s when given; what was freed."""
        gone = [self.entries[i] for i in object_ids if i in self.entries]
        if session_id:
            gone += [e for e in self.entries.values() if e.session_id == session_id]
        freed: dict[str, Entry] = {}
        for entry in gone:
            if entry.object_id not in freed:
                freed[entry.object_id] = entry
                self._remove(entry)
        return list(freed.values())

    def sessions(self) -> set[str]:
        """The sessions whose objects are held (objects put without one aside)."""
        return {e.session_id for e in self.entries.values() if e.session_id}

    def close(self) -> None:
        """Free everything, spill files included."""
        self.entries.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
            self._made = None

    def _remove(self, entry: Entry) -> None:
        del self.entries[entry.object_id]
        if entry.frames is not None:
            self.memory_bytes -= entry.size
        else:
            self.disk_bytes -= entry.size
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)

    def _spill(self, entry: Entry) -> None:
        """Write an entry's frames to a file and drop them (counted on disk from now on;
        the caller uncounts them from memory if they were counted there)."""
        assert entry.frames is not None
        if self._made is None:
            self._made = self._directory()
            self._made.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._made / entry.object_id
        with open(path, "wb") as out:
            for frame in entry.frames:
                out.write(frame)
        entry.frames = None
        entry.path = path
        self.disk_bytes += entry.size
