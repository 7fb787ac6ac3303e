"""How long a refused client waits for its ``UnauthorizedError`` (the README: "within
about a second, not a hang"): an embedded cluster with CURVE keys and a token, then
clients with one thing wrong each (no keys, another cluster's keys, an unknown client
key, a wrong token), to the scheduler and to the agent's data plane (over ZeroMQ and
over its local lane), each timed from its request to the error, on a new connection."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from zmq.auth.certs import create_certificates

from aviato import Sandbox, SandboxDefaults, UnauthorizedError
from aviato._auth import client_keys, create_cluster_keys, scheduler_public_key
from aviato._connection import Connection, LaneConnection, close_all, connection
from aviato._local import LocalCluster
from aviato.protocol import ClusterStatus, ClusterStatusReply, Ping

from ._cleanup import Cleanup
from ._common import RUN_ID
from ._stats import Stats

#: "About a second": each case's slowest refusal must come within this.
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


def met(case: Stats) -> bool:
    """The target, for one kind of refused client: its slowest refusal."""
    return bool(case.samples) and max(case.samples) <= TARGET_S


async def _time(
    stats: Stats, result: RefusalResult, attempt: Callable[[], Awaitable[object]]
) -> None:
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT_S):
            await attempt()
    except UnauthorizedError:
        stats.add(time.perf_counter() - t0)
    except TimeoutError:
        # A hang is the claim's failure, not the benchmark's: count it.
        stats.add(SAMPLE_TIMEOUT_S)
        result.hangs += 1
    else:
        raise RuntimeError(f"a client with {stats.name} was served")
    finally:
        close_all()  # each sample a new connection


async def _ping(make: Callable[[], Connection | LaneConnection]) -> None:
    conn = make()
    try:
        await conn.request(Ping(), timeout=SAMPLE_TIMEOUT_S)
    finally:
        conn.close()


def _look_alike(tmp: Path, cluster: Path) -> Path:
    """The cluster's public scheduler key with a client key it does not know."""
    directory = tmp / "unknown"
    (directory / "clients").mkdir(parents=True)
    shutil.copy(cluster / "scheduler.key", directory)
    create_certificates(directory / "clients", "intruder")
    return directory


async def bench_refusals(cleanup: Cleanup, n: int) -> RefusalResult:
    tmp = Path(tempfile.mkdtemp(prefix=f"aviato-bench-{RUN_ID}-keys-"))
    token = secrets.token_hex(16)
    try:
        keys = tmp / "cluster"
        create_cluster_keys(keys)
        create_cluster_keys(tmp / "foreign")  # another `aviato keys` run
        unknown = _look_alike(tmp, keys)
        agent_id = f"bench-{RUN_ID}-keyed"
        cleanup.agent_ids.add(agent_id)
        cluster = LocalCluster(agent_id=agent_id, keys=str(keys))
        cleanup.clusters.append(cluster)
        # The daemons take the token from their environment.
        before = os.environ.get("AVIATO_TOKEN")
        os.environ["AVIATO_TOKEN"] = token
        try:
            address = await asyncio.to_thread(cluster.start, 60.0)
        finally:
            if before is None:
                del os.environ["AVIATO_TOKEN"]
            else:
                os.environ["AVIATO_TOKEN"] = before
        try:
            own = client_keys(str(keys), None, scheduler_public_key(str(keys)))
            probe = Connection(address, token, own)
            try:
                status = (await probe.request(ClusterStatus(), timeout=30)).msg
            finally:
                probe.close()
            assert isinstance(status, ClusterStatusReply) and status.agents, status
            agent = status.agents[0]

            def listing(**options: str) -> Callable[[], Awaitable[object]]:
                defaults = SandboxDefaults(scheduler=address, **options)
                return lambda: Sandbox.list(defaults=defaults)

            def lane() -> LaneConnection:
                conn = connection(agent.address, "wrong-token", None, lane=agent.lane)
                assert isinstance(conn, LaneConnection), "no local lane to the agent"
                return conn

            cases: dict[str, Callable[[], Awaitable[object]]] = {
                "scheduler, no keys": listing(token=token),
                "scheduler, another cluster's keys (a wrong server key)": listing(
                    token=token, keys=str(tmp / "foreign")
                ),
                "scheduler, an unknown client key": listing(token=token, keys=str(unknown)),
                "scheduler, right keys, a wrong token": listing(
                    token="wrong-token", keys=str(keys)
                ),
                "agent over ZeroMQ, no keys": lambda: _ping(
                    lambda: Connection(agent.address, token)
                ),
                "agent over its local lane, a wrong token": lambda: _ping(lane),
            }
            result = RefusalResult()
            for name, attempt in cases.items():
                stats = Stats(name)
                for _ in range(n):
                    await _time(stats, result, attempt)
                result.cases.append(stats)
            return result
        finally:
            await asyncio.to_thread(cluster.stop)
            cleanup.clusters.remove(cluster)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
