"""Host mounts, named volumes and ports, on each runtime (a real cluster of each: Docker
containers; the local runtime's bubblewrap process trees), and the refusals of hostile
ones (each a typed error saying what to do)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import (
    ConfigurationError,
    Mount,
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    SandboxNotFoundError,
    Tunnel,
    list_volumes,
    remove_volume,
)
from tests.conftest import ROOT as REPO
from tests.conftest import RUN_ID, Cluster, docker_cluster, wait_until
from tests.test_local_runtime import _local_cluster
from tests.test_sandbox import sandboxes_of

RUNTIMES = ["docker", "local"]


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agents' --allow-mount root."""
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module", params=RUNTIMES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, allowed_root: Path
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp(request.param)
    args = ["--allow-mount", str(allowed_root)]
    if request.param == "docker":
        yield from docker_cluster(tmp, agents=1, agent_args=args)
    else:
        yield from _local_cluster(tmp, agents=1, agent_args=args)


@pytest.fixture
def allowed(cluster: Cluster, allowed_root: Path) -> Path:
    (allowed_root / "data").mkdir(exist_ok=True)
    (allowed_root / "data" / "hello.txt").write_text("hello from the host\n")
    os.chmod(allowed_root / "data", 0o777)  # a sandbox's user may write into the rw mount
    return allowed_root


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
        ([Mount("/datasets", "/run")], {}, [], None, "reserved"),
        ([Mount("/datasets", "/")], {}, [], None, "reserved"),
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


def _aviato(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", "--scheduler", cluster.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


async def test_named_volume_outlives_its_sandboxes(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    name = f"t{RUN_ID}-cache-{uuid.uuid4().hex[:6]}"
    with_volume = defaults.replace(volumes={"/cache": name})
    async with Sandbox(command="sleep", args=["infinity"], defaults=with_volume) as sb:
        r = await sb.exec(["sh", "-c", "echo kept > /cache/f && cat /cache/f"])
        assert r.stdout == b"kept\n", r
        # Listed, by the agent that holds it; not removable while mounted.
        rows = await _wait_listed(with_volume, name)
        assert [v.agent_id for v in rows] == [sb.info.agent_id]  # type: ignore[union-attr]
        with pytest.raises(SandboxFailedError, match="stop them first"):
            await remove_volume(name, defaults=defaults)
    async with Sandbox(command="sleep", args=["infinity"], defaults=with_volume) as sb:
        r = await sb.exec(["cat", "/cache/f"])
        assert r.stdout == b"kept\n", r  # a new sandbox finds what the last one left
    listed = _aviato(cluster, "volume", "ls")
    assert listed.returncode == 0 and name in listed.stdout, listed
    removed = _aviato(cluster, "volume", "rm", name)
    assert removed.returncode == 0 and name in removed.stdout, removed
    await _wait_listed(defaults, name, present=False)
    with pytest.raises(SandboxNotFoundError, match="aviato volume ls"):
        await remove_volume(name, defaults=defaults)
    bad = _aviato(cluster, "volume", "rm", "a/b")
    assert bad.returncode == 1 and "no '/'" in bad.stderr, bad


async def _wait_listed(defaults: SandboxDefaults, name: str, present: bool = True) -> list:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        rows = [v for v in await list_volumes(defaults) if v.name == name]
        if bool(rows) == present:
            return rows
        assert asyncio.get_running_loop().time() < deadline, f"volume {name} listed: {rows}"
        await asyncio.sleep(0.1)


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


async def test_a_port_is_reached_through_its_tunnel(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    # The snippet, as written (through a session).
    async with Sandbox.session(defaults) as session:
        sb = session.create(command="python", args=["-m", "http.server", "8000"], ports=[8000])
        tunnel = (await sb.tunnels())[8000]
        await sb.write_file("index.html", b"hello through the tunnel")  # where it serves
        assert isinstance(tunnel, Tunnel)
        assert tunnel.url == f"http://{tunnel.host}:{tunnel.port}"
        assert tunnel.port != 8000 or cluster.runtime == "docker"

        async def page() -> bytes | None:
            try:
                return await asyncio.to_thread(_fetch, tunnel.url + "/index.html")
            except OSError:
                return None

        deadline = asyncio.get_running_loop().time() + 30
        while (body := await page()) is None:
            assert asyncio.get_running_loop().time() < deadline, "the server never answered"
            await asyncio.sleep(0.2)
        assert body == b"hello through the tunnel"
        ps = _aviato(cluster, "ps")
        assert f"8000->{tunnel.host}:{tunnel.port}" in ps.stdout.replace("\n", ""), ps
        # A sandbox without ports has no tunnels.
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as plain:
        assert await plain.tunnels() == {}


async def test_daemons_refuse_hostile_storage_requests(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    """Sent raw (past the client's checks): each refused with a reply that says why, and
    both daemons keep serving."""
    from aviato.protocol import (
        CreateSandbox,
        ErrorCode,
        ErrorReply,
        GetTunnels,
        Ping,
        Pong,
        RemoveVolume,
        SandboxSpec,
    )
    from tests.test_bad_input import _raw

    bad_specs = {
        "mount source 'rel'": SandboxSpec("python:3.11", "sleep", mounts=(Mount("rel", "/d"),)),
        "reserved": SandboxSpec("python:3.11", "sleep", mounts=(Mount("/x", "/run"),)),
        "must not contain '..'": SandboxSpec("python:3.11", "sleep", volumes={"/a/../proc": "v"}),
        "no '/'": SandboxSpec("python:3.11", "sleep", volumes={"/c": "../../etc"}),
        "1 to 65535": SandboxSpec("python:3.11", "sleep", ports=(0, 70000)),
        "network='none'": SandboxSpec("python:3.11", "sleep", ports=(80,), network="none"),
    }
    for i, (words, spec) in enumerate(bad_specs.items()):
        reply = await _raw(cluster.address, encode_msg(CreateSandbox(spec, 5.0), 100 + i))
        assert isinstance(reply.msg, ErrorReply), words
        assert reply.msg.code is ErrorCode.BAD_REQUEST and words in reply.msg.message, reply.msg
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        agent = sb.info.agent_address  # type: ignore[union-attr]
        for i, name in enumerate(["../../etc", "a/b", "", "x" * 5000]):
            reply = await _raw(agent, encode_msg(RemoveVolume(name), 200 + i))
            assert isinstance(reply.msg, ErrorReply) and reply.msg.code is ErrorCode.BAD_REQUEST
            assert "volume name" in reply.msg.message and len(reply.msg.message) < 900
        reply = await _raw(agent, encode_msg(RemoveVolume("never-made"), 210))
        assert isinstance(reply.msg, ErrorReply) and reply.msg.code is ErrorCode.NOT_FOUND
        reply = await _raw(agent, encode_msg(GetTunnels("sb-nope"), 211))
        assert isinstance(reply.msg, ErrorReply) and reply.msg.code is ErrorCode.NOT_FOUND
        reply = await _raw(agent, encode_msg(GetTunnels(sb.sandbox_id), 212))
        assert not isinstance(reply.msg, ErrorReply) and reply.msg.tunnels == ()  # type: ignore[attr-defined]
        for address, server in ((cluster.address, "scheduler"), (agent, "agent")):
            reply = await _raw(address, encode_msg(Ping(), 300))
            assert isinstance(reply.msg, Pong) and reply.msg.server == server


def encode_msg(msg: object, request_id: int) -> list[bytes]:
    from aviato.protocol import encode

    return [bytes(f) for f in encode(msg, request_id)]  # type: ignore[arg-type]


def test_allowed_roots_and_what_resolves_under_them(tmp_path: Path) -> None:
    from agent.storage import allowed_roots, resolve_mount

    (tmp_path / "root" / "d").mkdir(parents=True)
    (tmp_path / "root" / "up").symlink_to(tmp_path)
    (tmp_path / "alias").symlink_to(tmp_path / "root")
    # A root is resolved too: a symlink to it allows what it points at.
    (root,) = allowed_roots([str(tmp_path / "alias")])
    assert root == str(tmp_path / "root")
    assert resolve_mount(str(tmp_path / "alias" / "d"), [root], "sb") == f"{root}/d"
    for escape in (f"{root}/d/../..", f"{root}/up", f"{root}/up/root/../.."):
        with pytest.raises(SandboxFailedError, match="--allow-mount"):
            resolve_mount(escape, [root], "sb")
    with pytest.raises(SandboxFailedError, match="allows no host mounts"):
        resolve_mount(root, [], "sb")
    with pytest.raises(ValueError, match="absolute"):
        allowed_roots(["datasets"])
    with pytest.raises(ValueError, match="not a directory"):
        allowed_roots([str(tmp_path / "missing")])


def test_the_local_runtime_without_bubblewrap_refuses_mounts_volumes_and_ports() -> None:
    from agent.runtime.local import LocalRuntime
    from aviato.protocol import SandboxSpec

    runtime = LocalRuntime(use_bwrap=False, use_cgroups=False)
    for spec in (
        SandboxSpec("python:3.11", "sleep", mounts=(Mount("/srv", "/data"),)),
        SandboxSpec("python:3.11", "sleep", volumes={"/cache": "pip-cache"}),
        SandboxSpec("python:3.11", "sleep", ports=(8000,)),
    ):
        with pytest.raises(SandboxFailedError, match=r"NOT isolated.*bubblewrap"):
            runtime._check_mounts_and_ports("sb", spec)
