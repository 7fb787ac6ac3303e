"""Resources and placement (issue 14, part 2) on real clusters: agents started with
``--gpus`` / ``--label`` / ``--cpus`` / ``--memory`` on this GPU-less machine; GPU
exclusivity and what a sandbox sees of its GPUs (exec ``env``) on Docker and on the
local runtime; creates that can never fit fail at once, those that fit later wait;
labels select agents; limits land on the container; ``aviato status`` shows
used/free."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aviato import ResourcesUnavailableError, Sandbox, SandboxDefaults
from tests.conftest import (
    AGENT_IDS,
    IMAGE,
    ROOT,
    RUN_ID,
    Cluster,
    containers_of,
    need_docker,
    wait_until,
)

MIB = 1 << 20


def _cluster(tmp: Path, runtime: str, agents: dict[str, list[str]]) -> Iterator[Cluster]:
    """A cluster whose agents each get their own flags (name -> extra args)."""
    if runtime == "docker":
        need_docker()
    c = Cluster(tmp, agents=0, runtime=runtime, slots=4)
    try:
        for name, extra in agents.items():
            agent_id = f"t{RUN_ID}-{name}-{os.urandom(3).hex()}"
            AGENT_IDS.add(agent_id)
            c.agent_ids.append(agent_id)
            c.start_agent(agent_id, extra)
        c.wait_agents(len(agents))
        yield c
    finally:
        c.close()
        if runtime == "docker":
            left = containers_of(c.agent_ids)
            if left:
                subprocess.run(["docker", "rm", "-f", *left], capture_output=True, timeout=60)
                pytest.fail(f"containers left behind: {left}\n{c.logs()}")
        assert not c.killed_at_close, c.logs()


@pytest.fixture(scope="module")
def rcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Docker: agent 0 has GPUs 0 and 1 and zone=a; agent 1 has no GPUs, zone=b,
    2 CPUs and 1 GiB advertised."""
    yield from _cluster(
        tmp_path_factory.mktemp("resources"),
        "docker",
        {
            "gpu": ["--gpus", "0,1", "--label", "zone=a"],
            "cpu": ["--gpus", "none", "--label", "zone=b", "--cpus", "2", "--memory", "1G"],
        },
    )


@pytest.fixture
def rdefaults(rcluster: Cluster) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image=IMAGE, scheduler=rcluster.address, lease_seconds=5)
    wait_until(
        lambda: not containers_of(rcluster.agent_ids), 30, 0.2, "the test's containers to go"
    )


def _agent(c: Cluster, name: str) -> str:
    return next(a for a in c.agent_ids if f"-{name}-" in a)


async def _env(sb: Sandbox) -> dict[str, str]:
    out = (await sb.exec(["env"], check=True)).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def _gpus_seen(sb: Sandbox) -> tuple[str, str]:
    env = await _env(sb)
    return env.get("CUDA_VISIBLE_DEVICES", "<unset>"), env.get("NVIDIA_VISIBLE_DEVICES", "<unset>")


def _queued(c: Cluster) -> int:
    return c.status().sandbox_counts.get("queued", 0)


async def _wait_queued(c: Cluster, n: int) -> None:
    deadline = time.monotonic() + 30
    while _queued(c) < n:
        assert time.monotonic() < deadline, "the create never queued"
        await asyncio.sleep(0.05)


async def test_each_gpu_goes_to_one_sandbox_which_sees_it_alone_and_one_waits(
    rcluster: Cluster, rdefaults: SandboxDefaults
) -> None:
    gpu_agent = _agent(rcluster, "gpu")
    async with Sandbox.session(rdefaults) as session:
        first = session.create(command="sleep", args=["infinity"], gpus=1)
        second = session.create(command="sleep", args=["infinity"], gpus=1)
        await asyncio.gather(first.start(), second.start())
        seen = {await _gpus_seen(first), await _gpus_seen(second)}
        assert seen == {("0", "0"), ("1", "1")}, seen
        assert {first.info.agent_id, second.info.agent_id} == {gpu_agent}  # type: ignore[union-attr]
        (row,) = [a for a in rcluster.status().agents if a.agent_id == gpu_agent]
        assert row.gpus == ("0", "1") and row.gpus_used == ("0", "1")

        # Both GPUs are held: a third GPU sandbox waits in the queue...
        third = session.create(command="sleep", args=["infinity"], gpus=1)
        starting = asyncio.ensure_future(third.start())
        await _wait_queued(rcluster, 1)
        assert not starting.done()
        # ...and takes the GPU the first one gives back when it stops.
        freed = (await _gpus_seen(first))[0]
        await first.stop()
        await asyncio.wait_for(starting, 60)
        assert await _gpus_seen(third) == (freed, freed)

        # A sandbox given no GPU on a GPU agent sees none.
        plain = session.create(command="sleep", args=["infinity"], agent_labels={"zone": "a"})
        await plain.start()
        assert plain.info.agent_id == gpu_agent  # type: ignore[union-attr]
        assert await _gpus_seen(plain) == ("", "void")


async def test_a_gpu_request_no_agent_could_ever_hold_fails_at_once(
    rcluster: Cluster, rdefaults: SandboxDefaults
) -> None:
    gpu_agent = _agent(rcluster, "gpu")
    async with Sandbox.session(rdefaults) as session:
        t0 = time.monotonic()
        with pytest.raises(ResourcesUnavailableError, match="GPUs 0,1") as caught:
            await session.create(command="sleep", args=["infinity"], gpus=3).start()
        assert gpu_agent in str(caught.value)
        with pytest.raises(ResourcesUnavailableError, match="none carries those labels"):
            await session.create(
                command="sleep", args=["infinity"], agent_labels={"zone": "mars"}
            ).start()
        with pytest.raises(ResourcesUnavailableError, match=r"cpus=64"):
            await session.create(
                command="sleep", args=["infinity"], cpus=64, agent_labels={"zone": "b"}
            ).start()

        @session.function(gpus=3)
        def never() -> None:
            pass

        with pytest.raises(ResourcesUnavailableError, match="GPUs 0,1"):
            await never()
        assert time.monotonic() - t0 < 20  # at once, not after the start timeout
        assert _queued(rcluster) == 0


async def test_labels_pick_the_agent_and_cpus_and_memory_are_held_and_limited(
    rcluster: Cluster, rdefaults: SandboxDefaults
) -> None:
    cpu_agent = _agent(rcluster, "cpu")
    async with Sandbox.session(rdefaults.replace(agent_labels={"zone": "b"})) as session:
        big = session.create(command="sleep", args=["infinity"], cpus=2, memory_bytes=512 * MIB)
        await big.start()
        assert big.info.agent_id == cpu_agent  # type: ignore[union-attr]
        host = _inspect(big)["HostConfig"]
        assert host["NanoCpus"] == 2_000_000_000 and host["Memory"] == 512 * MIB
        assert await _gpus_seen(big) == ("<unset>", "<unset>")  # an agent with no GPUs
        # Its 2 advertised CPUs are held: one more CPU there waits for them.
        more = session.create(command="sleep", args=["infinity"], cpus=1)
        starting = asyncio.ensure_future(more.start())
        await _wait_queued(rcluster, 1)
        await big.stop()
        await asyncio.wait_for(starting, 60)
        assert more.info.agent_id == cpu_agent  # type: ignore[union-attr]


async def test_functions_and_actors_get_their_own_gpus(
    rcluster: Cluster, rdefaults: SandboxDefaults
) -> None:
    async with Sandbox.session(rdefaults) as session:

        @session.function(gpus=1, cpus=0.5)
        def visible() -> str:
            import os as os_

            return os_.environ["CUDA_VISIBLE_DEVICES"]

        results = await asyncio.gather(*(visible() for _ in range(8)))
        assert {r.value for r in results} <= {"0", "1"}
        # The pool sized itself by the GPUs free, not the slots: no worker queued.
        assert _queued(rcluster) == 0

    async with Sandbox.session(rdefaults) as session:

        @session.cls(gpus=2)
        class Model:
            def devices(self) -> str:
                import os as os_

                return os_.environ["NVIDIA_VISIBLE_DEVICES"]

        model = Model()
        assert (await model.devices()).value == "0,1"
        await model.close()


def test_status_shows_used_and_free_per_resource(rcluster: Cluster) -> None:
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=rcluster.address)

    async def hold_and_look() -> str:
        async with Sandbox.session(defaults) as session:
            await session.create(
                command="sleep", args=["infinity"], gpus=1, cpus=0.5, memory_bytes=256 * MIB
            ).start()
            return _aviato("status", "--scheduler", rcluster.address)

    table = asyncio.run(hold_and_look())
    lines = table.splitlines()
    header = next(line for line in lines if "GPUS_USED/FREE" in line)
    assert "CPUS_USED/FREE" in header and "MEMORY_USED/FREE" in header
    row = next(line for line in lines if _agent(rcluster, "gpu") in line)
    assert " 0/1 " in row and "256.0M/" in row
    row = next(line for line in lines if _agent(rcluster, "cpu") in line)
    assert " 0/2 " in row and " 0.0M/1.0G " in row
    wait_until(lambda: not containers_of(rcluster.agent_ids), 30, 0.2, "its container to go")


@pytest.fixture
def gpu_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own (its scheduler is restarted): one agent with GPUs 0 and 1."""
    yield from _cluster(tmp_path, "docker", {"gpu": ["--gpus", "0,1"]})


async def test_a_restarted_scheduler_learns_the_held_gpus_from_the_agent(
    gpu_cluster: Cluster,
) -> None:
    """After a scheduler restart, the agent's report says which GPU each sandbox holds:
    a new GPU sandbox gets the other one, and one more waits."""
    c = gpu_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    async with Sandbox.session(d) as session:
        # Kept: the one holding GPU 1 (a rebuild that ignored the report would think
        # it holds the first free one, 0, and give 1 again).
        pair = [session.create(command="sleep", args=["infinity"], gpus=1) for _ in range(2)]
        await asyncio.gather(*(sb.start() for sb in pair))
        seen = [(await _gpus_seen(sb))[0] for sb in pair]
        held = pair[seen.index("1")]
        await pair[seen.index("0")].stop()
        mine = "1"
        port = int(c.address.rsplit(":", 1)[1])
        c.kill("scheduler")
        c.start_scheduler(port)
        await asyncio.to_thread(c.wait_agents, 1)
        other = session.create(command="sleep", args=["infinity"], gpus=1)
        await other.start()
        assert (await _gpus_seen(other))[0] == ({"0", "1"} - {mine}).pop()
        third = asyncio.ensure_future(
            session.create(command="sleep", args=["infinity"], gpus=1).start()
        )
        await _wait_queued(c, 1)
        await held.stop()
        await asyncio.wait_for(third, 60)
    await asyncio.to_thread(
        wait_until, lambda: not containers_of(c.agent_ids), 30, 0.2, "its containers to go"
    )


# --------------------------------------------------------------------------- local runtime


@pytest.fixture(scope="module")
def lcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(tmp_path_factory.mktemp("lresources"), "local", {"lgpu": ["--gpus", "0,1"]})


async def test_on_the_local_runtime_a_sandbox_sees_its_own_gpus(lcluster: Cluster) -> None:
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=lcluster.address, lease_seconds=5)
    async with Sandbox.session(defaults) as session:
        a = session.create(command="sleep", args=["infinity"], gpus=1)
        b = session.create(command="sleep", args=["infinity"], gpus=1)
        await asyncio.gather(a.start(), b.start())
        assert {await _gpus_seen(a), await _gpus_seen(b)} == {("0", "0"), ("1", "1")}
        both = session.create(command="sleep", args=["infinity"], gpus=2)
        waiting = asyncio.ensure_future(both.start())
        await _wait_queued(lcluster, 1)
        await asyncio.gather(a.stop(), b.stop())
        await asyncio.wait_for(waiting, 60)
        assert await _gpus_seen(both) == ("0,1", "0,1")


# --------------------------------------------------------------------------- helpers


def _inspect(sb: Sandbox) -> dict[str, Any]:
    import json

    out = subprocess.run(
        ["docker", "inspect", f"aviato-{sb.sandbox_id}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return json.loads(out)[0]  # type: ignore[no-any-return]


def _aviato(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", *args],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout
