"""User namespaces (issue 16) on Docker: on an engine with ``--userns-remap`` (one of
the tests' own, tests/_userns_engine.py), root inside a sandbox is an unprivileged uid
on the host. The agent detects the remapping and says so (``aviato status``/``ps``,
``sb.isolation``), hands the remapped root the socket directory it mounts in, and
exec, files and functions work; a file the sandbox makes on a host mount is owned by
the remapped uid."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.docker_userns import remapped_root
from aviato import Mount, Sandbox, SandboxDefaults
from tests._gvisor_engine import gvisor_cluster
from tests._userns_engine import SPAN, UsernsEngine
from tests.conftest import Cluster, wait_until
from tests.test_isolation import _aviato

IMAGE = "python:3.11"


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    # Not under pytest's 0700 directory: the remapped root must reach its mounts.
    root = Path(tempfile.mkdtemp(prefix="aviato-remap-"))
    root.chmod(0o755)
    (root / "rw").mkdir()
    (root / "rw").chmod(0o777)  # any uid may write: the owner of what appears shows who
    (root / "secret").mkdir()
    (root / "secret" / "key").write_text("root only\n")
    (root / "secret" / "key").chmod(0o600)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def ucluster(
    tmp_path_factory: pytest.TempPathFactory, userns_engine: UsernsEngine, shared: Path
) -> Iterator[Cluster]:
    yield from gvisor_cluster(
        tmp_path_factory.mktemp("remap"),
        userns_engine,
        "runc",
        agent_args=["--allow-mount", str(shared)],
    )


@pytest.fixture
def udefaults(
    ucluster: Cluster, userns_engine: UsernsEngine, shared: Path
) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(
        container_image=IMAGE,
        scheduler=ucluster.address,
        lease_seconds=5,
        mounts=(Mount(str(shared / "rw"), "/out"), Mount(str(shared / "secret"), "/secret")),
    )
    wait_until(
        lambda: not userns_engine.containers("label=aviato.managed"),
        20,
        0.2,
        "the test's sandboxes to be removed from the userns engine",
    )


async def test_root_inside_is_not_root_outside(
    ucluster: Cluster, udefaults: SandboxDefaults, userns_engine: UsernsEngine, shared: Path
) -> None:
    status = json.loads(_aviato("status", "--scheduler", ucluster.address, "--format", "json"))
    (agent,) = status["agents"]
    assert agent["isolations"] == ["runc"]
    assert agent["userns"] == f"root is uid {userns_engine.base} on the host", agent
    assert "runc+userns" in _aviato("status", "--scheduler", ucluster.address)

    async with Sandbox(command="sleep", args=["infinity"], defaults=udefaults) as sb:
        assert sb.isolation == "runc+userns"
        rows = json.loads(_aviato("ps", "--scheduler", ucluster.address, "--format", "json"))
        assert {r["sandbox_id"]: r["isolation"] for r in rows}[sb.sandbox_id] == "runc+userns"

        r = await sb.exec(["sh", "-c", "id -u; cat /proc/self/uid_map"], check=True)
        uid_inside, mapping = r.stdout.decode().split("\n", 1)
        assert uid_inside == "0"
        inside, outside, count = (int(x) for x in mapping.split())
        assert (inside, outside, count) == (0, userns_engine.base, SPAN), mapping
        # Made on a host mount: owned on the host by the unprivileged uid.
        await sb.exec(["sh", "-c", "echo hi > /out/made-inside"], check=True)
        st = os.stat(shared / "rw" / "made-inside")
        assert (st.st_uid, st.st_gid) == (outside, outside) and outside != 0
        # A root-only host file: closed (root inside owns nothing outside).
        r = await sb.exec(["cat", "/secret/key"])
        assert r.returncode != 0 and b"Permission denied" in r.stderr, r
        # What the sandbox is for still works: files (through the supervisor) and exec.
        await sb.write_file("/tmp/x.txt", b"payload")
        assert await sb.read_file("/tmp/x.txt") == b"payload"
        r = await sb.exec(["cat", "/tmp/x.txt"], check=True)
        assert r.stdout == b"payload"
    (shared / "rw" / "made-inside").unlink()


async def test_functions_run_under_it(
    udefaults: SandboxDefaults, userns_engine: UsernsEngine
) -> None:
    async with Sandbox.session(udefaults.replace(mounts=())) as session:

        @session.function(max_workers=1)
        def whoami(n: int) -> tuple[int, str]:
            return os.getuid(), open("/proc/self/uid_map").read().split()[1]

        uid, outside = (await whoami(0)).value
        assert uid == 0 and int(outside) == userns_engine.base
        assert [r.value async for r in whoami.map(range(20))] == [(0, outside)] * 20


def test_the_remapping_is_read_from_the_engine() -> None:
    plain = {"SecurityOptions": ["name=seccomp,profile=default"], "DockerRootDir": "/d"}
    assert remapped_root(plain) is None
    remapped = {
        "SecurityOptions": ["name=seccomp,profile=default", "name=userns"],
        "DockerRootDir": "/var/lib/docker/231072.231072",
    }
    assert remapped_root(remapped) == (231072, 231072)
    # Remapping said, but its ids unreadable: the agent must not guess.
    with pytest.raises(ValueError, match="userns"):
        remapped_root({**remapped, "DockerRootDir": "/var/lib/docker"})
