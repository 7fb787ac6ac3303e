"""The warm pool behind remote functions: worker sandboxes, a client-side queue, and
dispatch in batches straight to each worker's agent.

Everything here runs on the session's event loop, in plain callbacks: submitting
10,000 calls queues them and schedules one dispatch pass, which sends each worker
at most a bounded batch. Each call's future resolves exactly once; a reply for a
call that was already moved elsewhere (its worker was declared dead) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aviato._buffers import Frames
from aviato._connection import Channel, agent_connection
from aviato._function import (
    Call,
    FunctionOptions,
    FunctionResult,
    RemoteFunction,
    rebuild_error,
)
from aviato._options import SandboxOptions
from aviato._sandbox import Sandbox, scheduler_connection
from aviato._tasks import TaskGroup
from aviato.exceptions import (
    AviatoError,
    ClusterUnavailableError,
    FunctionError,
    FunctionSerializationError,
    SandboxError,
    SandboxTimeoutError,
    WorkerLostError,
)
from aviato.protocol import (
    CallHeader,
    CallResults,
    ClusterStatus,
    ClusterStatusReply,
    Decoded,
    ErrorReply,
    Payload,
    RunCalls,
)

if TYPE_CHECKING:
    from aviato._session import Session

log = logging.getLogger("aviato.pool")

_call_ids = itertools.count(1)
#: Work a batch should hold (seconds of function time): fewer messages for tiny calls.
BATCH_SECONDS = 0.01
MAX_BATCH = 256
#: Bytes a batch should hold at most (arguments and their buffers, each shared buffer
#: counted once); a call larger than this goes alone.
BATCH_BYTES = 64 * 1024 * 1024
#: Grow the pool only when the queue holds more than this much work per worker.
GROW_BACKLOG_SECONDS = 0.5


@dataclass(eq=False, slots=True)
class WorkerHandle:
    sandbox: Sandbox
    conn: Channel
    inflight: dict[int, Call] = field(default_factory=dict)
    requests: dict[int, set[int]] = field(default_factory=dict)  # request id -> call ids
    shipped: set[str] = field(default_factory=set)
    alive: bool = True

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.sandbox_id or "?"


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of a function pool (``fn.statistics()``)."""

    workers: int
    starting: int
    queued: int
    in_flight: int
    workers_started: int
    workers_lost: int
    calls_retried: int
    #: replies that came from a worker after its calls had moved on (dropped, not
    #: delivered twice)
    late_replies_dropped: int = 0
    #: second outcomes for a call the pool had already settled, dropped; each is a
    #: would-be duplicate delivery, so "exactly once delivered" means this stays 0
    duplicate_results: int = 0


def batch_size(fn: RemoteFunction[Any]) -> int:
    """One call at a time for slow or unknown functions; batches for tiny ones."""
    mean = fn.mean_seconds
    if mean is None or mean >= BATCH_SECONDS:
        return 1
    return max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(mean, 1e-6))))


class SharedBuffers:
    """The out-of-band buffers of one batch: one frame for a buffer however many of its
    calls pass it (the same array given to each of 100 calls crosses once)."""

    __slots__ = ("_index", "views")

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self._index: dict[int, int] = {}

    def add(self, frames: Frames) -> tuple[int, ...]:
        """The batch indices of one call's buffers, adding those not there yet."""
        out = []
        for view, key in zip(frames.views, frames.keys, strict=True):
            at = self._index.get(key) if key is not None else None
            if at is None:
                at = len(self.views)
                self.views.append(view)
                if key is not None:
                    self._index[key] = at
            out.append(at)
        return tuple(out)


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


class FunctionPool:
    def __init__(self, session: Session, options: FunctionOptions) -> None:
        self.session = session
        self.options = options
        self.max_workers: int | None = options.max_workers
        self.queue: deque[Call] = deque()
        self.workers: list[WorkerHandle] = []
        self.starting = 0
        self.closed = False
        self._pump_scheduled = False
        self._sizing = False
        #: Its tasks (worker starts and watches, sizing, stops): also its session's.
        self._tasks: TaskGroup | None = None
        self._started_total = 0
        self._lost_total = 0
        self._retried_total = 0
        self._late_total = 0
        self._duplicate_total = 0

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            workers=len(self.workers),
            starting=self.starting,
            queued=sum(1 for c in self.queue if not c.future.done()),
            in_flight=sum(len(w.inflight) for w in self.workers),
            workers_started=self._started_total,
            workers_lost=self._lost_total,
            calls_retried=self._retried_total,
            late_replies_dropped=self._late_total,
            duplicate_results=self._duplicate_total,
        )

    # ------------------------------------------------------------------ submit

    def submit(
        self, fn: RemoteFunction[Any], args_blob: bytes, frames: Frames | None = None
    ) -> asyncio.Future[Any]:
        if self.closed:
            raise SandboxError("the session is closed: call remote functions inside it")
        loop = asyncio.get_running_loop()
        call = Call(next(_call_ids), fn, args_blob, frames or Frames(), loop.create_future())
        call.future.add_done_callback(functools.partial(self._on_done, call))
        self.queue.append(call)
        if len(self.queue) == 1 and not self._pump_scheduled:
            # A lone call (sequential use) goes out now; calls submitted together in
            # one loop step are dispatched as batches by the pass scheduled below.
            idle = next((w for w in self.workers if not w.inflight), None)
            if idle is not None:
                self.queue.popleft()
                self._send(idle, [call])
                return call.future
        self._schedule_pump()
        return call.future

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self.closed:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _task(self, coro: Any) -> None:
        if self._tasks is None:
            self._tasks = self.session._tasks.child("a function pool")
        self._tasks.spawn(coro, on_error=self._task_failed)

    def _task_failed(self, exc: BaseException) -> None:
        """The pool's tasks handle their own errors; one that escapes (a bug) fails the
        queued calls, which no task may now be about to serve, and is raised again when
        the session closes."""
        log.error("function pool task failed", exc_info=exc)
        error = exc if isinstance(exc, Exception) else SandboxError(repr(exc))
        while self.queue:
            self._settle(self.queue.popleft(), error)
        raise exc

    # ------------------------------------------------------------------ dispatch

    def _pump(self) -> None:
        self._pump_scheduled = False
        while self.queue and self.queue[0].future.done():
            self.queue.popleft()
        for worker in list(self.workers):
            if not self.queue:
                break
            self._fill(worker)
        if self.queue:
            self._grow()

    def _fill(self, worker: WorkerHandle) -> None:
        pool_full = self.max_workers is not None and len(self.workers) >= self.max_workers
        while self.queue and worker.alive:
            fn = self.queue[0].fn
            size = batch_size(fn)
            # Two batches in flight keep a worker busy while the next one travels. For
            # slow calls (batch of one) only once the pool cannot grow (a call queued
            # behind another on a busy worker would wait for it instead of a new worker)
            # and never with a timeout (it runs from dispatch, so no queueing there).
            prefetch = size > 1 or (pool_full and fn.options.timeout_seconds is None)
            room = (2 * size if prefetch else 1) - len(worker.inflight)
            if self.queue[0].suspect:
                room = 0 if worker.inflight else 1  # alone on an idle worker
            if room <= 0:
                return
            batch: list[Call] = []
            budget = BatchBytes()
            while self.queue and len(batch) < min(size, room):
                if batch and self.queue[0].suspect:
                    break  # a suspect never shares a batch
                if batch and not budget.fits(self.queue[0]):
                    break  # full by bytes: the rest go in the next batch
                call = self.queue.popleft()
                if not call.future.done():
                    budget.add(call)
                    batch.append(call)
            if batch:
                self._send(worker, batch)

    def _send(self, worker: WorkerHandle, batch: list[Call]) -> None:
        headers: list[CallHeader] = []
        payloads: list[Payload] = []
        shared = SharedBuffers()
        for call in batch:
            shipped = call.fn.shipped()
            ship = shipped.digest not in worker.shipped
            if ship:
                worker.shipped.add(shipped.digest)
                payloads.append(shipped.blob)
            payloads.append(call.args_blob)
            options = call.fn.options
            headers.append(
                CallHeader(
                    call.call_id,
                    shipped.digest,
                    ship,
                    options.serialization,
                    options.max_result_bytes,
                    shared.add(call.frames),
                )
            )
            call.attempts += 1
            call.worker = worker
            worker.inflight[call.call_id] = call
            timeout = call.fn.options.timeout_seconds
            if timeout is not None:
                call.timer = asyncio.get_running_loop().call_later(
                    timeout, self._on_timeout, call, timeout
                )
        payloads.extend(shared.views)
        msg = RunCalls(worker.sandbox_id, tuple(headers), len(shared.views))
        try:
            request_id = worker.conn.send_nowait(
                msg, payloads, functools.partial(self._on_reply, worker)
            )
        except AviatoError as exc:  # too large: fail these calls, keep the worker
            for call in batch:
                worker.inflight.pop(call.call_id, None)
                self._settle(call, exc)
            return
        worker.requests[request_id] = {c.call_id for c in batch}

    # ------------------------------------------------------------------ replies

    def _on_reply(self, worker: WorkerHandle, decoded: Decoded) -> None:
        ids = worker.requests.get(decoded.request_id, set())
        msg = decoded.msg
        if isinstance(msg, ErrorReply):
            # The agent refused the batch (the sandbox is gone): the worker is lost.
            self._worker_lost(worker, msg.message)
            return
        if not isinstance(msg, CallResults):
            return
        blobs = iter(decoded.payloads)
        lost = ""
        culprit = 0
        for outcome in msg.outcomes:
            died = outcome.status in ("lost", "crashed")
            blob = b"" if died else next(blobs)
            buffers = [next(blobs, b"") for _ in range(outcome.buffers)]
            ids.discard(outcome.call_id)
            if died:
                lost = outcome.detail  # handled below, with every call the worker held
                if outcome.status == "crashed":
                    culprit = outcome.call_id
                continue
            call = worker.inflight.pop(outcome.call_id, None)
            if call is None or call.worker is not worker:
                self._late_total += 1
                continue  # moved elsewhere already: a late reply, dropped
            call.worker = None
            if call.timer is not None:
                call.timer.cancel()
            fn = call.fn
            fn.mean_seconds = (
                outcome.seconds
                if fn.mean_seconds is None
                else 0.8 * fn.mean_seconds + 0.2 * outcome.seconds
            )
            if outcome.status == "ok":
                try:
                    value = fn.decode_value(blob, buffers)
                except Exception as exc:
                    self._settle(
                        call,
                        FunctionSerializationError(
                            f"the result of {fn.name}() cannot be unpickled here: {exc}"
                        ),
                    )
                    continue
                self._settle(
                    call, FunctionResult(value, worker.sandbox_id, call.attempts, outcome.seconds)
                )
            else:
                error = rebuild_error(blob)
                retry_on = fn.options.retry_on
                if retry_on and isinstance(error, retry_on) and call.attempts <= fn.options.retries:
                    self.queue.appendleft(call)
                else:
                    self._settle(call, error)
        if not ids:
            worker.requests.pop(decoded.request_id, None)
            worker.conn.forget(decoded.request_id)
        if lost:
            self._worker_lost(worker, lost, culprit)  # a dead worker takes no more calls
        self._schedule_pump()

    def _settle(self, call: Call, outcome: FunctionResult[Any] | BaseException) -> None:
        """Resolve a call's future: the one place that does, so it happens once."""
        call.worker = None
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.settled:  # a second outcome: counted (it must never happen), not delivered
            self._duplicate_total += 1
            log.error("second outcome for call %d of %s dropped", call.call_id, call.fn.name)
            return
        call.settled = True
        if call.future.done():  # cancelled by its caller
            return
        if isinstance(outcome, FunctionResult):
            call.future.set_result(outcome)
        elif isinstance(outcome, Exception):
            call.future.set_exception(outcome)
        else:  # SystemExit and friends must not escape into the event loop
            call.future.set_exception(
                FunctionError(
                    f"remote function raised {type(outcome).__name__}: {outcome}",
                    type_name=type(outcome).__name__,
                )
            )

    def _retry_or_fail(self, call: Call, detail: str) -> None:
        if call.future.done():
            return
        if call.attempts <= call.fn.options.retries:
            self._retried_total += 1
            log.info("retrying call %d of %s: %s", call.call_id, call.fn.name, detail)
            self.queue.appendleft(call)
            self._schedule_pump()
        else:
            self._settle(
                call,
                WorkerLostError(
                    f"{call.fn.name}() failed: {detail}; gave up after {call.attempts} "
                    f"attempt(s) (retries={call.fn.options.retries})"
                ),
            )

    # ------------------------------------------------------------------ losing workers

    def _late_reply(self, conn: Channel, decoded: Decoded) -> None:
        conn.forget(decoded.request_id)
        self._late_total += 1

    def _drop(self, worker: WorkerHandle, *, stop: bool = True) -> list[Call]:
        """Take a worker out of the pool; returns the calls it had in flight."""
        if not worker.alive:
            return []
        worker.alive = False
        if worker in self.workers:
            self.workers.remove(worker)
        for request_id in worker.requests:
            # A worker cut off or frozen is not dead: its reply may still come. It is
            # counted and dropped, never delivered (its calls have moved on).
            worker.conn.redirect(request_id, functools.partial(self._late_reply, worker.conn))
        worker.requests.clear()
        calls = list(worker.inflight.values())
        worker.inflight.clear()
        for call in calls:
            call.worker = None
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
        if stop:
            self._task(self._stop_quietly(worker.sandbox))
        return calls

    def _worker_lost(self, worker: WorkerHandle, detail: str, culprit: int = 0) -> None:
        """The worker died. The call it was running (``culprit``, from the worker's
        own note; or the only call in flight) is charged an attempt; the others run
        again uncharged. When several were in flight and none is known to have been
        running, none is charged, and each runs again alone, as a suspect."""
        if worker.alive:
            self._lost_total += 1
        calls = self._drop(worker)
        running = [c for c in calls if c.call_id == culprit] if culprit else []
        if running:
            for call in reversed(calls):
                if call is not running[0] and not call.future.done():
                    call.attempts -= 1
                    self._retried_total += 1
                    self.queue.appendleft(call)
            self._retry_or_fail(running[0], detail)
        elif len(calls) == 1:
            self._retry_or_fail(calls[0], detail)
        else:
            for call in reversed(calls):
                if not call.future.done():
                    call.attempts -= 1
                    call.suspect = True
                    self._retried_total += 1
                    self.queue.appendleft(call)
        self._schedule_pump()

    def _kill_worker_for(self, victim: Call, worker: WorkerHandle) -> None:
        """Stop ``victim``'s run by killing its worker; the other calls it held run again
        elsewhere without being charged an attempt."""
        for call in self._drop(worker):
            if call is not victim and not call.future.done():
                call.attempts -= 1
                self.queue.appendleft(call)
        self._schedule_pump()

    def _on_timeout(self, call: Call, timeout: float) -> None:
        worker = call.worker
        if call.future.done() or worker is None:
            return
        self._settle(
            call,
            SandboxTimeoutError(
                f"{call.fn.name}() did not finish within {timeout:g}s; its worker "
                f"({worker.sandbox_id}) was stopped and will be replaced",
                sandbox_id=worker.sandbox_id,
            ),
        )
        self._kill_worker_for(call, worker)

    def _on_done(self, call: Call, _future: asyncio.Future[Any]) -> None:
        if call.future.cancelled() and call.worker is not None:
            self._kill_worker_for(call, call.worker)

    @staticmethod
    async def _stop_quietly(sandbox: Sandbox) -> None:
        with contextlib.suppress(AviatoError):
            await sandbox.stop()

    # ------------------------------------------------------------------ growing

    def _grow(self) -> None:
        if self.max_workers is None:
            if not self._sizing:
                self._sizing = True
                self._task(self._size())
            return
        queued = sum(1 for c in self.queue if not c.future.done())
        if not queued:
            return
        fn = self.queue[0].fn
        have = len(self.workers) + self.starting
        if fn.mean_seconds is not None and self.workers:
            backlog = queued * fn.mean_seconds / len(self.workers)
            if backlog < GROW_BACKLOG_SECONDS:
                return
        want = min(self.max_workers, have + math.ceil(queued / batch_size(fn)))
        for _ in range(want - have):
            self.starting += 1
            self._task(self._start_worker())

    async def _size(self) -> None:
        """Default pool bound: what the cluster's free slots allow, at least one."""
        try:
            conn = await scheduler_connection(self.session.defaults, self.session._connections)
            reply = await conn.request(
                ClusterStatus(), timeout=self.session.defaults.request_timeout_seconds
            )
            assert isinstance(reply.msg, ClusterStatusReply)
            free = sum(a.slots - a.used for a in reply.msg.agents if a.alive)
            self.max_workers = max(1, free)
        except AviatoError as exc:
            log.warning("could not size the function pool (%s); using 1 worker", exc)
            self.max_workers = 1
        self._schedule_pump()

    def _worker_sandbox(self) -> Sandbox:
        # The agent replaces command and args with its worker's; it owns that path.
        worker = SandboxOptions(command="python", env={"AVIATO_CLIENT_PYTHON": client_python()})
        return Sandbox(
            _merged=worker.over(self.options.sandbox), _session=self.session, _function_worker=True
        )

    async def _start_worker(self) -> None:
        try:
            sandbox = self._worker_sandbox()
        except AviatoError as exc:  # options the scheduler would refuse
            self.starting -= 1
            self._start_failed(exc)
            return
        try:
            await sandbox.start()
            info = sandbox.info
            assert info is not None and info.agent_address is not None
        except BaseException as exc:
            self.starting -= 1
            if isinstance(exc, asyncio.CancelledError):
                await self._stop_quietly(sandbox)
                raise
            self._start_failed(exc)
            return
        self.starting -= 1
        if self.closed:
            await self._stop_quietly(sandbox)
            return
        conn = agent_connection(info, self.session.defaults, self.session._connections)
        worker = WorkerHandle(sandbox, conn)
        self._started_total += 1
        self.workers.append(worker)
        self._task(self._watch(worker))
        self._schedule_pump()

    def _start_failed(self, exc: BaseException) -> None:
        """No worker could start: with none running, the queued calls cannot run either."""
        log.warning("function worker failed to start: %s", exc)
        if self.workers or self.starting:
            return
        error = exc if isinstance(exc, Exception) else SandboxError(str(exc))
        while self.queue:
            self._settle(self.queue.popleft(), error)

    async def _watch(self, worker: WorkerHandle) -> None:
        """Notice a worker sandbox that ends (killed, OOM, agent lost)."""
        detail = "its sandbox ended"
        while worker.alive:
            try:
                code = await worker.sandbox.wait()
                detail = f"its sandbox exited with code {code}"
            except ClusterUnavailableError:
                # The scheduler restarting is no news of the worker: ask again (the
                # agent's replies, not this watch, carry most losses anyway).
                await asyncio.sleep(0.5)
                continue
            except AviatoError as exc:
                detail = str(exc)
            break
        if worker.alive and worker.inflight:
            # The agent's own report says which call the worker was running; it is
            # usually here first, but give it a moment (this path cannot tell).
            await asyncio.sleep(1.0)
        if worker.alive:
            self._worker_lost(worker, detail)

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        self.closed = True
        error = SandboxError("the session closed before this call ran")
        while self.queue:
            self._settle(self.queue.popleft(), error)
        if self._tasks is not None:
            await self._tasks.close()
        workers = list(self.workers)
        for worker in workers:
            for call in self._drop(worker, stop=False):
                self._settle(call, error)
        await asyncio.gather(
            *(self._stop_quietly(w.sandbox) for w in workers), return_exceptions=True
        )


def client_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
