"""Interactive sandboxes under gVisor (issue 13 on the ``gvisor`` isolation level): exec
with stdin, kept processes (stdin, output, exit code, kill), a terminal, and a
published port reached through its tunnel, on the tests' own engine with runsc
(tests/_gvisor_engine.py). Each works there as on runc; none is refused."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest

from aviato import Sandbox, SandboxDefaults
from tests._gvisor_engine import GvisorEngine, gvisor_cluster
from tests.conftest import Cluster, wait_until

IMAGE = "python:3.11"


@pytest.fixture(scope="module")
def gcluster(
    tmp_path_factory: pytest.TempPathFactory, gvisor_engine: GvisorEngine
) -> Iterator[Cluster]:
    """One agent on the gVisor engine offering gvisor only: every sandbox runs on runsc."""
    yield from gvisor_cluster(tmp_path_factory.mktemp("gvisor-io"), gvisor_engine)


@pytest.fixture
def gdefaults(gcluster: Cluster, gvisor_engine: GvisorEngine) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image=IMAGE, scheduler=gcluster.address, lease_seconds=5)
    wait_until(
        lambda: (
            not gvisor_engine.containers(*(f"label=aviato.agent={a}" for a in gcluster.agent_ids))
        ),
        20,
        0.2,
        "the test's sandboxes to be removed from the gVisor engine",
    )


async def test_exec_stdin_processes_and_a_terminal_under_gvisor(
    gdefaults: SandboxDefaults,
) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=gdefaults) as sb:
        kernel = (await sb.exec(["uname", "-r"])).stdout.strip()
        assert kernel == b"4.4.0", f"not under gVisor: {kernel!r}"  # runsc's own kernel
        r = await sb.exec(["cat"], stdin=b"hello")
        assert (r.returncode, r.stdout) == (0, b"hello")
        big = bytes(range(256)) * 4096  # 1 MiB through stdin
        r = await sb.exec(["sh", "-c", "wc -c"], stdin=big)
        assert r.stdout.strip() == str(len(big)).encode()

        p = await sb.spawn(["python", "-u", "-i"])
        await p.write(b"print(6 * 7)\n")
        await p.close_stdin()
        out = b""
        async with asyncio.timeout(60):
            async for chunk in p.output():
                if chunk.stream == "stdout":
                    out += chunk.data
        assert b"42" in out
        assert await asyncio.wait_for(p.wait(), 60) == 0
        assert [i.id for i in await sb.processes() if i.running] == []

        sleeper = await sb.spawn(["sleep", "300"])
        assert any(i.id == sleeper.id and i.running for i in await sb.processes())
        await sleeper.kill()
        assert await asyncio.wait_for(sleeper.wait(), 60) != 0

        t = await sb.spawn(["sh", "-c", "tty; stty size"], pty=True, rows=24, cols=80)
        seen = b""
        async with asyncio.timeout(60):
            async for chunk in t.output():
                seen += chunk.data
        assert b"/dev/pts/" in seen and b"24 80" in seen, seen


def _fetch(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
            return body
    except OSError:
        return None


async def test_a_published_port_under_gvisor(gdefaults: SandboxDefaults) -> None:
    async with Sandbox.session(gdefaults) as session:
        sb = session.create(command="python", args=["-m", "http.server", "8000"], ports=[8000])
        tunnel = (await sb.tunnels())[8000]
        await sb.write_file("index.html", b"hello from runsc")  # where it serves
        deadline = asyncio.get_running_loop().time() + 60
        while (body := await asyncio.to_thread(_fetch, tunnel.url + "/index.html")) is None:
            assert asyncio.get_running_loop().time() < deadline, "the server never answered"
            await asyncio.sleep(0.2)
        assert body == b"hello from runsc"
