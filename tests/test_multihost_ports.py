"""Ports across hosts: a scheduler, an agent and a client, each in a network namespace
of its own (tests/_netns.py); the client starts a web server in a sandbox with
``ports=[8000]`` and fetches a page through its tunnel, from its own host.

Docker: every simulated host shares the one engine, whose host is the test's own
namespace, at .254 on the switch: the agent publishes there (``--publish-host``), as a
real agent publishes on its own host's address. Local runtime: the agent forwards from
its own host's address into the sandbox's namespace.

Run as a script, this file is the client: ``python tests/test_multihost_ports.py
SCHEDULER`` prints ``page <what it fetched>`` and ``tunnel <url>``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests._netns import MultiHostCluster, leftover_namespaces, netns_problem
    from tests.conftest import need_docker

pytestmark = pytest.mark.netns

PAGE = "served from a sandbox on another host"


async def client(address: str) -> None:
    import asyncio
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
    import asyncio

    asyncio.run(client(sys.argv[1]))
    raise SystemExit(0)


class PortsCluster(MultiHostCluster):
    """One agent of ``runtime`` (MultiHostCluster's are Docker agents)."""

    def __init__(self, tmp: Path, runtime: str) -> None:
        self.agent_runtime = runtime
        super().__init__(tmp, agents=1, slots=2)

    def start_agent(self, agent_id: str) -> None:
        extra = []
        if self.agent_runtime == "docker":
            extra = ["--publish-host", f"{self.hosts.subnet}.254"]
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


@pytest.fixture(params=["docker", "local"])
def mh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PortsCluster]:
    need_docker()
    problem = netns_problem()
    if problem is not None:
        if os.environ.get("AVIATO_REQUIRE_NETNS") == "1":
            pytest.fail(f"AVIATO_REQUIRE_NETNS=1 but {problem}")
        pytest.skip(problem)
    c = PortsCluster(tmp_path, request.param)
    try:
        yield c
    finally:
        c.close()
        assert not c.left_behind, f"containers left behind: {c.left_behind}\n{c.logs()}"
        assert not c.killed_at_close, f"needed SIGKILL: {c.killed_at_close}\n{c.logs()}"
        assert not leftover_namespaces(), leftover_namespaces()


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
