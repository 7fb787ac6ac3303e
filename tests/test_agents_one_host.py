"""Several agents on one host: ids unique by default, a duplicate id refused, an address
in use said in one line, what a dead agent leaves removed by the others, stopped and
dead agents leaving `aviato status`, and an agent or client with no scheduler told so."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import ClusterUnavailableError, Sandbox, SandboxDefaults
from tests.conftest import (
    IMAGE,
    ROOT,
    Cluster,
    containers_of,
    docker_cluster,
    running_of,
    wait_until,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def bare_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A scheduler alone (the test starts its agents), orphans swept 2 s after death."""
    yield from docker_cluster(
        tmp_path, agents=0, slots=4, scheduler_args=["--reap-orphans-after", "2"]
    )


def live_ids_by_port(c: Cluster) -> dict[int, str]:
    return {int(a.address.rsplit(":", 1)[1]): a.agent_id for a in c.status().agents if a.alive}


def start_cli_agents(c: Cluster, n: int) -> tuple[list[int], list[str]]:
    """``n`` agents as the README starts them: no --agent-id, each its own --bind port."""
    ports = [free_port() for _ in range(n)]
    for i, port in enumerate(ports):
        c.start_agent(f"cli-{i}", named=False, bind=f"tcp://127.0.0.1:{port}")
    c.wait_agents(n)
    by_port = live_ids_by_port(c)
    ids = [by_port[p] for p in ports]
    c.adopt_ids(ids)
    return ports, ids


async def test_three_cli_agents_on_one_host_one_killed_mid_map(bare_cluster: Cluster) -> None:
    c = bare_cluster
    ports, ids = start_cli_agents(c, 3)
    assert len(set(ids)) == 3, ids
    assert all(i.startswith(f"{socket.gethostname()}-") for i in ids), ids
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    async with Sandbox.session(d) as session:

        @session.function(max_workers=6, retries=3)
        def slow_id(i: int) -> int:
            import time

            time.sleep(0.01)
            return i

        deadline = time.monotonic() + 60
        while True:  # warm up until the pool has workers on all three agents
            warm = await asyncio.gather(*(slow_id(i) for i in range(60)))
            assert sorted(r.value for r in warm) == list(range(60))
            pool = next(iter(session._pools.values()))
            agents = {w.sandbox.info.agent_id for w in pool.workers if w.sandbox.info}
            if agents == set(ids):
                break
            assert time.monotonic() < deadline, f"workers on {agents}, wanted all of {ids}"
        victim = 0
        survivors = {ids[i]: set(running_of(ids[i])) for i in (1, 2)}
        assert all(survivors.values()), survivors
        futures = [slow_id(i) for i in range(1000)]
        await asyncio.sleep(0.5)
        c.kill(f"cli-{victim}")  # kill -9 with calls in flight on it
        results = await asyncio.wait_for(asyncio.gather(*futures), 180)
        assert [r.value for r in results] == list(range(1000))  # each once, right, in order
        stats = slow_id.statistics()
        assert stats.workers_lost >= 1, stats
        for agent_id, before in survivors.items():  # untouched: still running, same ids
            assert before <= set(running_of(agent_id)), (agent_id, before, c.logs())
        assert all("is not on agent" not in p.read_text() for p in c.tmp.glob("cli-*.log"))
        # An agent that exits stops its own sandboxes only.
        before = set(running_of(ids[2]))
        c.kill("cli-1", 15)
        assert not containers_of([ids[1]])
        assert before <= set(running_of(ids[2]))
    # The same command line again: the same id, which reaps what the killed one left.
    c.start_agent(f"cli-{victim}", named=False, bind=f"tcp://127.0.0.1:{ports[victim]}")
    await asyncio.to_thread(
        wait_until,
        lambda: ports[victim] in live_ids_by_port(c),
        30,
        0.1,
        "the killed agent to come back",
    )
    assert live_ids_by_port(c)[ports[victim]] == ids[victim]
    await asyncio.to_thread(
        wait_until,
        lambda: not containers_of([ids[victim]]),
        30,
        0.2,
        "the restarted agent to reap what it left",
    )


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Agents declared dead only 20 s after their last heartbeat."""
    yield from docker_cluster(tmp_path, agents=0, slots=2, scheduler_args=["--dead-after", "20"])


async def test_an_agent_restarted_after_kill_9_takes_its_id_back_at_once(
    patient_cluster: Cluster,
) -> None:
    """Its predecessor still counts as live (no heartbeat missed long enough yet): the
    restarted agent, holding the id's lock on this host, names it and is let in."""
    c = patient_cluster
    port = free_port()
    c.start_agent("cli-0", named=False, bind=f"tcp://127.0.0.1:{port}")
    c.wait_agents(1)
    [agent_id] = live_ids_by_port(c).values()
    c.adopt_ids([agent_id])
    c.kill("cli-0")
    killed_at = time.monotonic()
    proc = c.start_agent("cli-0", named=False, bind=f"tcp://127.0.0.1:{port}")
    await asyncio.to_thread(
        wait_until,
        lambda: (c.tmp / "cli-0.log").read_text().count(f"agent {agent_id} registered") >= 2,
        30,
        0.1,
        "the restarted agent to register",
    )
    assert time.monotonic() - killed_at < 20, "registered before the old one was declared dead"
    assert proc.poll() is None, c.logs()
    [again] = [a for a in c.status().agents if a.alive]
    assert again.agent_id == agent_id
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address)
    sb = await Sandbox.create("sleep", "infinity", defaults=d)
    assert (await sb.exec(["true"])).returncode == 0
    await sb.stop()


def _run_agent(
    c: Cluster, *args: str, state: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """An agent run to its end, logging warnings only: what it prints on stderr. With
    ``state``, as if on another host: its own state and temp directories."""
    return subprocess.run(
        [sys.executable, "-m", "agent", "--scheduler", c.address, "--runtime", "docker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={
            **os.environ,
            "AVIATO_STATE_DIR": str(state or c.tmp / "state"),
            "AVIATO_LOG_LEVEL": "WARNING",
            **({"TMPDIR": str(state)} if state else {}),
        },
    )


async def test_a_second_live_agent_with_a_held_id_is_refused(bare_cluster: Cluster) -> None:
    c = bare_cluster
    c.start_agent("dup-holder", bind=f"tcp://127.0.0.1:{free_port()}")
    c.wait_agents(1)
    c.adopt_ids(["dup-holder"])
    [holder] = [a for a in c.status().agents if a.agent_id == "dup-holder"]
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address)
    sb = await Sandbox.create("sleep", "infinity", defaults=d)
    # On this host: its lock says so before anything of the holder's is touched.
    here = await asyncio.to_thread(_run_agent, c, "--agent-id", "dup-holder")
    assert here.returncode == 1
    lines = here.stderr.strip().splitlines()
    assert len(lines) == 1, here.stderr
    assert "agent id 'dup-holder' is held by a live agent on this host" in lines[0]
    assert holder.address in lines[0]
    # From "another host" (its own state and temp directories): the scheduler refuses,
    # naming both addresses.
    port = free_port()
    (c.tmp / "other-host").mkdir()
    there = await asyncio.to_thread(
        _run_agent,
        c,
        "--agent-id",
        "dup-holder",
        "--bind",
        f"tcp://127.0.0.1:{port}",
        state=c.tmp / "other-host",
    )
    assert there.returncode == 1
    lines = there.stderr.strip().splitlines()
    assert len(lines) == 1, there.stderr
    assert "is held by a live agent at " + holder.address in lines[0]
    assert f"tcp://127.0.0.1:{port}" in lines[0]
    # The holder kept its id, its sandbox and its socket directory: it still serves.
    [after] = [a for a in c.status().agents if a.agent_id == "dup-holder"]
    assert after.alive and after.address == holder.address
    assert (await sb.exec(["echo", "fine"])).stdout == b"fine\n"
    sb2 = await Sandbox.create("sleep", "infinity", defaults=d)
    assert (await sb2.exec(["true"])).returncode == 0
    for s in (sb, sb2):
        await s.stop()


async def test_address_in_use_is_one_line(bare_cluster: Cluster) -> None:
    c = bare_cluster
    taken = c.address
    out = await asyncio.to_thread(_run_agent, c, "--agent-id", "in-use", "--bind", taken)
    assert out.returncode != 0
    assert out.stderr.strip() == f"agent: address already in use: {taken}", out.stderr
    sched = subprocess.run(
        [sys.executable, "-m", "scheduler", "--bind", taken],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert sched.returncode != 0
    assert sched.stderr.strip() == f"scheduler: address already in use: {taken}", sched.stderr


async def test_a_dead_agents_containers_are_removed_by_another_agent(
    bare_cluster: Cluster,
) -> None:
    c = bare_cluster
    _, ids = start_cli_agents(c, 2)
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address)
    sbs = [await Sandbox.create("sleep", "infinity", defaults=d) for _ in range(4)]
    victim = ids[0]
    on_victim = [sb for sb in sbs if sb.info and sb.info.agent_id == victim]
    assert on_victim, "spread placement puts some on each agent"
    for sb in on_victim:
        assert (await sb.exec(["true"])).returncode == 0  # its supervisor (watchdog) is up
    c.kill("cli-0")  # kill -9, and it never comes back
    # Its watchdogs stop them; the other agent removes them once the scheduler declared
    # the victim dead (1.5 s) and its grace passed (2 s): no Exited container remains.
    await asyncio.to_thread(
        wait_until,
        lambda: not containers_of([victim]),
        30,
        0.2,
        "the dead agent's containers to be removed",
    )
    survivor_log = (c.tmp / "cli-1.log").read_text()
    assert f"of dead agent {victim}" in survivor_log
    assert f"removed the socket directory of dead agent {victim}" in survivor_log
    for sb in sbs:  # the survivor's own are untouched
        if sb not in on_victim:
            assert (await sb.exec(["true"])).returncode == 0
    for sb in sbs:
        await sb.stop()


@pytest.fixture
def forgetful_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Two agents; dead agents forgotten 2 s after they are declared dead."""
    yield from docker_cluster(
        tmp_path, agents=2, slots=1, scheduler_args=["--forget-dead-after", "2"]
    )


async def test_stopped_agent_leaves_status_and_a_dead_one_is_forgotten(
    forgetful_cluster: Cluster,
) -> None:
    c = forgetful_cluster
    stopped, killed = c.agent_ids
    c.kill(stopped, 15)  # SIGTERM: a clean stop
    listed = {a.agent_id for a in c.status().agents}
    assert stopped not in listed, "a cleanly stopped agent deregisters at once"
    c.kill(killed)  # kill -9: declared dead (1.5 s), then forgotten (2 s later)
    await asyncio.to_thread(
        wait_until,
        lambda: any(a.agent_id == killed and not a.alive for a in c.status().agents),
        20,
        0.05,
        "the killed agent to be declared dead",
    )
    await asyncio.to_thread(
        wait_until, lambda: not c.status().agents, 20, 0.1, "the dead agent to be forgotten"
    )
    c.start_agent(killed)  # forgotten, it may come back with its id (and tidy up)
    c.wait_agents(1)


def test_agent_without_a_scheduler_warns_in_its_log(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--scheduler",
                f"tcp://127.0.0.1:{port}",
                "--agent-id",
                "lonely",
                "--runtime",
                "local",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "AVIATO_STATE_DIR": str(tmp_path / "state")},
        )
    try:

        def warnings() -> list[str]:
            return [
                line
                for line in log.read_text().splitlines()
                if " WARNING " in line and "does not answer" in line
            ]

        wait_until(lambda: len(warnings()) >= 2, 60, 0.2, "two warnings")
        assert f"tcp://127.0.0.1:{port}" in warnings()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture
def agentless_cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path, agents=0, scheduler_args=["--startup-grace", "0"])


async def test_create_with_no_agents_fails_at_once(agentless_cluster: Cluster) -> None:
    d = SandboxDefaults(container_image=IMAGE, scheduler=agentless_cluster.address)
    started = time.monotonic()
    with pytest.raises(ClusterUnavailableError, match="no agents registered"):
        await Sandbox.create("sleep", "infinity", defaults=d)
    assert time.monotonic() - started < 5
