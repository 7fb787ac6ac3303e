"""Host mounts, named volumes and ports, on each runtime (a real cluster of each: Docker
containers; the local runtime's bubblewrap process trees), and the refusals of hostile
ones (each a typed error saying what to do)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import ConfigurationError, Mount, Sandbox, SandboxDefaults, SandboxFailedError
from tests.conftest import Cluster, docker_cluster, wait_until
from tests.test_local_runtime import _local_cluster
from tests.test_sandbox import sandboxes_of

RUNTIMES = ["docker", "local"]
#: The agents' --allow-mount root (one per module run; /tmp holds no other root).
ROOT = Path(tempfile.mkdtemp(prefix="aviato-mounts-"))


@pytest.fixture(scope="module", params=RUNTIMES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp(request.param)
    allowed = ROOT / "allowed"
    allowed.mkdir(parents=True, exist_ok=True)
    args = ["--allow-mount", str(allowed)]
    try:
        if request.param == "docker":
            yield from docker_cluster(tmp, agents=1, agent_args=args)
        else:
            yield from _local_cluster(tmp, agents=1, agent_args=args)
    finally:
        import shutil

        shutil.rmtree(ROOT, ignore_errors=True)


@pytest.fixture
def allowed(cluster: Cluster) -> Path:
    path = ROOT / "allowed"
    (path / "data").mkdir(parents=True, exist_ok=True)
    (path / "data" / "hello.txt").write_text("hello from the host\n")
    os.chmod(path / "data", 0o777)  # a sandbox's user may write into the rw mount
    return path


@pytest.fixture
def defaults(cluster: Cluster) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image="python:3.11", scheduler=cluster.address, lease_seconds=5)
    wait_until(lambda: not sandboxes_of(cluster), 15, 0.2, "the test's sandboxes to be removed")


async def test_read_only_host_mount(defaults: SandboxDefaults, allowed: Path) -> None:
    mounted = defaults.replace(mounts=[Mount(str(allowed / "data"), "/data", read_only=True)])
    async with Sandbox(command="sleep", args=["infinity"], defaults=mounted) as sb:
        r = await sb.exec(["cat", "/data/hello.txt"])
        assert r.stdout == b"hello from the host\n", r
        r = await sb.exec(["sh", "-c", "echo x > /data/new.txt"])
        assert r.returncode != 0 and b"Read-only" in r.stderr, r
    assert not (allowed / "data" / "new.txt").exists()


async def test_writable_host_mount(defaults: SandboxDefaults, allowed: Path) -> None:
    mount = Mount(str(allowed / "data"), "/mnt/work")
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults, mounts=[mount]) as sb:
        r = await sb.exec(["sh", "-c", "echo from-sandbox > /mnt/work/out.txt"])
        assert r.returncode == 0, r
    assert (allowed / "data" / "out.txt").read_text() == "from-sandbox\n"
    (allowed / "data" / "out.txt").unlink()


@pytest.mark.parametrize("how", ["dotdot", "symlink", "outside", "missing"])
async def test_mount_escaping_its_root_is_refused(
    defaults: SandboxDefaults, allowed: Path, how: str
) -> None:
    if how == "dotdot":
        source = f"{allowed}/data/../../"  # the root's parent
    elif how == "symlink":
        link = allowed / "escape"
        if not link.is_symlink():
            link.symlink_to("/etc")
        source = str(link)
    elif how == "outside":
        source = "/etc"
    else:
        source = str(allowed / "no-such-dir")
    mounted = defaults.replace(mounts=[Mount(source, "/data")])
    with pytest.raises(SandboxFailedError) as info:
        await Sandbox.create("sleep", "infinity", defaults=mounted)
    message = str(info.value)
    assert source in message, message
    if how != "missing":
        assert "--allow-mount" in message and "outside" in message, message


@pytest.mark.parametrize(
    "mounts, volumes, ports, network, words",
    [
        ([Mount("datasets", "/data")], {}, [], None, "absolute path on the agent's host"),
        ([Mount("/datasets", "data")], {}, [], None, "absolute path inside the sandbox"),
        ([Mount("/datasets", "/proc/x")], {}, [], None, "reserved"),
        ([], {"/cache": "a/b"}, [], None, "no '/'"),
        ([], {"/cache": ""}, [], None, "volume name"),
        ([], {}, [0], None, "1 to 65535"),
        ([], {}, [70000], None, "1 to 65535"),
        ([], {}, [8000], "none", "network='none'"),
    ],
)
def test_bad_storage_options_are_refused_before_sending(
    mounts: list[Mount], volumes: dict[str, str], ports: list[int], network: str | None, words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words.replace("(", r"\(")):
        Sandbox(
            command="sleep",
            defaults=SandboxDefaults(scheduler="tcp://127.0.0.1:9"),
            mounts=mounts,
            volumes=volumes,
            ports=ports,
            network=network,
        )
