"""A real scheduler with fake agents (benchmarks/_control_plane.py) served the way
benchmarks/scale.py serves thousands of them: from readiness callbacks and one
heartbeat task. Creates and stops through the real client go through the
scheduler's hot path (a spec decoded once, agents' replies peeked at, messages read
as bytes) and must all be answered: no fake agent misses a wake-up, none is taken
for dead, and one gone silent is declared dead."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq.asyncio

from aviato import Sandbox, SandboxDefaults
from aviato.protocol import ClusterStatus, ClusterStatusReply
from benchmarks._control_plane import FakeAgent, _request, heartbeat_all, serve_all
from tests.conftest import IMAGE, Cluster


async def _status(ctx: zmq.asyncio.Context, address: str) -> ClusterStatusReply:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        reply = await _request(sock, ClusterStatus(), 1, "ClusterStatusReply")
        assert isinstance(reply, ClusterStatusReply)
        return reply
    finally:
        sock.close()


async def test_fake_agents_served_from_callbacks_answer_every_create(tmp_path: Path) -> None:
    # Heartbeats rare: a fake agent that missed a wake-up is not rescued by the drain
    # after its next heartbeat, and its create hangs (this test then fails).
    c = Cluster(
        tmp_path, agents=0, scheduler_args=["--heartbeat-interval", "60", "--dead-after", "300"]
    )
    ctx = zmq.asyncio.Context()
    agents = [FakeAgent(ctx, c.address, f"fake-{tmp_path.name[-6:]}-{i}", 200) for i in range(3)]
    try:
        await asyncio.gather(*(a.register() for a in agents))
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(serve_all(agents))
            beating = tg.create_task(heartbeat_all(agents))
            defaults = SandboxDefaults(container_image=IMAGE, scheduler=c.address)

            async def one() -> None:
                sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults)
                await sb.start()
                await sb.stop()

            for _ in range(6):  # 300 creates and stops, 50 at a time (each 50: < 1 s)
                await asyncio.wait_for(asyncio.gather(*(one() for _ in range(50))), 30)
            assert sum(a.placed for a in agents) >= 300
            assert sum(a.stopped for a in agents) >= 300
            assert all(a.errors == 0 and a.unregistered == 0 for a in agents)
            status = await _status(ctx, c.address)
            assert sum(1 for a in status.agents if a.alive) == 3
            serving.cancel()
            beating.cancel()
    finally:
        for a in agents:
            a.sock.close(linger=0)
        ctx.destroy(linger=0)
        c.close()


async def test_one_heartbeat_task_keeps_fake_agents_alive_until_one_goes_silent(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, agents=0)  # heartbeats every 0.5 s, dead after 3 s
    ctx = zmq.asyncio.Context()
    agents = [FakeAgent(ctx, c.address, f"fake-{tmp_path.name[-6:]}-{i}", 10) for i in range(3)]
    try:
        await asyncio.gather(*(a.register() for a in agents))
        async with asyncio.TaskGroup() as tg:
            serving = tg.create_task(serve_all(agents))
            beating = tg.create_task(heartbeat_all(agents))
            await asyncio.sleep(4.0)  # past dead-after: only heartbeats keep them alive
            status = await _status(ctx, c.address)
            assert all(a.alive for a in status.agents) and len(status.agents) == 3
            assert all(a.heartbeats >= 2 and a.unregistered == 0 for a in agents)
            victim = agents[1]
            victim.silent = True
            deadline = time.monotonic() + 60  # dead-after is 3 s: this only catches hangs
            while True:
                status = await _status(ctx, c.address)
                alive = {a.agent_id: a.alive for a in status.agents}
                if not alive[victim.agent_id]:
                    break
                assert time.monotonic() < deadline, "the silent fake agent was never declared dead"
                await asyncio.sleep(0.2)
            assert alive[agents[0].agent_id] and alive[agents[2].agent_id]
            serving.cancel()
            beating.cancel()
    finally:
        for a in agents:
            a.sock.close(linger=0)
        ctx.destroy(linger=0)
        c.close()
