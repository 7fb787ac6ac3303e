"""Sandbox networks across hosts (issue 16): a scheduler and two agents, each in a
network namespace of its own (tests/_netns.py), and listeners on other hosts.

- Egress allow-lists: a sandbox with ``network_allow`` reaches the listed listener on
  another host, and not another port there nor the same port on a third host; code
  inside trying to flush the rules fails (no NET_ADMIN) and they hold.
- ``network="internal"``: a session's internal sandboxes meet on one agent's network
  only, so the scheduler keeps them on one agent: two created on a two-agent cluster
  land together (spread would have split them) and reach each other.

Every simulated host shares the one Docker engine, whose containers route out through
the test's own namespace (its leg on the switch), as a real host's containers route
out through that host.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import Sandbox, SandboxDefaults
from tests._netns import MultiHostCluster, netns_cluster
from tests.conftest import wait_until
from tests.test_network import FLUSH, _address, _connect, _until_reached

pytestmark = pytest.mark.netns

PORT, OTHER_PORT = 8100, 8101


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(lambda: MultiHostCluster(tmp_path, agents=2, slots=2))


@pytest.fixture
def listeners(mh: MultiHostCluster) -> Iterator[dict[str, tuple[str, int]]]:
    """Web servers on the client's host (two ports) and the scheduler's (one)."""
    where = {
        "allowed": ("client", PORT),
        "other port": ("client", OTHER_PORT),
        "other host": ("scheduler", PORT),
    }
    procs = []
    try:
        for host, port in where.values():
            address = mh.hosts.addresses[host]
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", mh.hosts.ns(host), sys.executable, "-m",
                     "http.server", str(port), "--bind", address],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        targets = {name: (mh.hosts.addresses[h], p) for name, (h, p) in where.items()}
        for name, (host, port) in where.items():
            wait_until(lambda h=host, p=port: _answers(mh, h, p), 30, 0.1, f"the {name} listener")
        yield targets
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def _answers(mh: MultiHostCluster, host: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('{mh.hosts.addresses[host]}', {port}), 2)"
    done = subprocess.run(
        ["ip", "netns", "exec", mh.hosts.ns(host), sys.executable, "-c", probe],
        capture_output=True,
    )
    return done.returncode == 0


async def test_an_allow_list_across_hosts(
    mh: MultiHostCluster, listeners: dict[str, tuple[str, int]]
) -> None:
    allowed = listeners["allowed"]
    defaults = SandboxDefaults(
        container_image="python:3.11",
        scheduler=mh.address,
        lease_seconds=10,
        network_allow=[f"{allowed[0]}:{allowed[1]}"],
    )
    ask = [allowed, listeners["other port"], listeners["other host"]]
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert sb.info is not None and sb.info.agent_id in mh.agent_ids
        want = ["reached", "ConnectionRefusedError", "ConnectionRefusedError"]
        assert await _connect(sb, ask) == want
        # Code inside cannot change the rules, and they hold after it tried.
        r = await sb.exec(["python3", "-c", FLUSH], check=True)
        tried = json.loads(r.stdout)
        assert tried["raw"] != "opened" and tried["nft"] != 0, r
        r = await sb.exec(["sh", "-c", "iptables -F OUTPUT || echo refused"])
        assert b"refused" in r.stdout, r
        assert await _connect(sb, ask) == want
    # Without the list the same sandbox reaches both: the refusals were the rules'.
    open_ = defaults.replace(network_allow=None)
    async with Sandbox(command="sleep", args=["infinity"], defaults=open_) as sb:
        assert await _connect(sb, ask[1:]) == ["reached", "reached"]


async def test_a_sessions_internal_sandboxes_share_an_agent(mh: MultiHostCluster) -> None:
    defaults = SandboxDefaults(
        container_image="python:3.11", scheduler=mh.address, lease_seconds=10
    )
    async with Sandbox.session(defaults) as session, Sandbox.session(defaults) as other:
        a = session.create(
            command="python3", args=["-m", "http.server", "8000"], network="internal"
        )
        await a.start()
        # Spread would put the next one on the other agent (it has the most free slots).
        b = session.create(command="sleep", args=["infinity"], network="internal")
        c = other.create(command="sleep", args=["infinity"], network="internal")
        await asyncio.gather(b.start(), c.start())
        assert a.info is not None and b.info is not None and c.info is not None
        assert a.info.agent_id == b.info.agent_id, (a.info.agent_id, b.info.agent_id)
        assert c.info.agent_id != a.info.agent_id  # another session: spread as before
        await _until_reached(b, (await _address(a), 8000))
