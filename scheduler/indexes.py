"""The scheduler's indexes: pure data structures that keep each decision's cost
independent of the cluster's size (no sockets, no clock; times are plain floats).

- :class:`FreeIndex`: live agents by free slots, for placement in O(log agents).
- :class:`SpareIndex`: per spare shape, the agents holding ready spares of it, for
  placing a create where a spare waits for it in O(log agents).
- :class:`Timers`: a heap of (when, key), for deadlines that must not be found by
  walking a table every tick.
- :class:`RowOrder`: every row in the order the scheduler learnt of it, resumable at
  a cursor, for listings served one bounded page at a time.
- :class:`BlindSpots`: the intervals in which the scheduler itself was not reading its
  socket (a stalled loop, a backlog): an agent's silence during them is not its fault.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
R = TypeVar("R")


class FreeIndex:
    """Agents that can take a sandbox, by free slots: :meth:`best` is the one with the
    most (ties: the smallest id, for determinism). A lazy heap: an entry whose agent's
    free count has changed since is dropped when it reaches the top."""

    def __init__(self) -> None:
        self._free: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def set(self, agent_id: str, free: int) -> None:
        """``agent_id`` has ``free`` slots now (0 or less, or not alive: call ``drop``)."""
        if free <= 0:
            self._free.pop(agent_id, None)
            return
        if self._free.get(agent_id) == free:
            return
        self._free[agent_id] = free
        heapq.heappush(self._heap, (-free, agent_id))
        if len(self._heap) > 4 * len(self._free) + 64:  # stale entries: rebuild
            self._heap = [(-f, a) for a, f in self._free.items()]
            heapq.heapify(self._heap)

    def drop(self, agent_id: str) -> None:
        self._free.pop(agent_id, None)

    def best(self) -> str | None:
        heap, free = self._heap, self._free
        while heap:
            neg, agent_id = heap[0]
            if free.get(agent_id) == -neg:
                return agent_id
            heapq.heappop(heap)
        return None

    def total(self) -> int:
        return sum(self._free.values())

    def __len__(self) -> int:
        return len(self._free)

    def snapshot(self) -> dict[str, int]:
        return dict(self._free)


class SpareIndex:
    """Agents that hold ready spares and can take a sandbox, per spare shape (any
    hashable key): :meth:`best` is the one holding the most of that shape (ties: the
    smallest id). A :class:`FreeIndex` per shape held anywhere."""

    def __init__(self) -> None:
        self._by_shape: dict[object, FreeIndex] = {}

    def set(self, agent_id: str, key: object, ready: int) -> None:
        """``agent_id`` holds ``ready`` spares of ``key`` now (0: none, or it cannot
        take a sandbox)."""
        index = self._by_shape.get(key)
        if index is None:
            if ready <= 0:
                return
            index = self._by_shape[key] = FreeIndex()
        index.set(agent_id, ready)
        if not index:
            del self._by_shape[key]

    def best(self, key: object) -> str | None:
        index = self._by_shape.get(key)
        return index.best() if index is not None else None

    def __bool__(self) -> bool:
        return bool(self._by_shape)


class Timers(Generic[K]):
    """Keys due at a time. An entry is never removed early: whoever pops it checks that
    it still applies (the sandbox still lives, its deadline is still this one)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._seq = 0

    def add(self, when: float, key: K) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, key))

    def due(self, now: float) -> Iterator[K]:
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[2]

    def __len__(self) -> int:
        return len(self._heap)


class RowOrder(Generic[R]):
    """Rows in the order they were added, each with a sequence number; a page resumes
    after any sequence number in O(log n). Removed rows are skipped (``alive``) and
    swept out once they are half the list."""

    def __init__(self, seq_of: Callable[[R], int]) -> None:
        self._rows: list[R] = []
        self._seq_of = seq_of
        self._next = 0

    def add(self, row: R) -> int:
        """Append ``row``; its sequence number (to store on it)."""
        self._next += 1
        self._rows.append(row)
        return self._next

    def compact(self, alive: Callable[[R], bool], live_count: int) -> None:
        if len(self._rows) > 2 * live_count + 1024:
            self._rows = [r for r in self._rows if alive(r)]

    def after(self, seq: int) -> Iterator[R]:
        """Rows with a sequence number above ``seq``, in order (removed ones included:
        the caller skips them)."""
        rows = self._rows
        start = bisect.bisect_right(rows, seq, key=self._seq_of)
        for i in range(start, len(rows)):
            yield rows[i]

    def __len__(self) -> int:
        return len(self._rows)


class BlindSpots:
    """When the scheduler could not hear anyone: intervals ``(start, end)``. An agent
    last heard at ``t`` has been *silent* for ``now - t`` minus the blind time since
    ``t``; only that counts against it."""

    def __init__(self) -> None:
        self._spots: deque[tuple[float, float]] = deque()

    def add(self, start: float, end: float) -> None:
        if end <= start:
            return
        spots = self._spots
        if spots and start <= spots[-1][1]:  # overlaps the last one: merge
            start = min(start, spots[-1][0])
            end = max(end, spots[-1][1])
            spots.pop()
        spots.append((start, end))

    def blind_since(self, since: float, now: float) -> float:
        total = 0.0
        for start, end in reversed(self._spots):
            if end <= since:
                break
            total += min(end, now) - max(start, since)
        return max(0.0, total)

    def forget_before(self, when: float) -> None:
        """Spots that ended before ``when`` can no longer matter (every agent last heard
        before then is already judged). O(spots forgotten): called every tick."""
        spots = self._spots
        while spots and spots[0][1] < when:
            spots.popleft()

    def __len__(self) -> int:
        return len(self._spots)
