"""Pre-started spares (agent/spares.py): a sandbox made from one behaves exactly like a
fresh one; spares are never shared nor reused, fill free slots only (and the scheduler
sees them), and an agent restart (kill -9 or clean) loses no claimed one and leaks no
unclaimed one. The runtime conformance suite runs against spare-backed sandboxes in
tests/test_runtime_conformance.py ("docker-spare"), the Sandbox API's in tests/test_sandbox.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.docker import DockerRuntime
from agent.runtime.spare_claims import SpareClaims
from agent.spares import Demand, Shape, parse_warm, to_start
from aviato import Sandbox, SandboxDefaults, SandboxFailedError, SandboxStatus
from aviato.protocol import SandboxSpec
from tests.conftest import IMAGE, Cluster, containers_of, docker_cluster, wait_until
from tests.test_cli import _aviato
from tests.test_supervisor import _same_behaviour, _wait_for_supervisor

pytestmark = pytest.mark.docker

WARM = ["--warm", f"{IMAGE}=2"]


# ---------------------------------------------------------------- pure decisions


def test_parse_warm() -> None:
    assert parse_warm(["python:3.11=2", "reg:5000/img:tag=1", "python:3.11=1"]) == {
        Shape("python:3.11"): 3,
        Shape("reg:5000/img:tag"): 1,
    }
    for bad in ("python:3.11", "=2", "python:3.11=x", "python:3.11=-1"):
        with pytest.raises(ValueError, match="IMAGE=N"):
            parse_warm([bad])


def test_demand_is_bounded_and_forgets() -> None:
    a, b = Shape("a"), Shape("b", memory_bytes=1 << 28)
    d = Demand(cap=3, window=60)
    for t in range(5):
        d.note(a, t)
    d.note(b, 5)
    assert d.targets(10) == {a: 3}  # the cap, most created first
    assert sum(Demand(cap=3, memory=4).targets(0).values()) == 0
    assert d.targets(70) == {}  # past the window: nothing learned is kept
    assert Demand(cap=0).targets(0) == {}


def test_to_start_fills_the_furthest_behind_within_room() -> None:
    a, b = Shape("a"), Shape("b")
    assert to_start({a: 2, b: 2}, {a: 1}, room=2) == [b, b]  # b was furthest behind
    assert to_start({a: 2, b: 2}, {a: 1}, room=3) == [b, b, a]
    assert to_start({a: 2}, {a: 2}, room=5) == []
    assert to_start({a: 5}, {}, room=2) == [a, a]
    assert to_start({a: 5}, {}, room=0) == []


def test_claim_records_name_the_sandbox_until_it_ends(tmp_path: Path) -> None:
    claims = SpareClaims(tmp_path / "claims")
    spec = SandboxSpec(image=IMAGE, command="sleep", session_id="s1", env={"A": "1"})
    assert claims.labels("spare-a") is None  # never claimed: a leftover when listed
    claims.record("spare-a", "sb-1", spec, 12.5)
    labels = SpareClaims(tmp_path / "claims").labels("spare-a")  # as a restarted agent
    assert labels is not None and labels["aviato.sandbox"] == "sb-1"
    assert labels["aviato.session"] == "s1" and float(labels["aviato.created"]) == 12.5
    assert SandboxSpec(**json.loads(labels["aviato.spec"])).env == {"A": "1"}
    claims.record("spare-b", "sb-2", spec, 1.0)
    claims.prune({"spare-b"})  # spare-a's container is gone
    assert claims.labels("spare-a") is None and claims.labels("spare-b") is not None
    claims.release("sb-2")
    assert not list((tmp_path / "claims").iterdir())
    with pytest.raises(ValueError):
        claims.record("../x", "sb-3", spec, 1.0)


# ---------------------------------------------------------------- helpers


@pytest.fixture
def spare_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """One agent, 4 slots, 2 spares of python:3.11 kept warm."""
    yield from docker_cluster(tmp_path, agents=1, slots=4, agent_args=WARM)


@pytest.fixture
def cluster_of(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """One agent with the slots and agent flags the test's parameter gives."""
    slots, args = request.param
    yield from docker_cluster(tmp_path, agents=1, slots=slots, agent_args=args)


def spares_seen(c: Cluster) -> int:
    """Spares the scheduler sees on the cluster's live agents."""
    return sum(a.spares for a in c.status().agents if a.alive)


def wait_spares(c: Cluster, n: int, what: str = "") -> None:
    """Until the scheduler sees ``n`` spares and ``n`` are parked (started, not claimed)."""
    wait_until(
        lambda: spares_seen(c) == n and len(parked(c)) == n,
        60,
        0.05,
        what or f"{n} spares to be seen",
    )


def container(name: str) -> dict:
    out = subprocess.run(
        ["docker", "container", "inspect", name], capture_output=True, timeout=30, check=True
    )
    found: dict = json.loads(out.stdout)[0]
    return found


def container_id(sandbox_id: str) -> str:
    return str(container(f"aviato-{sandbox_id}")["Id"])


def from_spare(sandbox_id: str) -> bool:
    return container(f"aviato-{sandbox_id}")["Config"]["Labels"].get("aviato.spare") == "1"


def exists(cid: str) -> bool:
    r = subprocess.run(["docker", "container", "inspect", cid], capture_output=True, timeout=30)
    return r.returncode == 0


def parked(c: Cluster) -> list[str]:
    """The cluster's spares waiting to be claimed (a claimed one takes its sandbox's name)."""
    return [n for n in containers_of(c.agent_ids) if n.startswith("aviato-spare-")]


def claims_dir(c: Cluster, agent_id: str) -> Path:
    key = hashlib.sha256(agent_id.encode()).hexdigest()[:16]
    return c.tmp / "state" / "spares" / key


# ---------------------------------------------------------------- behaviour


async def test_a_spare_backed_sandbox_behaves_like_a_fresh_one(spare_cluster: Cluster) -> None:
    c = spare_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    wait_spares(c, 2)
    async with Sandbox.session(d) as session:
        sb = session.create(command="sleep", args=["infinity"], tags=["warm"])
        await sb.start()
        assert from_spare(sb.sandbox_id or "")
        assert await _wait_for_supervisor(sb)
        await _same_behaviour(sb)
        # Its identity: session, tags, listed as any sandbox.
        rows = await Sandbox.list(tags=["warm"], defaults=d)
        assert [r.sandbox_id for r in rows] == [sb.sandbox_id]
        assert rows[0].info and rows[0].info.spec.session_id == session.session_id
        # The spec's env reaches the command and every exec; the command's output, exit
        # code and stream order are the sandbox's, as for a fresh one.
        script = 'echo "out $A"; sleep 0.1; echo err >&2; sleep 0.1; '
        script += 'tr -d "\\0" < /proc/$$/cmdline; exit 3'
        wait_spares(c, 2, "the spare to be refilled")
        ran = session.create(command="sh", args=["-c", script], env={"A": "spec"})
        await ran.start()
        assert from_spare(ran.sandbox_id or "")
        assert await ran.wait(timeout=30) == 3
        logs = (await ran.logs()).decode()
        assert logs.startswith("out spec\nerr\n"), logs
        assert "sh-c" in logs  # the command itself, not the parker
        env = session.create(command="sleep", args=["infinity"], env={"A": "spec", "PATH": "/bin"})
        await env.start()
        r = await env.exec(["sh", "-c", 'echo "$A $PATH"'])
        assert r.stdout == b"spec /bin\n"
        r = await env.exec(["sh", "-c", 'echo "$A"'], env={"A": "mine"})
        assert r.stdout == b"mine\n"
        # A lifetime is kept as for any sandbox.
        short = session.create(command="sleep", args=["infinity"], max_lifetime_seconds=1)
        await short.start()
        await asyncio.to_thread(
            wait_until,
            lambda: not exists(f"aviato-{short.sandbox_id}"),
            30,
            0.1,
            "the short-lived sandbox to end",
        )


async def test_a_create_the_spares_do_not_match_is_made_afresh(spare_cluster: Cluster) -> None:
    c = spare_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    wait_spares(c, 2)
    async with Sandbox.session(d) as session:
        other = session.create(command="sleep", args=["infinity"], memory_bytes=256 << 20)
        func = session.create(command="sleep", args=["infinity"], working_dir="/srv")
        await asyncio.gather(other.start(), func.start())
        assert not from_spare(other.sandbox_id or "") and not from_spare(func.sandbox_id or "")
        assert container(f"aviato-{other.sandbox_id}")["HostConfig"]["Memory"] == 256 << 20
        assert (await func.exec(["pwd"])).stdout == b"/srv\n"
        assert spares_seen(c) == 2  # 4 slots: 2 sandboxes, 2 spares

        @session.function()
        def double(x: int) -> int:  # function workers are made afresh
            return 2 * x

        assert (await double(21)).value == 42
    # A command the image lacks fails as a fresh create does; the spare stays ready.
    await asyncio.to_thread(wait_spares, c, 2, "the spares to be refilled")
    ready = sorted(parked(c))
    with pytest.raises(SandboxFailedError, match=r"no-such-cmd.*was not found in image"):
        await Sandbox.create("no-such-cmd", defaults=d)
    assert sorted(parked(c)) == ready and spares_seen(c) == 2


async def test_spares_are_never_shared_nor_reused(spare_cluster: Cluster) -> None:
    c = spare_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    wait_spares(c, 2)
    before = {container(n)["Id"] for n in parked(c)}
    async with Sandbox.session(d) as one, Sandbox.session(d) as two:
        a = one.create(command="sleep", args=["infinity"])
        b = two.create(command="sleep", args=["infinity"])
        await asyncio.gather(a.start(), b.start())
        ids = {container_id(a.sandbox_id or ""), container_id(b.sandbox_id or "")}
        assert ids == before  # one spare each, none shared
        # Each session's sandbox is its own: a file in one is not in the other.
        await a.write_file("/tmp/mine", b"one")
        assert (await b.exec(["test", "-e", "/tmp/mine"])).returncode == 1
        await asyncio.to_thread(wait_spares, c, 2, "the spares to be refilled")
        refilled = {container(n)["Id"] for n in parked(c)}
        assert not refilled & ids
        await a.stop()
    # Ended: their containers are gone, never parked again.
    await asyncio.to_thread(
        wait_until, lambda: not any(exists(i) for i in ids), 20, 0.1, "the ended to go"
    )
    again = await Sandbox.create("sleep", "infinity", defaults=d)
    try:
        assert container_id(again.sandbox_id or "") not in ids
    finally:
        await again.stop()


@pytest.mark.parametrize("cluster_of", [(2, ["--warm", f"{IMAGE}=3"])], indirect=True)
async def test_spares_fill_free_slots_only_and_the_scheduler_sees_them(cluster_of: Cluster) -> None:
    c = cluster_of
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    wait_spares(c, 2, "spares in both free slots, not 3")
    assert len(parked(c)) == 2
    status = json.loads(_aviato("status", "--format", "json", "--scheduler", c.address).stdout)
    assert [a["spares"] for a in status["agents"]] == [2]  # what `aviato status` shows
    first = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(first.sandbox_id or "")
    await asyncio.to_thread(wait_spares, c, 1, "one spare: one slot is free")
    # No spare of this shape: one is dropped to make room, the create goes on.
    other = await Sandbox.create("sleep", "infinity", memory_bytes=128 << 20, defaults=d)
    assert not from_spare(other.sandbox_id or "")
    await asyncio.to_thread(wait_spares, c, 0, "no spare: no slot is free")
    assert parked(c) == []
    used = c.status().agents[0]
    assert (used.slots, used.used, used.spares) == (2, 2, 0)
    await first.stop()
    await other.stop()
    await asyncio.to_thread(wait_spares, c, 2, "spares back in the freed slots")


@pytest.mark.parametrize("cluster_of", [(4, ["--warm-learn", "1"])], indirect=True)
async def test_learned_spares_follow_demand(cluster_of: Cluster) -> None:
    c = cluster_of
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    assert spares_seen(c) == 0
    sb = await Sandbox.create("sleep", "infinity", cpus=0.5, defaults=d)
    assert not from_spare(sb.sandbox_id or "")
    await asyncio.to_thread(wait_spares, c, 1, "a spare of the shape just created")
    again = await Sandbox.create("sleep", "infinity", cpus=0.5, defaults=d)
    assert from_spare(again.sandbox_id or "")
    assert container(f"aviato-{again.sandbox_id}")["HostConfig"]["NanoCpus"] == 500_000_000
    await sb.stop()
    await again.stop()


# ---------------------------------------------------------------- agent restarts


async def test_agent_killed_with_spares_claimed_and_not_leaves_nothing(
    spare_cluster: Cluster,
) -> None:
    c = spare_cluster
    agent = c.agent_ids[0]
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    wait_spares(c, 2)
    sb = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(sb.sandbox_id or "")
    assert await _wait_for_supervisor(sb)
    await asyncio.to_thread(wait_spares, c, 2, "the spare to be refilled")
    old = set(containers_of([agent]))
    assert len(old) == 3 and list(claims_dir(c, agent).glob("*.json"))
    c.kill(agent)  # kill -9
    # As for any sandbox, its watchdog takes it down: the client hears it was lost.
    with pytest.raises(Exception, match=f"agent {agent} lost"):
        await sb.wait(timeout=30)
    c.start_agent(agent)
    await asyncio.to_thread(
        wait_until,
        lambda: not old & set(containers_of([agent])),
        30,
        0.2,
        "the killed agent's sandbox and spares to be removed",
    )
    await asyncio.to_thread(wait_spares, c, 2, "new spares")
    assert not list(claims_dir(c, agent).glob("*.json"))  # no record outlives its sandbox
    again = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(again.sandbox_id or "")
    await again.stop()


@pytest.mark.parametrize("cluster_of", [(4, [*WARM, "--keep-on-exit"])], indirect=True)
async def test_agent_restarted_cleanly_finds_its_claimed_spares(cluster_of: Cluster) -> None:
    """--keep-on-exit: the claimed spare stays running, the unclaimed ones go; the
    claim record names it, so the next agent reports it as its sandbox (session, spec)
    and not as a leftover spare, and the reaper removes it by that id."""
    c = cluster_of
    agent = c.agent_ids[0]
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    await asyncio.to_thread(wait_spares, c, 2)
    async with Sandbox.session(d) as session:
        sb = session.create(command="sleep", args=["infinity"], env={"A": "kept"})
        await sb.start()
        sid = sb.sandbox_id or ""
        assert from_spare(sid)
        assert await _wait_for_supervisor(sb)
        await asyncio.to_thread(wait_spares, c, 2)
        c.kill(agent, signal.SIGTERM)
        assert parked(c) == []  # unclaimed spares never outlive their agent
        assert [n.removeprefix("aviato-") for n in containers_of([agent])] == [sid]
        # What a restarted agent (and through it the scheduler) sees: the sandbox.
        runtime = DockerRuntime()
        runtime.claims = SpareClaims(claims_dir(c, agent))
        try:
            found = await runtime.list(agent)
            assert [f.sandbox_id for f in found] == [sid]
            assert found[0].labels["aviato.session"] == session.session_id
            spec = SandboxSpec(**json.loads(found[0].labels["aviato.spec"]))
            assert spec.env == {"A": "kept"} and spec.command == "sleep"
            r = await runtime.exec(sid, ("sh", "-c", "echo $A"))
            assert r.stdout == b"kept\n"  # exec through the engine gets its env too
        finally:
            await runtime.close()
        c.start_agent(agent)
        await asyncio.to_thread(
            wait_until,
            lambda: (
                f"reaping sandbox {sid} unknown to the scheduler"
                in (c.tmp / f"{agent}.log").read_text()
            ),
            30,
            0.1,
            "the restarted agent to report the claimed spare as its sandbox",
        )
        await asyncio.to_thread(
            wait_until,
            lambda: not exists(f"aviato-{sid}"),
            30,
            0.1,
            "the sandbox the scheduler wrote off to be reaped",
        )
        assert await sb.status() is SandboxStatus.TERMINATED
    await asyncio.to_thread(wait_spares, c, 2)
    assert not list(claims_dir(c, agent).glob("*.json"))
