"""The agent's side of output forwarding (issue 14 part 1): a function worker's
``WorkerOutput`` (agent/supervisor_output.py) relayed, unopened, to the client that
watches that worker (``WatchOutput``, aviato/protocol/output.py) as ``FunctionOutput``s.

The worker is not trusted to keep its own rate limit: each worker has a budget here
too (twice the worker's own, so that a well-behaved worker never meets it); what is
over it is dropped and counted, and the count travels with the next chunk relayed.
Output that comes before its watch (the watch and the first calls race on the way
in) is held, up to ``HOLD_BYTES``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.supervisor_output import BURST, RATE, Budget
from aviato.link import WorkerOutput
from aviato.protocol import FunctionOutput, Message, Payload

__all__ = ["OutputRelay"]

log = logging.getLogger("aviato.agent.output")

SendNow = Callable[[bytes, int, Message, tuple[Payload, ...]], None]

#: Output held for a worker nobody watches yet; past it, counted as dropped.
HOLD_BYTES = 256 << 10
MAX_HELD = 1024
#: A function name longer than this is cut (it is the worker's to say).
MAX_NAME = 200


@dataclass(slots=True)
class _Worker:
    budget: Budget
    route: tuple[bytes, int] | None = None
    held: list[tuple[FunctionOutput, bytes]] = field(default_factory=list)
    held_bytes: int = 0
    dropped: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0})


class OutputRelay:
    def __init__(self, send: SendNow, clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self._clock = clock
        self._workers: dict[str, _Worker] = {}

    def _worker(self, sandbox_id: str) -> _Worker:
        worker = self._workers.get(sandbox_id)
        if worker is None:
            budget = Budget(2 * RATE, 2 * BURST, self._clock())
            worker = self._workers[sandbox_id] = _Worker(budget)
        return worker

    def watch(self, sandbox_id: str, identity: bytes, request_id: int) -> None:
        """Send ``sandbox_id``'s output to this client's request from now on (and what
        was held for it)."""
        worker = self._worker(sandbox_id)
        worker.route = (identity, request_id)
        held, worker.held, worker.held_bytes = worker.held, [], 0
        for chunk, data in held:
            self._send(identity, request_id, chunk, (data,))

    def relay(self, sandbox_id: str, header: WorkerOutput, blobs: Sequence[Payload]) -> None:
        """A worker's output: on to its watcher, held, or dropped (counted)."""
        if header.fd not in (1, 2) or header.dropped < 0 or len(blobs) > 1:
            log.debug("worker %s sent malformed output; dropped", sandbox_id)
            return
        data = bytes(blobs[0]) if blobs else b""
        worker = self._worker(sandbox_id)
        if not worker.budget.take(len(data), self._clock()):
            worker.dropped[header.fd] += len(data)
            data = b""
            if not header.dropped:
                return  # said with the next chunk that goes
        dropped = header.dropped + worker.dropped[header.fd]
        worker.dropped[header.fd] = 0
        chunk = FunctionOutput(sandbox_id, header.fd, header.name[:MAX_NAME], dropped)
        if worker.route is not None:
            self._send(*worker.route, chunk, (data,))
        elif worker.held_bytes + len(data) <= HOLD_BYTES and len(worker.held) < MAX_HELD:
            worker.held.append((chunk, data))
            worker.held_bytes += len(data)
        else:
            worker.dropped[header.fd] += len(data) + dropped

    def forget(self, sandbox_id: str) -> None:
        """The worker is gone."""
        self._workers.pop(sandbox_id, None)
