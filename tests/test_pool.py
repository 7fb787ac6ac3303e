"""The function pool's shell as a unit (no cluster; the decisions themselves are
tests/test_pool_state.py's): a call's outcome reaches its future once, and a second
outcome for a settled call is counted in ``fn.statistics().duplicate_results`` rather
than silently dropped. The fault tests (test_chaos.py, test_functions.py,
test_multihost.py) assert that count stays 0."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from aviato._function import FunctionOptions, RemoteFunction
from aviato._pool import FunctionPool, WorkerHandle
from aviato._pool_state import Action, Done
from aviato._tasks import TaskGroup
from aviato.protocol import CallOutcome, CallResults, Decoded, RunCalls


class _Conn:
    """A channel that keeps what is sent and forgotten."""

    def __init__(self) -> None:
        self.sent: list[tuple[RunCalls, Callable[[Decoded], None]]] = []
        self.forgotten: list[int] = []

    def send_nowait(self, msg: RunCalls, payloads: Any, handler: Callable[[Decoded], None]) -> int:
        self.sent.append((msg, handler))
        return len(self.sent)

    def forget(self, request_id: int) -> None:
        self.forgotten.append(request_id)


class _Sandbox:
    sandbox_id = "sb-w"
    stopped = False

    async def stop(self) -> None:
        self.stopped = True


async def _pool_with_worker() -> tuple[FunctionPool, _Conn, RemoteFunction[int]]:
    """A pool of one idle worker (its dispatch pass done)."""
    session: Any = SimpleNamespace(_tasks=TaskGroup("a test session"), _objects=None)
    pool = FunctionPool(session, FunctionOptions(max_workers=1))
    pool.state.starting = 1
    actions = pool.state.worker_started("sb-w")
    record = pool.state.worker("sb-w")
    assert record is not None
    conn = _Conn()
    pool._handles["sb-w"] = WorkerHandle(_Sandbox(), conn, record)  # type: ignore[arg-type]
    pool._run(actions)
    await asyncio.sleep(0)
    fn: RemoteFunction[int] = RemoteFunction(lambda: 1, session, FunctionOptions())
    return pool, conn, fn


def _ok(call_id: int, request_id: int, value: Any) -> Decoded:
    return Decoded(
        CallResults("sb-w", (CallOutcome(call_id, "ok", 0.01),)), request_id, (pickle.dumps(value),)
    )


async def test_the_same_reply_twice_is_delivered_once() -> None:
    """Through the reply path: a worker's reply repeated (a resend, a bug) finds its
    call no longer in flight: one delivery, the second counted as a late reply."""
    pool, conn, fn = await _pool_with_worker()
    future = pool.submit(fn, b"")
    [(msg, handler)] = conn.sent  # a lone call to an idle worker goes at once
    [header] = msg.calls
    assert header.ship_function  # the worker has not had the function yet
    reply = _ok(header.call_id, 1, 7)
    handler(reply)
    handler(reply)
    assert (await future).value == 7
    stats = pool.statistics()
    assert (stats.late_replies_dropped, stats.duplicate_results) == (1, 0)
    assert conn.forgotten[0] == 1  # no more replies wanted once every call has one


async def test_a_second_outcome_is_counted_and_not_delivered() -> None:
    pool, _conn, fn = await _pool_with_worker()
    future = pool.submit(fn, b"")
    [call] = pool.workers[0].inflight.values()
    for outcome in (Done(1, "sb-a", 1, 0.0), Done(2, "sb-b", 2, 0.0), RuntimeError("a third")):
        actions: list[Action] = []
        pool.state._settle(call, outcome, actions)
        pool._run(actions)
    assert (await future).value == 1
    assert pool.statistics().duplicate_results == 2


async def test_a_callers_cancel_stops_the_worker_and_is_not_a_duplicate() -> None:
    pool, conn, fn = await _pool_with_worker()
    future = pool.submit(fn, b"")
    [(msg, handler)] = conn.sent
    handle = pool.workers[0]
    assert future.cancel()
    # At once, not a loop step later: the running call's worker is stopped.
    assert pool.workers == [] and not handle.alive
    handler(_ok(msg.calls[0].call_id, 1, 7))  # its result, come too late
    stats = pool.statistics()
    assert (stats.late_replies_dropped, stats.duplicate_results) == (1, 0)
    assert pool._tasks is not None
    await asyncio.gather(*pool._tasks._tasks)  # the stop, to its end
    assert handle.sandbox.stopped  # type: ignore[attr-defined]
    assert future.cancelled()
