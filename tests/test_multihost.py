"""Chaos on several hosts: a scheduler, three agents and a client, each in a network
namespace of its own (tests/_netns.py), with real Docker containers. Faults: an agent
killed, cut off, frozen; the scheduler killed and restarted. Every result must arrive,
each exactly once and right, and nothing may leak."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aviato import ClusterUnavailableError, Sandbox, SandboxDefaults, SandboxStatus
from tests._netns import MultiHostCluster, netns_cluster
from tests._tally import Tally
from tests.conftest import IMAGE, containers_of, running_of, wait_until

pytestmark = pytest.mark.netns

CALLS = 1000
SECONDS_PER_CALL = 0.02
DEAD_AFTER, HEARTBEAT = 3.0, 1.0  # the 1 s x 3


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(
        lambda: MultiHostCluster(
            tmp_path, agents=3, slots=2, dead_after=DEAD_AFTER, heartbeat=HEARTBEAT
        )
    )


@pytest.fixture
def tally(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tally]:
    """Counts the calls' executions, reported from inside the workers (the client's
    host passes the address on: AVIATO_TEST_TALLY)."""
    with Tally() as t:
        host, port = t.address
        monkeypatch.setenv("AVIATO_TEST_TALLY", f"{host}:{port}")
        yield t


def check_every_result(summary: dict[str, Any], tally: Tally) -> None:
    """All calls came back right; each ran at least once (counted in the workers) and
    was delivered exactly once (the pool counts any second outcome it drops)."""
    assert summary["results"] == CALLS, summary  # one outcome per call, by construction
    assert summary["error_count"] == 0, summary["errors"]
    assert summary["right"] == CALLS, summary
    assert summary["stats"]["duplicate_results"] == 0, summary
    # Reports may trail the results a little: wait for them.
    wait_until(
        lambda: set(map(str, range(CALLS))) <= set(tally.counts()),
        30,
        0.1,
        "every call's execution to be counted",
    )
    ran = tally.counts()
    print(f"{sum(ran.values())} executions for {CALLS} calls, {len(ran)} distinct")
    # The agents are on other hosts (network namespaces): ZeroMQ, not their local lanes.
    assert summary["channels"] == ["Connection"], summary


#: Declared dead is expected within DEAD_AFTER + HEARTBEAT + 1 s: 10x that, for a hang.
HANG_BOUND = 10 * (DEAD_AFTER + HEARTBEAT + 1)


def time_until_dead(c: MultiHostCluster, agent_id: str, since: float) -> float:
    wait_until(lambda: agent_id not in c.alive(), HANG_BOUND, 0.05, f"{agent_id} declared dead")
    return time.monotonic() - since


def test_agent_killed_mid_run(mh: MultiHostCluster, tally: Tally) -> None:
    c = mh
    victim = c.agent_ids[0]
    run = c.client("_mh_client.py", str(CALLS), str(SECONDS_PER_CALL))
    try:
        run.wait_line("progress 200", 120)
        assert running_of(victim), "the pool should have workers on every agent"
        c.kill(victim)
        t0 = time.monotonic()
        # Its containers' own watchdogs stop them (expected within twice the liveness
        # window), and it is declared dead (expected within 5 s). The bounds are 10x:
        # they catch a hang; the timings are the benchmarks' to report.
        wait_until(
            lambda: not running_of(victim),
            10 * 2 * DEAD_AFTER,
            0.05,
            "the killed agent's containers to stop",
        )
        assert time_until_dead(c, victim, t0) < HANG_BOUND
        summary = run.result(180)
    finally:
        run.close()
    print(summary)
    check_every_result(summary, tally)
    assert summary["stats"]["workers_lost"] >= 1, summary
    # Back with the same id, it reaps what its predecessor left.
    assert containers_of([victim])
    c.start_agent(victim)
    wait_until(lambda: not containers_of([victim]), 30, 0.2, "the orphans to be reaped")
    c.wait_agents(3)


def _outage(c: MultiHostCluster, tally: Tally, victim: str, begin: Any, end: Any) -> dict[str, Any]:
    """Run the calls; take ``victim`` out past the liveness window, then bring it back."""
    run = c.client("_mh_client.py", str(CALLS), str(SECONDS_PER_CALL))
    try:
        run.wait_line("progress 200", 120)
        before = set(containers_of([victim]))
        assert before, "the pool should have workers on every agent"
        begin()
        t0 = time.monotonic()
        try:
            assert time_until_dead(c, victim, t0) < HANG_BOUND
            time.sleep(1.0)  # well past the window: its calls have moved on
        finally:
            end()
        # It re-registers cleanly, and the sandboxes written off while it was away go.
        c.wait_agents(3, timeout=30)
        wait_until(
            lambda: not before & set(containers_of([victim])),
            30,
            0.2,
            "its written-off sandboxes to be reaped",
        )
        summary = run.result(180)
    finally:
        run.close()
    print(summary)
    check_every_result(summary, tally)
    assert summary["stats"]["workers_lost"] >= 1, summary
    # Its workers' replies came after all, and were dropped, not delivered twice.
    assert summary["stats"]["late_replies_dropped"] >= 1, summary
    return summary


def test_host_cut_off_then_back(mh: MultiHostCluster, tally: Tally) -> None:
    victim = mh.agent_ids[1]
    _outage(mh, tally, victim, lambda: mh.hosts.cut(victim), lambda: mh.hosts.restore(victim))
    assert mh.log_of("scheduler").count(f"agent {victim} registered") == 2


def test_frozen_agent_then_thawed(mh: MultiHostCluster, tally: Tally) -> None:
    victim = mh.agent_ids[2]
    _outage(
        mh,
        tally,
        victim,
        lambda: mh.signal(victim, signal.SIGSTOP),
        lambda: mh.signal(victim, signal.SIGCONT),
    )


async def test_scheduler_restart_under_load(mh: MultiHostCluster, tally: Tally) -> None:
    c = mh
    # Slower calls: the client must still be at work when the scheduler is back.
    run = c.client("_mh_client.py", str(CALLS), str(3 * SECONDS_PER_CALL), "3")
    try:
        run.wait_line("progress 100", 120)
        c.kill("scheduler")
        # Meanwhile a client gets a typed, retryable error within its timeout (a create
        # probes the scheduler every request timeout); no hang.
        d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, request_timeout_seconds=1.0)
        t0 = time.monotonic()
        with pytest.raises(ClusterUnavailableError) as caught:
            await Sandbox.create("sleep", "infinity", defaults=d)
        # Expected within about two request timeouts; 10x that catches a hang.
        assert caught.value.retryable and time.monotonic() - t0 < 10 * (2 * 1.0 + 1.5)
        c.start_scheduler()
        c.wait_agents(3, timeout=30)  # they reconnect by themselves, with backoff
        # The running sandboxes are listed again, rebuilt from what the agents report.
        deadline = time.monotonic() + 15
        while len(rows := await Sandbox.list(tags=["held"], defaults=d)) < 3:
            assert time.monotonic() < deadline, f"{rows}\n{c.logs()}"
            await asyncio.sleep(0.2)
        assert all(r.info and r.info.status is SandboxStatus.RUNNING for r in rows), rows
        summary = run.result(180)
    finally:
        run.close()
    print(summary)
    assert summary["held_ok"] == [True, True, True], summary
    # Function calls go to the agents directly: the outage costs them nothing. Every
    # result must arrive, right, delivered once.
    check_every_result(summary, tally)
    # The session's close, through the new scheduler, stopped every held sandbox.
    try:
        wait_until(lambda: not containers_of(c.agent_ids), 30, 0.2, "the session's sandboxes")
    except AssertionError:
        raise AssertionError(
            f"{containers_of(c.agent_ids)}\n{c.logs()}\n--- client\n{run.stderr[-5000:]}"
        ) from None


def test_killed_client_leaves_nothing_on_any_host(mh: MultiHostCluster) -> None:
    c = mh
    lease = 3.0
    run = c.client("_mh_client.py", "0", "0", "6", str(lease))
    try:
        run.wait_line("held 6", 120)
        assert all(running_of(a) for a in c.agent_ids), "spread: sandboxes on every host"
        run.proc.kill()  # kill -9 of the client process
        t0 = time.monotonic()
        wait_until(
            lambda: not containers_of(c.agent_ids),
            lease + HEARTBEAT + 5,
            0.1,
            "every sandbox of the killed client's session to go",
        )
        print(f"gone {time.monotonic() - t0:.1f}s after the kill (lease {lease:g}s)")
    finally:
        run.close()
