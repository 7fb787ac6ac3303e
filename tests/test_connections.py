"""The client's connections over the life of a process."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from aviato import Sandbox, SandboxDefaults
from aviato._connection import Connection
from aviato.protocol import Decoded, ErrorCode, ErrorReply, Ping
from tests.conftest import ROOT, Cluster

SCRIPT = """
import asyncio, os, sys
from aviato import Sandbox, SandboxDefaults
d = SandboxDefaults(scheduler=sys.argv[1])
async def main():
    await Sandbox.list(defaults=d)
    if sys.argv[2] == "session":  # a session's own connections, left open (never closed)
        await Sandbox.session(d).__aenter__()
asyncio.run(main())  # the first: imports, the ZeroMQ context
before = len(os.listdir("/proc/self/fd"))
for _ in range(30):
    asyncio.run(main())
print(len(os.listdir("/proc/self/fd")) - before)
"""


@pytest.mark.parametrize("owner", ["default", "session"])
def test_connections_of_ended_loops_are_closed(cluster: Cluster, owner: str) -> None:
    """Each asyncio.run that talked to the cluster left its sockets open (4 descriptors
    a loop): a long-lived process, or a long test run, ran out of ZeroMQ sockets and
    every new connection then found "nothing answers". The same for a session's own
    connections when it was never closed."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, cluster.address, owner],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    grown = int(out.stdout.strip())
    assert grown <= 8, f"{grown} descriptors more after 30 loops"


#: A hang bound for one step (10x what it takes here).
STEP = 60.0


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "zeromq"])
async def test_closing_a_session_leaves_another_on_the_same_loop_working(
    defaults: SandboxDefaults, lane: bool
) -> None:
    """Regression: ``Session.close()`` closed every connection of the event loop (they
    were one process-wide cache), so a second session on the loop lost its channels:
    its request in flight failed, and its function workers, which keep their channel,
    failed every later call."""
    d = defaults.replace(local_lane=lane)
    async with Sandbox.session(d) as second:
        mine = second.create(command="sleep", args=["infinity"])

        @second.function()
        def square(n: int) -> int:
            return n * n

        async with Sandbox.session(d) as first:
            theirs = first.create(command="sleep", args=["infinity"])
            await asyncio.gather(mine.start(), theirs.start())
            assert (await asyncio.wait_for(square(3), STEP)).value == 9  # a worker is up
            in_flight = asyncio.ensure_future(mine.exec(["sh", "-c", "sleep 1; echo slow"]))
            await asyncio.sleep(0.2)  # (it only needs to be sent before the close)
        # `first` is closed: everything of `second` still works.
        assert (await asyncio.wait_for(in_flight, STEP)).stdout == b"slow\n"
        assert (await asyncio.wait_for(mine.exec(["echo", "hi"]), STEP)).stdout == b"hi\n"
        results = await asyncio.wait_for(asyncio.gather(*(square(i) for i in range(20))), STEP)
        assert [r.value for r in results] == [i * i for i in range(20)]
        another = second.create(command="sleep", args=["infinity"])
        await asyncio.wait_for(another.start(), STEP)
        r = await asyncio.wait_for(another.exec(["echo", "new"]), STEP)
        assert r.stdout == b"new\n"


async def test_a_failed_send_fails_its_request() -> None:
    """A send that fails (its socket broke; the connection was closed under a function
    worker by another session's close) is told to the request's handler, from the
    loop, not only logged: the pool's calls on it failed to nobody and hung."""
    told: list[tuple[int, str, bool]] = []
    inside = False

    def handler(decoded: Decoded) -> None:
        assert isinstance(decoded.msg, ErrorReply)
        assert decoded.msg.code is ErrorCode.UNAVAILABLE
        told.append((decoded.request_id, decoded.msg.message, inside))

    for breaking in ("the socket", "the connection"):
        conn = Connection("tcp://127.0.0.1:1")  # nothing listens: no reply will come
        try:
            if breaking == "the socket":
                conn._sock.close(linger=0)
            else:
                conn.close()
            told.clear()
            inside = True
            request_id = conn.send_nowait(Ping(), (), handler)
            inside = False
            async with asyncio.timeout(10):
                while not told:
                    await asyncio.sleep(0.01)
            first_id, message, from_inside = told[0]
            assert (first_id, from_inside) == (request_id, False), told
            assert "tcp://127.0.0.1:1" in message
        finally:
            conn.close()
