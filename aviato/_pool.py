"""The warm pool behind remote functions: worker sandboxes, a client-side queue, and
dispatch in batches straight to each worker's agent.

The decisions (batching, retries, which call a dead worker is charged for, late and
second outcomes) are ``_pool_state.PoolState``'s; this shell carries out the actions it
returns: sends, futures, timers and worker sandboxes. Everything here runs on the
session's event loop, in plain callbacks: submitting 10,000 calls queues them and
schedules one dispatch pass, which sends each worker at most a bounded batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aviato._buffers import Frames
from aviato._connection import Channel, agent_connection
from aviato._function import (
    FunctionOptions,
    FunctionResult,
    RemoteFunction,
    decode_value,
    rebuild_error,
)
from aviato._options import SandboxOptions
from aviato._pool_state import (
    DIED,
    Action,
    Call,
    CancelTimer,
    Dispatch,
    Done,
    Forget,
    Note,
    Outcome,
    PoolState,
    Send,
    Settle,
    SizePool,
    StartTimer,
    StartWorker,
    StopWorker,
    Worker,
)
from aviato._resources import room_for
from aviato._sandbox import Sandbox, scheduler_connection
from aviato._tasks import TaskGroup
from aviato.exceptions import AviatoError, ClusterUnavailableError, SandboxError
from aviato.protocol import (
    CallHeader,
    CallResults,
    ClusterStatus,
    ClusterStatusReply,
    Decoded,
    ErrorReply,
    Payload,
    PoolFigures,
    RunCalls,
)

__all__ = [
    "CallFuture",
    "FunctionPool",
    "PoolStatistics",
    "SharedBuffers",
    "WorkerHandle",
    "client_python",
]


if TYPE_CHECKING:
    from aviato._session import Session

log = logging.getLogger("aviato.pool")

_call_ids = itertools.count(1)


@dataclass(eq=False, slots=True)
class WorkerHandle:
    """A worker sandbox, the channel to its agent, and its record in the state."""

    sandbox: Sandbox
    conn: Channel
    record: Worker
    #: The request its output comes on (``WatchOutput``), if it is forwarded.
    watch: int | None = None
    #: The request its actor calls come on (``WatchActorCalls``), once the session
    #: has actors (aviato/_actor_relay.py).
    relay: int | None = None

    @property
    def sandbox_id(self) -> str:
        return self.record.worker_id

    @property
    def inflight(self) -> dict[int, Call]:
        return self.record.inflight

    @property
    def alive(self) -> bool:
        return self.record.alive


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


#: Functions per pool, and characters of a name, a keepalive reports (bounded).
MAX_NAMES = 16
NAME_CHARS = 120
#: Round trips kept per function for its percentiles (as many as run times).
ROUND_TRIPS = 512


def _at(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted samples (nearest rank; 0 with none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


class CallFuture(asyncio.Future[FunctionResult[Any]]):
    """A call's future, whose cancel reaches the pool at once: a queued call is then
    never sent, and a running one's worker is stopped."""

    # Set after asyncio's own __init__ (a Python one here would cost every call).
    pool: FunctionPool
    call: Call
    #: When it was submitted (``time.perf_counter``): its round trip, at settle.
    submitted: float

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        self.pool._cancelled(self.call)
        return True


def _decode(call: Call, blob: Payload, buffers: Sequence[Payload]) -> Any:
    if call.raw:  # for a worker to open (aviato/_actor_relay.py)
        return bytes(blob), [bytes(b) for b in buffers]
    return decode_value(call.options.serialization, blob, buffers)


class FunctionPool:
    def __init__(self, session: Session, options: FunctionOptions) -> None:
        self.session = session
        self.options = options
        self.state = PoolState(options.max_workers, _decode, rebuild_error)
        self._handles: dict[str, WorkerHandle] = {}  # live workers, by sandbox id
        self._futures: dict[int, CallFuture] = {}  # by call id, until settled
        self._timers: dict[int, asyncio.TimerHandle] = {}  # by call id
        self._requests: dict[int, tuple[Channel, int]] = {}  # batch -> its request
        self._functions: dict[str, bytes] = {}  # digest -> the pickled function
        #: Recent round trips (seconds, submit to outcome) per function name, for at
        #: most MAX_NAMES names: what ``figures`` reports besides the run time.
        self._round_trips: dict[str, deque[float]] = {}
        #: Its tasks (worker starts and watches, sizing, stops): also its session's.
        self._tasks: TaskGroup | None = None
        self._carry_out = self._actions()

    @property
    def max_workers(self) -> int | None:
        return self.state.max_workers

    @max_workers.setter
    def max_workers(self, value: int | None) -> None:
        self.state.max_workers = value

    @property
    def closed(self) -> bool:
        return self.state.closed

    @property
    def workers(self) -> list[WorkerHandle]:
        return [self._handles[w.worker_id] for w in self.state.workers]

    def statistics(self) -> PoolStatistics:
        state = self.state
        return PoolStatistics(
            workers=len(state.workers),
            starting=state.starting,
            queued=state.queued(),
            in_flight=state.in_flight(),
            workers_started=state.started_total,
            workers_lost=state.lost_total,
            calls_retried=state.retried_total,
            late_replies_dropped=state.late_total,
            duplicate_results=state.duplicate_total,
        )

    def figures(self) -> list[PoolFigures]:
        """Each function this pool ran, for the scheduler's dashboard (its rate is the
        session's to work out, between two keepalives)."""
        state = self.state
        out = []
        for name, tally in list(state.by_name.items())[:MAX_NAMES]:
            recent = sorted(tally.recent)
            trips = sorted(self._round_trips.get(name, ()))
            out.append(
                PoolFigures(
                    name=name[:NAME_CHARS],
                    workers=len(state.workers),
                    queued=state.queued(),
                    in_flight=state.in_flight(),
                    calls=tally.calls,
                    run_p50_ms=_at(recent, 0.50) * 1e3,
                    run_p99_ms=_at(recent, 0.99) * 1e3,
                    retries=state.retried_total,
                    workers_lost=state.lost_total,
                    round_trip_p50_ms=_at(trips, 0.50) * 1e3,
                    round_trip_p99_ms=_at(trips, 0.99) * 1e3,
                )
            )
        return out

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        fn: RemoteFunction[Any],
        args_blob: bytes,
        frames: Frames | None = None,
        before: Callable[[int], object] | None = None,
        *,
        raw: bool = False,
    ) -> asyncio.Future[FunctionResult[Any]]:
        """Queue a call; ``before`` gets its id first (it may be sent at once). ``raw``:
        its value is ``(pickle, buffers)`` unopened, its error a ``RelayedError``."""
        if self.state.closed:
            raise SandboxError("the session is closed: call remote functions inside it")
        shipped = fn.shipped()
        if shipped.digest not in self._functions:
            self._functions[shipped.digest] = shipped.blob
        call = Call(
            next(_call_ids), shipped.digest, shipped.name, fn.options, args_blob, frames or Frames()
        )
        call.raw = raw
        future = CallFuture(loop=asyncio.get_running_loop())
        future.pool = self
        future.call = call
        future.submitted = time.perf_counter()
        self._futures[call.call_id] = future
        if before is not None:
            before(call.call_id)
        self._run(self.state.submit(call))
        return future

    # ------------------------------------------------------------------ actions

    def _run(self, actions: list[Action]) -> None:
        """Carry out what the state decided, in order."""
        for action in actions:
            self._carry_out[type(action)](action)

    def _actions(self) -> dict[type, Callable[[Any], object]]:
        loop = asyncio.get_running_loop
        return {
            Settle: self._settle,
            Send: lambda a: self._send(a),  # looked up per send: tests wrap it
            Dispatch: lambda _: loop().call_soon(self._dispatch),
            Forget: self._forget,
            StartTimer: self._start_timer,
            CancelTimer: self._cancel_timer,
            StopWorker: self._stop_worker,
            StartWorker: self._start_workers,
            SizePool: lambda _: self._task(self._size()),
            Note: lambda a: (log.error if a.error else log.info)("%s", a.text),
        }

    def _start_workers(self, action: StartWorker) -> None:
        for _ in range(action.count):
            self._task(self._start_worker())

    def _forget(self, action: Forget) -> None:
        request = self._requests.pop(action.batch, None)
        if request is not None:
            request[0].forget(request[1])

    def _start_timer(self, action: StartTimer) -> None:
        self._timers[action.call.call_id] = asyncio.get_running_loop().call_later(
            action.seconds, self._timed_out, action.call
        )

    def _cancel_timer(self, action: CancelTimer) -> None:
        timer = self._timers.pop(action.call.call_id, None)
        if timer is not None:
            timer.cancel()

    def _stop_worker(self, action: StopWorker) -> None:
        handle = self._handles.pop(action.worker_id, None)
        if handle is not None:
            self._task(self._stop_quietly(handle.sandbox, handle))

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
        self._run(self.state.fail_queued(error))
        raise exc

    def _settle(self, action: Settle) -> None:
        future = self._futures.pop(action.call.call_id, None)
        if future is None or future.done():
            return
        outcome = action.outcome
        name = action.call.name
        trips = self._round_trips.get(name)
        if trips is None and len(self._round_trips) < MAX_NAMES:
            trips = self._round_trips[name] = deque(maxlen=ROUND_TRIPS)
        if trips is not None:
            trips.append(time.perf_counter() - future.submitted)
        if isinstance(outcome, Done):
            future.set_result(
                FunctionResult(outcome.value, outcome.worker_id, outcome.attempts, outcome.seconds)
            )
        else:
            future.set_exception(outcome)

    def _dispatch(self) -> None:
        self._run(self.state.dispatch())

    def _send(self, send: Send) -> None:
        handle = self._handles[send.worker_id]
        headers: list[CallHeader] = []
        payloads: list[Payload] = []
        shared = SharedBuffers()
        for call, ship in zip(send.calls, send.ship, strict=True):
            if ship:
                payloads.append(self._functions[call.digest])
            payloads.append(call.args_blob)
            options = call.options
            headers.append(
                CallHeader(
                    call.call_id,
                    call.digest,
                    ship,
                    options.serialization,
                    options.max_result_bytes,
                    shared.add(call.frames),
                )
            )
        payloads.extend(shared.views)
        objects = self.session._objects  # refs in arguments, fn.ref results
        extra = (
            ((), ())
            if objects is None or not objects.calls
            else objects.for_batch(send.calls, handle.sandbox.info)
        )
        msg = RunCalls(handle.sandbox_id, tuple(headers), len(shared.views), *extra)
        try:
            request_id = handle.conn.send_nowait(
                msg, payloads, functools.partial(self._on_reply, send.worker_id, send.batch)
            )
        except AviatoError as exc:  # too large: fail these calls, keep the worker
            self._run(self.state.send_failed(send, exc))
            return
        self._requests[send.batch] = (handle.conn, request_id)

    # ------------------------------------------------------------------ events

    def _on_reply(self, worker_id: str, batch: int, decoded: Decoded) -> None:
        msg = decoded.msg
        if isinstance(msg, ErrorReply):
            # The agent refused the batch (the sandbox is gone): the worker is lost.
            self._run(self.state.refused(worker_id, batch, msg.message))
            return
        outcomes: list[Outcome] = []
        if isinstance(msg, CallResults):
            blobs = iter(decoded.payloads)
            for outcome in msg.outcomes:
                # A result or an error has a payload, then its buffers; a death none.
                blob = b"" if outcome.status in DIED else next(blobs)
                buffers = [next(blobs, b"") for _ in range(outcome.buffers)]
                outcomes.append((outcome, blob, buffers))
        self._run(self.state.outcomes(worker_id, batch, outcomes))

    def _timed_out(self, call: Call) -> None:
        self._timers.pop(call.call_id, None)
        self._run(self.state.timeout(call))

    def _cancelled(self, call: Call) -> None:
        self._futures.pop(call.call_id, None)
        self._run(self.state.cancel(call))

    @staticmethod
    async def _stop_quietly(sandbox: Sandbox, handle: WorkerHandle | None = None) -> None:
        with contextlib.suppress(AviatoError):
            await sandbox.stop()
        if handle is not None and handle.watch is not None:  # its last output is in
            handle.conn.forget(handle.watch)
        if handle is not None and handle.relay is not None:
            handle.conn.forget(handle.relay)

    # ------------------------------------------------------------------ workers

    async def _size(self) -> None:
        """Default pool bound: what the cluster's free slots (and resources, for workers
        that ask for some) allow, at least one."""
        free: int | None = None
        try:
            conn = await scheduler_connection(self.session.defaults, self.session._connections)
            reply = await conn.request(
                ClusterStatus(), timeout=self.session.defaults.request_timeout_seconds
            )
            assert isinstance(reply.msg, ClusterStatusReply)
            free = sum(room_for(a, self.options.sandbox) for a in reply.msg.agents)
        except AviatoError as exc:
            log.warning("could not size the function pool (%s); using 1 worker", exc)
        self._run(self.state.sized(free))

    def _worker_sandbox(self) -> Sandbox:
        # The agent replaces command and args with its worker's; it owns that path.
        env = {"AVIATO_CLIENT_PYTHON": client_python()}
        if self.session.defaults.forward_output:  # agent/supervisor_output.py
            env["AVIATO_FORWARD_OUTPUT"] = "1"
        worker = SandboxOptions(command="python", env=env)
        return Sandbox(
            _merged=worker.over(self.options.sandbox), _session=self.session, _function_worker=True
        )

    async def _start_worker(self) -> None:
        try:
            sandbox = self._worker_sandbox()
        except AviatoError as exc:  # options the scheduler would refuse
            log.warning("function worker failed to start: %s", exc)
            self._run(self.state.start_failed(exc))
            return
        try:
            await sandbox.start()
            info = sandbox.info
            assert info is not None and info.agent_address is not None
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                self._run(self.state.start_failed(None))
                await self._stop_quietly(sandbox)
                raise
            log.warning("function worker failed to start: %s", exc)
            self._run(self.state.start_failed(exc))
            return
        worker_id = sandbox.sandbox_id or "?"
        # The channel first: the state may send to the worker as soon as it has it.
        conn = (
            None
            if self.state.closed
            else agent_connection(info, self.session.defaults, self.session._connections)
        )
        actions = self.state.worker_started(worker_id)
        record = self.state.worker(worker_id)
        if record is None or conn is None:  # the pool closed meanwhile
            await self._stop_quietly(sandbox)
            return
        handle = self._handles[worker_id] = WorkerHandle(sandbox, conn, record)
        if self.session.defaults.forward_output:  # asked before its first calls
            handle.watch = self.session._output().watch(conn, worker_id)
        if self.session._relay is not None:  # actor handles may be passed to it
            self.session._relay.watch(handle)
        self._task(self._watch(handle))
        self._run(actions)

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
            self._run(self.state.worker_lost(worker.sandbox_id, detail))

    # ------------------------------------------------------------------ closing

    async def close(self) -> None:
        self._run(self.state.close())
        if self._tasks is not None:
            await self._tasks.close()
        handles = list(self._handles.values())
        self._run(self.state.close_workers())
        self._handles.clear()
        await asyncio.gather(
            *(self._stop_quietly(w.sandbox, w) for w in handles), return_exceptions=True
        )


def client_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"
