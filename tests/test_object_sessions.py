"""The objects of a client that died without closing its session (issue 14 part 3):
freed by their agents once the session's lease lapses at the scheduler; a live
session's objects are untouched. The scheduler's answer (scheduler/object_sessions.py)
is tested pure here too."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from aviato import Sandbox, SandboxDefaults
from aviato.protocol import MAX_OBJECT_SESSIONS, ObjectStats, ObjectStatsReply
from scheduler.object_sessions import ended_sessions
from tests.conftest import IMAGE, ROOT, Cluster, docker_cluster
from tests.test_local_runtime import _local_cluster as local_cluster
from tests.test_state import make_state

# ---------------------------------------------------------------------- pure


def test_closed_and_expired_sessions_are_named_live_ones_not() -> None:
    state = make_state(adopted_lease_seconds=30.0)
    state.session_keepalive("live", 5.0, now=0.0)
    state.session_keepalive("dies", 5.0, now=0.0)
    state.session_keepalive("closes", 5.0, now=0.0)
    state.session_close("closes", "session closed", now=1.0)
    assert ended_sessions(state, ["live", "dies", "closes", ""], now=2.0) == ("closes",)
    state.session_keepalive("live", 5.0, now=4.0)
    state.tick(now=6.0)  # "dies" sent no keepalive: its lease lapsed
    assert ended_sessions(state, ["live", "dies", "closes"], now=6.0) == ("dies", "closes")


def test_an_unknown_session_is_adopted_and_expires_unless_renewed() -> None:
    """After a scheduler restart it knows no session: one an agent names gets a lease
    of its own, which its client renews if alive."""
    state = make_state(adopted_lease_seconds=30.0)
    assert ended_sessions(state, ["orphan", "renewed"], now=0.0) == ()
    assert {"orphan", "renewed"} <= set(state.sessions)
    state.session_keepalive("renewed", 30.0, now=20.0)
    state.tick(now=31.0)
    assert ended_sessions(state, ["orphan", "renewed"], now=31.0) == ("orphan",)


def test_a_long_or_odd_question_is_bounded() -> None:
    state = make_state()
    many = [f"s{i}" for i in range(MAX_OBJECT_SESSIONS + 50)]
    assert ended_sessions(state, many, now=0.0) == ()
    assert len(state.sessions) == MAX_OBJECT_SESSIONS  # the rest were not read
    assert ended_sessions(state, [None, 3, ""], now=0.0) == ()  # type: ignore[list-item]


# ---------------------------------------------------------------------- real cluster

DEAD_CLIENT = """
import asyncio, os, sys
from aviato import Sandbox, SandboxDefaults

async def main():
    d = SandboxDefaults(container_image=sys.argv[1], scheduler=sys.argv[2],
                        lease_seconds=float(sys.argv[3]))
    session = Sandbox.session(d)
    await session.__aenter__()
    ref = await session.put(os.urandom(3 << 20))
    print(ref.source.agent_address, flush=True)
    await asyncio.sleep(3600)  # SIGKILLed here: its session is never closed

asyncio.run(main())
"""

LEASE = 3.0


@pytest.fixture(scope="module", params=["docker", "local"])
def either(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Two agents of each runtime: Docker, and local (bubblewrap + cgroups)."""
    tmp = tmp_path_factory.mktemp(f"object-sessions-{request.param}")
    if request.param == "docker":
        yield from docker_cluster(tmp, agents=2, slots=2)
    else:
        yield from local_cluster(tmp, agents=2, slots=2)


async def _held(session, address: str) -> ObjectStatsReply:
    conn = session._connections.get(address, session.defaults.cluster_token())
    reply = await conn.request(ObjectStats(), timeout=10)
    assert isinstance(reply.msg, ObjectStatsReply)
    return reply.msg


async def test_a_killed_clients_objects_are_freed_after_its_lease(either: Cluster) -> None:
    cluster = either
    d = SandboxDefaults(container_image=IMAGE, scheduler=cluster.address, lease_seconds=LEASE)
    async with Sandbox.session(d) as live:
        kept = os.urandom(1 << 20)
        ref = await live.put(kept)
        address = ref.source.agent_address
        proc = subprocess.Popen(
            [sys.executable, "-c", DEAD_CLIENT, IMAGE, cluster.address, str(LEASE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line.startswith("tcp://") or line.startswith("ipc://"), line + (
                proc.stderr.read() if proc.stderr else ""
            )
            victim = line.strip()
            before = await _held(live, victim)
            assert before.memory_bytes + before.disk_bytes >= 3 << 20, before
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

        # Its lease lapses after LEASE s; its agent asks every 2 s. The bound only
        # catches a hang (or objects that are never freed).
        deadline = killed_at + 60
        while True:
            now_held = await _held(live, victim)
            if now_held.memory_bytes + now_held.disk_bytes < 3 << 20:
                break
            assert time.monotonic() < deadline, f"the dead client's objects stay: {now_held}"
            await asyncio.sleep(0.1)
        took = time.monotonic() - killed_at
        assert took < LEASE + 30, took
        # The live session's object is untouched, on its agent and for its calls.
        held = [await _held(live, a.address) for a in cluster.status().agents]
        assert sum(s.objects for s in held) == 1, held
        assert (await _held(live, address)).objects == 1
        assert await ref.get() == kept
    # And with the live session's close, nothing is held anywhere.
    async with Sandbox.session(d) as other:
        for agent in cluster.status().agents:
            assert (await _held(other, agent.address)).objects == 0
