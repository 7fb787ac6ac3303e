"""Object refs on real clusters (issue 14 part 3): ``session.put``, refs passed as
arguments (nested too), ``fn.ref`` and chains, release, the session's close, and what a
lost ref does. Agents here run with unpickling made to fail (the conftest clusters), so
a value that reaches a worker went there as opaque bytes."""

from __future__ import annotations

import asyncio
import os

import pytest

from aviato import (
    ObjectLostError,
    ObjectRef,
    Sandbox,
    SandboxDefaults,
)
from aviato.protocol import ObjectStats, ObjectStatsReply
from tests.conftest import IMAGE, Cluster, docker_cluster


def size_of(value: bytes) -> int:
    return len(value)


def total(parts: dict[str, list[bytes]]) -> int:
    return sum(len(p) for ps in parts.values() for p in ps)


def double(data: bytes) -> bytes:
    return data + data


def pid_and_len(data: bytes) -> tuple[int, int]:
    return os.getpid(), len(data)


def fail_on(data: bytes) -> bytes:
    raise ValueError(f"refused {len(data)} bytes")


@pytest.fixture(scope="module")
def one_agent(tmp_path_factory: pytest.TempPathFactory):
    yield from docker_cluster(tmp_path_factory.mktemp("objects"), agents=1, slots=2)


def _defaults(cluster: Cluster) -> SandboxDefaults:
    return SandboxDefaults(container_image=IMAGE, scheduler=cluster.address, lease_seconds=5)


async def _held(session, address_of: list[str]) -> dict[str, int]:
    """Bytes held per agent (memory + disk), by asking each agent."""
    out = {}
    conns = session._connections
    for address in address_of:
        conn = conns.get(address, session.defaults.cluster_token())
        reply = await conn.request(ObjectStats(), timeout=10)
        assert isinstance(reply.msg, ObjectStatsReply)
        out[reply.msg.agent_id] = reply.msg.memory_bytes + reply.msg.disk_bytes
    return out


def test_put_pass_by_ref_and_get(one_agent: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(one_agent)) as session:
            size_fn = session.function()(size_of)
            total_fn = session.function()(total)
            value = os.urandom(3 << 20)
            ref = await session.put(value)
            assert isinstance(ref, ObjectRef)
            results = await asyncio.gather(*(size_fn(ref) for _ in range(20)))
            assert [r.value for r in results] == [len(value)] * 20
            # nested in dicts, lists and tuples
            r = await total_fn({"a": [ref, ref], "b": [ref]})
            assert r.value == 3 * len(value)
            assert await ref.get() == value
            ref.release()
            with pytest.raises(ObjectLostError, match="released"):
                await ref.get()

    asyncio.run(main())


def test_fn_ref_chain_without_the_client(one_agent: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(one_agent)) as session:
            f = session.function()(double)
            g = session.function()(double)
            h = session.function()(size_of)
            x = os.urandom(1 << 20)
            out = g.ref(f.ref(x))  # pending refs as arguments
            assert isinstance(out, ObjectRef)
            r = await h(out)
            assert r.value == 4 * len(x)
            assert await out.get() == x * 4
            bad = session.function()(fail_on).ref(x)
            with pytest.raises(ValueError, match="refused"):
                await bad.get()

    asyncio.run(main())


def test_session_close_frees_objects(one_agent: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(one_agent)) as session:
            ref = await session.put(os.urandom(2 << 20))
            address = ref.source.agent_address
            held = await _held(session, [address])
            assert sum(held.values()) >= 2 << 20
        async with Sandbox.session(_defaults(one_agent)) as other:
            assert sum((await _held(other, [address])).values()) == 0

    asyncio.run(main())
