"""A paused sandbox across an agent restart (issue 13), on both runtimes: the agent is
killed (SIGKILL, as the chaos tests do) while a sandbox is paused and started again
with its id; it adopts the sandbox as paused (the engine's paused container, the
local runtime's frozen cgroup), the scheduler keeps reporting it paused, and requests
on it are refused as paused. Docker: resume thaws it with its processes and files
intact (its old supervisor, the container's watchdog, is killed before it thaws).
Local: its supervisor is its main process and would end it once thawed, so resume is
refused, naming the runtime; a snapshot keeps its files."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import (
    Sandbox,
    SandboxDefaults,
    SandboxPausedError,
    SandboxStatus,
    SandboxTimeoutError,
    Session,
    UnsupportedOperationError,
)
from aviato._lifecycle import remove_snapshot
from tests.conftest import Cluster, docker_cluster, wait_until
from tests.test_lifecycle import TICKER, _has_ticks
from tests.test_local_runtime import STATE, _leftovers, need_cgroups
from tests.test_sandbox import sandboxes_of, wait_for_async

RESTART_SECONDS = 60.0
LIVENESS = ["--dead-after", "30"]


@pytest.fixture(params=["docker", "local"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """One agent, of this test's own (it is killed). Its restart takes seconds: the
    scheduler waits longer than the tests' usual 1.5 s before it writes an agent off."""
    if request.param == "docker":
        yield from docker_cluster(tmp_path, agents=1, scheduler_args=LIVENESS)
        return
    c = Cluster(tmp_path, agents=1, runtime="local", scheduler_args=LIVENESS)
    try:
        yield c
    finally:
        c.close()
        left = _leftovers(c)
        assert not left, f"local sandboxes left behind: {left}"


def _frozen(cluster: Cluster, sandbox_id: str) -> bool:
    """Whether the runtime holds the sandbox frozen, as seen from the host."""
    if cluster.runtime == "docker":
        out = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Paused}}", f"aviato-{sandbox_id}"],
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() == "true"
    home = STATE / cluster.agent_ids[0] / sandbox_id
    group = (home / "cgroup").read_text().strip() if (home / "cgroup").exists() else sandbox_id
    from agent.runtime.freezer import Freezer

    return Freezer().frozen(group)


def _restart(cluster: Cluster) -> None:
    """SIGKILL the agent, then start it again with its id; back once registered anew."""
    victim = cluster.agent_ids[0]

    def instance() -> str | None:
        return next(
            (a.address for a in cluster.status().agents if a.agent_id == victim and a.alive),
            None,
        )

    before = instance()
    cluster.kill(victim)
    cluster.start_agent(victim)
    wait_until(lambda: instance() not in (None, before), RESTART_SECONDS, 0.1, "the agent back")


async def test_a_paused_sandbox_stays_paused_across_an_agent_restart(cluster: Cluster) -> None:
    defaults = SandboxDefaults(
        container_image="python:3.11", scheduler=cluster.address, lease_seconds=5
    )
    async with Sandbox.session(defaults) as session:
        if cluster.runtime == "local":
            probe = session.create(command="sleep", args=["infinity"])
            await probe.start()
            need_cgroups(probe.runtime)
            await probe.stop()
        sb = session.create(command="python", args=["-c", TICKER])
        await sb.start()
        await wait_for_async(lambda: _has_ticks(sb, 3), 30, "the ticker to tick")
        await sb.pause()
        paused_at = time.time()
        await asyncio.to_thread(_restart, cluster)
        assert sb.sandbox_id is not None and _frozen(cluster, sb.sandbox_id)
        await asyncio.sleep(1.0)  # heartbeats of the new agent: the report holds
        assert _frozen(cluster, sb.sandbox_id)
        assert await sb.status() is SandboxStatus.PAUSED
        listed = await Sandbox.list(session_id=session.session_id, defaults=defaults)
        assert [s.info.status for s in listed if s.info] == [SandboxStatus.PAUSED]
        with pytest.raises(SandboxPausedError, match="resume"):
            await sb.exec(["true"])  # served as paused by the new agent process
        if cluster.runtime == "local":
            await _local_refuses_resume_and_keeps_files(session, sb)
            return
        resumed_at = time.time()
        await sb.resume()
        assert (await sb.exec(["true"])).returncode == 0
        # (read by exec: the engine's archive API fails on a container adopted so)
        ticks = await _exec_ticks(sb)  # the ticker's file, kept across the restart
        assert not [t for t in ticks if paused_at + 0.2 < t < resumed_at], "ticked paused"

        async def ticking() -> bool:
            return max(await _exec_ticks(sb)) > max(ticks)

        await wait_for_async(ticking, 30, "ticks after the resume")
        # Its old supervisor (the container's watchdog) did not stop it as it thawed.
        with pytest.raises(SandboxTimeoutError):
            await sb.wait(timeout=2)
        assert await sb.status() is SandboxStatus.RUNNING
        await sb.stop()
    wait_until(lambda: not sandboxes_of(cluster), 30, 0.2, "the sandbox to be removed")


async def _exec_ticks(sb: Sandbox) -> list[float]:
    return [float(t) for t in (await sb.exec(["cat", "/tmp/ticks"])).stdout.split()]


async def _local_refuses_resume_and_keeps_files(session: Session, sb: Sandbox) -> None:
    """The local runtime's supervisor is the sandbox's main process: thawed, it would
    end the sandbox (its agent is gone). Resume is refused, naming the runtime; the
    sandbox stays paused, and a snapshot keeps its files for a new one."""
    with pytest.raises(UnsupportedOperationError, match=r"local .*runtime.*snapshot"):
        await sb.resume()
    assert await sb.status() is SandboxStatus.PAUSED
    image = await sb.snapshot()
    try:
        clone = session.create(command="sleep", args=["infinity"], container_image=image)
        await clone.start()
        assert len((await clone.read_file("/tmp/ticks")).split()) >= 3
        await clone.stop()
    finally:
        await remove_snapshot(image, session.defaults)
    await sb.stop()
