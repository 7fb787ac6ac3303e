"""Benchmarks 1 and 2: create → first exec, and the warm exec round trip, of aviato and
its Docker peers, sampled interleaved so that drift hits every method alike."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aviato import Sandbox, _local
from aviato._connection import connection
from aviato.protocol import Ping

from ._common import IMAGE, check_exit, console, rotated, timed, wait_until
from ._docker_peers import DockerPeers
from ._stats import Stats

Run = tuple[Stats, Callable[[], Awaitable[float]]]


async def new_sandbox() -> Sandbox:
    return await timed(
        Sandbox.create("sleep", "infinity", container_image=IMAGE), 180, "Sandbox.create"
    )


async def stop_sandbox(sb: Sandbox) -> None:
    await timed(sb.stop(), 60, "Sandbox.stop")


async def exec_true(sb: Sandbox, timeout: float, what: str) -> None:
    result = await timed(sb.exec(["true"]), timeout, what)
    check_exit(result.returncode, "exec(['true'])")


async def aviato_create_exec(peers: DockerPeers) -> float:
    t0 = time.perf_counter()
    sb = await new_sandbox()
    try:
        await exec_true(sb, 60, "first exec")
        elapsed = time.perf_counter() - t0
    finally:
        await stop_sandbox(sb)
    sid = sb.sandbox_id or ""
    # The scheduler answers the stop at once and the agent removes the container after:
    # wait for that too, so no removal overlaps the next sample (nor the baselines').
    wait_until(lambda: peers.sandbox_gone(sid), 60, f"sandbox {sid}'s container to go")
    return elapsed


async def warm_up(runs: list[Run], times: int) -> None:
    """Caches, first connections: run every method ``times`` times, not recorded."""
    for _, fn in runs:
        for _ in range(times):
            await fn()


async def interleave(runs: list[Run], n: int, block: int, label: str) -> None:
    """``n`` samples of each method, taken in blocks of ``block`` in rotating order."""
    with console.status(label) as status:
        for i in range(0, n, block):
            for s, fn in rotated(runs, i // block):
                status.update(f"{label}: {i}/{n} ({s.name})")
                for _ in range(min(block, n - i)):
                    s.add(await fn())


# --------------------------------------------------------------------------- 1. create


@dataclass
class CreateResults:
    rows: list[Stats]  # aviato, docker CLI, Docker SDK
    replica: Stats  # the SDK making aviato's Docker calls
    steps: list[Stats]  # the replica's steps


async def bench_create(n: int, peers: DockerPeers) -> CreateResults:
    avi, cli, sdk = Stats("aviato"), Stats("docker CLI"), Stats("Docker SDK")
    rep = Stats("SDK making aviato's Docker calls")
    steps: dict[str, Stats] = {}
    counter = iter(range(1_000_000))

    async def cli_run() -> float:
        return await timed(peers.cli_create_exec(), 240, "docker run + exec + rm")

    async def sdk_run() -> float:
        return peers.sdk_create_exec()

    async def replica_run() -> float:
        return peers.aviato_calls_create_exec(steps, next(counter))

    runs: list[Run] = [
        (avi, lambda: aviato_create_exec(peers)),
        (cli, cli_run),
        (sdk, sdk_run),
        (rep, replica_run),
    ]
    await warm_up(runs, 1)
    steps.clear()
    await interleave(runs, n, 1, "create→first exec")
    return CreateResults([avi, cli, sdk], rep, list(steps.values()))


# --------------------------------------------------------------------------- 2. exec


@dataclass
class ExecResults:
    rows: list[Stats]
    breakdown: list[Stats]
    inspect_retries: list[int]


async def bench_exec(n: int, peers: DockerPeers) -> ExecResults:
    avi, cli, sdk = Stats("aviato"), Stats("docker CLI"), Stats("Docker SDK")
    ping, sched_ping = Stats("aviato Ping → agent"), Stats("aviato Ping → scheduler")
    stream = Stats("SDK stream exec")
    retries: list[int] = []
    sb = await new_sandbox()
    try:
        container = peers.container_of(sb.sandbox_id or "")
        info = sb.info
        assert info is not None and info.agent_address is not None
        agent_conn = connection(info.agent_address)
        sched_conn = connection(await _local.ensure_cluster())

        async def aviato_exec() -> float:
            t0 = time.perf_counter()
            await exec_true(sb, 30, "exec")
            return time.perf_counter() - t0

        async def rtt(conn: Any) -> float:
            t0 = time.perf_counter()
            await conn.request(Ping(), timeout=10)
            return time.perf_counter() - t0

        async def cli_exec() -> float:
            return await timed(peers.cli_exec(container.id), 60, "docker exec")

        async def sdk_exec() -> float:
            return peers.sdk_exec(container)

        async def stream_exec() -> float:
            return peers.sdk_stream_exec(container.id, retries)

        runs: list[Run] = [
            (avi, aviato_exec),
            (cli, cli_exec),
            (sdk, sdk_exec),
            (stream, stream_exec),
            (ping, lambda: rtt(agent_conn)),
            (sched_ping, lambda: rtt(sched_conn)),
        ]
        await warm_up(runs, 5)
        retries.clear()
        # Blocks of 10 per method in turn, so drift hits all of them alike.
        await interleave(runs, n, 10, "exec round trip")
    finally:
        await stop_sandbox(sb)
    return ExecResults([avi, cli, sdk], [avi, stream, sdk, ping, sched_ping], retries)
