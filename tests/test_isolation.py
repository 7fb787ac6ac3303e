"""Isolation levels (issue 16): an agent offering runc and gVisor on a Docker engine
of the tests' own (tests/_gvisor_engine.py), sandboxes and functions placed by the
isolation they ask for, shown in ``aviato status``/``ps``; a level no agent offers
refused at once; an agent that cannot run what it offers refuses to start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime.isolation import parse_isolations, refusal
from aviato import IsolationUnavailableError, Sandbox, SandboxDefaults, SandboxTimeoutError
from aviato.exceptions import ConfigurationError
from aviato.protocol import SandboxSpec
from tests._gvisor_engine import GvisorEngine, gvisor_cluster
from tests.conftest import ROOT, Cluster, docker_cluster, need_docker, wait_until

IMAGE = "python:3.11"


@pytest.fixture(scope="module")
def gcluster(
    tmp_path_factory: pytest.TempPathFactory, gvisor_engine: GvisorEngine
) -> Iterator[Cluster]:
    """One agent on the gVisor engine offering gvisor (its default) and runc."""
    yield from gvisor_cluster(tmp_path_factory.mktemp("gvisor"), gvisor_engine, "gvisor,runc")


@pytest.fixture
def gdefaults(gcluster: Cluster, gvisor_engine: GvisorEngine) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image=IMAGE, scheduler=gcluster.address, lease_seconds=5)
    wait_until(
        lambda: not gvisor_engine.containers("label=aviato.managed"),
        20,
        0.2,
        "the test's sandboxes to be removed from the gVisor engine",
    )


def _aviato(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    done = subprocess.run(
        [sys.executable, "-m", "aviato.cli", *args],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return done.stdout


async def test_each_sandbox_gets_the_isolation_it_asks_for(
    gcluster: Cluster, gdefaults: SandboxDefaults
) -> None:
    status = json.loads(_aviato("status", "--scheduler", gcluster.address, "--format", "json"))
    (agent,) = status["agents"]
    assert agent["isolations"] == ["gvisor", "runc"]
    assert agent["probe"].startswith("gvisor ok") and "kernel 4.4.0" in agent["probe"]

    gdefaults_runc = gdefaults.replace(isolation="runc")
    async with (
        Sandbox(command="sleep", args=["infinity"], defaults=gdefaults) as default,
        Sandbox(command="sleep", args=["infinity"], defaults=gdefaults_runc) as runc,
        Sandbox(
            command="sleep",
            args=["infinity"],
            defaults=gdefaults.replace(isolation="gvisor", network="none"),
        ) as gvisor,
    ):
        assert (default.isolation, runc.isolation, gvisor.isolation) == ("gvisor", "runc", "gvisor")
        kernels = [
            (await sb.exec(["uname", "-r"])).stdout.decode().strip()
            for sb in (default, runc, gvisor)
        ]
        assert kernels[0] == kernels[2] == "4.4.0"  # gVisor's own kernel answers
        assert kernels[1] == os.uname().release  # runc: the host's
        # Exec, files and streaming through the in-sandbox supervisor, under gVisor.
        for sb in (default, gvisor):
            await sb.write_file("/srv/data/x.bin", bytes(range(256)) * 4096)
            assert await sb.read_file("/srv/data/x.bin") == bytes(range(256)) * 4096
            assert await sb.read_file("/tmp/../srv/data/x.bin") == bytes(range(256)) * 4096
            out = await sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (out.returncode, out.stdout, out.stderr) == (3, b"out\n", b"err\n")
            t0 = time.monotonic()
            with pytest.raises(SandboxTimeoutError):
                await sb.exec(["sleep", "30"], timeout_seconds=1)
            assert time.monotonic() - t0 < 20
            # ...and the command is gone (killed inside gVisor, not just abandoned)
            ps = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
            assert b"sleep infinity" in ps.stdout and b"sleep 30" not in ps.stdout, ps.stdout
        ps = _aviato("ps", "--scheduler", gcluster.address, "--format", "json")
        shown = {r["sandbox_id"]: r["isolation"] for r in json.loads(ps)}
        assert shown[runc.sandbox_id] == "runc" and shown[gvisor.sandbox_id] == "gvisor"
        table = _aviato("ps", "--scheduler", gcluster.address)
        assert table.split("\n")[0].split()[5] == "ISOLATION"


async def test_functions_under_gvisor(gdefaults: SandboxDefaults) -> None:
    """Calls, small and large (a large argument and result take the link's
    shared-memory path where it works, the socket where it does not)."""
    async with Sandbox.session(gdefaults.replace(isolation="gvisor")) as session:

        @session.function(max_workers=1)
        def kernel_and_len(blob: bytes) -> tuple[str, int, bytes]:
            import os as os_

            return os_.uname().release, len(blob), blob[::-1]

        small = (await kernel_and_len(b"abc")).value
        assert small == ("4.4.0", 3, b"cba")
        big = os.urandom(8 * 1024 * 1024)
        kernel, n, back = (await kernel_and_len(big)).value
        assert (kernel, n, back) == ("4.4.0", len(big), big[::-1])
        results = await asyncio.gather(*(kernel_and_len(b"x" * i) for i in range(20)))
        assert [r.value[1] for r in results] == list(range(20))


async def test_an_isolation_no_agent_offers_fails_at_once(cluster: Cluster) -> None:
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=cluster.address, isolation="gvisor")
    t0 = time.monotonic()
    with pytest.raises(IsolationUnavailableError, match=r"offer: runc\)"):
        await Sandbox.create("sleep", "infinity", defaults=defaults)
    assert time.monotonic() - t0 < 10  # not after the start timeout
    with pytest.raises(ConfigurationError, match="isolation must be"):
        await Sandbox.create("sleep", "infinity", defaults=defaults.replace(isolation="kata"))


def test_an_agent_whose_engine_lacks_runsc_refuses_to_start(tmp_path: Path) -> None:
    """The host's engine has no runsc runtime registered: asked for gVisor, the agent
    exits at once saying what to add, rather than serving sandboxes it cannot make."""
    need_docker()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_STATE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [
            sys.executable, "-m", "agent", "--scheduler", "tcp://127.0.0.1:9",
            "--runtime", "docker", "--isolation", "gvisor",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode != 0
    assert "has no runtime runsc" in done.stderr and '"runtimeArgs"' in done.stderr, done.stderr
    local = subprocess.run(
        [
            sys.executable, "-m", "agent", "--scheduler", "tcp://127.0.0.1:9",
            "--runtime", "local", "--isolation", "gvisor",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert local.returncode != 0 and "offers isolation 'bwrap' only" in local.stderr


def test_isolation_choices_and_refusal() -> None:
    assert parse_isolations(None, "docker") == ("runc",)
    assert parse_isolations("gvisor, runc", "docker") == ("gvisor", "runc")
    assert parse_isolations(None, "local") == ("bwrap",)
    for bad, runtime in (("kata", "docker"), ("gvisor", "local"), (",", "docker")):
        with pytest.raises(ConfigurationError):
            parse_isolations(bad, runtime)
    spec = SandboxSpec(image=IMAGE, command="sleep", isolation="gvisor")
    refused = refusal(spec, ("runc",), "a1")
    assert isinstance(refused, IsolationUnavailableError)
    assert "agent a1 offers isolation runc, not 'gvisor'" in str(refused)
    assert refusal(spec, ("runc", "gvisor"), "a1") is None
    assert refusal(SandboxSpec(image=IMAGE, command="sleep"), ("runc",), "a1") is None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("runc"), agents=1)


# --------------------------------------------------------------------------- placement


def _register(state: Any, agent_id: str, isolations: tuple[str, ...], slots: int = 2) -> Any:
    from aviato.protocol import RegisterAgent

    msg = RegisterAgent(
        agent_id=agent_id,
        address=f"tcp://{agent_id}:7000",
        slots=slots,
        runtime="docker",
        fresh=True,
        isolations=isolations,
        probe="gvisor ok" if "gvisor" in isolations else "",
    )
    return state.register_agent(msg, 0.0)[1]


def _state() -> Any:
    import itertools

    from scheduler.state import Config, SchedulerState

    counter = itertools.count(1)
    return SchedulerState(
        Config(dead_after_seconds=1e9, startup_grace_seconds=5.0),
        new_id=lambda: f"sb-{next(counter)}",
    )


def _placed_on(actions: list[Any]) -> list[tuple[str, str]]:
    from aviato.protocol import PlaceSandbox
    from scheduler.state import SendToAgent

    return [
        (a.agent_id, a.msg.sandbox.isolation)
        for a in actions
        if isinstance(a, SendToAgent) and isinstance(a.msg, PlaceSandbox)
    ]


def test_placement_follows_the_isolation_asked_for() -> None:
    from aviato.protocol import ErrorCode, ErrorReply
    from scheduler.state import Reply

    state = _state()
    _register(state, "a-runc", ("runc",), slots=5)  # the most free slots
    _register(state, "b-gvisor", ("gvisor", "runc"))
    ask = SandboxSpec(image=IMAGE, command="sleep")
    now = 10.0  # past the start-up grace
    assert _placed_on(state.request_create("k1", ask, 30, now)) == [("a-runc", "runc")]
    gvisor = SandboxSpec(image=IMAGE, command="sleep", isolation="gvisor")
    assert _placed_on(state.request_create("k2", gvisor, 30, now)) == [("b-gvisor", "gvisor")]
    assert _placed_on(state.request_create("k3", gvisor, 30, now)) == [("b-gvisor", "gvisor")]
    # b-gvisor is full: a gVisor create waits for it, never goes to a-runc.
    assert _placed_on(state.request_create("k4", gvisor, 30, now)) == []
    assert len(state.pending) == 1
    # b-gvisor re-registers offering runc alone: the queued gVisor create is refused.
    _register(state, "b-gvisor", ("runc",))
    [reply] = [a for a in state.tick(now + 1) if isinstance(a, Reply)]
    assert isinstance(reply.msg, ErrorReply)
    assert reply.msg.code is ErrorCode.ISOLATION_UNAVAILABLE
    assert "(they offer: runc)" in reply.msg.message
    # A new one is refused at once, naming what agents offer.
    [refused] = state.request_create("k5", gvisor, 30, now + 1)
    assert refused.msg.code is ErrorCode.ISOLATION_UNAVAILABLE
    assert state.status(now).agents[1].isolations == ("runc",)


def test_an_isolation_asked_for_in_the_grace_waits_for_agents() -> None:
    state = _state()
    gvisor = SandboxSpec(image=IMAGE, command="sleep", isolation="gvisor")
    assert state.request_create("k", gvisor, 30, 1.0) == []  # agents may still register
    assert _placed_on(state.tick(2.0)) == [] and len(state.pending) == 1
    assert _placed_on(_register(state, "g", ("gvisor",))) == [("g", "gvisor")]


async def test_two_agents_each_gets_what_it_offers(
    tmp_path: Path, gvisor_engine: GvisorEngine
) -> None:
    """A runc agent on the host's engine, a gVisor one on the tests' engine: creates go
    to the agent offering their isolation, whichever has more free slots."""
    with contextlib.contextmanager(docker_cluster)(tmp_path, agents=1, slots=6) as c:
        gvisor_id = f"{c.agent_ids[0]}-g"
        c.agent_ids.append(gvisor_id)
        c.agent_env = {"DOCKER_HOST": gvisor_engine.host}
        c.start_agent(gvisor_id, ["--isolation", "gvisor"])
        c.wait_agents(2, timeout=60)
        base = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
        try:
            async with (
                Sandbox(
                    command="sleep", args=["1000"], defaults=base.replace(isolation="gvisor")
                ) as g1,
                Sandbox(
                    command="sleep", args=["1000"], defaults=base.replace(isolation="gvisor")
                ) as g2,
                Sandbox(
                    command="sleep", args=["1000"], defaults=base.replace(isolation="runc")
                ) as r1,
            ):
                assert g1.info and g2.info and r1.info
                assert g1.info.agent_id == g2.info.agent_id == gvisor_id
                assert r1.info.agent_id == c.agent_ids[0]
                assert (await g1.exec(["uname", "-r"])).stdout.strip() == b"4.4.0"
        finally:
            wait_until(
                lambda: not gvisor_engine.containers(f"label=aviato.agent={gvisor_id}"),
                30,
                0.2,
                "the gVisor agent's sandboxes to be removed",
            )
