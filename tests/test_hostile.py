"""Hostile code inside a sandbox, per isolation level (issue 16): each cell of the
README's "what a sandbox can and cannot do" table, asserted. The programs and what
each level is designed to block are in tests/_hostile.py; benchmarks/hostile.py prints
the same rows as a table."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from aviato import SandboxDefaults
from tests._gvisor_engine import GvisorEngine
from tests._hostile import ROWS, Target, probe_level, surprises
from tests._tally import Tally, host_address
from tests._userns_engine import UsernsEngine
from tests.conftest import Cluster, docker_cluster
from tests.test_local_runtime import _local_cluster

#: The fork bomb meets this, far below the 5,000 forks it tries.
PIDS = ["--pids-limit", "100"]


@pytest.fixture(scope="module")
def host_things() -> Iterator[tuple[int, str]]:
    """A host process to ptrace and a root-only host file to read (in /var/tmp, which
    a local sandbox sees)."""
    directory = Path(tempfile.mkdtemp(prefix="aviato-hostile-", dir="/var/tmp"))
    directory.chmod(0o755)
    secret = directory / "secret"
    secret.write_text("the host's\n")
    secret.chmod(0o600)
    victim = subprocess.Popen(["sleep", "600"])
    try:
        yield victim.pid, str(secret)
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(directory)


async def _check(level: str, cluster: Cluster, host: str, things: tuple[int, str]) -> None:
    defaults = SandboxDefaults(
        scheduler=cluster.address, lease_seconds=5, isolation=level.split("+")[0]
    )
    port = int(cluster.address.rsplit(":", 1)[1])
    with Tally(host) as tally:
        cells = await probe_level(Target(defaults, port, host, tally.address[1], *things))
    assert set(cells) == set(ROWS)
    assert not surprises(level, cells), (level, cells)


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("hostile-docker"), agents=1, agent_args=PIDS)


async def test_runc(docker: Cluster, host_things: tuple[int, str]) -> None:
    await _check("runc", docker, host_address(), host_things)


@pytest.mark.timeout(600)  # a gVisor sandbox's stop after the fork bomb is slow
async def test_gvisor(
    tmp_path_factory: pytest.TempPathFactory,
    gvisor_engine: GvisorEngine,
    host_things: tuple[int, str],
) -> None:
    c = Cluster(
        tmp_path_factory.mktemp("hostile-gvisor"),
        agents=1,
        agent_env={"DOCKER_HOST": gvisor_engine.host},
        agent_args=["--isolation", "gvisor", *PIDS],
    )
    try:
        await _check("gvisor", c, _bridge_address(gvisor_engine), host_things)
    finally:
        c.close()
    assert not gvisor_engine.containers(*(f"label=aviato.agent={a}" for a in c.agent_ids))


async def test_runc_userns(
    tmp_path_factory: pytest.TempPathFactory,
    userns_engine: UsernsEngine,
    host_things: tuple[int, str],
) -> None:
    c = Cluster(
        tmp_path_factory.mktemp("hostile-remap"),
        agents=1,
        agent_env={"DOCKER_HOST": userns_engine.host},
        agent_args=PIDS,
    )
    try:
        await _check("runc+userns", c, _bridge_address(userns_engine), host_things)
    finally:
        c.close()
    assert not userns_engine.containers(*(f"label=aviato.agent={a}" for a in c.agent_ids))


def _bridge_address(engine: GvisorEngine) -> str:
    """The host's address on a test engine's bridge (its sandboxes' way to the host)."""
    return next(
        a.address for a in psutil.net_if_addrs()[engine.bridge] if a.family == socket.AF_INET
    )


async def test_bwrap(
    tmp_path_factory: pytest.TempPathFactory, host_things: tuple[int, str]
) -> None:
    for c in _local_cluster(tmp_path_factory.mktemp("hostile-local"), agents=1, agent_args=PIDS):
        await _check("bwrap", c, host_address(), host_things)


async def test_bwrap_userns(
    tmp_path_factory: pytest.TempPathFactory, host_things: tuple[int, str]
) -> None:
    args = [*PIDS, "--userns-uid", "500000"]
    for c in _local_cluster(tmp_path_factory.mktemp("hostile-userns"), agents=1, agent_args=args):
        await _check("bwrap+userns", c, host_address(), host_things)
