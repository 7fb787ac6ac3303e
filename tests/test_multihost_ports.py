"""Ports and volumes across hosts: a scheduler, agents and a client, each in a network
namespace of its own (tests/_netns.py). The client starts a web server in a sandbox with
``ports=[8000]`` and fetches a page through its tunnel, from its own host; a create
naming a volume goes to the host that holds it while that host has room.

Docker: every simulated host shares the one engine, whose host is the test's own
namespace, at .254 on the switch: the agent publishes there (``--publish-host``), as a
real agent publishes on its own host's address. Local runtime: the agent forwards from
its own host's address into the sandbox's namespace.

Run as a script, this file is the client: ``python tests/test_multihost_ports.py
SCHEDULER`` prints ``page <what it fetched>`` and ``tunnel <url>``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests._netns import MultiHostCluster, netns_cluster

pytestmark = pytest.mark.netns

PAGE = "served from a sandbox on another host"


async def client(address: str) -> None:
    import urllib.request

    from aviato import Sandbox, SandboxDefaults

    defaults = SandboxDefaults(container_image="python:3.11", scheduler=address)
    async with Sandbox.session(defaults) as session:
        sb = session.create(command="python", args=["-m", "http.server", "8000"], ports=[8000])
        tunnel = (await sb.tunnels())[8000]
        print(f"tunnel {tunnel.url}", flush=True)
        await sb.write_file("index.html", PAGE.encode())
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            try:
                with urllib.request.urlopen(tunnel.url + "/index.html", timeout=5) as r:
                    print(f"page {r.read().decode()}", flush=True)
                    return
            except OSError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    print(f"page failed: {exc}", flush=True)
                    return
                await asyncio.sleep(0.3)


if __name__ == "__main__":
    asyncio.run(client(sys.argv[1]))
    raise SystemExit(0)


class PortsCluster(MultiHostCluster):
    """Agents of ``runtime`` (MultiHostCluster's are Docker agents), each with a state
    directory of its own, as on hosts of their own (the local runtime keeps volumes there)."""

    def __init__(self, tmp: Path, runtime: str, agents: int = 1) -> None:
        self.agent_runtime = runtime
        super().__init__(tmp, agents=agents, slots=2)

    def start_agent(self, agent_id: str) -> None:
        extra = ["--state-dir", str(self.tmp / f"state-{agent_id}")]
        if self.agent_runtime == "docker":
            extra += ["--publish-host", f"{self.hosts.subnet}.254"]
        self._spawn_on(
            agent_id,
            agent_id,
            [
                "agent",
                "--scheduler",
                self.address,
                "--agent-id",
                agent_id,
                "--slots",
                str(self.slots),
                "--runtime",
                self.agent_runtime,
                "--bind",
                f"tcp://{self.hosts.addresses[agent_id]}:0",
                *extra,
            ],
        )


def _cluster(tmp: Path, runtime: str, agents: int = 1) -> Iterator[PortsCluster]:
    yield from netns_cluster(lambda: PortsCluster(tmp, runtime, agents))


@pytest.fixture(params=["docker", "local"])
def mh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PortsCluster]:
    yield from _cluster(tmp_path, request.param)


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[PortsCluster]:
    """Two local-runtime agents: each host's volumes are its own (Docker agents here
    share one engine, so they share its volumes, as agents on one real host do)."""
    yield from _cluster(tmp_path, "local", agents=2)


def test_a_page_is_fetched_through_a_tunnel_from_another_host(mh: PortsCluster) -> None:
    run = mh.client("test_multihost_ports.py")
    try:
        tunnel = run.wait_line("tunnel ", 120).split(" ", 1)[1]
        page = run.wait_line("page", 90)
        assert page == f"page {PAGE}", f"{page}\n{mh.logs()}"
        # Reached at the agent's host (or, for Docker, the engine's), not the client's.
        agent_host = mh.hosts.addresses[mh.agent_ids[0]]
        engine_host = f"{mh.hosts.subnet}.254"
        expected = engine_host if mh.agent_runtime == "docker" else agent_host
        assert tunnel.startswith(f"http://{expected}:"), tunnel
        run.proc.wait(timeout=60)
        assert run.proc.returncode == 0
    finally:
        run.close()


async def test_a_create_naming_a_volume_goes_to_the_host_holding_it(
    two_hosts: PortsCluster,
) -> None:
    from aviato import Sandbox, SandboxDefaults, list_volumes, remove_volume

    defaults = SandboxDefaults(
        container_image="python:3.11", scheduler=two_hosts.address, lease_seconds=5
    )
    name = f"mh-{uuid.uuid4().hex[:8]}"
    named = defaults.replace(volumes={"/v": name})

    async def holders() -> list[str]:
        return sorted(v.agent_id for v in await list_volumes(defaults) if v.name == name)

    async def wait_holders(n: int) -> list[str]:
        for _ in range(200):
            if len(found := await holders()) == n:
                return found
            await asyncio.sleep(0.1)
        raise AssertionError(f"volume {name} held by {await holders()}, not {n} agents")

    first = await Sandbox.create("sleep", "infinity", defaults=named)
    second = third = None
    try:
        assert first.info is not None
        holder = first.info.agent_id
        await first.exec(["sh", "-c", "echo kept > /v/f"])
        assert await wait_holders(1) == [holder]
        # The holder has 1 free slot, the other host 2: spread would pick the other.
        second = await Sandbox.create("sleep", "infinity", defaults=named)
        assert second.info is not None and second.info.agent_id == holder
        assert (await second.exec(["cat", "/v/f"])).stdout == b"kept\n"
        # The holder is full: the create goes to the other host, where the volume is
        # made afresh (empty: volumes are never copied between hosts).
        third = await Sandbox.create("sleep", "infinity", defaults=named)
        assert third.info is not None and third.info.agent_id != holder
        assert (await third.exec(["ls", "-A", "/v"])).stdout == b""
        assert len(await wait_holders(2)) == 2
    finally:
        for sb in (first, second, third):
            if sb is not None:
                await sb.stop()
    assert len(await remove_volume(name, defaults=defaults)) == 2
    await wait_holders(0)
