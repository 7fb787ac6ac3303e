"""State that outlives idleness (issue 13), on both runtimes (Docker; local bubblewrap
+ cgroups) and, with AVIATO_TEST_GVISOR_LIFECYCLE=1, on Docker under gVisor (a second
engine of the tests' own, tests/_gvisor_engine.py): idle timeouts, lifetime
extensions, pause and resume, snapshots (refused under gVisor, naming it), and the
CLI's pause/resume/snapshot commands. Real clusters; every wait has a deadline."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import (
    EndedBy,
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    SandboxNotPausedError,
    SandboxNotRunningError,
    SandboxPausedError,
    SandboxStatus,
    SandboxTerminatedError,
    SandboxTimeoutError,
    UnsupportedOperationError,
)
from aviato._lifecycle import list_snapshots, remove_snapshot
from aviato.exceptions import ConfigurationError, SandboxNotFoundError
from tests._gvisor_engine import GvisorEngine, gvisor_cluster
from tests.conftest import ROOT, Cluster, docker_cluster
from tests.test_local_runtime import STATE, _local_cluster, need_cgroups
from tests.test_sandbox import sandboxes_of, wait_for_async

#: Idle timeouts, lifetimes and the CLI are the scheduler's and the agent's, the same on
#: every runtime; what a runtime does itself (pause, snapshots, and their refusal under
#: gVisor) is in the runtime conformance suite, which runs on gVisor in every run. This
#: module on gVisor too (minutes more): AVIATO_TEST_GVISOR_LIFECYCLE=1.
RUNTIMES = ["docker", "local"] + (
    ["docker-gvisor"] if os.environ.get("AVIATO_TEST_GVISOR_LIFECYCLE") == "1" else []
)
SLEEP = {"command": "sleep", "args": ["infinity"]}


@pytest.fixture(scope="module", params=RUNTIMES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "docker":
        yield from docker_cluster(tmp)
    elif request.param == "docker-gvisor":
        yield from _gvisor_cluster(tmp, request.getfixturevalue("gvisor_engine"))
    else:
        yield from _local_cluster(tmp)


def _gvisor_cluster(tmp: Path, engine: GvisorEngine) -> Iterator[Cluster]:
    """Two agents on the gVisor engine, offering gvisor only."""
    yield from gvisor_cluster(tmp, engine, agents=2)


def _gvisor(cluster: Cluster) -> bool:
    return "DOCKER_HOST" in cluster.agent_env


def _docker(cluster: Cluster, *args: str) -> list[str]:
    """``docker ARGS`` against the cluster's engine."""
    host = cluster.agent_env.get("DOCKER_HOST")
    out = subprocess.run(
        ["docker", *(["-H", host] if host else []), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _sandboxes_held(cluster: Cluster) -> list[str]:
    if not _gvisor(cluster):
        return sandboxes_of(cluster)
    return [
        c
        for a in cluster.agent_ids
        for c in _docker(cluster, "ps", "-aq", "--filter", f"label=aviato.agent={a}")
    ]


def _snapshots_held(cluster: Cluster) -> list[str]:
    """Snapshots of the cluster's agents still on this host (images; local archives)."""
    if cluster.runtime == "docker":
        found = []
        for agent_id in cluster.agent_ids:
            found += _docker(
                cluster, "images", "-q", "--filter", f"label=aviato.snapshot.agent={agent_id}"
            )
        return found
    return [
        str(meta)
        for meta in (STATE / ".snapshots").glob("*.json")
        if json.loads(meta.read_text()).get("aviato.snapshot.agent") in cluster.agent_ids
    ]


@pytest.fixture
def defaults(cluster: Cluster) -> Iterator[SandboxDefaults]:
    defaults = SandboxDefaults(
        container_image="python:3.11", scheduler=cluster.address, lease_seconds=5
    )
    yield defaults
    # Snapshots the test left (a failure half-way) go, and the test fails for them.
    left = _snapshots_held(cluster)
    if left:
        for snap in asyncio.run(list_snapshots(defaults)):
            asyncio.run(remove_snapshot(snap.image, defaults))
    assert not left, f"the test left snapshots behind: {left}"
    from tests.conftest import wait_until

    wait_until(lambda: not _sandboxes_held(cluster), 15, 0.2, "the test's sandboxes to be removed")


async def _ended(sb: Sandbox, timeout: float) -> SandboxTerminatedError:
    with pytest.raises(SandboxTerminatedError) as info:
        await sb.wait(timeout=timeout)
    return info.value


# --------------------------------------------------------------------------- idle timeout


async def test_idle_timeout_stops_an_idle_sandbox_and_says_so(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:
        sb = session.create(**SLEEP, idle_timeout_seconds=2)
        await sb.start()
        t0 = time.monotonic()
        error = await _ended(sb, timeout=30)
        assert time.monotonic() - t0 < 20
        assert error.ended_by == EndedBy.IDLE_TIMEOUT == sb.ended_by
        assert "idle timeout of 2s" in str(error)
        assert await sb.status() is SandboxStatus.TERMINATED
        assert sb.info is not None and "idle timeout" in sb.info.reason
        with pytest.raises(SandboxNotRunningError):
            await sb.extend_lifetime(10)  # extend on a stopped sandbox


async def test_activity_keeps_it_alive(defaults: SandboxDefaults) -> None:
    """Execs every half second for 3 idle timeouts, then one exec longer than the idle
    timeout: still running; left alone, it stops."""
    async with Sandbox.session(defaults) as session:
        sb = session.create(**SLEEP, idle_timeout_seconds=2)
        await sb.start()
        until = time.monotonic() + 6
        while time.monotonic() < until:
            assert (await sb.exec(["true"])).returncode == 0
            await asyncio.sleep(0.5)  # the activity under test, not a wait
        await sb.write_file("/tmp/f", b"x")  # files are activity too
        assert (await sb.exec(["sleep", "5"])).returncode == 0  # in flight: busy
        assert await sb.status() is SandboxStatus.RUNNING
        error = await _ended(sb, timeout=30)
        assert error.ended_by == "idle_timeout"


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf])
async def test_bad_idle_timeouts_are_refused(defaults: SandboxDefaults, bad: float) -> None:
    with pytest.raises(ConfigurationError, match="idle_timeout_seconds must be positive"):
        Sandbox(**SLEEP, idle_timeout_seconds=bad, defaults=defaults)


# --------------------------------------------------------------------------- lifetime


async def test_max_lifetime_says_so_and_extend_lifetime_pushes_it(
    defaults: SandboxDefaults,
) -> None:
    async with Sandbox.session(defaults) as session:
        short = session.create(**SLEEP, max_lifetime_seconds=1)
        longer = session.create(**SLEEP, max_lifetime_seconds=2)
        await asyncio.gather(short.start(), longer.start())
        before = longer.info.deadline if longer.info else None
        deadline = await longer.extend_lifetime(600)
        assert before is not None and deadline is not None and deadline == before + 600
        error = await _ended(short, timeout=30)
        assert error.ended_by == EndedBy.MAX_LIFETIME
        assert "max lifetime of 1s" in str(error)
        with pytest.raises(SandboxTimeoutError):  # its first deadline passes: still here
            await longer.wait(timeout=4)
        assert await longer.status() is SandboxStatus.RUNNING
        for bad in (0, -5, math.nan, math.inf):
            with pytest.raises(ValueError, match="positive, finite"):
                await longer.extend_lifetime(bad)
        await longer.stop()
        with pytest.raises(SandboxNotRunningError, match="has ended"):
            await longer.extend_lifetime(10)


async def test_a_stopped_sandbox_says_it_was_stopped(defaults: SandboxDefaults) -> None:
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
    other = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
    await sb.stop()
    error = await _ended(other, timeout=30)
    assert error.ended_by == EndedBy.STOPPED


# --------------------------------------------------------------------------- pause


TICKER = (
    "import time\n"
    "while True:\n"
    "    with open('/tmp/ticks', 'a') as f: f.write(f'{time.time()}\\n')\n"
    "    time.sleep(0.05)\n"
)


async def _ticks(sb: Sandbox) -> list[float]:
    return [float(t) for t in (await sb.read_file("/tmp/ticks")).split()]


async def test_pause_freezes_and_resume_thaws(defaults: SandboxDefaults, cluster: Cluster) -> None:
    if cluster.runtime == "local":
        need_cgroups(await _runtime_name(defaults))
    async with Sandbox.session(defaults) as session:
        sb = session.create(command="python", args=["-c", TICKER])
        await sb.start()
        await wait_for_async(lambda: _has_ticks(sb, 3), 30, "the ticker to tick")
        await sb.pause()
        assert await sb.status() is SandboxStatus.PAUSED
        listed = await Sandbox.list(session_id=session.session_id, defaults=defaults)
        assert [s.info.status for s in listed if s.info] == [SandboxStatus.PAUSED]
        with pytest.raises(SandboxPausedError, match="resume"):
            await sb.exec(["true"])
        with pytest.raises(SandboxPausedError):
            await sb.read_file("/tmp/ticks")
        with pytest.raises(SandboxPausedError, match="already paused"):
            await sb.pause()
        assert isinstance(await sb.logs(), bytes)  # logs need no process
        frozen_at = time.time()
        await asyncio.sleep(1.5)  # the pause under test: no tick may happen in it
        await sb.resume()
        assert await sb.status() is SandboxStatus.RUNNING
        with pytest.raises(SandboxNotPausedError, match="not paused"):
            await sb.resume()
        await wait_for_async(lambda: _ticked_after(sb, frozen_at + 1.5), 30, "ticks again")
        ticks = await _ticks(sb)
        assert not [t for t in ticks if frozen_at + 0.2 < t < frozen_at + 1.4], "ticked paused"
        assert (await sb.exec(["true"])).returncode == 0


async def test_a_paused_sandbox_keeps_its_idle_clock_stopped_and_can_be_stopped(
    defaults: SandboxDefaults, cluster: Cluster
) -> None:
    if cluster.runtime == "local":
        need_cgroups(await _runtime_name(defaults))
    async with Sandbox.session(defaults) as session:
        sb = session.create(**SLEEP, idle_timeout_seconds=2)
        await sb.start()
        await sb.pause()
        with pytest.raises(SandboxTimeoutError):  # past its idle timeout: still paused
            await sb.wait(timeout=4)
        assert await sb.status() is SandboxStatus.PAUSED
        await sb.resume()
        error = await _ended(sb, timeout=30)
        assert error.ended_by == EndedBy.IDLE_TIMEOUT
        held = session.create(**SLEEP)
        await held.start()
        await held.pause()
        await held.stop()  # a paused sandbox stops (and leaves nothing: the leak checks)
        with pytest.raises(SandboxNotRunningError):
            await held.pause()


async def test_pause_of_a_stopped_sandbox_is_refused(defaults: SandboxDefaults) -> None:
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
    other = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
    await sb.stop()
    with pytest.raises(SandboxNotRunningError, match="has ended"):
        await other.pause()
    with pytest.raises(SandboxNotRunningError, match="has ended"):
        await other.resume()


# --------------------------------------------------------------------------- snapshots


async def test_snapshot_and_create_from_it(defaults: SandboxDefaults, cluster: Cluster) -> None:
    async with Sandbox.session(defaults) as session:
        sb = session.create(**SLEEP)
        await sb.start()
        await sb.write_file("/tmp/state/data.txt", b"installed packages\n")
        if _gvisor(cluster):  # runsc's /tmp is out of the engine's sight: refused
            with pytest.raises(UnsupportedOperationError, match=r"gVisor.*isolation='runc'"):
                await sb.snapshot()
            assert await list_snapshots(defaults) == []
            return
        image = await sb.snapshot()
        assert image.startswith("aviato-snapshot:")
        snaps = {s.image: s for s in await list_snapshots(defaults)}
        assert snaps[image].sandbox_id == sb.sandbox_id
        assert snaps[image].agent_id == (sb.info.agent_id if sb.info else None)
        clone = session.create(**SLEEP, container_image=image)
        await clone.start()
        # Placed where the snapshot lives (the cluster has two agents).
        assert clone.info is not None and sb.info is not None
        assert clone.info.agent_id == sb.info.agent_id
        assert await clone.read_file("/tmp/state/data.txt") == b"installed packages\n"
        # A snapshot of the clone (a snapshot's snapshot) has both files.
        await clone.write_file("/tmp/more.txt", b"more")
        again = await clone.snapshot()
        third = session.create(**SLEEP, container_image=again)
        await third.start()
        assert await third.read_file("/tmp/state/data.txt") == b"installed packages\n"
        assert await third.read_file("/tmp/more.txt") == b"more"
        await asyncio.gather(clone.stop(), third.stop())
        await remove_snapshot(image, defaults)
        await remove_snapshot(again, defaults)
        assert {image, again}.isdisjoint(s.image for s in await list_snapshots(defaults))
        with pytest.raises(SandboxNotFoundError):
            await remove_snapshot(image, defaults)
        gone = session.create(**SLEEP, container_image=image)
        with pytest.raises(SandboxFailedError, match="snapshot"):
            await gone.start()


async def test_snapshot_of_a_stopped_sandbox_and_bad_names(defaults: SandboxDefaults) -> None:
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
    other = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
    await sb.stop()
    with pytest.raises(SandboxNotRunningError):
        await other.snapshot()
    for bad in ("python:3.11", "aviato-snapshot:../../etc/passwd", "aviato-snapshot:"):
        with pytest.raises(SandboxNotFoundError):
            await remove_snapshot(bad, defaults)
    from aviato.protocol import snapshot_agent_key

    elsewhere = f"aviato-snapshot:{snapshot_agent_key('no-such-agent')}-sb-00000001-1"
    with pytest.raises(SandboxFailedError, match="lives on the agent that took it"):
        await Sandbox.create("sleep", "infinity", container_image=elsewhere, defaults=defaults)


# --------------------------------------------------------------------------- CLI


def _aviato(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", "--scheduler", cluster.address, *args],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_pause_resume_snapshot_ls_rm(defaults: SandboxDefaults, cluster: Cluster) -> None:
    if cluster.runtime == "local":
        need_cgroups(await _runtime_name(defaults))
    async with Sandbox.session(defaults) as session:
        sb = session.create(**SLEEP)
        sid = await sb.start()
        done = await asyncio.to_thread(_aviato, cluster, "pause", sid)
        assert done.returncode == 0, done.stderr
        ps = await asyncio.to_thread(_aviato, cluster, "ps", "--format", "json")
        rows = {r["sandbox_id"]: r for r in json.loads(ps.stdout)}
        assert rows[sid]["status"] == "paused"
        again = await asyncio.to_thread(_aviato, cluster, "pause", sid)
        assert again.returncode == 1 and "already paused" in again.stderr
        assert (await asyncio.to_thread(_aviato, cluster, "resume", sid)).returncode == 0
        taken = await asyncio.to_thread(_aviato, cluster, "snapshot", sid)
        if _gvisor(cluster):
            assert taken.returncode == 1 and "gVisor" in taken.stderr, taken.stderr
            return
        assert taken.returncode == 0, taken.stderr
        image = taken.stdout.strip()
        ls = await asyncio.to_thread(_aviato, cluster, "snapshot", "ls")
        assert image in ls.stdout and sid in ls.stdout
        rm = await asyncio.to_thread(_aviato, cluster, "snapshot", "rm", image)
        assert rm.returncode == 0, rm.stderr
        ls = await asyncio.to_thread(_aviato, cluster, "snapshot", "ls", "--format", "json")
        assert image not in [s["image"] for s in json.loads(ls.stdout)]
        await sb.stop()
        ps = await asyncio.to_thread(_aviato, cluster, "ps", "--all", "--format", "json")
        rows = {r["sandbox_id"]: r for r in json.loads(ps.stdout)}
        assert rows[sid]["ended_by"] == "stopped"


# --------------------------------------------------------------------------- helpers


async def _runtime_name(defaults: SandboxDefaults) -> str:
    async with Sandbox(**SLEEP, defaults=defaults) as sb:
        return sb.runtime


async def _has_ticks(sb: Sandbox, n: int) -> bool:
    try:
        return len(await _ticks(sb)) >= n
    except Exception:
        return False


async def _ticked_after(sb: Sandbox, when: float) -> bool:
    return any(t > when for t in await _ticks(sb))
