"""Output of ended sandboxes, kept so that ``logs`` still answers after a stop or an
exit (the runtime removes the sandbox, and its output with it). Bounded by bytes:
each sandbox keeps its last ``per_sandbox`` bytes, and the oldest go first."""

from __future__ import annotations

from collections import OrderedDict

from agent.runtime.base import OutputChunk, tail_chunks

#: A sandbox's last output kept once it ended.
PER_SANDBOX_BYTES = 1024 * 1024
#: All ended sandboxes' output kept together, at most.
TOTAL_BYTES = 64 * 1024 * 1024


class KeptLogs:
    def __init__(self, per_sandbox: int = PER_SANDBOX_BYTES, total: int = TOTAL_BYTES) -> None:
        self.per_sandbox = per_sandbox
        self.total = total
        self._logs: OrderedDict[str, list[OutputChunk]] = OrderedDict()
        self._size = 0

    def keep(self, sandbox_id: str, chunks: list[OutputChunk]) -> None:
        self.drop(sandbox_id)
        kept = tail_chunks(chunks, self.per_sandbox)
        self._logs[sandbox_id] = kept
        self._size += _size(kept)
        while self._size > self.total and len(self._logs) > 1:
            _, oldest = self._logs.popitem(last=False)
            self._size -= _size(oldest)

    def get(self, sandbox_id: str) -> list[OutputChunk] | None:
        return self._logs.get(sandbox_id)

    def drop(self, sandbox_id: str) -> None:
        old = self._logs.pop(sandbox_id, None)
        if old is not None:
            self._size -= _size(old)

    def __contains__(self, sandbox_id: object) -> bool:
        return sandbox_id in self._logs


def _size(chunks: list[OutputChunk]) -> int:
    return sum(len(c.data) for c in chunks)
