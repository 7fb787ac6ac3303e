"""A big create is not starved by a stream of small ones (scheduler/placement.py's
reservation): past ``Config.reserve_after_seconds`` the agent it would fit on once
freed takes no later create until it is placed. Pure state machine, fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviato import Sandbox, SandboxDefaults
from scheduler.placement import reserve_for
from scheduler.state import Action, Config, SchedulerState
from tests.conftest import IMAGE, Cluster, containers_of, docker_cluster, wait_until
from tests.test_placement_resources import T, placements, register, spec


def make_state(reserve_after: float) -> SchedulerState:
    counter = itertools.count(1)
    config = Config(dead_after_seconds=1e9, reserve_after_seconds=reserve_after)
    return SchedulerState(config, new_id=lambda: f"sb-{next(counter)}")


@dataclass
class Sim:
    """Agents under a stream of small creates, each running ``lifetime`` s, and one
    big create queued behind them."""

    state: SchedulerState
    lifetime: float
    started: dict[str, float] = field(default_factory=dict)  # sandbox -> placed at
    big_placed: float | None = None
    big_agent: str = ""

    def apply(self, actions: list[Action], now: float) -> None:
        for info in placements(actions):
            more = self.state.placement_done(info.sandbox_id, None, now)
            if info.spec.command == "big":
                self.big_placed, self.big_agent = now, info.agent_id or ""
            self.started[info.sandbox_id] = now  # (the big one ends too)
            self.apply(more, now)

    def create(self, key: str, now: float, **kw: Any) -> None:
        command = kw.pop("command", "sleep")
        wanted = dataclasses.replace(spec(**kw), command=command)
        self.apply(self.state.request_create(key, wanted, 1e6, now), now)

    def step(self, now: float, arrivals: int, small: float) -> None:
        """Smalls past their lifetime end; ``arrivals`` new ones are asked for."""
        for sid, at in sorted(self.started.items(), key=lambda kv: kv[1]):
            if now - at >= self.lifetime:
                del self.started[sid]
                self.apply(self.state.sandbox_exited(sid, 0, "", now), now)
        for n in range(arrivals):
            self.create(f"small-{now}-{n}", now, cpus=small)


def _starve(reserve_after: float, steps: int) -> Sim:
    """One agent of 4 CPUs, two 2-CPU smalls always running (each for 3 s, one ending
    every 1.5 s), a 4-CPU create queued behind them."""
    state = make_state(reserve_after)
    register(state, "a", slots=8, cpus=4)
    sim = Sim(state, lifetime=3.0)
    sim.create("s0", T, cpus=2)
    sim.create("s1", T + 1.5, cpus=2)
    sim.create("big", T + 1.5, cpus=4, command="big")
    for k in range(steps):
        now = T + 3 + 1.5 * k
        sim.step(now, arrivals=1, small=2)
    return sim


def test_without_a_reservation_smalls_starve_a_big_create() -> None:
    """The starvation itself (a reservation that never comes): each freed half goes to
    the next small one, so the big create never fits."""
    sim = _starve(reserve_after=1e9, steps=60)
    assert sim.big_placed is None
    assert len(sim.state.pending) >= 1


def test_a_big_create_past_the_bound_is_placed() -> None:
    sim = _starve(reserve_after=10.0, steps=60)
    assert sim.big_placed is not None
    waited = sim.big_placed - (T + 1.5)
    # Reserved at the first pass past 10 s; its agent empties within one lifetime.
    assert 10.0 <= waited <= 10.0 + 3.0 + 1.5, waited
    # And the stream goes on once it is placed (smalls are placed again).
    assert any(at > sim.big_placed for at in sim.started.values())


def test_before_the_bound_smalls_are_not_held_back() -> None:
    sim = _starve(reserve_after=1e9, steps=6)
    held = _starve(reserve_after=10.0, steps=6)  # 6 steps: 9 s, under the bound
    assert sorted(sim.started.values()) == sorted(held.started.values())


def test_the_reserved_agent_is_the_nearest_to_fitting() -> None:
    state = make_state(10.0)
    register(state, "a", slots=8, cpus=8)
    register(state, "b", slots=8, cpus=8)
    register(state, "c", slots=8, cpus=2)  # could never hold 6 CPUs
    sim = Sim(state, lifetime=1e9)
    for key, cpus in (("a1", 4), ("a2", 3), ("b1", 4)):
        sim.create(key, T, cpus=cpus)
    by_agent = {i.agent_id for i in state.sandboxes.values()}
    assert by_agent == {"a", "b"}
    wanted = spec(cpus=6)
    agents = state.agents.values()
    # a has 1 free (needs 5 more) or b has 4 free (needs 2): whichever is nearer.
    nearer = min(("a", "b"), key=lambda n: 6000 - (8000 - state.agents[n].cpus_used_milli))
    assert (found := reserve_for(agents, wanted, set())) is not None
    assert found.agent_id == nearer
    other = reserve_for(agents, wanted, {nearer})
    assert other is not None and other.agent_id == ({"a", "b"} - {nearer}).pop()
    assert reserve_for(agents, wanted, {"a", "b"}) is None  # c could never hold it


def test_later_creates_go_around_a_reserved_agent() -> None:
    state = make_state(10.0)
    register(state, "a", slots=8, cpus=4)
    register(state, "b", slots=8, cpus=4)
    assert state._choose_around(spec(), {"a"}).agent_id == "b"  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(
    cpus=st.lists(st.integers(2, 8), min_size=1, max_size=3),
    small=st.integers(1, 4),
    lifetime=st.integers(1, 5),
    arrivals=st.integers(1, 3),
    slots=st.integers(2, 6),
)
def test_a_big_create_is_always_placed_eventually(
    cpus: list[int], small: int, lifetime: int, arrivals: int, slots: int
) -> None:
    """Whatever the agents and the stream of smalls (each ending after ``lifetime``),
    a create as big as the largest agent is placed: once reserved, its agent takes
    nothing new, and the reservation only moves to an agent nearer to fitting it."""
    state = make_state(10.0)
    for n, c in enumerate(cpus):
        register(state, f"a{n}", slots=slots, cpus=c)
    sim = Sim(state, lifetime=float(lifetime))
    biggest = max(cpus)
    now = T
    for k in range(3):  # the agents busy first
        sim.step(now + k, arrivals=arrivals * len(cpus), small=min(small, biggest))
    now += 3
    sim.create("big", now, cpus=biggest, command="big")
    queued_at = now
    for _ in range(400):
        if sim.big_placed is not None:
            break
        now += 1
        sim.step(now, arrivals=arrivals, small=min(small, biggest))
    assert sim.big_placed is not None, (state.pending[:3], list(state.agents.values()))
    assert sim.big_placed - queued_at <= 10 + 40 * lifetime
    big = state.agents[sim.big_agent]
    assert big.cpus_used_milli <= big.cpus_milli  # never over what it has


# ---------------------------------------------------------------------- real cluster


@pytest.fixture
def gpu_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """One Docker agent with GPUs 0 and 1 (advertised), reservations after 2 s."""
    yield from docker_cluster(
        tmp_path,
        agents=1,
        slots=8,
        scheduler_args=["--reserve-after", "2"],
        agent_args=["--gpus", "0,1"],
    )


async def test_a_two_gpu_create_is_placed_amid_a_stream_of_one_gpu_creates(
    gpu_cluster: Cluster,
) -> None:
    """Five loops each create a 1-GPU sandbox that runs 1.5 s, again and again: a
    freed GPU always has a 1-GPU create queued for it, so a 2-GPU create would never
    find both free. Past the bound it reserves the agent and is placed."""
    d = SandboxDefaults(container_image=IMAGE, scheduler=gpu_cluster.address, lease_seconds=5)
    stop = asyncio.Event()
    ran: list[float] = []

    async def small_ones(session: Any) -> None:
        while not stop.is_set():
            sb = session.create(command="sleep", args=["1.5"], gpus=1)
            await sb.start()
            ran.append(time.monotonic())
            await sb.wait(timeout=60)

    async with Sandbox.session(d) as session:
        loops = [asyncio.ensure_future(small_ones(session)) for _ in range(5)]
        try:
            deadline = time.monotonic() + 60
            while len(ran) < 2:  # both GPUs taken, creates queued behind them
                assert time.monotonic() < deadline, "the 1-GPU sandboxes never started"
                await asyncio.sleep(0.05)
            big = session.create(command="sleep", args=["infinity"], gpus=2)
            await asyncio.wait_for(big.start(), 60)
            seen = await big.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"])
            assert sorted(seen.stdout.decode().strip().split(",")) == ["0", "1"]
            await big.stop()
            # The stream goes on once it is placed.
            count = len(ran)
            deadline = time.monotonic() + 60
            while len(ran) <= count:
                assert time.monotonic() < deadline, "1-GPU sandboxes no longer start"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
    await asyncio.to_thread(
        wait_until, lambda: not containers_of(gpu_cluster.agent_ids), 30, 0.2, "containers"
    )
