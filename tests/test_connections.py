"""The client's connections over the life of a process."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Cluster

SCRIPT = """
import asyncio, os, sys
from aviato import Sandbox, SandboxDefaults
d = SandboxDefaults(scheduler=sys.argv[1])
async def main():
    await Sandbox.list(defaults=d)
asyncio.run(main())  # the first: imports, the ZeroMQ context
before = len(os.listdir("/proc/self/fd"))
for _ in range(30):
    asyncio.run(main())
print(len(os.listdir("/proc/self/fd")) - before)
"""


def test_connections_of_ended_loops_are_closed(cluster: Cluster) -> None:
    """Each asyncio.run that talked to the cluster left its sockets open (4 descriptors
    a loop): a long-lived process, or a long test run, ran out of ZeroMQ sockets and
    every new connection then found "nothing answers"."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, cluster.address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    grown = int(out.stdout.strip())
    assert grown <= 8, f"{grown} descriptors more after 30 loops"
