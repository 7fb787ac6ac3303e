"""The function pool's decisions, as a pure state machine: no sockets, no clock, no
asyncio.

Each event (a call submitted, a worker's outcomes, a worker started or lost, a timer
fired, a caller's cancel) returns the :data:`Action` list the shell in ``_pool.py``
carries out: send a batch to a worker, settle a call's future, start or stop worker
sandboxes, set or cancel a call's timer, run a dispatch pass soon. What is decided
here: which calls go to which worker in which batches (by count and by bytes), which
call a dead worker is charged for, what runs again (and alone, as a suspect), and what
a late or second outcome is (dropped, and counted). Each call is settled exactly once.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aviato._buffers import Frames
from aviato.exceptions import (
    FunctionError,
    FunctionSerializationError,
    SandboxError,
    SandboxTimeoutError,
    WorkerLostError,
)
from aviato.protocol import CallOutcome, Payload

if TYPE_CHECKING:
    from aviato._function import FunctionOptions

__all__ = [
    "BATCH_BYTES",
    "BATCH_SECONDS",
    "DIED",
    "GROW_BACKLOG_SECONDS",
    "MAX_BATCH",
    "Action",
    "BatchBytes",
    "Call",
    "CancelTimer",
    "Dispatch",
    "Done",
    "Forget",
    "FunctionTally",
    "Note",
    "Outcome",
    "PoolState",
    "RelayedError",
    "Send",
    "Settle",
    "SizePool",
    "StartTimer",
    "StartWorker",
    "StopWorker",
    "Worker",
    "batch_size",
]

#: Work a batch should hold (seconds of function time): fewer messages for tiny calls.
BATCH_SECONDS = 0.01
MAX_BATCH = 256
#: Bytes a batch should hold at most (arguments and their buffers, each shared buffer
#: counted once); a call larger than this goes alone.
BATCH_BYTES = 64 * 1024 * 1024
#: Grow the pool only when the queue holds more than this much work per worker.
GROW_BACKLOG_SECONDS = 0.5


class RelayedError(Exception):
    """A raw call's error: the worker's error record, unopened."""

    def __init__(self, record: bytes) -> None:
        super().__init__("the method raised (its error is for the calling worker to open)")
        self.record = record


@dataclass(eq=False, slots=True)
class Call:
    """One call's life in the client: queued, in flight on a worker, or done."""

    call_id: int
    #: The function's digest (the worker's cache key for it) and name (for messages).
    digest: str
    name: str
    options: FunctionOptions
    args_blob: bytes
    #: The arguments' out-of-band buffers: views of the caller's memory, not copies.
    frames: Frames = field(default_factory=Frames)
    attempts: int = 0
    #: Was in flight on a worker that died beside others: it runs alone from now on,
    #: so that a death can be pinned on the call that caused it.
    suspect: bool = False
    worker: Worker | None = None  # while in flight
    #: The pool gave it its outcome (a caller's cancel is not one).
    settled: bool = False
    #: Its caller cancelled its future: it is not run (again), and not delivered.
    cancelled: bool = False
    #: Relayed for a worker (an actor handle used in a sandbox): its result and error
    #: stay opaque bytes here, for that worker to open (aviato/_actor_relay.py).
    raw: bool = False

    @property
    def done(self) -> bool:
        return self.settled or self.cancelled


@dataclass(eq=False, slots=True)
class Worker:
    """A worker sandbox as the pool sees it."""

    worker_id: str
    inflight: dict[int, Call] = field(default_factory=dict)
    #: batch id -> ids of its calls still without an outcome
    batches: dict[int, set[int]] = field(default_factory=dict)
    #: digests of the functions this worker has been sent
    shipped: set[str] = field(default_factory=set)
    alive: bool = True


# ---------------------------------------------------------------------- actions
# Not frozen: a frozen dataclass's __init__ costs several times a plain one's, and a
# call makes a few of these on its way (the shell only reads them).


@dataclass(slots=True)
class Send:
    """Send ``calls`` to the worker as one batch; ``ship[i]``: the call's function
    goes with it (the worker has not had it). Replies go to ``PoolState.outcomes``
    with this ``batch``; a send that fails goes to ``PoolState.send_failed``."""

    worker_id: str
    batch: int
    calls: list[Call]
    ship: list[bool]


@dataclass(slots=True)
class Done:
    """A call's value, and where and how it ran (the shell makes a FunctionResult)."""

    value: Any
    worker_id: str
    attempts: int
    seconds: float


@dataclass(slots=True)
class Settle:
    """Resolve the call's future with ``outcome`` (never for a cancelled call)."""

    call: Call
    outcome: Done | Exception


@dataclass(slots=True)
class StartWorker:
    """Start ``count`` worker sandboxes; each ends in ``worker_started`` or
    ``start_failed``."""

    count: int


@dataclass(slots=True)
class StopWorker:
    worker_id: str


@dataclass(slots=True)
class SizePool:
    """Ask the cluster how many workers it has room for; answer with ``sized``."""


@dataclass(slots=True)
class StartTimer:
    """Call ``timeout(call)`` after ``seconds`` unless cancelled first."""

    call: Call
    seconds: float


@dataclass(slots=True)
class CancelTimer:
    call: Call


@dataclass(slots=True)
class Dispatch:
    """Call ``dispatch()`` soon: calls submitted in one loop step go out as batches."""


@dataclass(slots=True)
class Forget:
    """No more replies are wanted for ``batch``."""

    batch: int


@dataclass(slots=True)
class Note:
    """For the log."""

    error: bool
    text: str


_DISPATCH = Dispatch()

Action = (
    Send
    | Settle
    | StartWorker
    | StopWorker
    | SizePool
    | StartTimer
    | CancelTimer
    | Dispatch
    | Forget
    | Note
)

#: Outcome statuses that say the worker died: they carry no payload.
DIED = ("lost", "crashed")
#: One outcome from a worker: its record, its payload (b"" for none) and its buffers.
Outcome = tuple[CallOutcome, Payload, Sequence[Payload]]


@dataclass
class FunctionTally:
    """A function's calls that came back from a worker, and its latest run times."""

    calls: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=512))


def batch_size(mean_seconds: float | None) -> int:
    """One call at a time for slow or unknown functions; batches for tiny ones."""
    if mean_seconds is None or mean_seconds >= BATCH_SECONDS:
        return 1
    return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(mean_seconds, 1e-6))))


class BatchBytes:
    """What a batch weighs, as it will go (shared buffers counted once)."""

    __slots__ = ("_seen", "total")

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def weight(self, call: Call) -> int:
        size = len(call.args_blob)
        for view, key in zip(call.frames.views, call.frames.keys, strict=True):
            if key is None or key not in self._seen:
                size += view.nbytes
        return size

    def fits(self, call: Call) -> bool:
        return self.total + self.weight(call) <= BATCH_BYTES

    def add(self, call: Call) -> None:
        self.total += self.weight(call)
        self._seen.update(k for k in call.frames.keys if k is not None)


class PoolState:
    """The pool's queue, workers and counters. ``decode_value(call, blob, buffers)``
    and ``rebuild_error(blob)`` turn a worker's payloads into a value or an exception
    (they may raise: a result that cannot be unpickled here is the call's error)."""

    def __init__(
        self,
        max_workers: int | None,
        decode_value: Callable[[Call, Payload, Sequence[Payload]], Any],
        rebuild_error: Callable[[Payload], BaseException],
    ) -> None:
        #: None until sized by the cluster's free slots (``SizePool``)
        self.max_workers = max_workers
        self._decode_value = decode_value
        self._rebuild_error = rebuild_error
        self.queue: deque[Call] = deque()
        self.workers: list[Worker] = []
        self._by_id: dict[str, Worker] = {}
        self.starting = 0
        self.closed = False
        #: moving average of each function's run time (by digest), to size batches
        self.mean_seconds: dict[str, float] = {}
        self._dispatch_pending = False
        self._sizing = False
        self._batches = itertools.count(1)
        self.started_total = 0
        self.lost_total = 0
        self.retried_total = 0
        self.late_total = 0
        self.duplicate_total = 0
        #: Per function name: calls with an outcome, and recent run times (seconds).
        self.by_name: dict[str, FunctionTally] = {}

    # ------------------------------------------------------------------ queries

    def worker(self, worker_id: str) -> Worker | None:
        """The live worker of that id, if any."""
        return self._by_id.get(worker_id)

    def queued(self) -> int:
        return sum(1 for c in self.queue if not c.done)

    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self.workers)

    # ------------------------------------------------------------------ events

    def submit(self, call: Call) -> list[Action]:
        """A new call: queued, or sent now when it is alone and a worker is idle."""
        if self.closed:
            raise SandboxError("the session is closed: call remote functions inside it")
        self.queue.append(call)
        if len(self.queue) == 1 and not self._dispatch_pending:
            # A lone call (sequential use) goes out now; calls submitted together in
            # one loop step are dispatched as batches by the pass scheduled below.
            idle = next((w for w in self.workers if not w.inflight), None)
            if idle is not None:
                self.queue.popleft()
                actions: list[Action] = []
                self._send(idle, [call], actions)
                return actions
        return self._schedule()

    def dispatch(self) -> list[Action]:
        """The pass ``Dispatch`` asked for: fill the workers, grow the pool if needed."""
        self._dispatch_pending = False
        actions: list[Action] = []
        queue = self.queue
        while queue and queue[0].done:
            queue.popleft()
        for worker in list(self.workers):
            if not queue:
                break
            self._fill(worker, actions)
        if queue:
            self._grow(actions)
        return actions

    def send_failed(self, send: Send, error: Exception) -> list[Action]:
        """The batch could not be sent (too large): its calls fail, the worker stays."""
        actions: list[Action] = []
        worker = self._by_id.get(send.worker_id)
        if worker is not None:
            worker.batches.pop(send.batch, None)
            # Nothing went: the functions first shipped in this batch were not had.
            for call, ship in zip(send.calls, send.ship, strict=True):
                if ship:
                    worker.shipped.discard(call.digest)
        for call in send.calls:
            if worker is not None:
                worker.inflight.pop(call.call_id, None)
            self._settle(call, error, actions)
        return actions

    def outcomes(self, worker_id: str, batch: int, outcomes: Sequence[Outcome]) -> list[Action]:
        """A worker's reply to ``batch``: results and errors, and perhaps its death
        (``crashed``: while running that call; ``lost``: with that call not yet run)."""
        worker = self._by_id.get(worker_id)
        if worker is None:
            # The worker was dropped (cut off or frozen, not dead): its calls have moved
            # on, so its reply is counted and dropped, never delivered.
            self.late_total += 1
            return [Forget(batch)]
        actions: list[Action] = []
        ids = worker.batches.get(batch, set())
        lost = ""
        culprit = 0
        for outcome, blob, buffers in outcomes:
            call_id = outcome.call_id
            ids.discard(call_id)
            if outcome.status in DIED:
                lost = outcome.detail  # handled below, with every call the worker held
                if outcome.status == "crashed":
                    culprit = call_id
                continue
            call = worker.inflight.pop(call_id, None)
            if call is None or call.worker is not worker:
                self.late_total += 1
                continue  # moved elsewhere already: a late reply, dropped
            call.worker = None
            options = call.options
            if options.timeout_seconds is not None:
                actions.append(CancelTimer(call))
            mean = self.mean_seconds.get(call.digest)
            self.mean_seconds[call.digest] = (
                outcome.seconds if mean is None else 0.8 * mean + 0.2 * outcome.seconds
            )
            tally = self.by_name.get(call.name)
            if tally is None:
                tally = self.by_name[call.name] = FunctionTally()
            tally.calls += 1
            tally.recent.append(outcome.seconds)
            if outcome.status == "ok":
                try:
                    value = self._decode_value(call, blob, buffers)
                except Exception as exc:
                    self._settle(
                        call,
                        FunctionSerializationError(
                            f"the result of {call.name}() cannot be unpickled here: {exc}"
                        ),
                        actions,
                    )
                    continue
                self._settle(call, Done(value, worker_id, call.attempts, outcome.seconds), actions)
            else:
                error = RelayedError(bytes(blob)) if call.raw else self._rebuild_error(blob)
                # What the daemons' logs name it by, without changing the user's error.
                error.add_note(
                    f"aviato: call {call_id} of {call.name}(), worker sandbox {worker_id}"
                )
                retry_on = options.retry_on
                if retry_on and isinstance(error, retry_on) and call.attempts <= options.retries:
                    self.queue.appendleft(call)
                else:
                    self._settle(call, error, actions)
        if not ids:
            worker.batches.pop(batch, None)
            actions.append(Forget(batch))
        if lost:
            self._worker_lost(worker, lost, culprit, actions)  # a dead worker takes no more
        actions += self._schedule()
        return actions

    def refused(self, worker_id: str, batch: int, detail: str) -> list[Action]:
        """The agent refused a batch (the worker's sandbox is gone): the worker is lost."""
        if worker_id not in self._by_id:
            self.late_total += 1
            return [Forget(batch)]
        return self.worker_lost(worker_id, detail)

    def worker_lost(self, worker_id: str, detail: str) -> list[Action]:
        """The worker died (its sandbox ended, its agent refused it)."""
        actions: list[Action] = []
        worker = self._by_id.get(worker_id)
        if worker is not None:
            self._worker_lost(worker, detail, 0, actions)
        else:
            actions += self._schedule()
        return actions

    def timeout(self, call: Call) -> list[Action]:
        """A call's ``StartTimer`` fired: it fails, and its worker is stopped (the only
        way to stop a run); the other calls that worker held run again elsewhere."""
        worker = call.worker
        if call.done or worker is None:
            return []
        actions: list[Action] = []
        self._settle(
            call,
            SandboxTimeoutError(
                f"{call.name}() did not finish within {call.options.timeout_seconds:g}s; its "
                f"worker ({worker.worker_id}) was stopped and will be replaced",
                sandbox_id=worker.worker_id,
            ),
            actions,
        )
        self._kill_worker_for(call, worker, actions)
        return actions

    def cancel(self, call: Call) -> list[Action]:
        """Its caller cancelled the call: a queued one is skipped; a running one is
        stopped by stopping its worker."""
        if call.done:
            return []
        call.cancelled = True
        if call.worker is None:
            return []
        actions: list[Action] = []
        self._kill_worker_for(call, call.worker, actions)
        return actions

    def worker_started(self, worker_id: str) -> list[Action]:
        """A worker sandbox is up (not taken when the pool has closed: stop it)."""
        self.starting -= 1
        if self.closed:
            return []
        worker = Worker(worker_id)
        self._by_id[worker_id] = worker
        self.workers.append(worker)
        self.started_total += 1
        return self._schedule()

    def start_failed(self, error: BaseException | None) -> list[Action]:
        """A worker did not start (``None``: its start was given up, at close). With no
        worker running or starting, the queued calls cannot run either."""
        self.starting -= 1
        if error is None or self.workers or self.starting:
            return []
        actions: list[Action] = []
        failure = error if isinstance(error, Exception) else SandboxError(str(error))
        while self.queue:
            self._settle(self.queue.popleft(), failure, actions)
        return actions

    def fail_queued(self, error: Exception) -> list[Action]:
        """A bug escaped one of the shell's tasks: the queued calls fail with it, since
        no task may now be about to serve them."""
        actions: list[Action] = []
        while self.queue:
            self._settle(self.queue.popleft(), error, actions)
        return actions

    def sized(self, free_slots: int | None) -> list[Action]:
        """The answer to ``SizePool``: the cluster's free slots (None: unknown)."""
        self.max_workers = max(1, free_slots or 0)
        return self._schedule()

    def close(self) -> list[Action]:
        """The session closes: queued calls fail; no more calls are taken."""
        self.closed = True
        actions: list[Action] = []
        error = SandboxError("the session closed before this call ran")
        while self.queue:
            self._settle(self.queue.popleft(), error, actions)
        return actions

    def close_workers(self) -> list[Action]:
        """After ``close``: the calls still in flight fail. The shell stops every
        worker it has (no ``StopWorker`` here)."""
        actions: list[Action] = []
        error = SandboxError("the session closed before this call ran")
        for worker in list(self.workers):
            for call in self._drop(worker, actions, stop=False):
                self._settle(call, error, actions)
        return actions

    # ------------------------------------------------------------------ dispatch

    def _schedule(self) -> list[Action]:
        if self._dispatch_pending or self.closed:
            return []
        self._dispatch_pending = True
        return [_DISPATCH]

    def _fill(self, worker: Worker, actions: list[Action]) -> None:
        queue = self.queue
        pool_full = self.max_workers is not None and len(self.workers) >= self.max_workers
        while queue and worker.alive:
            head = queue[0]
            size = batch_size(self.mean_seconds.get(head.digest))
            # Two batches in flight keep a worker busy while the next one travels. For
            # slow calls (batch of one) only once the pool cannot grow (a call queued
            # behind another on a busy worker would wait for it instead of a new worker)
            # and never with a timeout (it runs from dispatch, so no queueing there).
            prefetch = size > 1 or (pool_full and head.options.timeout_seconds is None)
            room = (2 * size if prefetch else 1) - len(worker.inflight)
            width = head.options.max_concurrency
            if width > 1:  # an actor's worker runs this many at once (and queues as many)
                room = (2 * width if prefetch else width) - len(worker.inflight)
            if head.suspect:
                room = 0 if worker.inflight else 1  # alone on an idle worker
            if room <= 0:
                return
            batch: list[Call] = []
            budget = BatchBytes()
            while queue and len(batch) < min(size, room):
                if batch and queue[0].suspect:
                    break  # a suspect never shares a batch
                if batch and not budget.fits(queue[0]):
                    break  # full by bytes: the rest go in the next batch
                call = queue.popleft()
                if not call.done:
                    budget.add(call)
                    batch.append(call)
            if batch:
                self._send(worker, batch, actions)

    def _send(self, worker: Worker, batch: list[Call], actions: list[Action]) -> None:
        ship = []
        for call in batch:
            first = call.digest not in worker.shipped
            if first:
                worker.shipped.add(call.digest)
            ship.append(first)
            call.attempts += 1
            call.worker = worker
            worker.inflight[call.call_id] = call
            timeout = call.options.timeout_seconds
            if timeout is not None:
                actions.append(StartTimer(call, timeout))  # before the send: it may fail
        batch_id = next(self._batches)
        worker.batches[batch_id] = {c.call_id for c in batch}
        actions.append(Send(worker.worker_id, batch_id, batch, ship))

    def _grow(self, actions: list[Action]) -> None:
        if self.max_workers is None:
            if not self._sizing:
                self._sizing = True
                actions.append(SizePool())
            return
        queued = self.queued()
        if not queued:
            return
        mean = self.mean_seconds.get(self.queue[0].digest)
        have = len(self.workers) + self.starting
        if mean is not None and self.workers:
            backlog = queued * mean / len(self.workers)
            if backlog < GROW_BACKLOG_SECONDS:
                return
        want = min(self.max_workers, have + math.ceil(queued / batch_size(mean)))
        if want > have:
            self.starting += want - have
            actions.append(StartWorker(want - have))

    # ------------------------------------------------------------------ outcomes

    def _settle(self, call: Call, outcome: Done | BaseException, actions: list[Action]) -> None:
        """Give a call its outcome: the one place that does, so it happens once."""
        if call.worker is not None and call.options.timeout_seconds is not None:
            actions.append(CancelTimer(call))  # settled in flight (timed out, not sent)
        call.worker = None
        if call.settled:  # a second outcome: counted (it must never happen), not delivered
            self.duplicate_total += 1
            actions.append(
                Note(True, f"second outcome for call {call.call_id} of {call.name} dropped")
            )
            return
        call.settled = True
        if call.cancelled:  # by its caller: nobody waits for it
            return
        if not isinstance(outcome, Done | Exception):
            # SystemExit and friends must not escape into the caller's event loop
            outcome = FunctionError(
                f"remote function raised {type(outcome).__name__}: {outcome}",
                type_name=type(outcome).__name__,
            )
        actions.append(Settle(call, outcome))

    def _retry_or_fail(self, call: Call, detail: str, actions: list[Action]) -> None:
        if call.done:
            return
        if call.attempts <= call.options.retries:
            self.retried_total += 1
            actions.append(Note(False, f"retrying call {call.call_id} of {call.name}: {detail}"))
            self.queue.appendleft(call)
            actions += self._schedule()
        else:
            self._settle(
                call,
                WorkerLostError(
                    f"call {call.call_id} of {call.name}() failed: {detail}; gave up after "
                    f"{call.attempts} "
                    f"attempt(s) (retries={call.options.retries})"
                ),
                actions,
            )

    # ------------------------------------------------------------------ losing workers

    def _drop(self, worker: Worker, actions: list[Action], *, stop: bool = True) -> list[Call]:
        """Take a worker out of the pool; returns the calls it had in flight. A worker
        cut off or frozen is not dead: a reply from it may still come, and is late."""
        if not worker.alive:
            return []
        worker.alive = False
        self.workers.remove(worker)
        del self._by_id[worker.worker_id]
        worker.batches.clear()
        calls = list(worker.inflight.values())
        worker.inflight.clear()
        for call in calls:
            call.worker = None
            if call.options.timeout_seconds is not None:
                actions.append(CancelTimer(call))
        if stop:
            actions.append(StopWorker(worker.worker_id))
        return calls

    def _worker_lost(
        self, worker: Worker, detail: str, culprit: int, actions: list[Action]
    ) -> None:
        """The worker died. The call it was running (``culprit``, from the worker's
        own note; or the only call in flight) is charged an attempt; the others run
        again uncharged. When several were in flight and none is known to have been
        running, none is charged, and each runs again alone, as a suspect."""
        if worker.alive:
            self.lost_total += 1
        calls = self._drop(worker, actions)
        running = [c for c in calls if c.call_id == culprit] if culprit else []
        if calls and calls[0].options.max_concurrency > 1:
            # An actor's worker running calls at once (the note names one at most):
            # each may have been running, on the state that died with it. None runs
            # again on a fresh instance unasked: all are lost (the handle decides).
            for call in calls:
                self._retry_or_fail(call, detail, actions)
        elif running:
            for call in reversed(calls):
                if call is not running[0] and not call.done:
                    call.attempts -= 1
                    self.retried_total += 1
                    self.queue.appendleft(call)
            self._retry_or_fail(running[0], detail, actions)
        elif len(calls) == 1:
            self._retry_or_fail(calls[0], detail, actions)
        else:
            for call in reversed(calls):
                if not call.done:
                    call.attempts -= 1
                    call.suspect = True
                    self.retried_total += 1
                    self.queue.appendleft(call)
        actions += self._schedule()

    def _kill_worker_for(self, victim: Call, worker: Worker, actions: list[Action]) -> None:
        """Stop ``victim``'s run by killing its worker; the other calls it held run again
        elsewhere without being charged an attempt."""
        for call in self._drop(worker, actions):
            if call is not victim and not call.done:
                call.attempts -= 1
                self.queue.appendleft(call)
        actions += self._schedule()
