"""Pre-started spares on the local runtime (bubblewrap + cgroups): a spare is a sandbox
whose supervised command is the parker (agent/spares.py), its directory named after the
spare; a claim renames it and rewrites its labels, and the parker execs the sandbox's
command as the same pid. As on Docker: never shared nor reused, in free slots only (the
scheduler sees them), and nothing left after the agent ends, killed or not (local
sandboxes die with their agent). The Sandbox API's conformance suite runs on them too
(tests/test_sandbox.py, "local-spare")."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from aviato import Sandbox, SandboxDefaults, SandboxFailedError
from tests.conftest import Cluster, wait_until
from tests.test_local_runtime import STATE, _local_cluster, need_cgroups
from tests.test_supervisor import _same_behaviour

IMAGE = "python:3.11"
WARM = ["--warm", f"{IMAGE}=2"]


@pytest.fixture
def warm_local(tmp_path: Path) -> Iterator[Cluster]:
    """One local agent, 4 slots, 2 spares of python:3.11 kept warm."""
    yield from _local_cluster(tmp_path, agents=1, slots=4, agent_args=WARM)


@pytest.fixture
def local_of(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    slots, args = request.param
    yield from _local_cluster(tmp_path, agents=1, slots=slots, agent_args=args)


def parked(c: Cluster) -> list[str]:
    """Spares waiting to be claimed (a claimed one's directory takes its sandbox's id)."""
    return sorted(p.name for a in c.agent_ids for p in (STATE / a).glob("spare-*"))


def spares_seen(c: Cluster) -> int:
    return sum(a.spares for a in c.status().agents if a.alive)


def wait_spares(c: Cluster, n: int, what: str = "") -> None:
    wait_until(
        lambda: spares_seen(c) == n and len(parked(c)) == n,
        60,
        0.05,
        what or f"{n} spares to be seen",
    )


def home(c: Cluster, sandbox_id: str | None) -> Path:
    return STATE / c.agent_ids[0] / (sandbox_id or "")


def from_spare(c: Cluster, sandbox_id: str | None) -> bool:
    labels = json.loads((home(c, sandbox_id) / "labels.json").read_text())
    return labels.get("aviato.spare") == "1" and labels["aviato.sandbox"] == sandbox_id


def main_pid(c: Cluster, sandbox_id: str | None) -> int:
    """The host pid of the sandbox's first process (bubblewrap; the spare's, if made
    from one)."""
    return int((home(c, sandbox_id) / "pid").read_text().split()[0])


def defaults_of(c: Cluster) -> SandboxDefaults:
    return SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)


async def test_the_agent_keeps_spares_and_says_so(warm_local: Cluster) -> None:
    c = warm_local
    wait_spares(c, 2)
    log = (c.tmp / f"{c.agent_ids[0]}.log").read_text()
    assert "keeps no spares" not in log
    for spare in parked(c):  # a sandbox like any other, parked in its cgroups
        labels = json.loads((home(c, spare) / "labels.json").read_text())
        assert labels["aviato.spare"] == "1" and "aviato.spec" not in labels
        need_cgroups(c.status().agents[0].runtime)
        assert (home(c, spare) / "cgroup").read_text().strip()


async def test_a_spare_backed_sandbox_behaves_like_a_fresh_one(warm_local: Cluster) -> None:
    c = warm_local
    d = defaults_of(c)
    wait_spares(c, 2)
    before = {main_pid(c, s) for s in parked(c)}
    async with Sandbox.session(d) as session:
        sb = session.create(command="sleep", args=["infinity"], tags=["warm"])
        await sb.start()
        assert from_spare(c, sb.sandbox_id) and main_pid(c, sb.sandbox_id) in before
        await _same_behaviour(sb)
        rows = await Sandbox.list(tags=["warm"], defaults=d)
        assert [r.sandbox_id for r in rows] == [sb.sandbox_id]
        assert rows[0].info and rows[0].info.spec.session_id == session.session_id
        # The command's env, output, exit code and stream order are the sandbox's; the
        # process is the command itself, not the parker.
        wait_spares(c, 2, "the spare to be refilled")
        script = 'echo "out $A"; sleep 0.1; echo err >&2; sleep 0.1; '
        script += 'tr -d "\\0" < /proc/$$/cmdline; exit 3'
        ran = session.create(command="sh", args=["-c", script], env={"A": "spec"})
        await ran.start()
        assert from_spare(c, ran.sandbox_id)
        assert await ran.wait(timeout=30) == 3
        logs = (await ran.logs()).decode()
        assert logs.startswith("out spec\nerr\n") and logs.endswith("sh-c" + script), logs
        env = session.create(command="sleep", args=["infinity"], env={"A": "spec", "PATH": "/bin"})
        await env.start()
        assert from_spare(c, env.sandbox_id)
        r = await env.exec(["sh", "-c", 'echo "$A $PATH"'])
        assert r.stdout == b"spec /bin\n"
        r = await env.exec(["sh", "-c", 'echo "$A"'], env={"A": "mine"})
        assert r.stdout == b"mine\n"
        r = await env.exec(["sh", "-c", "tr '\\0' ' ' < /proc/$PPID/cmdline"])
        assert b"aviato_supervisor" in r.stdout  # under the supervisor, as a fresh one
        # A lifetime is kept as for any sandbox.
        short = session.create(command="sleep", args=["infinity"], max_lifetime_seconds=1)
        await short.start()
        with pytest.raises(Exception, match="max lifetime"):
            await short.wait(timeout=30)
        gone = home(c, short.sandbox_id)
        await asyncio.to_thread(
            wait_until, lambda: not gone.exists(), 20, 0.1, "the short-lived sandbox to go"
        )


async def test_claims_refill_and_no_spare_is_shared_or_reused(warm_local: Cluster) -> None:
    c = warm_local
    d = defaults_of(c)
    wait_spares(c, 2)
    first = parked(c)
    pids = {main_pid(c, s) for s in first}
    async with Sandbox.session(d) as one, Sandbox.session(d) as two:
        a = one.create(command="sleep", args=["infinity"])
        b = two.create(command="sleep", args=["infinity"])
        await asyncio.gather(a.start(), b.start())
        assert from_spare(c, a.sandbox_id) and from_spare(c, b.sandbox_id)
        taken = {main_pid(c, a.sandbox_id), main_pid(c, b.sandbox_id)}
        assert taken == pids  # one spare each, none shared
        await a.write_file("/tmp/mine", b"one")
        assert (await b.exec(["test", "-e", "/tmp/mine"])).returncode == 1
        await asyncio.to_thread(wait_spares, c, 2, "the spares to be refilled")
        assert not set(parked(c)) & set(first)  # new spares, under new ids
        assert not {main_pid(c, s) for s in parked(c)} & taken
        await a.stop()
    # Ended: their processes are gone, never parked again.
    await asyncio.to_thread(
        wait_until, lambda: not any(psutil.pid_exists(p) for p in taken), 20, 0.1, "them to end"
    )
    again = await Sandbox.create("sleep", "infinity", defaults=d)
    try:
        assert main_pid(c, again.sandbox_id) not in taken
    finally:
        await again.stop()


async def test_a_create_the_spares_do_not_match_is_made_afresh(warm_local: Cluster) -> None:
    c = warm_local
    d = defaults_of(c)
    wait_spares(c, 2)
    ready = parked(c)
    async with Sandbox.session(d) as session:
        other = session.create(command="sleep", args=["infinity"], memory_bytes=256 << 20)
        at = session.create(command="sleep", args=["infinity"], working_dir="/usr")
        await asyncio.gather(other.start(), at.start())
        assert not from_spare(c, other.sandbox_id) and not from_spare(c, at.sandbox_id)
        assert (await at.exec(["pwd"])).stdout == b"/usr\n"
        assert parked(c) == ready  # 4 slots: 2 sandboxes, 2 spares

        @session.function()
        def double(x: int) -> int:  # function workers are made afresh
            return 2 * x

        assert (await double(21)).value == 42
    await asyncio.to_thread(wait_spares, c, 2, "the spares back")
    ready = parked(c)
    # A command the host lacks fails as a fresh create does; the spare stays ready.
    with pytest.raises(SandboxFailedError, match=r"no-such-cmd.*was not found on this host"):
        await Sandbox.create("no-such-cmd", defaults=d)
    assert parked(c) == ready and spares_seen(c) == 2


@pytest.mark.parametrize("local_of", [(2, ["--warm", f"{IMAGE}=3"])], indirect=True)
async def test_spares_fill_free_slots_only_and_the_scheduler_sees_them(local_of: Cluster) -> None:
    c = local_of
    d = defaults_of(c)
    wait_spares(c, 2, "spares in both free slots, not 3")
    first = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(c, first.sandbox_id)
    await asyncio.to_thread(wait_spares, c, 1, "one spare: one slot is free")
    other = await Sandbox.create("sleep", "infinity", memory_bytes=128 << 20, defaults=d)
    assert not from_spare(c, other.sandbox_id)  # no spare of its shape: one dropped
    await asyncio.to_thread(wait_spares, c, 0, "no spare: no slot is free")
    used = c.status().agents[0]
    assert (used.slots, used.used, used.spares) == (2, 2, 0)
    await first.stop()
    await other.stop()
    await asyncio.to_thread(wait_spares, c, 2, "spares back in the freed slots")


async def test_a_spare_that_dies_parked_is_replaced(warm_local: Cluster) -> None:
    c = warm_local
    wait_spares(c, 2)
    victim = parked(c)[0]
    psutil.Process(main_pid(c, victim)).kill()
    await asyncio.to_thread(
        wait_until,
        lambda: victim not in parked(c) and len(parked(c)) == 2 and spares_seen(c) == 2,
        30,
        0.05,
        "the dead spare to be replaced",
    )
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults_of(c))
    assert from_spare(c, sb.sandbox_id)
    await sb.stop()


async def test_a_killed_agent_with_spares_leaves_nothing_once_restarted(
    warm_local: Cluster,
) -> None:
    """Local sandboxes die with their agent (bubblewrap's --die-with-parent), spares and
    claimed spares alike; the restarted agent removes what they left and parks anew."""
    c = warm_local
    agent = c.agent_ids[0]
    d = defaults_of(c)
    wait_spares(c, 2)
    sb = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(c, sb.sandbox_id)
    await asyncio.to_thread(wait_spares, c, 2, "the spare to be refilled")
    old = {p.name: main_pid(c, p.name) for p in (STATE / agent).glob("*")}
    assert len(old) == 3
    c.kill(agent)  # kill -9
    await asyncio.to_thread(
        wait_until,
        lambda: not any(psutil.pid_exists(p) for p in old.values()),
        20,
        0.1,
        "the killed agent's sandbox and spares to die with it",
    )
    with pytest.raises(Exception, match=f"agent {agent} lost"):
        await sb.wait(timeout=30)
    c.start_agent(agent)
    await asyncio.to_thread(wait_spares, c, 2, "new spares")
    assert not set(old) & {p.name for p in (STATE / agent).glob("*")}
    again = await Sandbox.create("sleep", "infinity", defaults=d)
    assert from_spare(c, again.sandbox_id)
    await again.stop()


async def test_a_cleanly_stopped_agent_takes_its_spares_along(tmp_path: Path) -> None:
    for c in _local_cluster(tmp_path, agents=1, slots=4, agent_args=WARM):
        wait_spares(c, 2)
        pids = [main_pid(c, s) for s in parked(c)]
        c.kill(c.agent_ids[0], signal.SIGTERM)
        assert not (STATE / c.agent_ids[0]).exists() or parked(c) == []
        assert not any(psutil.pid_exists(p) for p in pids)


@pytest.fixture
def warm_and_cold(tmp_path: Path) -> Iterator[tuple[Cluster, str, str]]:
    """A cold agent with 6 slots, and a warm one with 3 slots and 2 spares."""
    for c in _local_cluster(tmp_path, agents=1, slots=6):
        cold = c.agent_ids[0]
        warm = f"{cold[:-2]}-w"
        c.adopt_ids([warm])
        c.start_agent(warm, ["--slots", "3", *WARM])
        c.wait_agents(2)
        yield c, warm, cold


async def test_creates_go_to_the_agent_holding_spares_while_it_has_them(
    warm_and_cold: tuple[Cluster, str, str],
) -> None:
    """Spreading alone would pick the cold agent (more free slots). Creates of the
    spares' shape go to the warm one while it holds spares; others, and those past its
    spares, to the cold one."""
    c, warm, cold = warm_and_cold
    d = defaults_of(c)

    def spares_of(agent: str) -> int:
        return sum(a.spares for a in c.status().agents if a.agent_id == agent)

    await asyncio.to_thread(
        wait_until, lambda: spares_of(warm) == 2, 60, 0.05, "the warm agent's spares"
    )
    async with Sandbox.session(d) as session:
        made = [session.create(command="sleep", args=["infinity"]) for _ in range(3)]
        await asyncio.gather(*(sb.start() for sb in made))
        where = {sb.sandbox_id: sb.info.agent_id if sb.info else "" for sb in made}
        assert sorted(where.values()) == sorted([warm, warm, cold]), where
        assert all(from_spare_of(warm, s) for s, a in where.items() if a == warm)
        other = session.create(command="sleep", args=["infinity"], memory_bytes=128 << 20)
        await other.start()
        assert other.info and other.info.agent_id == cold  # no spare of its shape
        # The warm agent refills its free slot: the next create goes there again.
        await asyncio.to_thread(
            wait_until, lambda: spares_of(warm) == 1, 60, 0.05, "the warm agent's refill"
        )
        again = session.create(command="sleep", args=["infinity"])
        await again.start()
        assert again.info and again.info.agent_id == warm
        assert from_spare_of(warm, again.sandbox_id)


def from_spare_of(agent: str, sandbox_id: str | None) -> bool:
    labels = json.loads((STATE / agent / (sandbox_id or "") / "labels.json").read_text())
    return labels.get("aviato.spare") == "1"
