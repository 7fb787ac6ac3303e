"""Object refs on real clusters (issue 14 part 3): ``session.put``, refs passed as
arguments (nested too), ``fn.ref`` and chains, release, the session's close, and what a
lost ref does. Agents here run with unpickling made to fail (the conftest clusters), so
a value that reaches a worker went there as opaque bytes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

import aviato
from aviato import (
    FunctionSerializationError,
    ObjectLostError,
    ObjectRef,
    ObjectStoreFullError,
    Sandbox,
    SandboxDefaults,
    SandboxError,
)
from aviato.protocol import (
    GetObject,
    ObjectsReleased,
    ObjectStats,
    ObjectStatsReply,
    PutObject,
    ReleaseObjects,
)
from tests.conftest import IMAGE, ROOT, Cluster, containers_of, docker_cluster, wait_until
from tests.test_local_runtime import _local_cluster as local_cluster

CLI = (sys.executable, "-m", "aviato.cli")


def size_of(value: bytes) -> int:
    return len(value)


def total(parts: dict[str, list[bytes]]) -> int:
    return sum(len(p) for ps in parts.values() for p in ps)


def double(data: bytes) -> bytes:
    return data + data


def pid_and_len(data: bytes) -> tuple[int, int]:
    return os.getpid(), len(data)


def append_one(xs: list[int]) -> int:
    xs.append(1)  # a call may change what it is given: the next call must not see it
    return len(xs)


class Sizes:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def add(self, data: bytes) -> list[int]:
        self.seen.append(len(data))
        return self.seen


def fail_on(data: bytes) -> bytes:
    raise ValueError(f"refused {len(data)} bytes")


@pytest.fixture(scope="module", params=["docker", "local"])
def one_agent(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One agent of each runtime: Docker, and local (bubblewrap + cgroups)."""
    tmp = tmp_path_factory.mktemp(f"objects-{request.param}")
    if request.param == "docker":
        yield from docker_cluster(tmp, agents=1, slots=4)
    else:
        yield from local_cluster(tmp, agents=1, slots=4)


def _defaults(cluster: Cluster) -> SandboxDefaults:
    return SandboxDefaults(container_image=IMAGE, scheduler=cluster.address, lease_seconds=5)


def _count_sent(pool) -> list[int]:
    """The payload bytes each batch of ``pool`` carries from now on."""
    sent: list[int] = []
    for handle in pool.workers:
        conn = handle.conn
        if "send_nowait" in vars(conn):
            continue  # (wrapped already: two workers share the agent's channel)
        original = conn.send_nowait

        def send_nowait(msg, payloads, *rest, _original=original):
            sent.append(sum(memoryview(p).nbytes for p in payloads))
            return _original(msg, payloads, *rest)

        conn.send_nowait = send_nowait
    return sent


async def _agent_stats(session, address: str) -> ObjectStatsReply:
    conn = session._connections.get(address, session.defaults.cluster_token())
    reply = await conn.request(ObjectStats(), timeout=10)
    assert isinstance(reply.msg, ObjectStatsReply)
    return reply.msg


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
            size_fn = session.function(max_workers=2)(size_of)  # a slot left for the actor
            total_fn = session.function()(total)
            await size_fn(b"warm")  # its workers, and their channel to the agent
            value = os.urandom(3 << 20)
            ref = await session.put(value)
            assert isinstance(ref, ObjectRef)
            (address,) = {w.sandbox.info.agent_address for w in size_fn._pool().workers}
            before = await _agent_stats(session, address)
            sent = _count_sent(size_fn._pool())
            results = await asyncio.gather(*(size_fn(ref) for _ in range(20)))
            assert [r.value for r in results] == [len(value)] * 20
            assert 0 < sum(sent) < 64 * 1024, sent  # the ref went, never the value
            after = await _agent_stats(session, address)
            workers = len(size_fn._pool().workers)
            assert 1 <= after.handed - before.handed <= workers  # once per worker
            # nested in dicts, lists and tuples
            r = await total_fn({"a": [ref, ref], "b": [ref]})
            assert r.value == 3 * len(value)
            assert await ref.get() == value
            mutable = await session.put([0])
            append_fn = session.function()(append_one)
            lengths = await asyncio.gather(*(append_fn(mutable) for _ in range(10)))
            assert {r.value for r in lengths} == {2}  # rebuilt for each call
            with pytest.raises(FunctionSerializationError, match="inside a put value"):
                await session.put({"nested": ref})
            sizes = session.cls()(Sizes)()  # an actor: refs among its calls keep their order
            calls = [sizes.add(ref), sizes.add(b"xy"), sizes.add(ref)]
            assert (await asyncio.gather(*calls))[-1].value == [len(value), 2, len(value)]
            await sizes.close()
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
            refs = [f.ref(b"ab") for _ in range(3)]  # refs in aviato.wait, as in ray.wait
            done, pending = await aviato.wait(refs, num_returns=3, timeout=120)
            assert (done, pending) == (refs, [])
            assert [await r.get() for r in done] == [b"abab"] * 3
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


def test_status_shows_bytes_held_per_agent(one_agent: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(one_agent)) as session:
            await session.put(os.urandom(3 << 20))
            done = await asyncio.to_thread(
                subprocess.run,
                [*CLI, "status", "--scheduler", one_agent.address],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            assert done.returncode == 0, done.stderr
            assert "objects held" in done.stdout and "3.0 MiB" in done.stdout, done.stdout
            done = await asyncio.to_thread(
                subprocess.run,
                [*CLI, "status", "--format", "json", "--scheduler", one_agent.address],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=ROOT,
            )
            held = json.loads(done.stdout)["objects"][one_agent.agent_ids[0]]
            assert held["objects"] == 1 and held["memory_bytes"] >= 3 << 20, held

    asyncio.run(main())


async def _spread(session, fn, agents: int) -> set[str]:
    """Warm ``fn``'s pool until its workers are on ``agents`` agents; their ids."""
    deadline = time.monotonic() + 60
    while True:
        await asyncio.gather(*(fn(b"x") for _ in range(30)))
        pool = next(iter(session._pools.values()))
        on = {w.sandbox.info.agent_id for w in pool.workers if w.sandbox.info}
        if len(on) >= agents:
            return on
        assert time.monotonic() < deadline, f"workers only on {on}"


async def _stats(session, cluster: Cluster) -> dict[str, ObjectStatsReply]:
    out = {}
    for agent in cluster.status().agents:
        conn = session._connections.get(agent.address, session.defaults.cluster_token())
        reply = await conn.request(ObjectStats(), timeout=10)
        out[agent.agent_id] = reply.msg
    return out


async def test_another_agent_fetches_an_object_once(fresh_cluster: Cluster) -> None:
    async with Sandbox.session(_defaults(fresh_cluster)) as session:
        fn = session.function(max_workers=6)(pid_and_len)
        await _spread(session, fn, 2)
        value = os.urandom(4 << 20)
        ref = await session.put(value)
        before = await _stats(session, fresh_cluster)
        results = []
        for _ in range(6):  # batches after batches: the first one fetches
            results += await asyncio.gather(*(fn(ref) for _ in range(10)))
        assert {r.value[1] for r in results} == {len(value)}
        pool = next(iter(session._pools.values()))
        agent_of = {w.sandbox_id: w.sandbox.info.agent_id for w in pool.workers}
        used = {agent_of.get(r.sandbox_id) for r in results}
        assert len(used) == 2, used  # both agents ran calls on the ref
        after = await _stats(session, fresh_cluster)
        holder = ref.source.agent_id
        (other,) = set(after) - {holder}
        assert after[other].fetched - before[other].fetched == 1  # once, not per call
        assert after[holder].served - before[holder].served == 1
        assert after[other].memory_bytes >= len(value)  # its copy, for later calls
    after_close = await _stats_fresh(fresh_cluster)
    assert all(s.objects == 0 for s in after_close.values()), after_close


async def _stats_fresh(cluster: Cluster) -> dict[str, ObjectStatsReply]:
    async with Sandbox.session(_defaults(cluster)) as session:
        return await _stats(session, cluster)


async def test_lost_agent_fn_ref_remade_by_lineage_put_raises(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    killed: list[str] = []
    try:
        async with Sandbox.session(_defaults(c)) as session:
            fn = session.function(max_workers=1, retries=3)(double)
            x = os.urandom(1 << 20)
            out = fn.ref(x)
            source = await out._ready
            put = await session.put(b"kept by put")
            assert put.source.agent_id == source.agent_id  # beside the only worker
            victim = next(n for n in c.agent_ids if n == source.agent_id)
            c.kill(victim)
            killed.append(victim)
            assert await out.get(timeout=120) == x + x  # its call ran again elsewhere
            assert out.source.agent_id != victim
            with pytest.raises(ObjectLostError, match="put the value again"):
                await put.get(timeout=120)
    finally:
        for victim in killed:
            c.start_agent(victim)  # it comes back and reaps what it left
    await asyncio.to_thread(
        wait_until, lambda: not containers_of(c.agent_ids), 30, 0.2, "the victim's containers"
    )


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory):
    """An agent whose store holds 1 MiB in memory and 3 MiB on disk."""
    env = {"AVIATO_OBJECT_MEMORY_BYTES": str(1 << 20), "AVIATO_OBJECT_DISK_BYTES": str(3 << 20)}
    yield from docker_cluster(
        tmp_path_factory.mktemp("small-store"), agents=1, slots=2, agent_env=env
    )


def test_spilled_objects_serve_calls_and_a_full_store_refuses(small_store: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(small_store)) as session:
            size_fn = session.function()(size_of)
            big = os.urandom(2 << 20)
            ref = await session.put(big)  # past the memory budget: on disk
            stats = await _agent_stats(session, ref.source.agent_address)
            assert (stats.memory_bytes, stats.disk_bytes >= len(big)) == (0, True)
            assert (await size_fn(ref)).value == len(big)  # read back for the worker
            assert await ref.get() == big
            with pytest.raises(ObjectStoreFullError, match="release"):
                await session.put(os.urandom(2 << 20))
            with pytest.raises(ObjectStoreFullError):  # a kept result that cannot be
                await session.function()(double).ref(big).get()
            address = ref.source.agent_address
            ref.release()  # sent now, not awaited: wait for it to be done
            deadline = time.monotonic() + 30
            while (await _agent_stats(session, address)).disk_bytes:
                assert time.monotonic() < deadline, "the release never came"
                await asyncio.sleep(0.05)
            await session.put(os.urandom(2 << 20))  # room again

    asyncio.run(main())


def test_bad_object_requests_get_typed_errors(small_store: Cluster) -> None:
    async def main() -> None:
        async with Sandbox.session(_defaults(small_store)) as session:
            (agent,) = small_store.status().agents
            conn = session._connections.get(agent.address, session.defaults.cluster_token())
            for msg, payloads in [
                (PutObject("a" * 32, buffers=2), [b"x"]),  # frames it has not
                (PutObject("../../etc/passwd"), [b"x"]),  # not an id: it would name a file
                (PutObject("b" * 32, buffers=-1), []),
            ]:
                with pytest.raises(SandboxError, match=r"buffers|not 1 to 64"):
                    await conn.request(msg, payloads, timeout=10)
            with pytest.raises(ObjectLostError, match="not held"):
                await conn.request(GetObject("c" * 32), timeout=10)
            reply = await conn.request(ReleaseObjects(("d" * 32,)), timeout=10)
            assert reply.msg == ObjectsReleased(0, 0)
            reply = await conn.request(ObjectStats(), timeout=10)  # it serves on
            assert isinstance(reply.msg, ObjectStatsReply)

    asyncio.run(main())


def test_an_agent_fetches_only_from_agents_of_its_cluster(one_agent: Cluster) -> None:
    """A source is written by the client, and a fetch carries the cluster token: an
    agent asks the scheduler first, and connects to no other address."""
    import socket

    from aviato._objects import ObjectRef as Ref
    from aviato.protocol import ObjectSource

    async def main() -> None:
        with socket.socket() as trap:
            trap.bind(("127.0.0.1", 0))
            trap.listen(1)
            trap.setblocking(False)
            address = f"tcp://127.0.0.1:{trap.getsockname()[1]}"
            async with Sandbox.session(_defaults(one_agent)) as session:
                fn = session.function(max_workers=1)(size_of)
                await fn(b"warm")
                forged = ObjectSource("e" * 32, "not-an-agent", address)
                ready = asyncio.get_running_loop().create_future()
                ready.set_result(forged)
                ref = Ref(session._object_manager(), forged.object_id, ready)
                with pytest.raises(ObjectLostError, match="not a live agent of this cluster"):
                    await fn(ref)
                assert (await fn(b"ok")).value == 2  # the worker serves on
            with pytest.raises(BlockingIOError):
                trap.accept()  # nobody came

    asyncio.run(main())
