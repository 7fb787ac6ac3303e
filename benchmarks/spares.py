#!/usr/bin/env python
"""Sandboxes from pre-started spares (``python -m agent --warm IMAGE=N``) against fresh
ones and against the raw Docker SDK, in one run; and the same on the local runtime.

    python benchmarks/spares.py [--quick] [--burst 32] [--local-only]
    python -m benchmarks.spares ...  (the same, from the repo root)

A scheduler and one Docker agent of this run's own (``--warm python:3.11=BURST``, slots
BURST + 8), image python:3.11 (never pulled). It measures:

a. create → first exec, sequentially (``Sandbox.create("sleep", "infinity")`` then
   ``exec(["true"])``): from a spare; fresh (a resource shape no spare has, so the agent
   creates a container); and the raw Docker SDK (``containers.run(..., detach=True)`` then
   ``exec_run(["true"])``). Interleaved; stops and the spares' refill are outside the timing.
b. BURST creates at once with BURST spares warm: the wall time until every sandbox has
   answered its first exec ("ready"), and create throughput (sandboxes/s: BURST / the
   time until every create returned); the raw SDK the same way (BURST threads).
c. What spares cost at idle: memory (the containers' cgroup usage less page cache, as
   ``docker stats`` shows) and CPU (over 10 s) of BURST parked spares, and of the agent.
d. The local runtime (bubblewrap + cgroups), a scheduler and agent of their own
   (``--runtime local --warm python:3.11=4``): create → first exec from a spare and
   fresh (a shape no spare has), interleaved as in a. ``--local-only``: just this.

Prints rich tables, then a markdown table with each target and whether it is met. Every
container it makes carries ``aviato-bench.run=<run id>`` or its agent's id, and is
removed at exit (error, Ctrl-C and SIGTERM included).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import docker
import psutil
import uvloop

from aviato import Sandbox, SandboxDefaults
from aviato._connection import close_all, connection
from aviato.protocol import AgentInfo, ClusterStatus, ClusterStatusReply
from benchmarks._cleanup import Cleanup
from benchmarks._common import (
    IMAGE,
    ROOT,
    RUN_ID,
    add_markdown_option,
    check_exit,
    console,
    spawn_daemon,
    timed,
    write_markdown,
)
from benchmarks._control_plane import start_scheduler
from benchmarks._docker_peers import DockerPeers
from benchmarks._stats import Stats, latency_table, ms, new_table

TIMEOUT = 600.0
TARGET_FIRST_EXEC_MS = 25.0
TARGET_BURST_S = 1.0


@dataclass
class Results:
    burst: int
    create: list[Stats] = field(default_factory=list)
    burst_ready: dict[str, float] = field(default_factory=dict)  # method -> seconds
    burst_created: dict[str, float] = field(default_factory=dict)  # method -> seconds
    from_spares: int = 0  # of the burst's sandboxes (checked on their containers' labels)
    idle: dict[str, float] = field(default_factory=dict)
    local: list[Stats] = field(default_factory=list)  # d. from a spare, fresh
    local_runtime: str = ""
    local_idle: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- the cluster


async def agents_of(address: str) -> tuple[AgentInfo, ...]:
    reply = (await connection(address).request(ClusterStatus(), timeout=5)).msg
    assert isinstance(reply, ClusterStatusReply), reply
    return reply.agents


async def wait_spares(address: str, n: int, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while sum(a.spares for a in await agents_of(address)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def start_cluster(
    cleanup: Cleanup, burst: int, runtime: str = "docker"
) -> tuple[str, str, psutil.Process]:
    agent_id = f"bench-{RUN_ID}-spares-{runtime}"
    cleanup.agent_ids.add(agent_id)
    _sched, address = await start_scheduler(cleanup, None)
    tmp = Path(tempfile.mkdtemp(prefix="aviato-bench-"))
    cleanup.dirs.append(str(tmp))
    argv = ["-m", "agent", "--scheduler", address, "--agent-id", agent_id]
    argv += ["--runtime", runtime, "--bind", "tcp://127.0.0.1:*", "--slots", str(burst + 8)]
    argv += ["--warm", f"{IMAGE}={burst}", "--state-dir", str(tmp / "state")]
    logfile = tmp / "agent.log"
    agent = spawn_daemon(argv, logfile, ROOT)
    cleanup.procs.insert(0, agent)  # swept before the scheduler: it stops its sandboxes
    deadline = time.monotonic() + 60
    while not any(a.alive for a in await agents_of(address)):
        if agent.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the agent did not come up:\n{tail}")
        await asyncio.sleep(0.05)
    return address, agent_id, psutil.Process(agent.pid)


# --------------------------------------------------------------------------- a. sequential


async def aviato_create_exec(d: SandboxDefaults, **shape: Any) -> tuple[float, Sandbox]:
    t0 = time.perf_counter()
    sb = await Sandbox.create("sleep", "infinity", defaults=d, **shape)
    r = await sb.exec(["true"])
    elapsed = time.perf_counter() - t0
    check_exit(r.returncode, "exec(['true'])")
    return elapsed, sb


async def bench_sequential(
    address: str, peers: DockerPeers, burst: int, n: int, results: Results
) -> None:
    d = SandboxDefaults(container_image=IMAGE, scheduler=address)
    spare, fresh, sdk = Stats("aviato, from a spare"), Stats("aviato, fresh"), Stats("Docker SDK")
    for i in range(n + 1):  # the first round warms every path up, and is dropped
        for method in ((0, 1, 2), (1, 2, 0), (2, 0, 1))[i % 3]:
            # Each sample on a quiet host: the last claim's refill done.
            await wait_spares(address, burst, "the spares to be refilled")
            await asyncio.sleep(0.2)
            if method == 0:
                dt, sb = await aviato_create_exec(d)
                await sb.stop()
                stats = spare
            elif method == 1:  # a shape no spare has: made afresh
                dt, sb = await aviato_create_exec(d, memory_bytes=1 << 30)
                await sb.stop()
                stats = fresh
            else:
                dt = await asyncio.to_thread(peers.sdk_create_exec)
                stats = sdk
            if i:
                stats.add(dt)
    results.create = [spare, fresh, sdk]


async def bench_local(address: str, warm: int, n: int, results: Results) -> None:
    d = SandboxDefaults(container_image=IMAGE, scheduler=address)
    spare, fresh = Stats("local, from a spare"), Stats("local, fresh")
    for i in range(n + 1):  # the first round warms every path up, and is dropped
        for from_spare in (True, False) if i % 2 else (False, True):
            await wait_spares(address, warm, "the local spares to be refilled")
            await asyncio.sleep(0.2)
            shape = {} if from_spare else {"memory_bytes": 1 << 30}  # no spare has it
            dt, sb = await aviato_create_exec(d, **shape)
            results.local_runtime = sb.runtime
            await sb.stop()
            if i:
                (spare if from_spare else fresh).add(dt)
    results.local = [spare, fresh]


async def bench_local_idle(
    address: str, agent_id: str, agent: psutil.Process, warm: int, r: Results
) -> None:
    """What the local spares cost at idle: their process trees' RSS summed (shared
    pages counted in each) and CPU over 10 s; the agent's CPU meanwhile."""
    await wait_spares(address, warm, f"{warm} local spares")
    await asyncio.sleep(2)  # settled: no refill under way
    state = Path(tempfile.gettempdir()) / "aviato-local" / agent_id
    trees = []
    for home in state.glob("spare-*"):
        root = psutil.Process(int((home / "pid").read_text().split()[0]))
        trees.append([root, *root.children(recursive=True)])
    if not trees:
        raise RuntimeError("no parked local spare found")
    procs = [p for tree in trees for p in tree]

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    window = 10.0
    spares_cpu0, agent_cpu0, t0 = cpu(), sum(agent.cpu_times()[:2]), time.perf_counter()
    await asyncio.sleep(window)
    elapsed = time.perf_counter() - t0
    r.local_idle = {
        "spares": len(trees),
        "rss_mib_per_spare": sum(p.memory_info().rss for p in procs) / len(trees) / (1 << 20),
        "uss_mib_per_spare": sum(p.memory_full_info().uss for p in procs) / len(trees) / (1 << 20),
        "procs_per_spare": len(procs) / len(trees),
        "cpu_pct_per_spare": 100 * (cpu() - spares_cpu0) / elapsed / len(trees),
        "agent_cpu_pct": 100 * (sum(agent.cpu_times()[:2]) - agent_cpu0) / elapsed,
    }


# --------------------------------------------------------------------------- b. burst


async def bench_burst(address: str, peers: DockerPeers, burst: int, results: Results) -> None:
    d = SandboxDefaults(container_image=IMAGE, scheduler=address)
    await wait_spares(address, burst, f"{burst} spares")
    await asyncio.sleep(3)  # the last ones counted were still starting: now parked
    created: list[float] = []
    t0 = time.perf_counter()

    async def one() -> Sandbox:
        sb = await Sandbox.create("sleep", "infinity", defaults=d)
        created.append(time.perf_counter() - t0)
        check_exit((await sb.exec(["true"])).returncode, "exec(['true'])")
        return sb

    sbs = await timed(asyncio.gather(*(one() for _ in range(burst))), TIMEOUT, "the burst")
    results.burst_ready["aviato, spares warm"] = time.perf_counter() - t0
    results.burst_created["aviato, spares warm"] = max(created)
    results.from_spares = sum(_from_spare(peers.client, sb.sandbox_id or "") for sb in sbs)
    await asyncio.gather(*(sb.stop() for sb in sbs))

    # Its own client: one HTTP connection per thread (the default pool holds 10).
    client = docker.from_env(timeout=120, max_pool_size=burst)
    sdk_created: list[float] = []

    def sdk_one(t0: float) -> Any:
        c = client.containers.run(IMAGE, ["sleep", "infinity"], detach=True, labels=peers.labels)
        sdk_created.append(time.perf_counter() - t0)
        check_exit(c.exec_run(["true"]).exit_code, "exec_run(['true'])")
        return c

    with ThreadPoolExecutor(burst) as pool:
        t1 = time.perf_counter()
        containers = list(pool.map(lambda _: sdk_one(t1), range(burst)))
        results.burst_ready["Docker SDK"] = time.perf_counter() - t1
        results.burst_created["Docker SDK"] = max(sdk_created)
        list(pool.map(lambda c: c.remove(force=True), containers))
    client.close()


def _from_spare(client: Any, sandbox_id: str) -> bool:
    labels = client.api.inspect_container(f"aviato-{sandbox_id}")["Config"]["Labels"]
    return bool(labels.get("aviato.spare") == "1")


# --------------------------------------------------------------------------- c. idle cost


def _spare_containers(client: Any, agent_id: str) -> list[Any]:
    rows = client.api.containers(filters={"label": [f"aviato.agent={agent_id}", "aviato.spare=1"]})
    return [row["Id"] for row in rows if any(n.startswith("/aviato-spare-") for n in row["Names"])]


def _mem_and_cpu(client: Any, cid: str) -> tuple[float, float]:
    """Memory in use less page cache (bytes), and CPU used so far (seconds)."""
    s = client.api.stats(cid, stream=False)
    mem = s["memory_stats"]
    cache = mem.get("stats", {}).get("inactive_file", 0)
    return float(mem.get("usage", 0) - cache), s["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9


async def bench_idle(
    address: str, agent_id: str, agent: psutil.Process, client: Any, burst: int, r: Results
) -> None:
    await wait_spares(address, burst, f"{burst} spares")
    await asyncio.sleep(2)  # settled: no refill under way
    ids = _spare_containers(client, agent_id)
    if not ids:
        raise RuntimeError("no parked spare found")
    window = 10.0
    before = await asyncio.to_thread(lambda: [_mem_and_cpu(client, c) for c in ids])
    agent_cpu0 = sum(agent.cpu_times()[:2])
    t0 = time.perf_counter()
    await asyncio.sleep(window)
    after = await asyncio.to_thread(lambda: [_mem_and_cpu(client, c) for c in ids])
    elapsed = time.perf_counter() - t0
    r.idle["spares"] = len(ids)
    r.idle["mem_mib_per_spare"] = sum(m for m, _ in after) / len(ids) / (1 << 20)
    r.idle["mem_mib_total"] = sum(m for m, _ in after) / (1 << 20)
    cpu = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    r.idle["cpu_pct_total"] = 100 * cpu / elapsed
    r.idle["agent_cpu_pct"] = 100 * (sum(agent.cpu_times()[:2]) - agent_cpu0) / elapsed
    r.idle["agent_rss_mib"] = agent.memory_info().rss / (1 << 20)
    # The same memory as the processes' resident sets (shared pages counted in each).
    pids = [int(p[1]) for c in ids for p in client.api.top(c)["Processes"]]
    rss = sum(psutil.Process(p).memory_info().rss for p in pids if psutil.pid_exists(p))
    r.idle["rss_mib_per_spare"] = rss / len(ids) / (1 << 20)
    r.idle["procs_per_spare"] = len(pids) / len(ids)


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_report(r: Results) -> str:
    """Prints the tables; returns the markdown (for --markdown)."""
    text = ""
    if r.create:
        text += print_docker_report(r)
    if r.local:
        text += ("\n" if text else "") + print_local_report(r)
    return text


def print_local_report(r: Results) -> str:
    spare, fresh = r.local
    title = f"d. local runtime ({r.local_runtime}): create → first exec (sequential)"
    console.print(latency_table(title, r.local, fresh))
    lines = [
        "| local runtime | from spares | fresh | target | verdict |",
        "|---|---:|---:|---|---|",
        f"| create → first exec p50 (ms) | {ms(spare.p50)} | {ms(fresh.p50)}"
        f" | ≤ {TARGET_FIRST_EXEC_MS:g} ms | {verdict(spare.p50 * 1000 <= TARGET_FIRST_EXEC_MS)} |",
        f"| create → first exec p99 (ms) | {ms(spare.p99)} | {ms(fresh.p99)} | | |",
    ]
    i = r.local_idle
    if i:
        lines.append(
            f"| idle cost per spare | {i['uss_mib_per_spare']:.1f} MiB unique"
            f" ({i['rss_mib_per_spare']:.0f} MiB RSS, {i['procs_per_spare']:.0f} processes),"
            f" {i['cpu_pct_per_spare']:.3f}% CPU | | reported | |"
        )
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    return "\n".join(lines) + "\n"


def print_docker_report(r: Results) -> str:
    console.print(latency_table("a. create → first exec (sequential)", r.create, r.create[-1]))
    t = new_table(
        f"b. {r.burst} creates at once",
        ["", "all ready s", "all created s", "creates/s"],
        left={""},
    )
    for name in r.burst_ready:
        created = r.burst_created[name]
        t.add_row(name, f"{r.burst_ready[name]:.2f}", f"{created:.2f}", f"{r.burst / created:.1f}")
    console.print(t)
    console.print(f"[dim]aviato's burst: {r.from_spares} of {r.burst} made from a spare[/]")
    i = r.idle
    t = new_table("c. idle cost of parked spares", ["", "value"], left={""})
    t.add_row("spares parked", f"{i['spares']:.0f}")
    t.add_row("memory per spare, cgroup less page cache (MiB)", f"{i['mem_mib_per_spare']:.1f}")
    t.add_row("RSS per spare, its processes summed (MiB)", f"{i['rss_mib_per_spare']:.1f}")
    t.add_row("processes per spare", f"{i['procs_per_spare']:.0f}")
    t.add_row("memory, all spares (MiB)", f"{i['mem_mib_total']:.0f}")
    t.add_row("CPU, all spares (% of a core)", f"{i['cpu_pct_total']:.2f}")
    t.add_row("agent CPU at idle (% of a core)", f"{i['agent_cpu_pct']:.2f}")
    t.add_row("agent RSS (MiB)", f"{i['agent_rss_mib']:.0f}")
    console.print(t)
    return print_markdown(r)


def print_markdown(r: Results) -> str:
    spare, fresh, sdk = r.create
    ready = r.burst_ready["aviato, spares warm"]
    created = r.burst_created["aviato, spares warm"]
    sdk_ready, sdk_created = r.burst_ready["Docker SDK"], r.burst_created["Docker SDK"]
    i = r.idle
    lines = [
        "| what | aviato, from spares | aviato, fresh | Docker SDK | target | verdict |",
        "|---|---:|---:|---:|---|---|",
        f"| create → first exec p50 (ms) | {ms(spare.p50)} | {ms(fresh.p50)} | {ms(sdk.p50)}"
        f" | ≤ {TARGET_FIRST_EXEC_MS:g} ms | {verdict(spare.p50 * 1000 <= TARGET_FIRST_EXEC_MS)} |",
        f"| create → first exec p99 (ms) | {ms(spare.p99)} | {ms(fresh.p99)} | {ms(sdk.p99)} | | |",
        f"| {r.burst} creates at once, all ready (s; {r.from_spares} from spares) | {ready:.2f}"
        f" | | {sdk_ready:.2f}"
        f" | ≤ {TARGET_BURST_S:g} s with {r.burst} warm | {verdict(ready <= TARGET_BURST_S)} |",
        f"| create throughput, {r.burst} at once (sandboxes/s) | {r.burst / created:.0f} | |"
        f" {r.burst / sdk_created:.1f} | reported | |",
        f"| idle cost per spare | {i['mem_mib_per_spare']:.1f} MiB"
        f" ({i['rss_mib_per_spare']:.0f} MiB RSS),"
        f" {i['cpu_pct_total'] / max(i['spares'], 1):.3f}% CPU | | | reported | |",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


LOCAL_WARM = 4


async def amain(
    burst: int, n: int, cleanup: Cleanup, results: Results, *, local_only: bool = False
) -> None:
    with console.status("d. the local runtime"):
        address, agent_id, agent = await start_cluster(cleanup, LOCAL_WARM, "local")
        await bench_local(address, LOCAL_WARM, n, results)
        await bench_local_idle(address, agent_id, agent, LOCAL_WARM, results)
    if local_only:
        close_all()
        return
    peers = DockerPeers()
    try:
        with console.status(f"starting a cluster with {burst} spares"):
            address, agent_id, agent = await start_cluster(cleanup, burst)
            await wait_spares(address, burst, f"{burst} spares")
        with console.status("a. create → first exec"):
            await bench_sequential(address, peers, burst, n, results)
        with console.status("b. burst"):
            await bench_burst(address, peers, burst, results)
        with console.status("c. idle cost"):
            await bench_idle(address, agent_id, agent, peers.client, burst, results)
    finally:
        peers.close()
        close_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--burst", type=int, default=32, help="spares warm, creates at once")
    parser.add_argument("--local-only", action="store_true", help="only d. (no Docker)")
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    for var in ("AVIATO_SCHEDULER", "AVIATO_TOKEN"):
        os.environ.pop(var, None)
    results = Results(args.burst)
    cleanup = Cleanup()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = 0
    try:
        n = 5 if args.quick else 30
        uvloop.run(amain(args.burst, n, cleanup, results, local_only=args.local_only))
    except KeyboardInterrupt:
        console.print("[red]interrupted: cleaning up[/]")
        code = 130
    finally:
        with console.status("cleaning up"):
            cleanup.sweep()
    if code:
        return code
    markdown = print_report(results)
    if args.markdown:
        write_markdown(args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
