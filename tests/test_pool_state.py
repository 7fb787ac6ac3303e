"""PoolState, the function pool's pure state machine: no cluster, no event loop, no
clock. Workers are plain ids (w1, w2, ...), calls are numbered by the test, and a
worker's reply is a list of (CallOutcome, payload, buffers) as the shell parses it."""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviato import _pool_state
from aviato._buffers import Frames
from aviato._function import FunctionOptions, rebuild_error
from aviato._pool_state import (
    MAX_BATCH,
    Action,
    Call,
    CancelTimer,
    Dispatch,
    Done,
    Forget,
    Outcome,
    PoolState,
    Send,
    Settle,
    SizePool,
    StartTimer,
    StartWorker,
    StopWorker,
)
from aviato.exceptions import SandboxError, SandboxTimeoutError, WorkerLostError
from aviato.protocol import CallOutcome, Payload

FAST = 0.0001  # a function this fast is batched: 100 calls to a batch


def decode(call: Call, blob: Payload, buffers: Sequence[Payload]) -> Any:
    return pickle.loads(blob)


def make_state(max_workers: int | None = 4) -> PoolState:
    return PoolState(max_workers, decode, rebuild_error)


def call(n: int, digest: str = "f", size: int = 0, **options: Any) -> Call:
    return Call(n, digest, f"fn_{digest}", FunctionOptions(**options), b"x" * size)


def passed(state: PoolState, actions: list[Action]) -> list[Action]:
    """``actions``, and those of the dispatch pass they ask for (as the shell runs it
    in the next loop step)."""
    if any(isinstance(a, Dispatch) for a in actions):
        actions = actions + state.dispatch()
    return actions


def started(state: PoolState, *ids: str) -> list[Action]:
    """Workers up (their starts were asked for), and the dispatch pass after."""
    actions: list[Action] = []
    for worker_id in ids:
        state.starting += 1
        actions += state.worker_started(worker_id)
    return passed(state, actions)


def submit(state: PoolState, *calls: Call) -> list[Action]:
    """Submit in one loop step, then the dispatch pass."""
    actions: list[Action] = []
    for c in calls:
        actions += state.submit(c)
    return passed(state, actions)


def queued_then_started(state: PoolState, calls: Sequence[Call], *ids: str) -> list[Action]:
    """Calls submitted with no worker idle, then workers up: one dispatch pass."""
    actions: list[Action] = []
    for c in calls:
        actions += state.submit(c)
    for worker_id in ids:
        state.starting += 1
        actions += state.worker_started(worker_id)
    return passed(state, actions)


def sends(actions: Iterable[Action]) -> list[tuple[str, list[int]]]:
    """(worker id, call ids) of every batch sent."""
    return [(a.worker_id, [c.call_id for c in a.calls]) for a in actions if isinstance(a, Send)]


def batch_of(actions: Iterable[Action], worker_id: str) -> int:
    [batch] = [a.batch for a in actions if isinstance(a, Send) and a.worker_id == worker_id]
    return batch


def settled(actions: Iterable[Action]) -> dict[int, Done | Exception]:
    out: dict[int, Done | Exception] = {}
    for a in actions:
        if isinstance(a, Settle):
            assert a.call.call_id not in out, "settled twice in one event"
            out[a.call.call_id] = a.outcome
    return out


def stopped(actions: Iterable[Action]) -> list[str]:
    return [a.worker_id for a in actions if isinstance(a, StopWorker)]


def ok(call_id: int, value: Any = None, seconds: float = FAST) -> Outcome:
    return (CallOutcome(call_id, "ok", seconds), pickle.dumps(value), [])


def error(call_id: int, type_name: str = "ValueError") -> Outcome:
    record = {"type": f"builtins.{type_name}", "message": "bad", "traceback": ""}
    return (CallOutcome(call_id, "error", FAST), pickle.dumps(record), [])


def crashed(call_id: int) -> Outcome:
    return (CallOutcome(call_id, "crashed", 0.0, "the worker died (signal 9)"), b"", [])


def lost(call_id: int) -> Outcome:
    return (CallOutcome(call_id, "lost", 0.0, "the worker died (signal 9)"), b"", [])


def warm(state: PoolState, digest: str = "f", seconds: float = FAST) -> None:
    """The pool has seen the function run: ``seconds`` a call."""
    state.mean_seconds[digest] = seconds


# --------------------------------------------------------------------------- dispatch


def test_a_lone_call_goes_at_once_to_an_idle_worker() -> None:
    state = make_state()
    started(state, "w1")
    state.dispatch()
    actions = state.submit(call(1))
    assert sends(actions) == [("w1", [1])]
    [send] = [a for a in actions if isinstance(a, Send)]
    assert send.ship == [True]  # the worker has not had the function yet
    b = send.batch
    actions = state.outcomes("w1", b, [ok(1, "one")])
    assert settled(actions) == {1: Done("one", "w1", 1, FAST)}
    assert Forget(b) in actions  # every call of the batch has its outcome
    actions = passed(state, actions)  # the pass the reply asked for
    assert sends(state.submit(call(2))) == [("w1", [2])]
    assert sends(state.submit(call(3))) == []  # busy: queued


def test_the_function_is_shipped_once_per_worker_and_again_after_a_failed_send() -> None:
    state = make_state()
    started(state, "w1")
    state.dispatch()
    [send] = [a for a in state.submit(call(1)) if isinstance(a, Send)]
    assert send.ship == [True]
    # The send was refused (too large): nothing reached the worker, the call fails.
    actions = state.send_failed(send, SandboxError("too big"))
    assert isinstance(settled(actions)[1], SandboxError)
    [send] = [a for a in state.submit(call(2)) if isinstance(a, Send)]
    assert send.ship == [True]  # so the next call ships the function again
    passed(state, state.outcomes("w1", send.batch, [ok(2)]))
    [send] = [a for a in state.submit(call(3)) if isinstance(a, Send)]
    assert send.ship == [False]


def test_slow_calls_go_one_at_a_time_and_grow_the_pool() -> None:
    state = make_state(max_workers=3)
    started(state, "w1")
    actions = submit(state, *(call(n) for n in range(1, 6)))
    assert sends(actions) == [("w1", [1])]  # unknown speed: one at a time
    assert StartWorker(2) in actions  # queued work for more workers, up to the bound
    assert state.starting == 2


def test_batches_are_bounded_by_count() -> None:
    state = make_state(max_workers=1)
    started(state, "w1")
    warm(state)  # 100 calls fill a batch
    actions = submit(state, *(call(n) for n in range(1, 252)))
    # The first goes at once, alone; then batches, two in flight to keep the worker
    # busy (with the first, 201 calls in flight); the rest wait.
    assert [len(ids) for _, ids in sends(actions)] == [1, 100, 99]
    assert state.queued() == 51
    assert _pool_state.batch_size(1e-9) == MAX_BATCH
    assert _pool_state.batch_size(None) == _pool_state.batch_size(0.5) == 1


def test_batches_are_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool_state, "BATCH_BYTES", 100)
    state = make_state(max_workers=1)
    started(state, "w1")
    warm(state)
    sizes = [10, 40, 40, 40, 150, 10]
    actions = submit(state, *(call(n, size=size) for n, size in enumerate(sizes, 1)))
    # (The first goes at once, alone.) 40 + 40 fit, a third does not; the 150-byte call
    # is bigger than the budget: alone.
    assert [ids for _, ids in sends(actions)] == [[1], [2, 3], [4], [5], [6]]


def test_a_buffer_shared_by_a_batch_weighs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pool_state, "BATCH_BYTES", 100)
    shared = bytearray(60)
    calls = []
    for n in (1, 2, 3):
        c = call(n)
        c.frames = Frames()
        c.frames.views.append(memoryview(shared))
        c.frames.keys.append(id(shared))
        calls.append(c)
    state = make_state(max_workers=1)
    started(state, "w1")
    warm(state)
    assert sends(submit(state, call(0), *calls)) == [("w1", [0]), ("w1", [1, 2, 3])]


def test_a_cancelled_call_is_not_sent() -> None:
    state = make_state()
    warm(state)
    first, second = call(1), call(2)
    assert sends(submit(state, first, second)) == []  # no worker yet
    assert state.cancel(first) == []  # queued: nothing to stop
    assert state.queued() == 1
    actions = started(state, "w1")
    assert sends(actions) == [("w1", [2])]
    actions = state.outcomes("w1", batch_of(actions, "w1"), [ok(2)])
    assert list(settled(actions)) == [2]  # never one for the cancelled call


def test_cancelling_a_running_call_stops_its_worker_and_reruns_the_others() -> None:
    state = make_state()
    warm(state)
    calls = [call(1), call(2), call(3)]
    b = batch_of(queued_then_started(state, calls, "w1"), "w1")
    actions = state.cancel(calls[1])
    assert stopped(actions) == ["w1"]
    assert settled(actions) == {}  # the cancelled call gets nothing; the others run again
    assert sorted(c.call_id for c in state.queue) == [1, 3]
    assert [c.attempts for c in calls] == [0, 1, 0]  # not charged for the stop
    # The old worker's reply, if it comes, is late: dropped, not delivered.
    actions = state.outcomes("w1", b, [ok(1), ok(2), ok(3)])
    assert settled(actions) == {} and state.late_total == 1
    assert state.cancel(calls[1]) == []  # a second cancel is nothing


# --------------------------------------------------------------------------- failures


def test_a_poison_call_is_charged_alone() -> None:
    """The worker says which call it was running when it died: that one is charged
    an attempt (and fails once out of retries); the others run again uncharged."""
    state = make_state(max_workers=2)
    warm(state)
    calls = [call(1, retries=0), call(2, retries=0), call(3, retries=0)]
    b = batch_of(queued_then_started(state, calls, "w1"), "w1")
    actions = passed(state, state.outcomes("w1", b, [ok(1), crashed(2), lost(3)]))
    results = settled(actions)
    assert isinstance(results[1], Done)
    assert isinstance(results[2], WorkerLostError)
    assert "gave up after 1 attempt(s) (retries=0)" in str(results[2])
    assert 3 not in results and [c.call_id for c in state.queue] == [3]
    assert calls[2].attempts == 0 and not calls[2].suspect
    assert stopped(actions) == ["w1"]
    assert (state.lost_total, state.retried_total) == (1, 1)
    assert StartWorker(1) in actions  # a worker in its place
    b = batch_of(started(state, "w2"), "w2")
    assert isinstance(settled(state.outcomes("w2", b, [ok(3)]))[3], Done)


def test_suspects_rerun_alone() -> None:
    """A worker died with several calls and no word of which was running: none is
    charged, and each runs again alone, so that the next death names its culprit."""
    state = make_state(max_workers=3)
    warm(state)
    calls = [call(n, retries=1) for n in (1, 2, 3)]
    assert sends(queued_then_started(state, calls, "w1")) == [("w1", [1, 2, 3])]
    actions = passed(state, state.worker_lost("w1", "its sandbox exited with code 137"))
    assert settled(actions) == {} and stopped(actions) == ["w1"]
    assert [(c.call_id, c.attempts, c.suspect) for c in state.queue] == [
        (1, 0, True),
        (2, 0, True),
        (3, 0, True),
    ]
    assert state.retried_total == 3
    # A new call is no suspect, but it may not share a suspect's batch either.
    actions = queued_then_started(state, [call(4, retries=1)], "w2", "w3")
    assert sends(actions) == [("w2", [1]), ("w3", [2])]  # alone, on idle workers
    actions = passed(state, state.outcomes("w2", batch_of(actions, "w2"), [ok(1)]))
    assert sends(actions) == [("w2", [3]), ("w2", [4])]  # the last suspect, then the rest
    # A suspect that dies alone is charged: with 2 attempts it is out of retries.
    actions = passed(state, state.worker_lost("w3", "its sandbox exited with code 137"))
    assert sends(actions) == [] and calls[1].attempts == 1 and state.queue[0] is calls[1]
    actions = queued_then_started(state, [], "w4")
    assert sends(actions) == [("w4", [2])]
    actions = state.outcomes("w4", batch_of(actions, "w4"), [crashed(2)])
    assert isinstance(settled(actions)[2], WorkerLostError)


def test_a_suspect_never_shares_a_batch() -> None:
    state = make_state(max_workers=3)
    warm(state, seconds=0.005)  # batches of 2, two in flight a worker
    calls = [call(n) for n in range(1, 7)]
    actions = queued_then_started(state, calls, "w1", "w2")
    assert sends(actions) == [("w1", [1, 2]), ("w1", [3, 4]), ("w2", [5, 6])]
    passed(state, state.worker_lost("w1", "its sandbox exited with code 137"))
    # A call that ran beside a cancelled one runs again first, uncharged, no suspect.
    passed(state, state.cancel(calls[4]))
    assert [(c.call_id, c.suspect) for c in state.queue][:2] == [(6, False), (1, True)]
    actions = queued_then_started(state, [], "w3")
    assert sends(actions) == [("w3", [6])]  # not [6, 1]: a suspect goes alone


def test_retries_are_counted_and_bounded() -> None:
    state = make_state(max_workers=1)
    c = call(1, retries=2)
    for n in range(1, 4):
        actions = queued_then_started(state, [c] if n == 1 else [], f"w{n}")
        assert sends(actions) == [(f"w{n}", [1])]
        actions = passed(state, state.worker_lost(f"w{n}", "its sandbox exited with code 1"))
    [failure] = settled(actions).values()
    assert isinstance(failure, WorkerLostError)
    assert "gave up after 3 attempt(s) (retries=2)" in str(failure)
    assert (state.retried_total, state.lost_total) == (2, 3)


def test_a_user_error_runs_again_only_when_asked() -> None:
    state = make_state(max_workers=1)
    started(state, "w1")
    plain, again = call(1), call(2, retry_on=(ValueError,), retries=1)
    b = batch_of(submit(state, plain), "w1")
    assert isinstance(settled(passed(state, state.outcomes("w1", b, [error(1)])))[1], ValueError)
    b = batch_of(submit(state, again), "w1")
    actions = passed(state, state.outcomes("w1", b, [error(2)]))
    assert settled(actions) == {}  # run again
    actions = state.outcomes("w1", batch_of(actions, "w1"), [error(2)])
    assert isinstance(settled(actions)[2], ValueError) and again.attempts == 2


def test_a_late_reply_is_dropped_and_counted() -> None:
    """A worker cut off (declared dead) answers after all: its calls have run again
    elsewhere and settled, so its reply is counted and dropped, never delivered."""
    state = make_state(max_workers=2)
    started(state, "w1")
    c = call(1)
    b1 = batch_of(submit(state, c), "w1")
    passed(state, state.worker_lost("w1", "its sandbox ended"))
    b2 = batch_of(queued_then_started(state, [], "w2"), "w2")
    assert isinstance(settled(passed(state, state.outcomes("w2", b2, [ok(1, "second")])))[1], Done)
    actions = state.outcomes("w1", b1, [ok(1, "first")])
    assert settled(actions) == {} and actions == [Forget(b1)]
    # The same reply twice on a live worker: the second finds nothing in flight.
    actions = state.submit(call(2))
    b3 = batch_of(actions, "w2")
    assert list(settled(state.outcomes("w2", b3, [ok(2)]))) == [2]
    assert settled(state.outcomes("w2", b3, [ok(2)])) == {}
    assert (state.late_total, state.duplicate_total) == (2, 0)


def test_a_timeout_fails_the_call_and_stops_its_worker() -> None:
    state = make_state(max_workers=2)
    started(state, "w1")
    warm(state)
    slow, other = call(1, timeout_seconds=2.0), call(2, timeout_seconds=2.0)
    actions = submit(state, slow, other)
    assert [a.seconds for a in actions if isinstance(a, StartTimer)] == [2.0, 2.0]
    actions = state.timeout(slow)
    failure = settled(actions)[1]
    assert isinstance(failure, SandboxTimeoutError) and failure.sandbox_id == "w1"
    assert "fn_f() did not finish within 2s" in str(failure)
    assert stopped(actions) == ["w1"]
    assert CancelTimer(other) in actions and other.attempts == 0  # runs again, uncharged
    assert state.timeout(slow) == [] and state.timeout(other) == []  # not running now


def test_no_worker_starts_so_queued_calls_fail() -> None:
    state = make_state(max_workers=None)
    actions = submit(state, call(1), call(2))
    assert actions.count(SizePool()) == 1
    assert state.dispatch() == []  # asked once
    actions = passed(state, state.sized(0))  # no free slot: still one worker
    assert state.max_workers == 1 and StartWorker(1) in actions
    state.max_workers = 2  # a second function of the pool asks for more
    actions = passed(state, state.submit(call(3)))
    assert StartWorker(1) in actions and state.starting == 2
    assert state.start_failed(SandboxError("no image")) == []  # another may still start
    actions = state.start_failed(SandboxError("no image"))
    assert set(settled(actions)) == {1, 2, 3}
    assert all(isinstance(e, SandboxError) for e in settled(actions).values())


def test_close_fails_what_is_left_and_takes_nothing_more() -> None:
    state = make_state(max_workers=2)
    started(state, "w1")
    assert sends(submit(state, call(1), call(2))) == [("w1", [1])]
    actions = state.close()
    assert list(settled(actions)) == [2]  # queued
    actions = state.close_workers()
    assert list(settled(actions)) == [1]  # in flight
    assert "closed before this call ran" in str(settled(actions)[1])
    with pytest.raises(SandboxError, match="closed"):
        state.submit(call(3))
    state.starting += 1
    assert state.worker_started("w2") == [] and state.worker("w2") is None


# --------------------------------------------------------------------------- properties

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["submit"] * 3
            + ["dispatch"] * 3
            + ["start"] * 2
            + ["reply"] * 5
            + ["start_failed", "reply_old", "lost", "refused", "timeout", "cancel"]
            + ["send_failed", "learn_fast"]
        ),
        st.integers(0, 50),
        st.lists(st.sampled_from(["ok", "error", "crashed", "lost"]), max_size=4),
    ),
    min_size=20,
    max_size=80,
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(OPS, st.sampled_from([None, 1, 3]))
def test_every_call_ends_exactly_once(ops: list[tuple[str, int, list[str]]], bound: Any) -> None:
    """Under any interleaving of events, every call ends once: settled once, or
    cancelled by its caller (and then never settled); a call is never in two places;
    no second outcome ever reaches a call."""
    state = make_state(max_workers=bound)
    calls: list[Call] = []
    ended: Counter[int] = Counter()
    cancelled: set[int] = set()
    sent: dict[int, Send] = {}  # by batch
    starts = 0  # asked for by StartWorker, not yet started
    timers: dict[int, Call] = {}  # set by StartTimer, not yet cancelled
    workers = 0
    make: dict[str, Callable[[int], Outcome]] = {
        "ok": ok,
        "error": error,
        "crashed": crashed,
        "lost": lost,
    }

    def apply(actions: list[Action]) -> None:
        nonlocal starts
        for a in actions:
            if isinstance(a, Settle):
                assert a.call.call_id not in cancelled, "settled after its cancel"
                ended[a.call.call_id] += 1
            elif isinstance(a, Send):
                sent[a.batch] = a
            elif isinstance(a, StartWorker):
                starts += a.count
            elif isinstance(a, StartTimer):
                timers[a.call.call_id] = a.call
            elif isinstance(a, CancelTimer):
                timers.pop(a.call.call_id, None)
            elif isinstance(a, SizePool):
                apply(state.sized(2))

    for op, n, statuses in ops:
        if op == "submit":  # in one loop step
            for i in range(n % 5 + 1):
                c = call(
                    len(calls) + 1,
                    digest="fg"[i % 2],
                    retries=n % 3,
                    retry_on=(ValueError,) if n % 2 else (),
                    timeout_seconds=1.0 if n % 4 == 0 else None,
                )
                calls.append(c)
                apply(state.submit(c))
        elif op == "dispatch":
            apply(state.dispatch())
        elif op == "start" or (op == "start_failed" and starts):
            if not starts:
                state.starting += 1  # a start the pool did not ask for (as by a race)
                starts += 1
            starts -= 1
            if op == "start":
                workers += 1
                apply(state.worker_started(f"w{workers}"))
            else:
                apply(state.start_failed(SandboxError("no") if n % 2 else None))
        elif op == "reply":  # to a batch still waited for, its calls in order
            waited = [b for w in state.workers for b in w.batches]
            if waited:
                send = sent[waited[n % len(waited)]]
                outcomes = [
                    make[statuses[i] if i < len(statuses) else "ok"](c.call_id)
                    for i, c in enumerate(send.calls[n % 2 :])
                ]
                apply(state.outcomes(send.worker_id, send.batch, outcomes))
        elif op == "reply_old" and sent:  # any batch's, again, in part, or too late
            send = sent[list(sent)[n % len(sent)]]
            outcomes = [make[s](c.call_id) for s, c in zip(statuses, send.calls, strict=False)]
            apply(state.outcomes(send.worker_id, send.batch, outcomes))
        elif op in ("lost", "refused") and state.workers:
            worker = state.workers[n % len(state.workers)]
            if op == "lost":
                apply(state.worker_lost(worker.worker_id, "gone"))
            elif worker.batches:
                apply(state.refused(worker.worker_id, min(worker.batches), "gone"))
        elif op == "timeout" and timers:
            apply(state.timeout(timers.pop(list(timers)[n % len(timers)])))
        elif op == "cancel" and calls:
            c = calls[n % len(calls)]
            if not c.done:  # what a future allows: cancel once, and not once it is done
                cancelled.add(c.call_id)
            apply(state.cancel(c))
        elif op == "send_failed" and sent:
            send = sent[max(sent)]
            holder = state.worker(send.worker_id)
            if holder is not None and holder.batches.get(send.batch) == {
                c.call_id for c in send.calls
            }:  # only just sent: no reply yet
                apply(state.send_failed(send, SandboxError("too large")))
        elif op == "learn_fast":
            warm(state, "fg"[n % 2], FAST if n % 3 else 0.5)
        # A call is in one place at most: queued, or in flight on one worker.
        inflight = [c for w in state.workers for c in w.inflight.values()]
        assert len(inflight) == len(set(map(id, inflight)))
        assert not {id(c) for c in state.queue if not c.done} & {id(c) for c in inflight}
        assert all(c.worker is w and not c.done for w in state.workers for c in w.inflight.values())
        assert state.duplicate_total == 0
    apply(state.close())
    apply(state.close_workers())
    for c in calls:
        assert ended[c.call_id] + (c.call_id in cancelled) == 1, c
    assert state.queued() == 0 and state.in_flight() == 0


def test_an_actor_running_calls_at_once_keeps_n_on_its_worker_and_loses_them_all() -> None:
    """``max_concurrency`` N: its one worker holds N slow calls at once (and N more
    queued behind them); when it dies, every call it held fails (each may have been
    running on the instance that died), none runs again unasked."""
    state = make_state(max_workers=1)
    calls = [call(n, actor="a", retries=0, max_concurrency=3) for n in range(1, 9)]
    actions = queued_then_started(state, calls, "w1")
    assert [ids for _, ids in sends(actions)] == [[n] for n in range(1, 7)]
    actions = passed(state, state.worker_lost("w1", "its sandbox exited with code 137"))
    failed = settled(actions)
    assert sorted(failed) == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e, WorkerLostError) for e in failed.values())
    assert [c.call_id for c in state.queue if not c.done] == [7, 8]
