"""Failures: a killed client, a killed agent, a restarted scheduler, orphaned containers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import docker
import pytest

from aviato import Sandbox, SandboxDefaults, SandboxFailedError, SandboxStatus
from tests.conftest import (
    IMAGE,
    ROOT,
    Cluster,
    containers_of,
    need_docker,
    running_of,
    wait_until,
)


async def test_killed_client_session_is_reaped_within_its_lease(cluster: Cluster) -> None:
    code = f"""
import asyncio
from aviato import Sandbox, SandboxDefaults
async def main():
    d = SandboxDefaults(container_image={IMAGE!r}, scheduler={cluster.address!r},
                        lease_seconds=1.5)
    async with Sandbox.session(d) as s:
        sb = s.create(command="sleep", args=["infinity"])
        await sb.start()
        print(sb.sandbox_id, flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        sandbox_id = proc.stdout.readline().decode().strip()
        assert sandbox_id.startswith("sb-")
        await asyncio.sleep(2.5)  # renewed past its first lease while alive
        assert f"aviato-{sandbox_id}" in containers_of(cluster.agent_ids)
        proc.kill()
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        await asyncio.to_thread(
            wait_until,
            lambda: f"aviato-{sandbox_id}" not in containers_of(cluster.agent_ids),
            10,
            0.2,
            "the killed client's container to go",
        )
        assert time.monotonic() - killed_at < 1.5 + 5
    finally:
        proc.kill()
    sb = await Sandbox.from_id(sandbox_id, defaults=SandboxDefaults(scheduler=cluster.address))
    assert await sb.status() is SandboxStatus.TERMINATED
    assert sb.info is not None and "lease expired" in sb.info.reason


async def test_killed_agent_is_declared_dead_and_orphans_reaped_on_restart(
    fresh_cluster: Cluster,
) -> None:
    c = fresh_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address)
    sbs = [await Sandbox.create("sleep", "infinity", defaults=d) for _ in range(2)]
    victim = sbs[0].info.agent_id if sbs[0].info else ""
    on_victim = [sb for sb in sbs if sb.info and sb.info.agent_id == victim]
    assert (await on_victim[0].exec(["true"])).returncode == 0  # its supervisor is up
    c.kill(victim)  # kill -9: its containers stay behind, orphaned
    t0 = time.monotonic()
    # Each container's own watchdog (its supervisor) stops it, even though the agent
    # never returns (nothing else would). Expected within twice the liveness window
    # (1.5 s here); the bounds below are 10x, to catch a hang, not to time it.
    await asyncio.to_thread(
        wait_until,
        lambda: not running_of(victim),
        10 * 2 * 1.5,
        0.05,
        "the watchdog to stop the orphaned containers",
    )
    for sb in on_victim:
        with pytest.raises(SandboxFailedError, match=f"agent {victim} lost"):
            await sb.wait(timeout=10)
    assert time.monotonic() - t0 < 10 * (1.5 + 3)
    assert all(a.alive is False for a in c.status().agents if a.agent_id == victim)
    assert containers_of([victim]), "kill -9 should leave the containers (that is the point)"
    # The agent comes back with the same id: it reaps what the scheduler no longer wants.
    c.start_agent(victim)
    await asyncio.to_thread(
        wait_until, lambda: not containers_of([victim]), 20, 0.2, "the orphans to be reaped"
    )
    c.wait_agents(2)
    # and the cluster still places work on it: spread placement fills the emptied agent.
    more: list[Sandbox] = []
    try:
        while not any(sb.info and sb.info.agent_id == victim for sb in more):
            assert len(more) < 4, f"nothing placed on {victim} after its restart\n{c.logs()}"
            more.append(await Sandbox.create("sleep", "infinity", defaults=d))
        (back,) = [sb for sb in more if sb.info and sb.info.agent_id == victim]
        assert (await back.exec(["echo", "placed"])).stdout == b"placed\n"
    finally:
        for sb in sbs + more:
            await sb.stop()


async def test_scheduler_restart_rebuilds_tables_from_agents(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    async with Sandbox.session(d) as session:
        sbs = [
            session.create(command="sleep", args=["infinity"], tags=["survivor"]) for _ in range(3)
        ]
        await asyncio.gather(*(sb.start() for sb in sbs))
        port = int(c.address.rsplit(":", 1)[1])
        c.kill("scheduler")
        # The data plane does not need the scheduler.
        assert (await sbs[0].exec(["echo", "still here"])).stdout == b"still here\n"
        c.start_scheduler(port)
        c.wait_agents(2)

        async def listed() -> set[str | None]:
            return {s.sandbox_id for s in await Sandbox.list(tags=["survivor"], defaults=d)}

        deadline = time.monotonic() + 15
        while await listed() != {sb.sandbox_id for sb in sbs}:
            assert time.monotonic() < deadline, "sandboxes not rebuilt after restart"
            await asyncio.sleep(0.2)
        rows = await Sandbox.list(tags=["survivor"], defaults=d)
        assert all(r.info and r.info.spec.session_id == session.session_id for r in rows)
        assert all(await asyncio.gather(*(s.status() for s in sbs))) and all(
            st is SandboxStatus.RUNNING for st in await asyncio.gather(*(s.status() for s in sbs))
        )
    # The session close after the restart still stops them all.
    await asyncio.to_thread(
        wait_until,
        lambda: not containers_of(c.agent_ids),
        15,
        0.2,
        "the session's containers to go",
    )


async def test_agent_reaps_labelled_orphans_at_start(cluster: Cluster, tmp_path) -> None:
    agent_id = f"{cluster.agent_ids[0]}-orphans"
    client = docker.from_env()
    try:
        orphan = client.containers.run(
            IMAGE,
            ["sleep", "infinity"],
            detach=True,
            name=f"aviato-orphan-{agent_id}",
            labels={"aviato.managed": "1", "aviato.agent": agent_id, "aviato.sandbox": "sb-orphan"},
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--scheduler",
                cluster.address,
                "--agent-id",
                agent_id,
                "--slots",
                "1",
                "--bind",
                "tcp://127.0.0.1:*",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.to_thread(
                wait_until,
                lambda: not containers_of([agent_id]),
                20,
                0.2,
                "the orphan to be reaped",
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(orphan.id)
    finally:
        for name in containers_of([agent_id]):
            client.containers.get(name).remove(force=True)
        client.close()


async def test_embedded_cluster_reaps_sandboxes_of_dead_embedded_agents() -> None:
    """An embedded agent killed together with its owner leaves its containers to
    nobody; the next embedded cluster on the host removes them."""
    from aviato._local import LocalCluster

    need_docker()
    client = docker.from_env()
    dead = 2**22 + 12345  # above pid_max here: no such process
    name = f"aviato-sb-orphan{dead}"  # sandboxes are named aviato-<sandbox id>
    try:
        client.containers.run(
            IMAGE,
            ["sleep", "infinity"],
            detach=True,
            name=name,
            labels={
                "aviato.managed": "1",
                "aviato.agent": f"embedded-{dead}",
                "aviato.sandbox": f"sb-orphan{dead}",
            },
        )
        cluster = LocalCluster(runtime="docker")
        try:
            await asyncio.to_thread(cluster.start)
            await asyncio.to_thread(
                wait_until,
                lambda: not containers_of([f"embedded-{dead}"]),
                20,
                0.2,
                "the dead embedded agent's container to be reaped",
            )
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        for leftover in containers_of([f"embedded-{dead}"]):
            client.containers.get(leftover).remove(force=True)
        client.close()


async def test_agent_kept_on_exit_leaves_its_sandboxes_running(fresh_cluster: Cluster) -> None:
    """``--keep-on-exit``: the agent tells each supervisor to detach first, so the
    watchdog does not stop the containers the user asked to keep."""
    c = fresh_cluster
    victim = c.agent_ids[0]

    def address() -> str | None:
        return next(
            (a.address for a in c.status().agents if a.agent_id == victim and a.alive), None
        )

    before = address()
    c.kill(victim, signal.SIGTERM)
    c.start_agent(victim, ["--keep-on-exit"])
    await asyncio.to_thread(
        wait_until, lambda: address() not in (None, before), 20, 0.1, "the agent to come back"
    )
    before = address()
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address)
    sbs = [await Sandbox.create("sleep", "infinity", defaults=d) for _ in range(4)]
    kept = [sb for sb in sbs if sb.info and sb.info.agent_id == victim]
    assert kept, "spread placement puts some on each agent"
    for sb in kept:  # their supervisors are up
        assert (await sb.exec(["true"])).returncode == 0
    c.kill(victim, signal.SIGTERM)  # returns once the agent has exited
    # Its supervisors saw the link close when it exited (a watchdog would have stopped
    # its container at once): each still runs a command after the agent is gone.
    for sb in kept:
        subprocess.run(
            ["docker", "exec", f"aviato-{sb.sandbox_id}", "true"],
            check=True,
            capture_output=True,
            timeout=30,
        )
    assert len(running_of(victim)) == len(kept)
    # Back with the same id: it adopts them (back within the liveness window) or reaps
    # them (the scheduler wrote them off); either way a stop leaves nothing.
    c.start_agent(victim)
    await asyncio.to_thread(
        wait_until, lambda: address() not in (None, before), 20, 0.1, "the agent to come back"
    )
    for sb in sbs:
        await sb.stop()
    await asyncio.to_thread(
        wait_until, lambda: not containers_of([victim]), 20, 0.2, "the kept sandboxes to go"
    )


async def test_wait_rides_out_a_scheduler_restart(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, request_timeout_seconds=2)
    sb = await Sandbox.create("sh", "-c", "sleep 5; exit 3", defaults=d)
    waiting = asyncio.create_task(sb.wait(timeout=60))
    await asyncio.sleep(0.5)
    port = int(c.address.rsplit(":", 1)[1])
    c.kill("scheduler")
    await asyncio.sleep(2.0)  # its poll is lost with the scheduler
    c.start_scheduler(port)
    assert await asyncio.wait_for(waiting, 60) == 3  # the exit code, after the restart
