"""A client for tests/test_multihost_objects.py, on the client's own host (network
namespace): puts a value, passes it by ref to calls on workers on two agents, each on a
host of its own, and reads each agent's object counters.

    python tests/_mh_objects_client.py SCHEDULER SIZE_MIB

Prints ``summary {json}``: the lengths the calls saw, the agents that ran them, the
agent holding the value, and each agent's counters (fetched, served, handed).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from aviato import Sandbox, SandboxDefaults
from aviato.protocol import ClusterStatus, ObjectStats


def size_of(data: bytes) -> int:
    return len(data)


async def main(address: str, size_mib: int) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=address)
    async with Sandbox.session(defaults) as session:
        fn = session.function(max_workers=2)(size_of)
        deadline = time.monotonic() + 120
        while True:  # until its workers are on both agents
            await asyncio.gather(*(fn(b"w") for _ in range(8)))
            pool = next(iter(session._pools.values()))
            if len({w.sandbox.info.agent_id for w in pool.workers}) == 2:
                break
            assert time.monotonic() < deadline, "workers never on two agents"
        value = os.urandom(size_mib << 20)
        ref = await session.put(value)
        results = []
        for _ in range(4):  # several batches per worker
            results += await asyncio.gather(*(fn(ref) for _ in range(6)))
        agent_of = {w.sandbox_id: w.sandbox.info.agent_id for w in pool.workers}
        conn = session._connections.get(address)
        status = (await conn.request(ClusterStatus(), timeout=30)).msg
        counters = {}
        for agent in status.agents:
            agent_conn = session._connections.get(agent.address)
            stats = (await agent_conn.request(ObjectStats(), timeout=30)).msg
            counters[agent.agent_id] = [stats.fetched, stats.served, stats.handed]
        summary = {
            "lengths": sorted({r.value for r in results}),
            "ran_on": sorted({agent_of.get(r.sandbox_id, "?") for r in results}),
            "holder": ref.source.agent_id,
            "counters": counters,
            "channel": type(conn).__name__,
        }
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
