"""Placement by resources in the scheduler's pure state machine (scheduler/placement.py):
CPUs, memory and GPU ids per agent, agent labels, spread or pack, the typed refusal of
what no agent could ever hold, and creates that wait for resources. Fake clock, ids
sb-1, sb-2, ... (as tests/test_state.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aviato.protocol import (
    ErrorCode,
    ErrorReply,
    PlaceSandbox,
    RegisterAgent,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
)
from scheduler.placement import milli
from scheduler.state import Action, Config, Reply, SchedulerState, SendToAgent

GIB = 1 << 30
#: Past the start-up grace (10 s by default): agents that are not here will not come.
T = 100.0


def spec(**kw: Any) -> SandboxSpec:
    return SandboxSpec(image="python:3.11", command="sleep", args=("1000",), **kw)


def make_state() -> SchedulerState:
    counter = itertools.count(1)
    return SchedulerState(Config(dead_after_seconds=1e9), new_id=lambda: f"sb-{next(counter)}")


def register(
    state: SchedulerState,
    agent_id: str,
    *,
    slots: int = 8,
    cpus: float = 0.0,
    memory: int = 0,
    gpus: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    sandboxes: Sequence[SandboxInfo] = (),
    fresh: bool = True,
    now: float = T,
) -> list[Action]:
    msg = RegisterAgent(
        agent_id=agent_id,
        address=f"tcp://{agent_id}:7000",
        slots=slots,
        runtime="docker",
        fresh=fresh,
        labels=labels or {},
        sandboxes=tuple(sandboxes),
        cpus=cpus,
        memory_bytes=memory,
        gpus=tuple(gpus),
    )
    _, actions = state.register_agent(msg, now)
    return actions


def placements(actions: Iterable[Action]) -> list[SandboxInfo]:
    return [
        a.msg.sandbox
        for a in actions
        if isinstance(a, SendToAgent) and isinstance(a.msg, PlaceSandbox)
    ]


def create(state: SchedulerState, key: str, now: float = T, **kw: Any) -> list[Action]:
    """Ask for a sandbox; the agent starts whatever is placed at once."""
    actions = state.request_create(key, spec(**kw), 60.0, now)
    for info in placements(actions):
        actions += state.placement_done(info.sandbox_id, None, now)
    return actions


def where(actions: Iterable[Action]) -> tuple[str, tuple[str, ...]] | None:
    """(agent, GPU ids) of the one sandbox placed, None if none was."""
    found = placements(actions)
    assert len(found) <= 1, found
    return (found[0].agent_id or "", found[0].gpu_ids) if found else None


def refusal(actions: Iterable[Action], key: str) -> ErrorReply | None:
    for a in actions:
        if isinstance(a, Reply) and a.to == key and isinstance(a.msg, ErrorReply):
            return a.msg
    return None


def stop(state: SchedulerState, sandbox_id: str, now: float = T) -> list[Action]:
    _, actions = state.request_stop(sandbox_id, "done", now)
    for info in placements(actions):
        actions += state.placement_done(info.sandbox_id, None, now)
    return actions


# --------------------------------------------------------------------------- fit


def test_a_create_goes_only_where_its_cpus_and_memory_fit() -> None:
    state = make_state()
    register(state, "a", cpus=2, memory=4 * GIB, slots=20)
    register(state, "b", cpus=8, memory=2 * GIB)
    # a has the most free slots, but not 4 CPUs; b has, but not 3 GiB.
    assert where(create(state, "k1", cpus=4)) == ("b", ())
    assert where(create(state, "k2", memory_bytes=3 * GIB)) == ("a", ())
    # b's 8 CPUs: 4 held, 4 free.
    assert where(create(state, "k3", cpus=4)) == ("b", ())
    actions = create(state, "k4", cpus=1)  # a: 2 free; b: none
    assert where(actions) == ("a", ())


def test_spread_is_the_default_and_pack_fills_the_fullest_agent_first() -> None:
    state = make_state()
    register(state, "a", cpus=4)
    register(state, "b", cpus=4)
    assert where(create(state, "k1", cpus=1)) == ("a", ())
    assert where(create(state, "k2", cpus=1)) == ("b", ())  # spread: the emptier one
    assert where(create(state, "k3", cpus=1, placement="pack")) == ("a", ())  # ties: id
    assert where(create(state, "k4", cpus=1, placement="pack")) == ("a", ())  # fullest
    assert where(create(state, "k5", cpus=1)) == ("b", ())
    assert where(create(state, "k6", cpus=2, placement="pack")) == ("b", ())  # a: 1 free


def test_agent_labels_select_agents_by_their_labels() -> None:
    state = make_state()
    register(state, "a", labels={"zone": "a", "disk": "ssd"}, slots=1)
    register(state, "b", labels={"zone": "b"}, slots=4)
    for i in range(3):
        assert where(create(state, f"b{i}", agent_labels={"zone": "b"})) == ("b", ())
    assert where(create(state, "a1", agent_labels={"zone": "a", "disk": "ssd"})) == ("a", ())
    # a is full: the next zone=a create waits (b has room, but is not zone a).
    actions = create(state, "a2", agent_labels={"zone": "a"})
    assert where(actions) is None and refusal(actions, "a2") is None
    assert where(stop(state, "sb-4")) == ("a", ())


def test_an_agent_that_advertises_nothing_is_not_limited() -> None:
    """An older agent sends no capacity: it is placed on as before."""
    state = make_state()
    register(state, "old")
    assert where(create(state, "k1", cpus=64, memory_bytes=512 * GIB)) == ("old", ())


# --------------------------------------------------------------------------- GPUs


def test_each_gpu_goes_to_one_sandbox_and_a_gpu_create_waits_for_one() -> None:
    state = make_state()
    register(state, "g", gpus=("0", "1"), cpus=8)
    assert where(create(state, "k1", gpus=1)) == ("g", ("0",))
    assert where(create(state, "k2", gpus=1)) == ("g", ("1",))
    waiting = create(state, "k3", gpus=1)
    assert where(waiting) is None and refusal(waiting, "k3") is None  # queued
    assert state.status(T).agents[0].gpus_used == ("0", "1")
    freed = stop(state, "sb-1")  # GPU 0 is free again: the queued create takes it
    assert where(freed) == ("g", ("0",))
    assert [r.msg.sandbox.gpu_ids for r in freed if isinstance(r, Reply)] == [("0",)]


def test_a_waiting_gpu_create_does_not_hold_back_the_creates_behind_it() -> None:
    state = make_state()
    register(state, "g", gpus=("0",), slots=4)
    create(state, "k1", gpus=1)
    assert where(create(state, "k2", gpus=1)) is None  # queued first
    assert where(create(state, "k3")) == ("g", ())  # placed past it
    assert where(create(state, "k4", cpus=0.5)) == ("g", ())
    assert len(state.pending) == 1


def test_a_sandbox_without_gpus_gets_none_and_takes_none() -> None:
    state = make_state()
    register(state, "g", gpus=("0", "1"))
    assert where(create(state, "k1")) == ("g", ())
    assert where(create(state, "k2", gpus=2)) == ("g", ("0", "1"))


# --------------------------------------------------------------------------- refusals


def test_what_no_live_agent_could_ever_hold_fails_at_once_naming_the_largest() -> None:
    state = make_state()
    register(state, "small", cpus=2, memory=4 * GIB, gpus=("0",))
    register(state, "big", cpus=16, memory=64 * GIB, gpus=("0", "1"))
    for key, ask in [
        ("gpus", {"gpus": 3}),
        ("cpus", {"cpus": 32}),
        ("memory", {"memory_bytes": 128 * GIB}),
    ]:
        error = refusal(create(state, key, **ask), key)
        assert error is not None and error.code is ErrorCode.RESOURCES_UNAVAILABLE, key
        assert "the largest is big (16 CPUs, 64.0 GiB memory, GPUs 0,1" in error.message
    error = refusal(create(state, "zone", agent_labels={"zone": "x"}), "zone")
    assert error is not None and error.code is ErrorCode.RESOURCES_UNAVAILABLE
    assert "none carries those labels" in error.message and "--label" in error.message
    # Fits the big one, busy or not: waits rather than fails.
    create(state, "hold", gpus=2)
    waiting = create(state, "k", gpus=2)
    assert refusal(waiting, "k") is None and len(state.pending) == 1


def test_in_the_start_up_grace_a_big_create_waits_for_agents_to_register() -> None:
    state = make_state()
    register(state, "small", gpus=("0",), now=1.0)
    actions = create(state, "k", now=1.0, gpus=2)
    assert refusal(actions, "k") is None  # a bigger agent may still register
    assert where(register(state, "big", gpus=("0", "1"), now=2.0)) == ("big", ("0", "1"))


def test_a_queued_create_is_refused_when_the_only_agent_that_could_hold_it_leaves() -> None:
    state = make_state()
    register(state, "small", gpus=("0",))
    register(state, "big", gpus=("0", "1"))
    create(state, "hold", gpus=2)
    assert where(create(state, "k", gpus=2)) is None
    actions = state.deregister_agent("big", "", T)
    actions += state.tick(T + 1)
    error = refusal(actions, "k")
    assert error is not None and error.code is ErrorCode.RESOURCES_UNAVAILABLE
    assert "small" in error.message and not state.pending


# --------------------------------------------------------------------------- rebuild


def test_a_restarted_scheduler_learns_which_gpus_are_held_from_the_agents_report() -> None:
    state = make_state()
    running = SandboxInfo(
        "sb-9", spec(gpus=1, session_id=None), SandboxStatus.RUNNING, gpu_ids=("1",)
    )
    register(state, "g", gpus=("0", "1"), fresh=False, sandboxes=[running])
    assert state.status(T).agents[0].gpus_used == ("1",)
    assert where(create(state, "k", gpus=1)) == ("g", ("0",))
    assert where(create(state, "k2", gpus=1)) is None


def test_status_shows_used_and_total_per_resource() -> None:
    state = make_state()
    register(state, "a", cpus=4, memory=8 * GIB, gpus=("0", "1"))
    create(state, "k", cpus=1.5, memory_bytes=GIB, gpus=1)
    (agent,) = state.status(T).agents
    assert (agent.cpus, agent.cpus_used) == (4.0, 1.5)
    assert (agent.memory_bytes, agent.memory_used) == (8 * GIB, GIB)
    assert (agent.gpus, agent.gpus_used) == (("0", "1"), ("0",))
    stop(state, "sb-1")
    (agent,) = state.status(T).agents
    assert (agent.cpus_used, agent.memory_used, agent.gpus_used) == (0.0, 0, ())


# --------------------------------------------------------------------------- properties

ASKS = st.fixed_dictionaries(
    {},
    optional={
        "cpus": st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]),
        "memory_bytes": st.sampled_from([GIB // 2, GIB, 3 * GIB]),
        "gpus": st.integers(1, 3),
        "placement": st.just("pack"),
        "agent_labels": st.just({"zone": "a"}),
    },
)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), ASKS),
        st.tuples(st.just("stop"), st.integers(1, 40)),
        st.tuples(st.just("leave"), st.sampled_from(["a", "b"])),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_no_agent_is_ever_given_more_than_it_has(ops: list[tuple[str, Any]]) -> None:
    """Whatever is created, stopped or lost, in any order: what each agent's active
    sandboxes hold is its tally, within its capacity, and each GPU has one holder."""
    state = make_state()
    register(state, "a", cpus=4, memory=4 * GIB, gpus=("0", "1"), labels={"zone": "a"})
    register(state, "b", cpus=2, memory=8 * GIB, gpus=("0",))
    for n, (op, arg) in enumerate(ops):
        if op == "create":
            actions = create(state, f"k{n}", **arg)
            error = refusal(actions, f"k{n}")
            if error is not None:
                assert error.code in (ErrorCode.RESOURCES_UNAVAILABLE, ErrorCode.UNAVAILABLE)
        elif op == "stop":
            stop(state, f"sb-{arg}")
        elif arg in state.agents:
            state.deregister_agent(arg, "", T)
        for agent in state.agents.values():
            rows = [state.sandboxes[s] for s in agent.active]
            assert agent.cpus_used_milli == sum(milli(r.spec.cpus) for r in rows)
            assert agent.memory_used == sum(r.spec.memory_bytes or 0 for r in rows)
            assert agent.cpus_used_milli <= agent.cpus_milli
            assert agent.memory_used <= agent.memory_bytes
            held = [g for r in rows for g in r.gpu_ids]
            assert sorted(held) == sorted(agent.gpu_holders) and len(set(held)) == len(held)
            for r in rows:
                assert len(r.gpu_ids) == (r.spec.gpus or 0)
                assert all(agent.labels.get(k) == v for k, v in r.spec.agent_labels.items())
        # Nothing waits that fits a live agent now (a free GPU is never left idle).
        for req in state.pending:
            fits = [a for a in state.agents.values() if a.alive and _fits(a, req.spec)]
            assert not fits, (req.spec, fits)


def _fits(agent: Any, s: SandboxSpec) -> bool:
    from scheduler.placement import fits_now

    return fits_now(agent, s)


def test_stopping_a_sandbox_answers_with_its_row() -> None:
    """The row a stop returns still names the GPUs the sandbox had."""
    state = make_state()
    register(state, "g", gpus=("0",))
    create(state, "k", gpus=1)
    reply, _ = state.request_stop("sb-1", "done", T)
    assert isinstance(reply, SandboxReply) and reply.sandbox.gpu_ids == ("0",)


def test_the_dashboard_shows_what_each_agent_holds() -> None:
    from scheduler.dashboard.snapshot import resources_text

    state = make_state()
    register(state, "a", cpus=4, memory=8 * GIB, gpus=("0", "1"))
    register(state, "old")
    create(state, "k", cpus=1.5, memory_bytes=GIB, gpus=1)
    assert resources_text(state.agents["a"]) == "cpu 1.5/4 · mem 1.0/8.0G · gpu 1/2"
    assert resources_text(state.agents["old"]) == ""
