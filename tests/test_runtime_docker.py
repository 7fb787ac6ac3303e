"""Tests of the Docker runtime alone (the conformance suite every runtime passes is
tests/test_runtime_conformance.py): operator options, and what Docker itself would do
on its own (remake a missing bind source)."""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Any

import pytest

from agent.runtime.base import sandbox_labels
from aviato.exceptions import SandboxFailedError
from aviato.protocol import SandboxSpec
from tests.test_runtime_conformance import (
    IMAGE,
    REQUIRE,
    RUN_ID,
    _counter,
    _docker_problem,
    _docker_ps,
    _inspect,
    new_sandbox,
)

pytestmark = pytest.mark.docker


async def test_operator_may_keep_some_capabilities() -> None:
    if problem := _docker_problem():
        if REQUIRE:
            pytest.fail(f"{problem} (AVIATO_REQUIRE_DOCKER=1)")
        pytest.skip(problem)
    from agent.runtime.docker import DockerRuntime

    aid = f"test-{RUN_ID}-{next(_counter)}"
    rt = DockerRuntime(cap_add=["chown", "CAP_SETUID"])  # agent --cap-add
    try:
        sid = await new_sandbox(rt, aid)
        assert sorted(_inspect(sid)["HostConfig"]["CapAdd"]) == ["CHOWN", "SETUID"]
        status = (await rt.exec(sid, ("cat", "/proc/self/status"))).stdout
        assert b"CapEff:\t0000000000000081" in status  # CHOWN (bit 0) + SETUID (bit 7) only
        await rt.stop(sid)
    finally:
        await rt.close()
        left = _docker_ps(aid)
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)
        assert not left


async def test_a_missing_mount_source_fails_the_create_and_is_not_made(tmp_path: Any) -> None:
    """A create that raced its sandbox's stop (or the agent's exit) finds its socket
    directory gone: it fails, and Docker does not remake the directory (which leaked
    /tmp/avw-* directories after the agent had removed them)."""
    if problem := _docker_problem():
        if REQUIRE:
            pytest.fail(f"{problem} (AVIATO_REQUIRE_DOCKER=1)")
        pytest.skip(problem)
    from agent.runtime.base import Mount
    from agent.runtime.docker import DockerRuntime

    aid = f"test-{RUN_ID}-{next(_counter)}"
    gone = tmp_path / "removed-socket-dir"
    rt = DockerRuntime()
    sid = f"t{uuid.uuid4().hex[:12]}"
    spec = SandboxSpec(image=IMAGE, command="sleep", args=("300",))
    try:
        with pytest.raises(SandboxFailedError):
            await rt.create(
                sid,
                spec,
                sandbox_labels(sid, aid, spec, time.time()),
                [Mount(str(gone), "/run/x", read_only=False)],
            )
        assert not gone.exists()
    finally:
        await rt.close()
        left = _docker_ps(aid)
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)
        assert not left
