"""A failure followed across processes: the id a client's error names (the sandbox a
create chose, a call's number and its worker sandbox) is the id the scheduler's and
the agent's logs use for the same event (issue 15, logs and traces)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aviato import Sandbox, SandboxDefaults, SandboxError, WorkerLostError
from tests.conftest import Cluster, wait_until


def _log(cluster: Cluster, name: str) -> str:
    return (Path(cluster.tmp) / f"{name}.log").read_text(errors="replace")


def _agent_logs(cluster: Cluster) -> str:
    return "".join(_log(cluster, a) for a in cluster.agent_ids)


async def test_a_failed_create_is_named_alike_in_the_error_and_the_logs(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    sb = Sandbox(
        command="sleep",
        args=["infinity"],
        container_image="aviato-test/no-such-image:1",
        defaults=defaults,
    )
    with pytest.raises(SandboxError) as raised:
        await sb.start()
    sid = raised.value.sandbox_id  # the id the client chose for it
    assert sid and f"[sandbox {sid}]" in str(raised.value)
    wait_until(lambda: f"placing sandbox {sid}" in _log(cluster, "scheduler"), 10, what="placing")
    wait_until(lambda: f"create of {sid} failed" in _agent_logs(cluster), 10, what="agent log")


async def test_a_failed_call_names_its_call_and_worker(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:

        @session.function()
        def boom(x: int) -> int:
            raise ValueError(f"bad {x}")

        with pytest.raises(ValueError, match="bad 3") as raised:
            await boom(3)
        notes = [n for n in getattr(raised.value, "__notes__", []) if n.startswith("aviato: ")]
        assert len(notes) == 1 and notes[0].startswith("aviato: call "), notes
        assert ".boom(), worker sandbox sb-" in notes[0]


async def test_a_lost_call_is_named_alike_in_the_error_and_the_agent_log(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    async with Sandbox.session(defaults) as session:

        @session.function(retries=0)
        def die(x: int) -> int:
            os._exit(9)

        with pytest.raises(WorkerLostError) as raised:
            await die(1)
        message = str(raised.value)
        assert message.startswith("call ") and ".die() failed: worker sb-" in message, message
        call_id = message.split()[1]
        worker = message.split("worker ", 1)[1].split()[0]
        wait_until(
            lambda: (
                f"worker {worker} died" in _agent_logs(cluster)
                and f"call {call_id} crashed" in _agent_logs(cluster)
            ),
            10,
            what="the agent's line naming the worker and the call",
        )
