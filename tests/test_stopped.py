"""``stop()`` means stopped: once it returns, nothing runs in the sandbox any more,
from any handle; a stop during ``start()`` fails the start with a typed error."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import Sandbox, SandboxDefaults, SandboxNotRunningError, SandboxTerminatedError
from tests.conftest import IMAGE, Cluster, containers_of, docker_cluster


@pytest.fixture
def one_slot(tmp_path: Path) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path, agents=1, slots=1)


def _defaults(c: Cluster) -> SandboxDefaults:
    return SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)


async def test_stop_returns_only_once_the_agent_has_stopped_the_sandbox(
    one_slot: Cluster,
) -> None:
    """The race made deterministic: the agent is frozen (SIGSTOP) while the client
    stops. The scheduler has decided, but the agent has not acted: stop() must not
    return yet, else a handle made now could still exec there."""
    defaults = _defaults(one_slot)
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
    agent = one_slot.procs[one_slot.agent_ids[0]]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        stopping = asyncio.ensure_future(sb.stop())
        # well under the cluster's 1.5 s dead-after, so the agent is not declared dead
        done, _ = await asyncio.wait({stopping}, timeout=0.6)
        assert not done, "stop() returned while the agent had not stopped the sandbox"
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    await asyncio.wait_for(stopping, 30)
    again = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
    with pytest.raises(SandboxNotRunningError):
        await again.exec(["true"])


async def test_stop_during_a_queued_start_fails_the_start(one_slot: Cluster) -> None:
    defaults = _defaults(one_slot)
    async with Sandbox.session(defaults) as session:
        first = session.create(command="sleep", args=["infinity"])
        await first.start()
        for queued in (
            session.create(command="sleep", args=["infinity"]),  # in a session
            Sandbox(command="sleep", args=["infinity"], defaults=defaults),  # alone
        ):
            starting = asyncio.ensure_future(queued.start())
            done, _ = await asyncio.wait({starting}, timeout=1.0)
            assert not done, "the one slot is taken: this start must queue"
            await queued.stop()
            with pytest.raises(SandboxTerminatedError, match="stopped while starting"):
                await asyncio.wait_for(starting, 30)
            with pytest.raises(SandboxTerminatedError):  # and again: not started anew
                await queued.start()
        # the slot is still the first one's: nothing was started behind our back
        assert (await first.exec(["true"])).returncode == 0
        assert [s.sandbox_id for s in await Sandbox.list(defaults=defaults)] == [first.sandbox_id]


async def test_stop_while_the_agent_creates_leaves_nothing_running(one_slot: Cluster) -> None:
    """A stop that reaches the agent while it is still creating the sandbox: the create
    then finishes there. stop() returns only once that sandbox is gone too."""
    defaults = _defaults(one_slot)
    for _ in range(3):
        sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults)
        starting = asyncio.ensure_future(sb.start())
        deadline = time.monotonic() + 30
        while not await Sandbox.list(status=["creating"], defaults=defaults):
            assert not starting.done() and time.monotonic() < deadline, "never seen creating"
            await asyncio.sleep(0.005)
        await sb.stop()
        assert containers_of(one_slot.agent_ids) == []  # not even an exited one
        with pytest.raises(SandboxTerminatedError):
            await asyncio.wait_for(starting, 30)
