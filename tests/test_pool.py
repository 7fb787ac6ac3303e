"""The function pool's delivery accounting, as a unit (no cluster): a call's outcome
reaches its future once, and a second outcome for a settled call is counted in
``fn.statistics().duplicate_results`` rather than silently dropped. The fault tests
(test_chaos.py, test_functions.py, test_multihost.py) assert that count stays 0."""

from __future__ import annotations

import asyncio
import pickle
from types import SimpleNamespace
from typing import Any

from aviato._function import Call, FunctionOptions, FunctionResult, RemoteFunction
from aviato._pool import FunctionPool, WorkerHandle
from aviato.protocol import CallOutcome, CallResults, Decoded


def _pool_and_call() -> tuple[FunctionPool, Call]:
    session: Any = SimpleNamespace()
    pool = FunctionPool(session, FunctionOptions())
    fn: RemoteFunction[int] = RemoteFunction(lambda: 1, session, FunctionOptions())
    call = Call(1, fn, b"", (), asyncio.get_running_loop().create_future())
    return pool, call


async def test_a_second_outcome_is_counted_and_not_delivered() -> None:
    pool, call = _pool_and_call()
    pool._settle(call, FunctionResult(1, "sb-a", 1, 0.0))
    pool._settle(call, FunctionResult(2, "sb-b", 2, 0.0))
    pool._settle(call, RuntimeError("and a third"))
    assert (await call.future).value == 1
    assert pool.statistics().duplicate_results == 2


async def test_a_callers_cancel_is_not_a_duplicate() -> None:
    pool, call = _pool_and_call()
    call.future.cancel()
    pool._settle(call, FunctionResult(1, "sb-a", 1, 0.0))  # its result, come too late
    assert pool.statistics().duplicate_results == 0


class _Conn:
    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def forget(self, request_id: int) -> None:
        self.forgotten.append(request_id)


async def test_the_same_reply_twice_is_delivered_once() -> None:
    """Through the reply path: a worker's reply repeated (a resend, a bug) finds its
    call no longer in flight: one delivery, the second counted as a late reply."""
    pool, call = _pool_and_call()
    sandbox: Any = SimpleNamespace(sandbox_id="sb-w")
    worker = WorkerHandle(sandbox, _Conn())  # type: ignore[arg-type]
    worker.inflight[call.call_id] = call
    call.worker = worker
    call.attempts = 1
    worker.requests[5] = {call.call_id}
    reply = Decoded(
        CallResults("sb-w", (CallOutcome(call.call_id, "ok", 0.01),)), 5, (pickle.dumps(7),)
    )
    pool._schedule_pump = lambda: None  # type: ignore[method-assign]
    pool._on_reply(worker, reply)
    pool._on_reply(worker, reply)
    assert (await call.future).value == 7
    stats = pool.statistics()
    assert (stats.late_replies_dropped, stats.duplicate_results) == (1, 0)
