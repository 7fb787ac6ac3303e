"""Object refs on a CURVE cluster (issue 14 part 3): an agent fetches another agent's
object with its own keypair, which the other admits for object fetches only."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from zmq.auth import load_certificate

from aviato import Sandbox, SandboxDefaults, UnauthorizedError
from aviato._auth import CurveKeys
from aviato._connection import Connection
from aviato._objects import curve_for
from aviato.protocol import (
    ClusterStatusReply,
    Exec,
    GetObject,
    ObjectData,
    ObjectStats,
    ObjectStatsReply,
    Ping,
)
from tests.conftest import IMAGE, Cluster, containers_of, docker_cluster, wait_until


def pid_and_len(data: bytes) -> tuple[int, int]:
    return os.getpid(), len(data)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aviato._auth import create_cluster_keys

    directory = tmp_path_factory.mktemp("keys")
    create_cluster_keys(directory, agents=2, clients=1)
    return directory


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("keyed-objects"), agents=2, keys=keys)


def _defaults(cluster: Cluster, keys: Path) -> SandboxDefaults:
    return SandboxDefaults(
        container_image=IMAGE,
        scheduler=cluster.address,
        lease_seconds=5,
        keys=str(keys),
        client_key="client-1",
        local_lane=False,  # the client over CURVE too
    )


async def _stats(session, cluster: Cluster) -> dict[str, ObjectStatsReply]:
    status = cluster.status()
    assert isinstance(status, ClusterStatusReply)
    out = {}
    for agent in status.agents:
        curve = curve_for(session.defaults, agent.public_key)
        conn = session._connections.get(agent.address, None, curve)
        reply = await conn.request(ObjectStats(), timeout=20)
        assert isinstance(reply.msg, ObjectStatsReply)
        out[agent.agent_id] = reply.msg
    return out


async def test_an_agent_fetches_another_agents_object_over_curve(
    keyed: Cluster, keys: Path
) -> None:
    async with Sandbox.session(_defaults(keyed, keys)) as session:
        fn = session.function(max_workers=6)(pid_and_len)
        deadline = time.monotonic() + 120
        while True:  # workers on both agents
            await asyncio.gather(*(fn(b"x") for _ in range(30)))
            pool = next(iter(session._pools.values()))
            on = {w.sandbox.info.agent_id for w in pool.workers if w.sandbox.info}
            if len(on) >= 2:
                break
            assert time.monotonic() < deadline, f"workers only on {on}"
        value = os.urandom(4 << 20)
        ref = await session.put(value)
        assert ref.source is not None and ref.source.agent_public_key  # it serves CURVE
        before = await _stats(session, keyed)
        results = []
        for _ in range(6):
            results += await asyncio.gather(*(fn(ref) for _ in range(10)))
        assert {r.value[1] for r in results} == {len(value)}
        agent_of = {w.sandbox_id: w.sandbox.info.agent_id for w in pool.workers}
        assert len({agent_of.get(r.sandbox_id) for r in results}) == 2  # both ran calls
        after = await _stats(session, keyed)
        (other,) = set(after) - {ref.source.agent_id}
        assert after[other].fetched - before[other].fetched == 1  # fetched, once
        assert after[ref.source.agent_id].served - before[ref.source.agent_id].served == 1
    await asyncio.to_thread(
        wait_until, lambda: not containers_of(keyed.agent_ids), 30, 0.2, "containers"
    )


async def test_an_agent_key_may_only_fetch_objects(keyed: Cluster, keys: Path) -> None:
    """Another agent's key is admitted on an agent's data plane for GetObject alone."""
    status = keyed.status()
    assert isinstance(status, ClusterStatusReply)
    target = status.agents[0]
    public, secret = load_certificate(keys / "agents" / "agent-2.key_secret")
    assert secret is not None
    conn = Connection(target.address, curve=CurveKeys(public, secret, target.public_key.encode()))
    try:
        for msg in (Ping(), Exec("sb-none", ("true",))):
            started = time.monotonic()
            with pytest.raises(UnauthorizedError, match="may only fetch objects"):
                await conn.request(msg, timeout=20)
            assert time.monotonic() - started < 10
        async with Sandbox.session(_defaults(keyed, keys)) as session:
            ref = await session.put(b"for agents")
            assert ref.source is not None
            if ref.source.agent_id != target.agent_id:
                conn.close()
                other = next(a for a in status.agents if a.agent_id == ref.source.agent_id)
                curve = CurveKeys(public, secret, other.public_key.encode())
                conn = Connection(other.address, curve=curve)
            reply = await conn.request(GetObject(ref.object_id), timeout=20)
            assert isinstance(reply.msg, ObjectData) and reply.payloads
    finally:
        conn.close()
