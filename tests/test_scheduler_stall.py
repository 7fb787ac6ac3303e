"""A scheduler that stalls (its process stopped, as a huge request or a swapped host
would hold it) blames no agent for its own silence; a real death is still seen, and
logged at WARNING with its reason and the age of the last heartbeat."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

from aviato import Sandbox, SandboxDefaults, SandboxStatus
from tests.conftest import IMAGE, Cluster, wait_until

# The cluster fixture's scheduler runs with --dead-after 1.5 and 0.2 s heartbeats.
DEAD_AFTER = 1.5


def _scheduler_log(c: Cluster) -> str:
    return Path(c.tmp / "scheduler.log").read_text(errors="replace")


async def test_a_stalled_scheduler_declares_no_live_agent_dead(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=3)
    async with Sandbox.session(d) as session:
        sbs = [session.create(command="sleep", args=["infinity"]) for _ in range(2)]
        await asyncio.gather(*(sb.start() for sb in sbs))
        scheduler = c.procs["scheduler"]
        scheduler.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(4 * DEAD_AFTER)  # the stall itself: nothing to wait on
        finally:
            scheduler.send_signal(signal.SIGCONT)
        # For several dead-after periods after it resumes, every agent stays alive.
        deadline = time.monotonic() + 3 * DEAD_AFTER
        while time.monotonic() < deadline:
            status = await asyncio.to_thread(c.status)
            assert all(a.alive for a in status.agents), (status.agents, c.logs())
            await asyncio.sleep(0.1)
        log = _scheduler_log(c)
        assert "declared dead" not in log, log[-3000:]
        assert re.search(r"event loop stalled for \d+\.\d s", log), log[-3000:]
        # Nor did its sandboxes (or the session, whose keepalives sat unread) suffer.
        statuses = await asyncio.gather(*(sb.status() for sb in sbs))
        assert statuses == [SandboxStatus.RUNNING] * 2, [sb.info for sb in sbs]
        assert (await sbs[0].exec(["echo", "ok"])).stdout == b"ok\n"

        # A real death is still seen, and logged with its reason and age.
        victim = c.agent_ids[0]
        c.kill(victim)
        await asyncio.to_thread(
            wait_until,
            lambda: not any(a.alive for a in c.status().agents if a.agent_id == victim),
            10 * DEAD_AFTER,
            0.1,
            "the killed agent to be declared dead",
        )
        line = next(ln for ln in _scheduler_log(c).splitlines() if "declared dead" in ln)
        assert " WARNING " in line and victim in line, line
        assert re.search(r"no heartbeat for \d+\.\ds \(last heartbeat \d+\.\d s ago", line), line
        # It comes back with its id and removes what it left (no leak after the test).
        c.start_agent(victim)
        await asyncio.to_thread(c.wait_agents, 2)
