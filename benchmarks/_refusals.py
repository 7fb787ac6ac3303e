"""How long a refused client waits for its ``UnauthorizedError`` (the README: "within
about a second, not a hang"): an embedded cluster with CURVE keys, then clients with
no keys and with another cluster's keys, each timed from its request to the error."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aviato import Sandbox, SandboxDefaults, UnauthorizedError
from aviato._auth import create_cluster_keys
from aviato._connection import close_all
from aviato._local import LocalCluster

from ._cleanup import Cleanup
from ._common import RUN_ID
from ._stats import Stats

#: "About a second": the slowest refusal must come within this.
TARGET_S = 1.5
#: A refusal that takes longer is a hang: counted at this, and the run goes on.
SAMPLE_TIMEOUT_S = 20.0


@dataclass
class RefusalResult:
    cases: list[Stats] = field(default_factory=list)  # seconds to UnauthorizedError
    hangs: int = 0  # samples with no answer within SAMPLE_TIMEOUT_S

    @property
    def worst(self) -> float:
        return max((max(c.samples) for c in self.cases if c.samples), default=float("nan"))


async def bench_refusals(cleanup: Cleanup, n: int) -> RefusalResult:
    tmp = Path(tempfile.mkdtemp(prefix=f"aviato-bench-{RUN_ID}-keys-"))
    try:
        create_cluster_keys(tmp / "cluster")
        create_cluster_keys(tmp / "foreign")  # another `aviato keys` run
        agent_id = f"bench-{RUN_ID}-keyed"
        cleanup.agent_ids.add(agent_id)
        cluster = LocalCluster(agent_id=agent_id, keys=str(tmp / "cluster"))
        cleanup.clusters.append(cluster)
        try:
            address = await asyncio.to_thread(cluster.start, 60.0)
            clients = {
                "no keys": SandboxDefaults(scheduler=address),
                "another cluster's keys": SandboxDefaults(
                    scheduler=address, keys=str(tmp / "foreign")
                ),
            }
            result = RefusalResult()
            for name, defaults in clients.items():
                stats = Stats(name)
                for _ in range(n):
                    t0 = time.perf_counter()
                    try:
                        async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                            await Sandbox.list(defaults=defaults)
                    except UnauthorizedError:
                        stats.add(time.perf_counter() - t0)
                    except TimeoutError:
                        # A hang is the claim's failure, not the benchmark's: count it.
                        stats.add(SAMPLE_TIMEOUT_S)
                        result.hangs += 1
                    else:
                        raise RuntimeError(f"a client with {name} was served")
                    finally:
                        close_all()  # each sample a new connection
                result.cases.append(stats)
            return result
        finally:
            await asyncio.to_thread(cluster.stop)
            cleanup.clusters.remove(cluster)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
