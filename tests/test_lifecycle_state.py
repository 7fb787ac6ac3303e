"""The scheduler's lifecycle decisions (scheduler/lifecycle.py), pure: idle timeouts as
deadlines (activity moves them, a tick costs what is due), lifetime extensions, pause
and resume, and where a create from a snapshot goes."""

from __future__ import annotations

import math

import pytest

from aviato.protocol import (
    EndedBy,
    ErrorCode,
    ErrorReply,
    PauseSandbox,
    SandboxReply,
    SandboxStatus,
    snapshot_agent_key,
)
from scheduler.records import SendToAgent
from scheduler.state import SchedulerState
from tests.test_state import make_state, placed, register, replies_to, run, spec, status_of, stops


def _idle(state: SchedulerState, now: float = 0.0, idle: float = 2.0) -> str:
    register(state, "a", slots=4)
    return run(state, "k", now, idle_timeout_seconds=idle)


def test_idle_timeout_stops_a_sandbox_with_no_activity() -> None:
    state = make_state()
    sid = _idle(state)
    assert stops(state.tick(1.9)) == []
    actions = state.tick(2.0)
    assert stops(actions) == [("a", sid)]
    rec = state.sandboxes[sid]
    assert rec.status is SandboxStatus.TERMINATED
    assert rec.ended_by == EndedBy.IDLE_TIMEOUT
    assert "idle timeout of 2s" in rec.reason
    assert state.info(rec).ended_by == "idle_timeout"


def test_activity_moves_the_idle_deadline() -> None:
    state = make_state()
    sid = _idle(state)
    state.activity("a", [sid], 1.5)
    assert stops(state.tick(2.0)) == []  # the old deadline: re-armed at 3.5
    state.activity("a", [sid], 3.0)
    assert stops(state.tick(3.5)) == []
    assert stops(state.tick(4.9)) == []
    assert stops(state.tick(5.0)) == [("a", sid)]


def test_activity_from_another_agent_or_unknown_ids_is_ignored() -> None:
    state = make_state()
    sid = _idle(state)
    register(state, "b", slots=1)
    state.activity("b", [sid, "sb-nope", ""], 1.5)
    assert stops(state.tick(2.0)) == [("a", sid)]


def test_no_idle_timeout_means_none() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k")
    assert stops(state.tick(1e6)) == []
    assert status_of(state, sid) is SandboxStatus.RUNNING


def test_idle_timers_hold_one_entry_per_sandbox() -> None:
    """Activity costs no heap entry: a busy cluster's timers stay one per sandbox."""
    state = make_state()
    register(state, "a", slots=200)
    sids = [run(state, f"k{i}", idle_timeout_seconds=2.0) for i in range(100)]
    for t in range(1, 50):
        state.activity("a", sids, t * 0.5)
        state.tick(t * 0.5)
    assert len(state._idle_timers) <= len(sids)


def test_max_lifetime_says_so() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k", max_lifetime_seconds=10.0)
    assert stops(state.tick(10.0)) == [("a", sid)]
    assert state.sandboxes[sid].ended_by == EndedBy.MAX_LIFETIME
    assert "max lifetime of 10s" in state.sandboxes[sid].reason


def test_stop_and_session_close_say_so() -> None:
    state = make_state()
    register(state, "a", slots=2)
    state.session_keepalive("s", 60.0, 0.0)
    mine = run(state, "k1")
    theirs = run(state, "k2", session_id="s")
    state.request_stop(mine, "stopped by user", 1.0)
    state.session_close("s", "session closed", 1.0)
    assert state.sandboxes[mine].ended_by == EndedBy.STOPPED
    assert state.sandboxes[theirs].ended_by == EndedBy.SESSION


def test_extend_lifetime_pushes_the_deadline() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k", max_lifetime_seconds=10.0)
    reply = state.extend_lifetime(sid, 5.0, 1.0)
    assert isinstance(reply, SandboxReply) and reply.sandbox.deadline == 15.0
    assert stops(state.tick(10.0)) == []
    assert stops(state.tick(15.0)) == [("a", sid)]
    assert "max lifetime of 15s" in state.sandboxes[sid].reason


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf])
def test_extend_lifetime_refuses_bad_seconds(seconds: float) -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k", max_lifetime_seconds=10.0)
    reply = state.extend_lifetime(sid, seconds, 1.0)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_REQUEST
    assert "positive, finite" in reply.message


def test_extend_lifetime_of_an_ended_or_unknown_sandbox() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k", max_lifetime_seconds=10.0)
    state.request_stop(sid, "stopped by user", 1.0)
    reply = state.extend_lifetime(sid, 5.0, 2.0)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_RUNNING
    assert "has ended" in reply.message
    unknown = state.extend_lifetime("sb-12345678", 5.0, 2.0)
    assert isinstance(unknown, ErrorReply) and unknown.code is ErrorCode.NOT_FOUND


def test_extend_lifetime_without_a_max_lifetime_keeps_none() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k")
    reply = state.extend_lifetime(sid, 5.0, 1.0)
    assert isinstance(reply, SandboxReply) and reply.sandbox.deadline is None


def _pause(state: SchedulerState, sid: str, pause: bool, now: float, key: str = "p") -> object:
    actions = state.request_pause(key, sid, pause, now)
    sent = [a for a in actions if isinstance(a, SendToAgent)]
    if not sent:
        [reply] = replies_to(actions, key)
        return reply
    assert sent[0].msg == PauseSandbox(sid, pause)
    [reply] = replies_to(state.pause_done(sid, None, now), key)
    return reply


def test_pause_and_resume_set_the_status_and_hold_the_slot() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    reply = _pause(state, sid, True, 1.0)
    assert isinstance(reply, SandboxReply) and reply.sandbox.status is SandboxStatus.PAUSED
    assert state.free_slots() == 0
    assert placed(state.request_create("k2", spec(), 30.0, 1.0)) == []  # waits for the slot
    reply = _pause(state, sid, False, 2.0)
    assert isinstance(reply, SandboxReply) and reply.sandbox.status is SandboxStatus.RUNNING
    assert state.status(2.0).sandbox_counts["paused"] == 0


def test_a_paused_sandbox_has_no_idle_clock_and_resume_restarts_it() -> None:
    state = make_state()
    sid = _idle(state)
    _pause(state, sid, True, 1.0)
    assert stops(state.tick(100.0)) == []
    assert status_of(state, sid) is SandboxStatus.PAUSED
    _pause(state, sid, False, 100.0)
    assert stops(state.tick(101.9)) == []
    assert stops(state.tick(102.0)) == [("a", sid)]


def test_a_paused_sandbox_still_has_its_max_lifetime() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k", max_lifetime_seconds=10.0)
    _pause(state, sid, True, 1.0)
    assert stops(state.tick(10.0)) == [("a", sid)]
    assert state.sandboxes[sid].ended_by == EndedBy.MAX_LIFETIME


@pytest.mark.parametrize(
    ("first", "second", "code", "words"),
    [
        (True, True, ErrorCode.PAUSED, "already paused"),
        (None, False, ErrorCode.NOT_PAUSED, "is not paused"),
    ],
)
def test_pause_twice_and_resume_a_running_one_are_refused(
    first: bool | None, second: bool, code: ErrorCode, words: str
) -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k")
    if first is not None:
        _pause(state, sid, first, 1.0)
    reply = _pause(state, sid, second, 2.0, key="again")
    assert isinstance(reply, ErrorReply) and reply.code is code and words in reply.message


def test_pause_of_an_ended_unknown_or_starting_sandbox() -> None:
    state = make_state()
    register(state, "a", slots=2)
    sid = run(state, "k")
    state.request_stop(sid, "stopped by user", 1.0)
    ended = _pause(state, sid, True, 2.0)
    assert isinstance(ended, ErrorReply) and ended.code is ErrorCode.NOT_RUNNING
    unknown = _pause(state, "sb-12345678", True, 2.0)
    assert isinstance(unknown, ErrorReply) and unknown.code is ErrorCode.NOT_FOUND
    [(_, starting)] = placed(state.request_create("k2", spec(), 30.0, 2.0))
    early = _pause(state, starting, True, 2.0)
    assert isinstance(early, ErrorReply) and "still starting" in early.message


def test_a_pause_the_agent_refuses_or_never_answers() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k")
    state.request_pause("p", sid, True, 1.0)
    busy = state.request_pause("p2", sid, False, 1.0)
    [refused] = replies_to(busy, "p2")
    assert "under way" in refused.message
    why = ErrorReply(ErrorCode.UNSUPPORTED, "the local runtime cannot pause")
    [reply] = replies_to(state.pause_done(sid, why, 1.5), "p")
    assert reply is why and status_of(state, sid) is SandboxStatus.RUNNING
    state.request_pause("p3", sid, True, 2.0)
    [late] = replies_to(state.tick(30.0), "p3")  # the agent died: answered anyway
    assert isinstance(late, ErrorReply) and late.code is ErrorCode.UNAVAILABLE


def test_a_paused_sandbox_that_vanishes_from_its_agent_ends() -> None:
    state = make_state()
    register(state, "a")
    sid = run(state, "k")
    _pause(state, sid, True, 1.0)
    state.heartbeat("a", [], 2.0)
    assert status_of(state, sid) is SandboxStatus.COMPLETED


def test_a_create_from_a_snapshot_goes_to_the_agent_holding_it() -> None:
    state = make_state()
    register(state, "a", slots=1)
    register(state, "b", slots=9)
    image = f"aviato-snapshot:{snapshot_agent_key('a')}-sb-00000001-1"
    [(agent, _)] = placed(state.request_create("k", spec(image=image), 30.0, 0.0))
    assert agent == "a"  # though b has more room
    assert placed(state.request_create("k2", spec(image=image), 30.0, 0.0)) == []  # a full


def test_a_create_from_a_snapshot_of_a_gone_agent_is_refused() -> None:
    state = make_state()
    register(state, "a")
    for image in (
        f"aviato-snapshot:{snapshot_agent_key('gone')}-sb-00000001-1",
        "aviato-snapshot:nonsense",
    ):
        [reply] = replies_to(state.request_create("k", spec(image=image), 30.0, 0.0), "k")
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.FAILED
        assert "lives on the agent that took it" in reply.message
