"""SchedulerState, the scheduler's pure state machine: fake clock (plain floats),
deterministic sandbox ids (sb-1, sb-2, ...), reply keys are plain strings."""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviato.protocol import (
    ErrorCode,
    ErrorReply,
    PlaceSandbox,
    RegisterAgent,
    RegisterReply,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    SpareShape,
    StopSandbox,
    spare_key,
)
from scheduler.indexes import BlindSpots, FreeIndex, Timers
from scheduler.records import MAX_SPARE_SHAPES
from scheduler.state import (
    STOP_CONFIRM_SECONDS,
    Action,
    AgentDeclaredDead,
    Config,
    Reply,
    SchedulerState,
    SendToAgent,
    validate_spec,
)

RUNNING = SandboxStatus.RUNNING
CREATING = SandboxStatus.CREATING


def spec(**kw: Any) -> SandboxSpec:
    base: dict[str, Any] = {"image": "python:3.11", "command": "sleep", "args": ("1000",)}
    base.update(kw)
    return SandboxSpec(**base)


def make_state(**config: Any) -> SchedulerState:
    # Agents never go silent unless a test says so (tests do not send heartbeats).
    config.setdefault("dead_after_seconds", 1e9)
    counter = itertools.count(1)
    return SchedulerState(Config(**config), new_id=lambda: f"sb-{next(counter)}")


def register(
    state: SchedulerState,
    agent_id: str,
    slots: int = 1,
    now: float = 0.0,
    *,
    fresh: bool = True,
    sandboxes: Sequence[SandboxInfo] = (),
) -> tuple[RegisterReply, list[Action]]:
    msg = RegisterAgent(
        agent_id=agent_id,
        address=f"tcp://{agent_id}:7000",
        slots=slots,
        runtime="docker",
        fresh=fresh,
        labels={"name": agent_id},
        sandboxes=tuple(sandboxes),
    )
    return state.register_agent(msg, now)


def placed(actions: Iterable[Action]) -> list[tuple[str, str]]:
    """(agent_id, sandbox_id) of every PlaceSandbox sent."""
    return [
        (a.agent_id, a.msg.sandbox.sandbox_id)
        for a in actions
        if isinstance(a, SendToAgent) and isinstance(a.msg, PlaceSandbox)
    ]


def stops(actions: Iterable[Action]) -> list[tuple[str, str]]:
    """(agent_id, sandbox_id) of every StopSandbox sent."""
    return [
        (a.agent_id, a.msg.sandbox_id)
        for a in actions
        if isinstance(a, SendToAgent) and isinstance(a.msg, StopSandbox)
    ]


def replies_to(actions: Iterable[Action], key: object) -> list[Any]:
    return [a.msg for a in actions if isinstance(a, Reply) and a.to == key]


def status_of(state: SchedulerState, sandbox_id: str) -> SandboxStatus:
    return state.sandboxes[sandbox_id].status


def run(state: SchedulerState, key: str, now: float = 0.0, **spec_kw: Any) -> str:
    """Create a sandbox and have its agent start it; returns its id."""
    actions = state.request_create(key, spec(**spec_kw), 30.0, now)
    [(_, sid)] = placed(actions)
    [reply] = replies_to(state.placement_done(sid, None, now), key)
    assert isinstance(reply, SandboxReply)
    return sid


# --------------------------------------------------------------------------- registration


def test_register_agent_reply_and_is_registered() -> None:
    state = make_state(heartbeat_interval=0.7)
    reply, actions = register(state, "a", slots=4)
    assert reply == RegisterReply(heartbeat_interval=0.7, adopt=(), reap=())
    assert actions == []
    assert state.is_registered("a")
    assert not state.is_registered("b")
    assert state.free_slots() == 4


def test_spread_places_on_the_agent_with_most_free_slots_ties_by_id() -> None:
    state = make_state()
    register(state, "a", slots=2)
    register(state, "b", slots=3)
    where = [placed(state.request_create(f"k{i}", spec(), 10.0, 0.0))[0][0] for i in range(5)]
    # b(3) a(2) -> b; a2 b2 tie -> a; a1 b2 -> b; a1 b1 -> a; a0 b1 -> b
    assert where == ["b", "a", "b", "a", "b"]
    assert state.free_slots() == 0


def test_a_create_goes_to_an_agent_holding_a_spare_of_its_shape() -> None:
    """Spread would pick b (more free slots); a holds ready spares of the default shape,
    so creates of that shape go to a while it has them (as far as the scheduler knows:
    each placement counts one as taken until a says otherwise)."""
    state = make_state()
    register(state, "a", slots=4)
    register(state, "b", slots=8)
    state.set_spares("a", 2, (SpareShape("python:3.11", ready=2),))

    def where(key: str, **kw: Any) -> str:
        return placed(state.request_create(key, spec(**kw), 10.0, 0.0))[0][0]

    assert where("k1") == "a"
    assert where("k2", env={"X": "1"}, tags=("t",), session_id="s") == "a"  # identity is free
    assert state.agents["a"].spares == 0
    assert where("k3") == "b"  # a's spares are taken: spread again
    # The agent refilled: its report is the truth again.
    state.set_spares("a", 1, (SpareShape("python:3.11", memory_bytes=1 << 28, ready=1),))
    assert where("k4") == "b"  # the default shape: no spare of it anywhere
    assert where("k5", memory_bytes=1 << 28) == "a"
    # A function worker is never made from a spare; a dead or full agent takes nothing.
    state.set_spares("a", 1, (SpareShape("python:3.11", ready=1),))
    assert where("k6", function_worker=True) == "b"
    state.agents["a"].slots = len(state.agents["a"].active)
    state.agents["b"].slots += 1
    state.set_spares("a", 1, (SpareShape("python:3.11", ready=1),))
    assert where("k7") == "b"
    state.agents["a"].slots += 2
    state.set_spares("a", 1, (SpareShape("python:3.11", ready=1),))
    assert where("k8") == "a"
    state.set_spares("a", 1, (SpareShape("python:3.11", ready=1),))
    state.deregister_agent("a", state.agents["a"].instance, 1.0)
    assert where("k9") == "b"
    # The agent holding the most spares of the shape wins (ties by id).
    register(state, "c", slots=4)
    register(state, "d", slots=4)
    state.set_spares("c", 1, (SpareShape("python:3.11", ready=1),))
    state.set_spares("d", 2, (SpareShape("python:3.11", ready=2),))
    assert [where(f"m{i}") for i in range(3)] == ["d", "c", "d"]
    # Registration carries them too (a restarted agent's report).
    reg = RegisterAgent(
        agent_id="e",
        address="tcp://e:7000",
        slots=2,
        runtime="docker",
        fresh=True,
        spares=1,
        spare_shapes=(SpareShape("python:3.11", cpus=0.5, ready=1),),
    )
    state.register_agent(reg, 2.0)
    assert where("n1", cpus=0.5) == "e"
    # However many shapes an agent reports, it keeps those with the most spares, boundedly.
    many = [SpareShape(f"img:{i}", ready=1 + i % 3) for i in range(1000)]
    state.set_spares("c", 1999, many)
    kept = state.agents["c"].spare_shapes
    assert len(kept) == MAX_SPARE_SHAPES and set(kept.values()) == {3}


def test_the_agent_spare_shape_is_the_one_the_scheduler_matches() -> None:
    """The agent reports agent.spares.Shape; the scheduler matches protocol.spare_key."""
    from agent.spares import Shape
    from aviato.protocol import spare_key

    full = spec(cpus=0.5, memory_bytes=1 << 28, pids_limit=64, network="none", working_dir="/s")
    for s in (spec(), full, spec(env={"A": "1"}, tags=("t",), max_lifetime_seconds=3)):
        assert Shape.of(s).wire(1).key == spare_key(s)
    assert {f.name for f in fields(Shape)} == {f.name for f in fields(SpareShape)} - {"ready"}


def test_place_message_and_creator_reply_once_started() -> None:
    state = make_state()
    register(state, "a", slots=1)
    actions = state.request_create("k", spec(tags=("t",)), 10.0, 5.0)
    [send] = actions
    assert isinstance(send, SendToAgent) and isinstance(send.msg, PlaceSandbox)
    info = send.msg.sandbox
    assert (info.sandbox_id, info.status, info.agent_id) == ("sb-1", CREATING, "a")
    assert info.spec.tags == ("t",)
    assert info.created_at == 5.0
    [reply] = state.placement_done("sb-1", None, 6.0)
    assert isinstance(reply, Reply) and reply.to == "k"
    assert isinstance(reply.msg, SandboxReply)
    got = reply.msg.sandbox
    assert got.status is RUNNING
    assert (got.agent_address, got.runtime) == ("tcp://a:7000", "docker")


def test_placement_done_for_unknown_sandbox_is_ignored() -> None:
    assert make_state().placement_done("sb-404", None, 0.0) == []


# --------------------------------------------------------------------------- queueing


def test_create_queues_when_every_slot_is_taken() -> None:
    state = make_state()
    register(state, "a", slots=1)
    run(state, "k1")
    assert state.request_create("k2", spec(), 10.0, 1.0) == []
    assert len(state.pending) == 1
    assert state.status(1.0).sandbox_counts["queued"] == 1


def test_create_queues_when_there_is_no_agent_and_places_on_registration() -> None:
    state = make_state()
    assert state.request_create("k", spec(), 10.0, 0.0) == []
    _, actions = register(state, "a", slots=1, now=1.0)
    assert placed(actions) == [("a", "sb-1")]


def test_queued_create_placed_when_a_stop_frees_the_slot() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k1")
    state.request_create("k2", spec(), 10.0, 1.0)
    reply, actions = state.request_stop(sid, "done", 2.0)
    assert isinstance(reply, SandboxReply) and reply.sandbox.status is SandboxStatus.TERMINATED
    assert stops(actions) == [("a", sid)]
    assert placed(actions) == [("a", "sb-2")]
    assert state.sandboxes["sb-2"].creator == "k2"
    [started] = replies_to(state.placement_done("sb-2", None, 3.0), "k2")
    assert started.sandbox.sandbox_id == "sb-2"


def test_queued_create_placed_when_a_sandbox_exits() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k1")
    state.request_create("k2", spec(), 10.0, 1.0)
    actions = state.sandbox_exited(sid, 0, "", 2.0)
    assert status_of(state, sid) is SandboxStatus.COMPLETED
    assert state.sandboxes[sid].exit_code == 0
    assert placed(actions) == [("a", "sb-2")]


def test_queue_is_first_in_first_out() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k1")
    state.request_create("k2", spec(), 10.0, 1.0)
    state.request_create("k3", spec(), 10.0, 1.5)
    state.request_stop(sid, "done", 2.0)
    assert state.sandboxes["sb-2"].creator == "k2"
    assert [p.key for p in state.pending] == ["k3"]


def test_queued_create_times_out_in_tick() -> None:
    state = make_state()
    register(state, "a", slots=1)
    run(state, "k1")
    state.request_create("k2", spec(), 5.0, 1.0)
    assert replies_to(state.tick(5.9), "k2") == []
    [err] = replies_to(state.tick(6.0), "k2")
    assert isinstance(err, ErrorReply)
    assert err.code is ErrorCode.TIMEOUT
    assert "no free sandbox slot" in err.message
    assert not state.pending


# --------------------------------------------------------------------------- placement failure


def test_placement_failure_fails_the_sandbox_and_tells_the_creator() -> None:
    state = make_state()
    register(state, "a", slots=1)
    state.request_create("k", spec(image="nope:latest"), 10.0, 0.0)
    error = ErrorReply(ErrorCode.FAILED, "image nope:latest not found", {"image": "nope:latest"})
    actions = state.placement_done("sb-1", error, 1.0)
    [reply] = replies_to(actions, "k")
    assert reply.code is ErrorCode.FAILED
    assert reply.message == "image nope:latest not found"
    assert reply.detail == {"image": "nope:latest", "sandbox_id": "sb-1"}
    assert len(actions) == 1  # exactly one reply, nothing sent to the agent
    rec = state.sandboxes["sb-1"]
    assert rec.status is SandboxStatus.FAILED
    assert rec.reason == "image nope:latest not found"
    assert state.free_slots() == 1


# --------------------------------------------------------------------------- max lifetime


def test_max_lifetime_terminates_at_the_deadline() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k", now=2.0, max_lifetime_seconds=10.0)
    assert state.sandboxes[sid].deadline == 12.0
    assert state.tick(11.9) == []
    actions = state.tick(12.0)
    assert stops(actions) == [("a", sid)]
    rec = state.sandboxes[sid]
    assert rec.status is SandboxStatus.TERMINATED
    assert "max lifetime" in rec.reason
    assert state.free_slots() == 1


# --------------------------------------------------------------------------- sessions


def test_session_lease_expiry_stops_only_that_sessions_sandboxes() -> None:
    state = make_state()
    register(state, "a", slots=3)
    state.session_keepalive("s1", 5.0, 0.0)
    state.session_keepalive("s2", 100.0, 0.0)
    mine = run(state, "k1", session_id="s1")
    other = run(state, "k2", session_id="s2")
    lone = run(state, "k3")
    assert state.tick(4.9) == []
    actions = state.tick(5.0)
    assert stops(actions) == [("a", mine)]
    assert status_of(state, mine) is SandboxStatus.TERMINATED
    assert "lease expired" in state.sandboxes[mine].reason
    assert status_of(state, other) is RUNNING
    assert status_of(state, lone) is RUNNING
    assert set(state.sessions) == {"s2"}


def test_keepalive_renews_the_lease() -> None:
    state = make_state()
    register(state, "a", slots=1)
    state.session_keepalive("s1", 5.0, 0.0)
    sid = run(state, "k", session_id="s1")
    state.session_keepalive("s1", 5.0, 4.0)
    assert state.tick(8.9) == []
    assert status_of(state, sid) is RUNNING
    assert stops(state.tick(9.0)) == [("a", sid)]


def test_session_close_stops_its_sandboxes_and_fails_its_queued_creates() -> None:
    state = make_state()
    register(state, "a", slots=2)
    state.session_keepalive("s1", 60.0, 0.0)
    mine = run(state, "k1", session_id="s1")
    other = run(state, "k2", session_id="s2")
    # q-s2 is ahead of q-s1, so the slot freed by the close goes to q-s2 (see the
    # regression test below for the case where the closed session's create is first).
    state.request_create("q-s2", spec(session_id="s2"), 30.0, 1.0)
    state.request_create("q-s1", spec(session_id="s1"), 30.0, 1.0)
    stopped, actions = state.session_close("s1", "session closed", 2.0)
    assert stopped == [mine]
    assert stops(actions) == [("a", mine)]
    assert status_of(state, mine) is SandboxStatus.TERMINATED
    [err] = replies_to(actions, "q-s1")
    assert err.code is ErrorCode.TERMINATED
    assert status_of(state, other) is RUNNING
    assert "s1" not in state.sessions
    assert placed(actions) == [("a", "sb-3")]
    assert state.sandboxes["sb-3"].spec.session_id == "s2"
    assert not state.pending


def test_session_close_does_not_place_its_own_queued_create() -> None:
    """Regression (scheduler/state.py, session_close): stopping the session's sandboxes frees
    slots, and ``_end`` -> ``_dispatch`` places the session's *own* queued creates
    before the loop that fails them runs. The closed session then gets a new sandbox
    with no lease (it runs until max lifetime, or forever) and the queued creator is
    never told TERMINATED. Same path for lease expiry in tick(). Fix: remove (and fail)
    the session's pending creates *before* ending its sandboxes."""
    state = make_state()
    register(state, "a", slots=1)
    state.session_keepalive("s1", 60.0, 0.0)
    mine = run(state, "k1", session_id="s1")
    state.request_create("q", spec(session_id="s1"), 30.0, 1.0)
    stopped, actions = state.session_close("s1", "session closed", 2.0)
    assert stopped == [mine]
    assert placed(actions) == [], "a closed session's queued create was placed"
    [err] = replies_to(actions, "q")
    assert err.code is ErrorCode.TERMINATED


def test_create_for_a_closed_session_is_refused() -> None:
    """A create sent before an outage can reach a restarted scheduler after its client
    gave up and closed the session: it must not start a sandbox nobody will stop."""
    state = make_state()
    register(state, "a", slots=2)
    state.session_keepalive("s1", 60.0, 0.0)
    state.session_close("s1", "session closed", 1.0)
    actions = state.request_create("late", spec(session_id="s1"), 30.0, 2.0)
    [err] = replies_to(actions, "late")
    assert err.code is ErrorCode.TERMINATED and "s1 is closed" in err.message
    assert placed(actions) == []
    state.session_keepalive("s1", 60.0, 3.0)  # a keepalive late too: no lease again
    assert "s1" not in state.sessions


def test_create_for_an_unheard_of_session_gets_a_lease() -> None:
    """After a scheduler restart, a session's first message may be a create: it gets a
    lease, so its sandboxes are reaped if no client renews it."""
    state = make_state(adopted_lease_seconds=30.0)
    register(state, "a", slots=1)
    sid = run(state, "k", session_id="s9", now=1.0)
    assert state.sessions["s9"] == 31.0
    assert stops(state.tick(31.0)) == [("a", sid)]


def _report(sid: str, session_id: str | None = None) -> SandboxInfo:
    return SandboxInfo(
        sandbox_id=sid,
        spec=spec(session_id=session_id),
        status=RUNNING,
        agent_id="a",
        created_at=0.0,
    )


def test_after_a_restart_stops_and_closes_that_came_first_reap_on_report() -> None:
    """A restarted scheduler hears a client's stop, or its session close, before the
    agent re-registers: what the agent then reports for them is reaped, not adopted."""
    state = make_state()
    state.request_stop("sb-old", "stopped by client", 1.0)
    state.session_close("s1", "session closed", 1.0)
    reply, _ = register(
        state,
        "a",
        slots=4,
        now=2.0,
        fresh=False,
        sandboxes=[_report("sb-old"), _report("sb-x", "s1"), _report("sb-keep", "s2")],
    )
    assert set(reply.reap) == {"sb-old", "sb-x"}
    assert reply.adopt == ("sb-keep",)


def test_client_chosen_ids_let_a_late_create_be_cancelled() -> None:
    """A client that gave up on a create sends a stop for the id it chose; whichever
    order they arrive in, the sandbox never runs."""
    state = make_state()
    # The stop first (the create still on its way): the create is refused.
    state.request_stop("sb-aaaaaaaa", "its creator gave up waiting", 0.0)
    [err] = replies_to(state.request_create("k1", spec(), 30.0, 0.0, "sb-aaaaaaaa"), "k1")
    assert err.code is ErrorCode.TERMINATED
    # The create first, queued for a slot: the stop takes it out of the queue.
    state.request_create("k2", spec(), 30.0, 0.0, "sb-bbbbbbbb")
    _, actions = state.request_stop("sb-bbbbbbbb", "its creator gave up waiting", 1.0)
    [err] = replies_to(actions, "k2")
    assert err.code is ErrorCode.TERMINATED and not state.pending
    assert placed(register(state, "a", slots=1, now=2.0)[1]) == []
    # Placed: the sandbox has the client's id; the same id again is refused.
    assert placed(state.request_create("k3", spec(), 30.0, 3.0, "sb-cccccccc")) == [
        ("a", "sb-cccccccc")
    ]
    [err] = replies_to(state.request_create("k4", spec(), 30.0, 3.0, "sb-cccccccc"), "k4")
    assert err.code is ErrorCode.BAD_REQUEST and "taken" in err.message
    [err] = replies_to(state.request_create("k5", spec(), 30.0, 3.0, "../etc"), "k5")
    assert err.code is ErrorCode.BAD_REQUEST and "sb-<8 to 32 hex" in err.message


def test_session_close_of_unknown_session_is_harmless() -> None:
    stopped, actions = make_state().session_close("nope", "closed", 0.0)
    assert (stopped, actions) == ([], [])


# --------------------------------------------------------------------------- agent death


def test_silent_agent_is_declared_dead_and_its_sandboxes_fail() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", slots=1)
    register(state, "b", slots=1)
    on_a = run(state, "k1")
    on_b = run(state, "k2")
    assert state.sandboxes[on_a].agent_id == "a"
    assert state.wait("w", on_a, 100.0, 0.0) == []
    state.heartbeat("b", [on_b], 2.5)
    assert state.tick(3.0) == []  # exactly dead_after: not yet
    actions = state.tick(3.1)
    assert not state.is_registered("a")
    assert state.is_registered("b")
    rec = state.sandboxes[on_a]
    assert rec.status is SandboxStatus.FAILED
    assert "agent a" in rec.reason
    [woken] = replies_to(actions, "w")
    assert woken.sandbox.status is SandboxStatus.FAILED
    assert stops(actions) == []  # nobody to tell
    assert status_of(state, on_b) is RUNNING
    agents = {a.agent_id: a for a in state.status(3.1).agents}
    assert agents["a"].alive is False and agents["a"].used == 0
    assert agents["b"].alive is True


def test_dead_agent_fails_a_creating_sandbox_to_its_creator() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", slots=1)
    state.request_create("k", spec(), 30.0, 0.0)
    [err] = replies_to(state.tick(4.0), "k")
    assert err.code is ErrorCode.FAILED
    assert err.detail == {"sandbox_id": "sb-1"}


def test_dead_agent_gets_no_placements_and_its_heartbeat_is_ignored() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", slots=2)
    state.tick(4.0)
    assert state.heartbeat("a", [], 4.5) == []
    assert not state.is_registered("a")
    assert state.request_create("k", spec(), 30.0, 5.0) == []
    assert state.free_slots() == 0


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat_ends_a_running_sandbox_missing_from_the_running_list() -> None:
    state = make_state()
    register(state, "a", slots=3)
    kept = run(state, "k1")
    gone = run(state, "k2")
    state.request_create("k3", spec(), 30.0, 0.0)  # sb-3 still CREATING
    state.heartbeat("a", [kept], 1.0)
    assert status_of(state, kept) is RUNNING
    assert status_of(state, gone).is_terminal
    assert status_of(state, "sb-3") is CREATING  # placement reply may still be on its way
    assert state.agents["a"].active == {kept, "sb-3"}


def test_heartbeat_keeps_the_agent_alive() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", slots=1)
    state.heartbeat("a", [], 2.0)
    state.tick(4.0)
    assert state.is_registered("a")


# --------------------------------------------------------------------------- re-registration


def _reported(old: SchedulerState, sid: str) -> SandboxInfo:
    return old.info(old.sandboxes[sid])


def test_scheduler_restart_adopts_reported_sandboxes() -> None:
    old = make_state()
    register(old, "a", slots=2)
    old.session_keepalive("s1", 60.0, 10.0)
    sid = run(old, "k", now=10.0, tags=("x", "y"), session_id="s1", max_lifetime_seconds=100.0)
    info = _reported(old, sid)

    new = make_state(adopted_lease_seconds=30.0)
    reply, _ = register(new, "a", slots=2, now=50.0, fresh=False, sandboxes=[info])
    assert reply.adopt == (sid,)
    assert reply.reap == ()
    [row] = new.list_sandboxes().sandboxes
    assert row.sandbox_id == sid
    assert row.status is RUNNING
    assert row.agent_id == "a"
    assert row.spec.tags == ("x", "y")
    assert row.spec.session_id == "s1"
    assert row.created_at == 10.0
    assert row.deadline == 110.0
    assert new.sessions == {"s1": 80.0}
    assert new.free_slots() == 1
    # the recomputed deadline is enforced
    assert stops(new.tick(110.0)) == [("a", sid)]


def test_fresh_registration_reaps_unknown_sandboxes() -> None:
    old = make_state()
    register(old, "a", slots=1)
    info = _reported(old, run(old, "k"))
    new = make_state()
    reply, _ = register(new, "a", slots=1, fresh=True, sandboxes=[info])
    assert reply.adopt == ()
    assert reply.reap == (info.sandbox_id,)
    assert new.list_sandboxes().sandboxes == ()
    assert new.free_slots() == 1


def test_re_registering_agent_gets_known_terminal_sandbox_reaped() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", slots=1)
    sid = run(state, "k")
    info = _reported(state, sid)
    state.tick(10.0)  # agent a declared dead: sid FAILED
    assert status_of(state, sid) is SandboxStatus.FAILED
    reply, _ = register(state, "a", slots=1, now=11.0, fresh=False, sandboxes=[info])
    assert reply.reap == (sid,)
    assert reply.adopt == ()
    assert status_of(state, sid) is SandboxStatus.FAILED
    assert state.is_registered("a")
    assert state.free_slots() == 1


def test_re_registering_agent_keeps_known_active_sandboxes() -> None:
    state = make_state()
    register(state, "a", slots=2)
    sid = run(state, "k")
    reply, actions = register(
        state, "a", slots=2, now=1.0, fresh=False, sandboxes=[_reported(state, sid)]
    )
    assert reply.adopt == (sid,)
    assert actions == []
    assert status_of(state, sid) is RUNNING


def test_re_registration_reporting_running_completes_a_creating_sandbox() -> None:
    state = make_state()
    register(state, "a", slots=1)
    state.request_create("k", spec(), 30.0, 0.0)
    reported = _reported(state, "sb-1")
    reported = SandboxInfo(**{**_fields(reported), "status": RUNNING})
    reply, actions = register(state, "a", slots=1, now=1.0, fresh=False, sandboxes=[reported])
    assert reply.adopt == ("sb-1",)
    [started] = replies_to(actions, "k")
    assert started.sandbox.status is RUNNING


def test_re_registration_fails_placed_sandboxes_the_agent_no_longer_has() -> None:
    state = make_state()
    register(state, "a", slots=2)
    sid = run(state, "k1")
    state.request_create("k2", spec(), 30.0, 0.0)  # sb-2 CREATING
    register(state, "a", slots=2, now=1.0, fresh=False, sandboxes=[])
    assert status_of(state, sid) is SandboxStatus.FAILED
    assert "agent a restarted" in state.sandboxes[sid].reason
    assert status_of(state, "sb-2") is CREATING  # its placement reply may be in flight
    register(state, "a", slots=2, now=2.0, fresh=True, sandboxes=[])
    assert status_of(state, "sb-2") is SandboxStatus.FAILED


def _fields(info: SandboxInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in SandboxInfo.__dataclass_fields__}


# --------------------------------------------------------------------------- wait


def test_wait_on_an_ended_sandbox_replies_at_once() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    state.sandbox_exited(sid, 3, "", 1.0)
    [reply] = replies_to(state.wait("w", sid, 60.0, 2.0), "w")
    assert reply.sandbox.status is SandboxStatus.COMPLETED
    assert reply.sandbox.exit_code == 3


def test_wait_replies_when_the_sandbox_ends() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    assert state.wait("w", sid, 60.0, 0.0) == []
    [reply] = replies_to(state.sandbox_exited(sid, None, "oom killed", 1.0), "w")
    assert reply.sandbox.status is SandboxStatus.FAILED
    assert reply.sandbox.reason == "oom killed"
    assert state.waiters == {}


def test_wait_replies_with_current_status_at_its_deadline() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    assert state.wait("w", sid, 5.0, 1.0) == []
    assert replies_to(state.tick(5.9), "w") == []
    [reply] = replies_to(state.tick(6.0), "w")
    assert reply.sandbox.status is RUNNING
    assert state.waiters == {}
    assert replies_to(state.tick(7.0), "w") == []  # answered once


def test_wait_with_zero_timeout_replies_at_once() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    [reply] = replies_to(state.wait("w", sid, 0.0, 1.0), "w")
    assert reply.sandbox.status is RUNNING


# --------------------------------------------------------------------------- get / stop


def test_get_stop_and_wait_of_unknown_id_give_not_found() -> None:
    state = make_state()
    for msg in (
        state.get("sb-x"),
        state.request_stop("sb-x", "r", 0.0)[0],
        replies_to(state.wait("w", "sb-x", 5.0, 0.0), "w")[0],
    ):
        assert isinstance(msg, ErrorReply)
        assert msg.code is ErrorCode.NOT_FOUND
        assert msg.detail == {"sandbox_id": "sb-x"}
    assert state.request_stop("sb-x", "r", 0.0)[1] == []


def test_a_stop_of_the_empty_id_blocks_no_create() -> None:
    """Regression (found by the handler fuzz): StopSandbox("") was remembered as "stopped
    before its create arrived", and every later create without an id of its own (""
    lets the scheduler choose) was refused as that sandbox."""
    state = make_state()
    register(state, "a", slots=1)
    reply, actions = state.request_stop("", "hostile", 0.0)
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_FOUND
    assert actions == []
    assert run(state, "k").startswith("sb-")


def test_a_wait_with_a_nan_timeout_is_answered_at_once() -> None:
    """Regression: a NaN deadline never passes, so the waiter was never answered."""
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    [reply] = replies_to(state.wait("w", sid, float("nan"), 0.0), "w")
    assert isinstance(reply, SandboxReply) and reply.sandbox.status is RUNNING


def test_get_returns_the_row() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k", tags=("t",))
    reply = state.get(sid)
    assert isinstance(reply, SandboxReply)
    assert reply.sandbox.sandbox_id == sid and reply.sandbox.spec.tags == ("t",)


def test_stop_is_idempotent() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    _, first = state.request_stop(sid, "first", 1.0)
    assert stops(first) == [("a", sid)]
    reply, second = state.request_stop(sid, "second", 2.0)
    assert second == []
    assert isinstance(reply, SandboxReply)
    assert reply.sandbox.status is SandboxStatus.TERMINATED
    assert reply.sandbox.reason == "first"


def test_stop_of_an_exited_sandbox_keeps_its_status() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    state.sandbox_exited(sid, 0, "", 1.0)
    reply, actions = state.request_stop(sid, "late", 2.0)
    assert actions == []
    assert reply.sandbox.status is SandboxStatus.COMPLETED  # type: ignore[attr-defined]


def test_stop_while_creating_tells_the_creator_and_stops_a_late_start() -> None:
    state = make_state()
    register(state, "a", slots=1)
    state.request_create("k", spec(), 30.0, 0.0)
    _, actions = state.request_stop("sb-1", "changed my mind", 1.0)
    [err] = replies_to(actions, "k")
    assert err.code is ErrorCode.TERMINATED
    assert stops(actions) == [("a", "sb-1")]
    # the agent's success arrives afterwards: it must not linger
    assert stops(state.placement_done("sb-1", None, 2.0)) == [("a", "sb-1")]
    assert status_of(state, "sb-1") is SandboxStatus.TERMINATED


def test_sandbox_exited_twice_or_unknown_is_ignored() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    state.sandbox_exited(sid, 1, "", 1.0)
    assert state.sandbox_exited(sid, 2, "", 2.0) == []
    assert state.sandboxes[sid].exit_code == 1
    assert state.sandbox_exited("sb-x", 0, "", 2.0) == []


def test_agent_that_never_starts_a_sandbox_fails_it_after_the_grace() -> None:
    state = make_state(placement_grace_seconds=10.0, dead_after_seconds=1000.0)
    register(state, "a", slots=1)
    state.request_create("k", spec(), 5.0, 0.0)
    assert state.tick(14.9) == []
    actions = state.tick(15.0)
    [err] = replies_to(actions, "k")
    assert err.code is ErrorCode.FAILED
    assert stops(actions) == [("a", "sb-1")]


# --------------------------------------------------------------------------- list / status


def _three(state: SandboxSpec | None = None) -> tuple[SchedulerState, str, str, str]:
    s = make_state()
    register(s, "a", slots=3)
    xy = run(s, "k1", now=1.0, tags=("x", "y"), session_id="s1")
    x = run(s, "k2", now=2.0, tags=("x",), session_id="s2")
    none = run(s, "k3", now=3.0)
    return s, xy, x, none


def _ids(reply: Any) -> list[str]:
    return [i.sandbox_id for i in reply.sandboxes]


def test_list_filters_by_tags_all_of_which_must_match() -> None:
    state, xy, x, none = _three()
    assert _ids(state.list_sandboxes()) == [xy, x, none]
    assert _ids(state.list_sandboxes(tags=["x"])) == [xy, x]
    assert _ids(state.list_sandboxes(tags=["x", "y"])) == [xy]
    assert _ids(state.list_sandboxes(tags=["y", "z"])) == []


def test_list_filters_by_status_and_session() -> None:
    state, xy, x, none = _three()
    state.request_stop(x, "bye", 4.0)
    assert _ids(state.list_sandboxes(statuses=[SandboxStatus.TERMINATED])) == [x]
    both = [RUNNING, SandboxStatus.TERMINATED]
    assert _ids(state.list_sandboxes(statuses=both)) == [xy, x, none]
    assert _ids(state.list_sandboxes(session_id="s1")) == [xy]
    assert _ids(state.list_sandboxes(tags=["x"], statuses=[RUNNING])) == [xy]
    assert _ids(state.list_sandboxes(session_id="s2", statuses=[RUNNING])) == []


def test_ended_sandboxes_are_forgotten_after_keep_ended_seconds() -> None:
    state = make_state(keep_ended_seconds=100.0)
    register(state, "a", slots=1)
    sid = run(state, "k")
    state.request_stop(sid, "bye", 1.0)
    state.heartbeat("a", [], 100.0)
    state.tick(101.0)
    assert sid in state.sandboxes
    state.heartbeat("a", [], 101.5)
    state.tick(101.5)
    assert sid not in state.sandboxes
    assert isinstance(state.get(sid), ErrorReply)


def test_status_counts() -> None:
    state = make_state()
    register(state, "b", slots=2, now=0.0)
    register(state, "a", slots=1, now=0.0)
    state.session_keepalive("s1", 60.0, 0.0)
    run(state, "k1")  # RUNNING
    state.request_create("k2", spec(), 30.0, 0.0)  # CREATING
    gone = run(state, "k3")
    state.request_stop(gone, "bye", 1.0)  # TERMINATED, frees a slot
    state.request_create("k4", spec(), 30.0, 1.0)  # CREATING on the freed slot
    state.request_create("k5", spec(), 30.0, 1.0)  # queued
    reply = state.status(2.0)
    assert reply.sandbox_counts == {
        "creating": 2,
        "running": 1,
        "paused": 0,
        "completed": 0,
        "failed": 0,
        "terminated": 1,
        "queued": 1,
    }
    assert reply.sessions == 1
    assert [a.agent_id for a in reply.agents] == ["a", "b"]
    assert sum(a.used for a in reply.agents) == 3
    assert all(a.seconds_since_heartbeat == 2.0 for a in reply.agents)
    assert reply.agents[0].labels == {"name": "a"}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"image": ""}, "container_image"),
        ({"image": "   "}, "container_image"),
        ({"command": ""}, "command"),
        ({"command": " \t"}, "command"),
        ({"max_lifetime_seconds": 0.0}, "max_lifetime_seconds"),
        ({"max_lifetime_seconds": -5.0}, "max_lifetime_seconds"),
        ({"memory_bytes": 1024}, "memory_bytes"),
        ({"network": "host"}, "network"),
        # Found by the create fuzz (tests/test_fuzz_sockets.py): NaN passed "<= 0"
        # (a lifetime that never ends); 1e300 CPUs overflowed the runtime (INTERNAL).
        ({"max_lifetime_seconds": float("nan")}, "max_lifetime_seconds"),
        ({"max_lifetime_seconds": float("inf")}, "max_lifetime_seconds"),
        ({"cpus": float("nan")}, "cpus"),
        ({"cpus": 1e300}, "cpus"),
        ({"cpus": 0.0}, "cpus"),
        ({"cpus": -1.0}, "cpus"),
        ({"pids_limit": 0}, "pids_limit"),
        ({"image": "x" * 256}, "at most 255"),
    ],
)
def test_validate_spec_rejects(kw: dict[str, Any], words: str) -> None:
    problem = validate_spec(spec(**kw))
    assert problem is not None and words in problem


@pytest.mark.parametrize("network", [None, "none", "bridge"])
def test_validate_spec_accepts(network: str | None) -> None:
    assert validate_spec(spec(network=network, max_lifetime_seconds=1.0)) is None


def test_invalid_create_is_refused_and_not_queued() -> None:
    state = make_state()
    register(state, "a", slots=1)
    [reply] = state.request_create("k", spec(command=""), 10.0, 0.0)
    assert reply == Reply("k", reply.msg)  # type: ignore[union-attr]
    assert reply.msg.code is ErrorCode.BAD_REQUEST  # type: ignore[union-attr]
    assert not state.pending
    assert state.sandboxes == {}


def test_stop_is_answered_once_the_agent_has_stopped_it() -> None:
    """A stop's reply waits for the agent: once the client hears "stopped", the agent
    has dropped the sandbox, so no handle (made before or after) can exec in it."""
    state = make_state()
    register(state, "a", slots=2)
    sid = run(state, "k")
    reply, actions = state.request_stop(sid, "done", 1.0, key="stopper")
    assert reply is None and stops(actions) == [("a", sid)]
    # a second stop (another handle) waits for the same confirmation
    again, more = state.request_stop(sid, "again", 1.5, key="second")
    assert again is None and stops(more) == []
    answered = state.stop_confirmed(sid)
    [first] = replies_to(answered, "stopper")
    [second] = replies_to(answered, "second")
    assert first.sandbox.status is SandboxStatus.TERMINATED
    assert second.sandbox.status is SandboxStatus.TERMINATED
    # nothing in flight any more: answered at once
    late, _ = state.request_stop(sid, "late", 2.0, key="late")
    assert isinstance(late, SandboxReply)


def test_stop_while_creating_waits_for_the_placement_and_its_stop() -> None:
    state = make_state()
    register(state, "a", slots=1)
    state.request_create("k", spec(), 30.0, 0.0)
    reply, _ = state.request_stop("sb-1", "changed my mind", 1.0, key="stopper")
    assert reply is None
    # the agent confirms the first stop while the create is still under way there
    assert replies_to(state.stop_confirmed("sb-1"), "stopper") == []
    # the create then succeeds: stopped again, and only that confirmation answers
    assert stops(state.placement_done("sb-1", None, 2.0)) == [("a", "sb-1")]
    [done] = replies_to(state.stop_confirmed("sb-1"), "stopper")
    assert done.sandbox.status is SandboxStatus.TERMINATED


def test_stop_waiting_on_a_silent_agent_is_answered_when_it_dies_or_at_a_deadline() -> None:
    state = make_state(dead_after_seconds=2.0)
    register(state, "a", slots=1)
    register(state, "b", slots=1)
    sid_a = run(state, "ka")
    sid_b = run(state, "kb")
    assert {sid_a, sid_b} == {"sb-1", "sb-2"}
    on_a = next(s for s, r in state.sandboxes.items() if r.agent_id == "a")
    on_b = next(s for s, r in state.sandboxes.items() if r.agent_id == "b")
    state.request_stop(on_a, "x", 1.0, key="wa")
    state.request_stop(on_b, "x", 1.0, key="wb")
    state.heartbeat("b", (), 2.5)  # b stays alive, and silent about the stop
    [dead] = replies_to(state.tick(3.5), "wa")  # a missed its heartbeats
    assert dead.sandbox.sandbox_id == on_a
    assert replies_to(state.tick(3.5), "wb") == []
    state.heartbeat("b", (), 20.0)
    [late] = replies_to(state.tick(1.0 + STOP_CONFIRM_SECONDS), "wb")
    assert late.sandbox.sandbox_id == on_b


def test_a_stop_the_agent_could_not_carry_out_fails_for_its_callers() -> None:
    state = make_state()
    register(state, "a", slots=1)
    sid = run(state, "k")
    state.request_stop(sid, "done", 1.0, key="stopper")
    error = ErrorReply(ErrorCode.FAILED, f"could not remove sandbox {sid}: engine down")
    [reply] = replies_to(state.stop_confirmed(sid, error), "stopper")
    assert reply == error


# --------------------------------------------------------------------------- agent ids


def _register_as(
    state: SchedulerState, agent_id: str, address: str, instance: str, now: float, **kw: Any
) -> tuple[RegisterReply | ErrorReply, list[Action]]:
    msg = RegisterAgent(
        agent_id=agent_id,
        address=address,
        slots=1,
        runtime="docker",
        fresh=True,
        instance=instance,
        **kw,
    )
    return state.register_agent(msg, now)


def test_a_second_live_agent_with_a_held_id_is_refused_naming_both_addresses() -> None:
    state = make_state(dead_after_seconds=3.0)
    reply, _ = _register_as(state, "vm", "tcp://10.0.0.1:7000", "one", 0.0)
    assert isinstance(reply, RegisterReply)
    refused, actions = _register_as(state, "vm", "tcp://10.0.0.2:7001", "two", 1.0)
    assert isinstance(refused, ErrorReply) and actions == []
    assert refused.code is ErrorCode.ID_IN_USE
    assert "tcp://10.0.0.1:7000" in refused.message and "tcp://10.0.0.2:7001" in refused.message
    assert state.agents["vm"].address == "tcp://10.0.0.1:7000"  # no silent takeover
    assert state.agents["vm"].instance == "one"


def test_the_same_agent_registers_again_and_a_dead_ones_id_is_free() -> None:
    state = make_state(dead_after_seconds=3.0)
    _register_as(state, "vm", "tcp://a:1", "one", 0.0)
    # A lost link or a restarted scheduler: the same process, the same instance.
    again, _ = _register_as(state, "vm", "tcp://a:1", "one", 1.0)
    assert isinstance(again, RegisterReply)
    # Its successor on that host (it holds the id's lock) names it and takes over at once.
    successor, _ = _register_as(state, "vm", "tcp://a:2", "two", 1.5, replaces="one")
    assert isinstance(successor, RegisterReply)
    assert state.agents["vm"].instance == "two"
    # Naming some other instance does not help.
    forged, _ = _register_as(state, "vm", "tcp://b:1", "three", 1.6, replaces="one")
    assert isinstance(forged, ErrorReply)
    # Once the holder is declared dead, the id is free for anyone.
    state.tick(5.0)
    taken, _ = _register_as(state, "vm", "tcp://b:1", "three", 5.1)
    assert isinstance(taken, RegisterReply)
    assert state.is_registered("vm") and state.agents["vm"].address == "tcp://b:1"


# --------------------------------------------------------------------------- leaving


def test_deregistered_agent_is_gone_and_its_sandboxes_end() -> None:
    state = make_state()
    _register_as(state, "a", "tcp://a:1", "one", 0.0)
    sid = run(state, "k")
    assert state.wait("w", sid, 100.0, 0.0) == []
    assert state.deregister_agent("a", "stale", 1.0) == []  # not the holder: ignored
    assert "a" in state.agents
    actions = state.deregister_agent("a", "one", 1.0)
    assert "a" not in state.agents
    assert [a.agent_id for a in state.status(1.0).agents] == []
    assert status_of(state, sid) is SandboxStatus.TERMINATED
    assert "agent a stopped" in state.sandboxes[sid].reason
    [woken] = replies_to(actions, "w")
    assert woken.sandbox.status is SandboxStatus.TERMINATED
    assert stops(actions) == []  # it stopped them itself


def test_dead_agents_are_listed_for_sweeping_after_the_grace_then_forgotten() -> None:
    state = make_state(dead_after_seconds=3.0, orphan_grace_seconds=10.0, forget_dead_seconds=60.0)
    register(state, "a")
    register(state, "b")
    state.heartbeat("b", [], 3.0)
    state.tick(3.5)  # a is declared dead at 3.5
    assert not state.is_registered("a")
    assert state.dead_agents(13.0) == ()  # within the grace: it may come back
    assert state.dead_agents(13.5) == ("a",)
    state.heartbeat("b", [], 60.0)
    state.tick(63.5)
    assert "a" in state.agents  # exactly forget_dead_seconds: not yet
    state.tick(63.6)
    assert "a" not in state.agents and state.dead_agents(63.6) == ()
    assert [a.agent_id for a in state.status(63.6).agents] == ["b"]


def test_a_returning_agent_is_no_longer_listed_as_dead() -> None:
    state = make_state(dead_after_seconds=3.0, orphan_grace_seconds=0.0)
    register(state, "a")
    state.tick(4.0)
    assert state.dead_agents(4.0) == ("a",)
    register(state, "a", now=5.0)
    assert state.dead_agents(5.0) == ()


# --------------------------------------------------------------------------- no agents


def test_create_with_no_agents_fails_at_once_after_the_startup_grace() -> None:
    state = SchedulerState(Config(startup_grace_seconds=10.0), started_at=100.0)
    # Just started: agents are still registering, so the create waits for one.
    assert state.request_create("early", spec(), 30.0, 105.0) == []
    [err] = replies_to(state.request_create("late", spec(), 30.0, 110.0), "late")
    assert err.code is ErrorCode.UNAVAILABLE
    assert "no agents registered" in err.message
    assert "python -m agent --scheduler" in err.message
    assert len(state.pending) == 1  # only the early one waits


def test_create_with_only_dead_agents_fails_at_once_naming_them() -> None:
    state = SchedulerState(Config(dead_after_seconds=3.0, startup_grace_seconds=0.0))
    register(state, "a")
    state.tick(4.0)
    [err] = replies_to(state.request_create("k", spec(), 30.0, 5.0), "k")
    assert err.code is ErrorCode.UNAVAILABLE
    assert "no agents registered that are alive (lost: a)" in err.message
    assert state.pending == deque()


# --------------------------------------------------------------------------- scale: indexes
# The indexes (placement, live/ended rows, counts, sessions, listing order, in-flight
# requests per agent) must always say what a brute-force scan of the tables says.


def brute_choice(state: SchedulerState) -> str | None:
    best = None
    for a in state.agents.values():
        if (
            a.alive
            and a.free > 0
            and (best is None or (a.free, best.agent_id) > (best.free, a.agent_id))
        ):
            best = a
    return best.agent_id if best else None


def list_all(state: SchedulerState, **filters: Any) -> list[str]:
    """Every page of a listing, joined (and each page bounded)."""
    ids: list[str] = []
    cursor = ""
    for _ in range(10_000):
        page = state.list_sandboxes(cursor=cursor, limit=filters.pop("limit", None), **filters)
        assert len(page.sandboxes) <= 5000
        ids += [i.sandbox_id for i in page.sandboxes]
        if not page.next_cursor:
            return ids
        cursor = page.next_cursor
    raise AssertionError("listing never ended")


def brute_spare_choice(state: SchedulerState, key: object) -> str | None:
    """The agent a create of ``key``'s shape must go to: of the live agents with a free
    slot, the one holding the most ready spares of it (ties by id); else the spread."""
    holders = [
        (-a.spare_shapes.get(key, 0), a.agent_id)  # type: ignore[call-overload]
        for a in state.agents.values()
        if a.alive and a.free > 0 and a.spare_shapes.get(key, 0) > 0  # type: ignore[call-overload]
    ]
    return min(holders)[1] if holders else brute_choice(state)


def check_indexes(state: SchedulerState) -> None:
    rows = state.sandboxes
    for shape in (spec(), spec(memory_bytes=1 << 28)):
        chosen = state.choose_agent(shape)
        want = brute_spare_choice(state, spare_key(shape))
        assert (chosen.agent_id if chosen else None) == want
    assert (
        state.choose_agent() is None
        if brute_choice(state) is None
        else (
            state.choose_agent().agent_id == brute_choice(state)  # type: ignore[union-attr]
        )
    )
    assert state.free_slots() == sum(a.free for a in state.agents.values() if a.alive)
    assert set(state.live) == {s for s, r in rows.items() if r.status in (RUNNING, CREATING)}
    assert set(state.ended) == {s for s, r in rows.items() if r.status.is_terminal}
    assert all(state.live[s] is rows[s] for s in state.live)
    counts = {s: sum(1 for r in rows.values() if r.status is s) for s in SandboxStatus}
    assert state.counts == counts
    assert state._alive_count == sum(a.alive for a in state.agents.values())
    for session_id in {r.spec.session_id for r in rows.values()} - {None}:
        live = {s for s, r in state.live.items() if r.spec.session_id == session_id}
        assert state._by_session.get(session_id, set()) == live  # type: ignore[arg-type]
    in_seq = sorted(rows.values(), key=lambda r: r.seq)
    assert list_all(state, statuses=()) == [r.sandbox_id for r in in_seq]
    assert list_all(state, statuses=(RUNNING,), limit=2) == [
        r.sandbox_id for r in in_seq if r.status is RUNNING
    ]
    assert list_all(state, tags=("t",), session_id="s1") == [
        r.sandbox_id for r in in_seq if "t" in r.spec.tags and r.spec.session_id == "s1"
    ]
    assert list_all(state, agent_id="a1") == [r.sandbox_id for r in in_seq if r.agent_id == "a1"]
    for a in state.agents.values():
        flying = {
            s
            for s, r in rows.items()
            if r.agent_id == a.agent_id and (r.placing or r.stops_unconfirmed)
        }
        assert flying <= a.inflight, (a.agent_id, flying, a.inflight)


OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "register",
                "create",
                "place",
                "fail",
                "stop",
                "confirm",
                "exit",
                "beat",
                "tick",
                "close",
                "deregister",
                "spares",
            ]
        ),
        st.integers(0, 4),
        st.integers(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_the_indexes_always_agree_with_a_brute_force_scan(ops: list[tuple[str, int, int]]) -> None:
    state = make_state(dead_after_seconds=5.0, keep_ended_seconds=8.0)
    now = 0.0
    sent: list[str] = []  # PlaceSandbox / StopSandbox sent, in order
    for op, i, j in ops:
        now += 0.5
        agent = f"a{i}"
        ids = sorted(state.sandboxes)
        sid = ids[j % len(ids)] if ids else "sb-none"
        if op == "register":
            register(state, agent, slots=j + 1, now=now, fresh=False)
        elif op == "create":
            kw: dict[str, Any] = {"session_id": f"s{j % 2}", "tags": ("t",) if i % 2 else ()}
            if j == 3:
                kw["max_lifetime_seconds"] = 2.0
            state.request_create(f"k{now}", spec(**kw), 3.0, now)
        elif op in ("place", "fail"):
            err = ErrorReply(ErrorCode.FAILED, "no") if op == "fail" else None
            state.placement_done(sid, err, now)
        elif op == "stop":
            state.request_stop(sid, "x", now, key=f"s{now}")
        elif op == "confirm":
            state.stop_confirmed(sid)
        elif op == "exit":
            state.sandbox_exited(sid, 0, "", now)
        elif op == "beat":
            rec = state.agents.get(agent)
            have = sorted(rec.active)[j:] if rec else []
            if j % 2:
                state.heartbeat(agent, have, now)
            else:
                gone = sorted(rec.active)[:j] if rec else []
                state.heartbeat(agent, (), now, full=False, gone=gone)
        elif op == "tick":
            now += j * 2.0
            state.tick(now)
        elif op == "close":
            state.session_close(f"s{j % 2}", "closed", now)
        elif op == "deregister":
            rec = state.agents.get(agent)
            if rec is not None:
                state.deregister_agent(agent, rec.instance, now)
        elif op == "spares":
            shapes = [SpareShape("python:3.11", ready=j), SpareShape("python:3.11", ready=i)]
            shapes[1] = dataclasses.replace(shapes[1], memory_bytes=1 << 28)
            state.set_spares(agent, i + j, shapes[: 1 + j % 2])
        check_indexes(state)
    del sent


def test_a_placement_answered_after_its_agent_left_sends_no_stop() -> None:
    """Found by the scan above: the agent deregistered (stopping its sandboxes) before
    its answer to a PlaceSandbox arrived; a stop sent to it would never be confirmed,
    and would hang as in flight on the agent's next record."""
    state = make_state()
    register(state, "a1", fresh=False)
    state.request_create("k", spec(), 3.0, 0.0)
    state.deregister_agent("a1", state.agents["a1"].instance, 0.5)
    assert state.placement_done("sb-1", None, 1.0) == []
    register(state, "a1", fresh=False, now=1.5)
    assert state.sandboxes["sb-1"].stops_unconfirmed == 0
    check_indexes(state)


def test_placement_index_spreads_like_the_scan_at_scale() -> None:
    state = make_state()
    for i in range(200):
        register(state, f"a{i:03d}", slots=1 + i % 7)
    for n in range(400):
        assert state.choose_agent().agent_id == brute_choice(state)  # type: ignore[union-attr]
        state.request_create(f"k{n}", spec(), 30.0, 0.0)
    assert state.choose_agent() is None or state.free_slots() > 0
    check_indexes(state)


def test_a_listing_page_is_bounded_and_a_cursor_resumes_it() -> None:
    state = make_state()
    register(state, "a", slots=2000)
    for n in range(1200):
        run(state, f"k{n}", tags=("x",) if n % 100 == 0 else ())
    first = state.list_sandboxes()
    assert len(first.sandboxes) == 500 and first.next_cursor  # the default page
    assert len(list_all(state)) == 1200
    assert [i.sandbox_id for i in state.list_sandboxes(limit=3).sandboxes] == [
        "sb-1",
        "sb-2",
        "sb-3",
    ]
    second = state.list_sandboxes(limit=3, cursor=state.list_sandboxes(limit=3).next_cursor)
    assert [i.sandbox_id for i in second.sandboxes] == ["sb-4", "sb-5", "sb-6"]
    assert len(list_all(state, tags=("x",))) == 12
    assert state.list_sandboxes(cursor="junk").sandboxes[0].sandbox_id == "sb-1"


def test_ended_rows_are_forgotten_in_end_order_without_touching_live_ones() -> None:
    state = make_state(keep_ended_seconds=10.0)
    register(state, "a", slots=10)
    keep, end1, end2 = run(state, "k1"), run(state, "k2"), run(state, "k3")
    state.sandbox_exited(end1, 0, "", 1.0)
    state.sandbox_exited(end2, 0, "", 5.0)
    state.tick(11.5)
    assert end1 not in state.sandboxes and end2 in state.sandboxes and keep in state.live
    state.tick(15.5)
    assert set(state.sandboxes) == {keep}
    check_indexes(state)


def test_a_delta_heartbeat_ends_only_what_it_says_is_gone() -> None:
    state = make_state()
    register(state, "a", slots=3)
    one, two, three = run(state, "k1"), run(state, "k2"), run(state, "k3")
    assert state.heartbeat("a", (), 1.0, full=False, gone=()) == []
    state.heartbeat("a", (), 1.5, full=False, gone=(two, "sb-unknown"))
    assert [status_of(state, s) for s in (one, two, three)] == [
        RUNNING,
        SandboxStatus.COMPLETED,
        RUNNING,
    ]
    state.heartbeat("a", (one,), 2.0)  # a full one: three is gone too
    assert status_of(state, three) is SandboxStatus.COMPLETED and status_of(state, one) is RUNNING


def test_the_heartbeat_interval_grows_with_the_cluster_and_death_stays_within_5s() -> None:
    state = make_state(heartbeat_interval=0.5, dead_after_seconds=3.0)
    register(state, "a")
    assert state.heartbeat_interval() == 0.5 and state.dead_after() == 3.0
    for i in range(5000):
        register(state, f"b{i}")
    assert state.heartbeat_interval() == 1.5
    assert state.dead_after() == 4.5  # 3 intervals, under 5 s


# --------------------------------------------------------------------------- scale: liveness


def test_an_agent_silent_while_the_scheduler_was_blind_is_not_declared_dead() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", now=0.0)
    sid = run(state, "k", now=0.0)
    # The loop stalled from 1 to 14 (a huge listing, the process stopped): the tick that
    # finally runs must not blame the agent, whose heartbeats sit unread in the socket.
    state.scheduler_blind(1.0, 14.0)
    assert [a for a in state.tick(14.0) if isinstance(a, AgentDeclaredDead)] == []
    assert state.is_registered("a") and status_of(state, sid) is RUNNING
    # Still unread a little later (a backlog): still 1 s of real silence only.
    assert state.tick(15.0) == []
    state.heartbeat("a", [sid], 15.1)
    assert state.is_registered("a")


def test_an_agent_silent_outside_the_blind_spots_is_declared_dead_with_why() -> None:
    state = make_state(dead_after_seconds=3.0)
    register(state, "a", now=0.0)
    sid = run(state, "k", now=0.0)
    state.scheduler_blind(1.0, 2.0)  # 1 s blind: 3 s of real silence at 4.0, 3.5 at 4.5
    assert state.tick(4.0) == []
    actions = state.tick(4.5)
    [dead] = [a for a in actions if isinstance(a, AgentDeclaredDead)]
    assert dead.agent_id == "a" and dead.seconds_since_heartbeat == 4.5
    assert dead.blind_seconds == 1.0 and dead.sandboxes == 1
    assert "no heartbeat for 4.5s" in dead.reason
    assert status_of(state, sid) is SandboxStatus.FAILED


def test_blind_spots_merge_and_count_only_after_the_last_heartbeat() -> None:
    spots = BlindSpots()
    spots.add(1.0, 3.0)
    spots.add(2.0, 4.0)  # overlaps: merged
    spots.add(10.0, 12.0)
    assert len(spots) == 2
    assert spots.blind_since(0.0, 20.0) == 5.0
    assert spots.blind_since(3.5, 20.0) == 2.5
    assert spots.blind_since(11.0, 11.5) == 0.5
    spots.forget_before(5.0)
    assert spots.blind_since(0.0, 20.0) == 2.0


@given(
    st.lists(
        st.tuples(st.sampled_from(["set", "drop", "best"]), st.integers(0, 9), st.integers(-1, 6))
    )
)
def test_free_index_always_agrees_with_a_scan(ops: list[tuple[str, int, int]]) -> None:
    index = FreeIndex()
    truth: dict[str, int] = {}
    for op, i, free in ops:
        agent = f"a{i}"
        if op == "set":
            index.set(agent, free)
            if free > 0:
                truth[agent] = free
            else:
                truth.pop(agent, None)
        elif op == "drop":
            index.drop(agent)
            truth.pop(agent, None)
        want = min(truth, key=lambda a: (-truth[a], a)) if truth else None
        assert index.best() == want
        assert index.total() == sum(truth.values())


@given(st.lists(st.floats(0, 100), max_size=50), st.floats(0, 100))
def test_timers_pop_exactly_what_is_due_in_time_order(whens: list[float], now: float) -> None:
    timers: Timers[int] = Timers()
    for n, when in enumerate(whens):
        timers.add(when, n)
    due = list(timers.due(now))
    assert sorted(due) == sorted(n for n, w in enumerate(whens) if w <= now)
    assert [whens[n] for n in due] == sorted(whens[n] for n in due)
    assert len(timers) == len(whens) - len(due)


def test_a_session_lease_is_not_lost_to_the_schedulers_own_stall() -> None:
    state = make_state()
    register(state, "a", slots=2)
    state.session_keepalive("s", 5.0, 0.0)
    sid = run(state, "k", session_id="s")
    state.scheduler_blind(1.0, 9.0)  # its keepalives sat unread
    assert stops(state.tick(9.0)) == []
    assert status_of(state, sid) is RUNNING
    state.session_keepalive("s", 5.0, 9.5)
    assert stops(state.tick(12.0)) == []
    # A client really gone still loses its lease.
    assert stops(state.tick(14.6)) == [("a", sid)]


def test_status_pages_agents_by_id_with_cluster_wide_counts() -> None:
    state = make_state()
    for i in range(7):
        register(state, f"a{i}", slots=2)
    run(state, "k")
    first = state.status(0.0, limit=3)
    assert [a.agent_id for a in first.agents] == ["a0", "a1", "a2"] and first.next_cursor == "a2"
    assert first.sandbox_counts["running"] == 1 and first.free_slots == 13
    rest = state.status(0.0, first.next_cursor, 3)
    last = state.status(0.0, rest.next_cursor, 3)
    assert [a.agent_id for a in rest.agents + last.agents] == ["a3", "a4", "a5", "a6"]
    assert last.next_cursor == ""
    assert len(state.status(0.0).agents) == 7  # the default page holds 1,000


def test_a_create_naming_a_volume_goes_to_an_agent_holding_it() -> None:
    """Spread would pick b (more free slots); a holds the volume, so a create naming it
    goes to a while a has a free slot, then anywhere (where it is made afresh, empty).
    The listing shows each live agent's volumes, by name then agent."""
    state = make_state()
    register(state, "a", slots=2)
    register(state, "b", slots=8)
    state.set_volumes("a", ["pip-cache", "data"])
    state.set_volumes("ghost", ["x"])  # not registered: ignored

    def where(key: str, **kw: Any) -> str:
        return placed(state.request_create(key, spec(**kw), 10.0, 0.0))[0][0]

    assert where("k1", volumes={"/cache": "pip-cache"}) == "a"
    assert where("k2") == "b"  # no volume: spread
    assert where("k3", volumes={"/c": "other", "/d": "data"}) == "a"
    assert where("k4", volumes={"/cache": "pip-cache"}) == "b"  # a is full
    state.set_volumes("b", ["pip-cache"])
    rows = [(v.name, v.agent_id) for v in state.list_volumes().volumes]
    assert rows == [("data", "a"), ("pip-cache", "a"), ("pip-cache", "b")]
    state.set_volumes("a", [])
    assert [v.agent_id for v in state.list_volumes().volumes] == ["b"]
