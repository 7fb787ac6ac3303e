"""The embedded cluster (``LocalCluster``): its start and stop time, its processes' memory."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import psutil

from aviato._local import LocalCluster

from ._cleanup import Cleanup
from ._common import RUN_ID, daemon_module


def cluster_procs(address: str, agent_id: str) -> dict[str, psutil.Process]:
    """The scheduler (listening on ``address``'s port) and the agent (``agent_id``) of an
    embedded cluster this process started."""
    port = int(address.rsplit(":", 1)[1])
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if daemon_module(cmd) == "agent" and agent_id in cmd:
                found["agent"] = child
            elif daemon_module(cmd) == "scheduler" and any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for c in child.net_connections("tcp")
            ):
                found["scheduler"] = child
    if set(found) != {"scheduler", "agent"}:
        raise RuntimeError(f"cannot find the embedded cluster's processes (found {list(found)})")
    return found


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: p.memory_info().rss / 2**20 for name, p in procs.items()}


@dataclass
class StartResult:
    start_s: float
    stop_s: float
    idle_rss: dict[str, float]


def bench_cluster_start(cleanup: Cleanup) -> StartResult:
    agent_id = f"bench-{RUN_ID}-start"
    cleanup.agent_ids.add(agent_id)
    cluster = LocalCluster(agent_id=agent_id)
    cleanup.clusters.append(cluster)
    t0 = time.perf_counter()
    cluster.start(timeout=60)
    start_s = time.perf_counter() - t0
    time.sleep(2.0)  # let both daemons settle (agent's Docker client, event stream)
    idle = rss_mib(cluster_procs(cluster.address, agent_id))
    t0 = time.perf_counter()
    cluster.stop()
    stop_s = time.perf_counter() - t0
    cleanup.clusters.remove(cluster)
    return StartResult(start_s, stop_s, idle)
