#!/usr/bin/env python
"""aviato's exec paths and sandbox runtimes against each other, and against raw Docker.

    python benchmarks/runtimes.py [--quick] [--only exec,create,functions] [--markdown FILE]
    python -m benchmarks.runtimes ...  (the same, from the repo root)

One run, image python:3.11 (never pulled), three clusters of this process's own (each a
``python -m scheduler`` and one ``python -m agent`` on loopback):

- "Docker": the embedded cluster on the Docker runtime (``LocalCluster(runtime="docker")``):
  exec and files go through the in-sandbox supervisor;
- "docker exec": a scheduler and an agent started with ``--no-supervisor`` (the Docker
  runtime's own exec, i.e. ``docker exec`` through the SDK);
- "local": the embedded cluster on the local runtime (``LocalCluster(runtime="local")``:
  sandboxes are bubblewrap process trees on this host, python:3.11 mapped to its Python).

It measures:

a. ``exec(["true"])`` round trip on a warm sandbox (the same sandbox throughout): through
   the supervisor, through ``docker exec`` (the ``--no-supervisor`` agent), the Docker SDK's
   ``container.exec_run(["true"])`` on a plain ``docker run -d python:3.11 sleep infinity``,
   and the local runtime (supervisor); plus a protocol Ping to the Docker agent (the floor).
   Which path each exec takes is checked from inside (the exec'd shell's parent process).
   Methods are interleaved in blocks of 10.
b. create → first exec (``Sandbox.create("sleep", "infinity")`` + ``exec(["true"])``) on the
   local runtime and on the Docker runtime, interleaved; each stop is outside the timing and
   finished (container / process tree gone) before the next sample.
c. remote functions on the local runtime and on the Docker runtime, the same client code:
   no-op throughput (submit 10,000 calls then gather, warm pool, ``max_workers=2``; the
   median of 3 runs, interleaved) and the sequential round trip of one call (p50/p99).

Prints rich tables, then a markdown table with the targets and whether they are met
(``--markdown FILE`` writes it to FILE too; under 100 samples it shows a max, not a p99).
Every container this run makes carries ``aviato-bench.run=<run id>`` or one of its agents'
ids, and is removed at exit (error, Ctrl-C and SIGTERM included); so are the processes it
started and the local runtime's state of its agent under /tmp/aviato-local.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a script: import this checkout (its benchmarks package and the aviato, agent and
    # scheduler packages the subprocesses run) rather than the script's directory.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import psutil
import uvloop

from aviato import Sandbox, SandboxDefaults
from aviato._connection import close_all, connection
from aviato._local import LocalCluster
from aviato.protocol import AgentInfo, ClusterStatus, ClusterStatusReply, Ping
from benchmarks import _plots as plots
from benchmarks._cleanup import Cleanup
from benchmarks._common import (
    IMAGE,
    ROOT,
    RUN_ID,
    add_markdown_option,
    check_exit,
    console,
    rotated,
    spawn_daemon,
    timed,
    write_markdown,
)
from benchmarks._control_plane import start_scheduler
from benchmarks._docker_peers import DockerPeers
from benchmarks._latency import Run, interleave, warm_up
from benchmarks._stats import Stats, latency_table, ms, new_table, ratio

PARTS = ("exec", "create", "functions")
LOCAL_STATE = Path(tempfile.gettempdir()) / "aviato-local"  # the local runtime's state root
TIMEOUT = 600.0  # any one gather or phase: a hang fails the run instead of blocking it


@dataclass(frozen=True)
class Plan:
    exec_n: int  # samples per method, part a
    create_n: int  # samples per runtime, part b
    fn_calls: int  # calls per no-op throughput run, part c
    fn_reps: int  # throughput runs per runtime (the median is reported)
    seq_n: int  # sequential round trips per runtime
    warm_calls: int  # the gathers that warm each 2-worker pool
    max_workers: int = 2
    seq_block: int = 100  # sequential calls per runtime in turn


FULL = Plan(exec_n=300, create_n=20, fn_calls=10_000, fn_reps=3, seq_n=1_000, warm_calls=200)
QUICK = Plan(exec_n=40, create_n=5, fn_calls=2_000, fn_reps=1, seq_n=200, warm_calls=100)


def noop(i: int) -> int:
    return i


# --------------------------------------------------------------------------- clusters


@dataclass
class Cluster:
    name: str
    agent_id: str
    address: str = ""
    start_s: float = 0.0
    runtime: str = ""  # as the agent reports it
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # spawned here
    embedded: LocalCluster | None = None

    def defaults(self) -> SandboxDefaults:
        return SandboxDefaults(container_image=IMAGE, scheduler=self.address)


async def agents_of(address: str) -> tuple[AgentInfo, ...]:
    reply = (await connection(address).request(ClusterStatus(), timeout=5)).msg
    assert isinstance(reply, ClusterStatusReply), reply
    return reply.agents


async def describe(cluster: Cluster) -> None:
    agents = await agents_of(cluster.address)
    cluster.runtime = ", ".join(a.runtime for a in agents if a.agent_id == cluster.agent_id)


async def start_embedded(cleanup: Cleanup, name: str, runtime: str) -> Cluster:
    """``LocalCluster(runtime=runtime)``: a scheduler and one agent, as the embedded cluster."""
    c = Cluster(name, f"bench-{RUN_ID}-{name}")
    cleanup.agent_ids.add(c.agent_id)
    c.embedded = LocalCluster(runtime=runtime, agent_id=c.agent_id)
    cleanup.clusters.append(c.embedded)
    t0 = time.perf_counter()
    c.address = await asyncio.to_thread(c.embedded.start, 60)
    c.start_s = time.perf_counter() - t0
    await describe(c)
    return c


async def start_no_supervisor(cleanup: Cleanup) -> Cluster:
    """A scheduler and an agent on the Docker runtime with ``--no-supervisor`` (flags
    ``LocalCluster`` does not pass), as processes of this run."""
    c = Cluster("docker-exec", f"bench-{RUN_ID}-nosup")
    cleanup.agent_ids.add(c.agent_id)
    t0 = time.perf_counter()
    sched, c.address = await start_scheduler(cleanup, None)
    c.procs.append(sched)
    tmp = Path(tempfile.mkdtemp(prefix="aviato-bench-"))
    cleanup.dirs.append(str(tmp))
    argv = ["-m", "agent", "--scheduler", c.address, "--agent-id", c.agent_id]
    argv += ["--runtime", "docker", "--no-supervisor", "--bind", "tcp://127.0.0.1:*"]
    logfile = tmp / "agent.log"
    agent = spawn_daemon(argv, logfile, ROOT)
    cleanup.procs.insert(0, agent)  # swept before the scheduler: it stops its sandboxes
    c.procs.insert(0, agent)
    deadline = time.monotonic() + 60
    while not any(a.alive for a in await agents_of(c.address)):
        if agent.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the --no-supervisor agent did not come up:\n{tail}")
        await asyncio.sleep(0.05)
    c.start_s = time.perf_counter() - t0
    await describe(c)
    return c


def stop_cluster(cleanup: Cleanup, c: Cluster) -> None:
    """Agent first (it stops its sandboxes), then the scheduler."""
    if c.embedded is not None:
        c.embedded.stop()
        with contextlib.suppress(ValueError):
            cleanup.clusters.remove(c.embedded)
    for proc in c.procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            cleanup.procs.remove(proc)
    c.procs.clear()


def sweep_local_state(agent_ids: set[str]) -> int:
    """Kill any sandbox process tree the local runtime left for these agents and remove
    their state (/tmp/aviato-local/<agent id>); how many trees were still running."""
    killed = 0
    for agent_id in sorted(agent_ids):
        root = LOCAL_STATE / agent_id
        if not root.is_dir():
            continue
        for pidfile in root.glob("*/pid"):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                pid, created = pidfile.read_text().split()
                proc = psutil.Process(int(pid))
                if abs(proc.create_time() - float(created)) >= 0.01:
                    continue  # the pid was reused: not ours
                for p in [*proc.children(recursive=True), proc]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                killed += 1
        shutil.rmtree(root, ignore_errors=True)
    return killed


# --------------------------------------------------------------------------- sandboxes


async def new_sandbox(c: Cluster) -> Sandbox:
    return await timed(
        Sandbox.create("sleep", "infinity", defaults=c.defaults()), 180, "Sandbox.create"
    )


async def stop_sandbox(sb: Sandbox) -> None:
    await timed(sb.stop(), 60, "Sandbox.stop")


async def exec_true(sb: Sandbox, timeout: float = 30) -> None:
    result = await timed(sb.exec(["true"]), timeout, "exec(['true'])")
    check_exit(result.returncode, "exec(['true'])")


async def exec_parent(sb: Sandbox) -> str:
    """The command line of the exec'd shell's parent: the supervisor when exec goes through
    it, nothing with ``docker exec`` (the parent is outside the container's PID namespace)."""
    argv = ["sh", "-c", "cat /proc/$PPID/cmdline 2>/dev/null; true"]
    result = await timed(sb.exec(argv), 30, "exec (parent probe)")
    check_exit(result.returncode, "exec (parent probe)")
    return result.stdout.replace(b"\0", b" ").decode(errors="replace").strip()


async def wait_exec_path(sb: Sandbox, supervised: bool, timeout: float = 30) -> str:
    """Wait until execs in ``sb`` go through its supervisor (``supervised``), or check that
    they do not; what the probe saw."""
    deadline = time.monotonic() + timeout
    while True:
        parent = await exec_parent(sb)
        if ("aviato_supervisor" in parent) == supervised:
            return parent or "(no parent in the sandbox: docker exec)"
        if time.monotonic() > deadline:
            want = "through" if supervised else "not through"
            raise RuntimeError(
                f"exec in {sb.sandbox_id} does not go {want} the supervisor (parent {parent!r})"
            )
        await asyncio.sleep(0.1)


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def gone_check(c: Cluster, peers: DockerPeers) -> Callable[[str], bool]:
    """Whether sandbox ``sid`` of ``c`` has left nothing: its container, or its process
    tree's state directory (removed once the tree is dead)."""
    if c.embedded is not None and c.embedded.runtime == "local":
        return lambda sid: not (LOCAL_STATE / c.agent_id / sid).exists()
    return peers.sandbox_gone


# --------------------------------------------------------------------------- a. exec


@dataclass
class ExecPart:
    supervisor: Stats
    docker_exec: Stats
    sdk: Stats
    local: Stats | None
    ping: Stats
    paths: dict[str, str]


async def bench_exec(
    n: int, docker: Cluster, nosup: Cluster, local: Cluster | None, peers: DockerPeers
) -> ExecPart:
    sup = Stats("aviato, Docker runtime, supervisor")
    dex = Stats("aviato, Docker runtime, docker exec (--no-supervisor)")
    sdk = Stats("Docker SDK exec_run, plain container")
    loc = Stats("aviato, local runtime, supervisor") if local is not None else None
    ping = Stats("aviato Ping → Docker agent (floor)")
    sandboxes: list[Sandbox] = []
    plain: Any = None
    try:
        with console.status("a. exec: sandboxes and a plain container"):
            sup_sb = await new_sandbox(docker)
            sandboxes.append(sup_sb)
            dex_sb = await new_sandbox(nosup)
            sandboxes.append(dex_sb)
            loc_sb = None
            if local is not None:
                loc_sb = await new_sandbox(local)
                sandboxes.append(loc_sb)
            plain = await asyncio.to_thread(
                peers.client.containers.run,
                IMAGE,
                ["sleep", "infinity"],
                detach=True,
                labels=peers.labels,
            )
            paths = {
                sup.name: await wait_exec_path(sup_sb, True),
                dex.name: await wait_exec_path(dex_sb, False),
            }
            if loc_sb is not None and loc is not None:
                paths[loc.name] = await wait_exec_path(loc_sb, True)
            info = sup_sb.info
            assert info is not None and info.agent_address is not None
            agent_conn = connection(info.agent_address)

        def aviato(sb: Sandbox) -> Callable[[], Awaitable[float]]:
            async def run() -> float:
                t0 = time.perf_counter()
                await exec_true(sb)
                return time.perf_counter() - t0

            return run

        async def sdk_exec() -> float:
            return peers.sdk_exec(plain)  # blocking on purpose, as a synchronous caller does

        async def agent_ping() -> float:
            t0 = time.perf_counter()
            await agent_conn.request(Ping(), timeout=10)
            return time.perf_counter() - t0

        runs: list[Run] = [(sup, aviato(sup_sb)), (dex, aviato(dex_sb)), (sdk, sdk_exec)]
        if loc_sb is not None and loc is not None:
            runs.append((loc, aviato(loc_sb)))
        runs.append((ping, agent_ping))
        await warm_up(runs, 10)
        gc.collect()
        await interleave(runs, n, 10, "a. exec round trip")
        # Still on the same paths at the end (a supervisor that died would fall back).
        assert "aviato_supervisor" in await exec_parent(sup_sb), "the supervisor went away"
        return ExecPart(sup, dex, sdk, loc, ping, paths)
    finally:
        for sb in sandboxes:
            with contextlib.suppress(Exception):
                await stop_sandbox(sb)
        if plain is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(plain.remove, force=True)


# --------------------------------------------------------------------------- b. create


@dataclass
class CreatePart:
    rows: list[Stats]  # local, Docker: create → first exec
    steps: list[Stats]  # each one's create and first exec


async def bench_create(n: int, clusters: list[Cluster], peers: DockerPeers) -> CreatePart:
    rows: list[Stats] = []
    steps: list[Stats] = []
    runs: list[Run] = []
    for c in clusters:
        total = Stats(f"{c.name} runtime")
        create, first = Stats(f"{c.name}: Sandbox.create"), Stats(f"{c.name}: first exec")
        gone = gone_check(c, peers)

        async def run(
            c: Cluster = c,
            create: Stats = create,
            first: Stats = first,
            gone: Callable[[str], bool] = gone,
        ) -> float:
            t0 = time.perf_counter()
            sb = await new_sandbox(c)
            try:
                t1 = time.perf_counter()
                await exec_true(sb, 60)
                t2 = time.perf_counter()
            finally:
                await stop_sandbox(sb)
            create.add(t1 - t0)
            first.add(t2 - t1)
            sid = sb.sandbox_id or ""
            # The scheduler answers the stop at once and the agent removes the sandbox after:
            # wait for that too, so no removal overlaps the next sample.
            await wait_for(lambda: gone(sid), 60, f"sandbox {sid} of {c.name} to go")
            return t2 - t0

        rows.append(total)
        steps += [create, first]
        runs.append((total, run))
    await warm_up(runs, 2)
    for s in steps:
        s.samples.clear()
    gc.collect()
    await interleave(runs, n, 1, "b. create → first exec")
    return CreatePart(rows, steps)


# --------------------------------------------------------------------------- c. functions


@dataclass
class FnResult:
    name: str
    first_s: float = 0.0  # the first warming gather (the pool's workers start)
    rates: list[float] = field(default_factory=list)
    workers: int = 0
    seq: Stats = field(default_factory=lambda: Stats("round trip"))

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


async def bench_functions(plan: Plan, clusters: list[Cluster]) -> list[FnResult]:
    results = [FnResult(c.name) for c in clusters]
    async with contextlib.AsyncExitStack() as stack:
        fns = []
        for c in clusters:
            session = await stack.enter_async_context(Sandbox.session(c.defaults()))
            fns.append(session.function(max_workers=plan.max_workers)(noop))

        async def gather(fn: Any, n: int) -> list[Any]:
            return await timed(asyncio.gather(*(fn(i) for i in range(n))), TIMEOUT, "gather")

        for fn, res in zip(fns, results, strict=True):
            with console.status(f"c. functions: warming the {res.name} pool"):
                t0 = time.perf_counter()
                await gather(fn, plan.warm_calls)  # starts both workers
                res.first_s = time.perf_counter() - t0
                await gather(fn, plan.warm_calls)

        pairs = list(zip(fns, results, strict=True))
        with console.status("c. functions: no-op throughput") as status:
            for rep in range(plan.fn_reps):
                for fn, res in rotated(pairs, rep):
                    status.update(f"c. functions: no-op throughput, {res.name}, run {rep + 1}")
                    gc.collect()
                    t0 = time.perf_counter()
                    out = await gather(fn, plan.fn_calls)
                    res.rates.append(plan.fn_calls / (time.perf_counter() - t0))
                    assert out[-1].value == plan.fn_calls - 1
                    res.workers = len({r.sandbox_id for r in out})
                    del out

        gc.collect()
        with console.status("c. functions: sequential round trip") as status:
            for i in range(0, plan.seq_n, plan.seq_block):
                for fn, res in rotated(pairs, i // plan.seq_block):
                    status.update(f"c. functions: round trip, {res.name}: {i}/{plan.seq_n}")
                    for j in range(min(plan.seq_block, plan.seq_n - i)):
                        t0 = time.perf_counter()
                        r = await timed(fn(j), 60, "call")
                        res.seq.add(time.perf_counter() - t0)
                        assert r.value == j
    return results


# --------------------------------------------------------------------------- report


@dataclass
class Results:
    plan: Plan
    clusters: list[Cluster] = field(default_factory=list)
    exec: ExecPart | None = None
    create: CreatePart | None = None
    functions: list[FnResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt_ms(seconds: float) -> str:
    value = seconds * 1000
    if value != value:
        return "-"
    return f"{value:.3f}" if value < 1 else ms(seconds)


def times(a: float, b: float) -> str:
    """a / b as "12.3x" (more digits when small)."""
    if not (a == a and b == b) or b <= 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def verdicts(r: Results) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    if r.exec is not None:
        e = r.exec
        p50 = e.supervisor.p50
        out.append((p50 < 0.003, f"supervisor exec p50 < 3 ms: {fmt_ms(p50)} ms"))
        k = e.docker_exec.p50 / p50
        out.append(
            (
                k > 15,
                f"supervisor exec > 15x faster than docker exec (p50): "
                f"{times(e.docker_exec.p50, p50)}"
                f" ({fmt_ms(e.docker_exec.p50)} / {fmt_ms(p50)} ms); vs Docker SDK exec_run:"
                f" {times(e.sdk.p50, p50)}",
            )
        )
    if r.create is not None:
        loc = next((s for s in r.create.rows if s.name.startswith("local")), None)
        if loc is not None:
            out.append(
                (loc.p50 < 0.030, f"local create → first exec p50 < 30 ms: {fmt_ms(loc.p50)} ms")
            )
    if len(r.functions) == 2:
        a, b = r.functions  # local, Docker
        k = a.rate / b.rate
        out.append(
            (
                abs(k - 1) <= 0.10,
                f"functions no-op throughput, local within 10% of Docker: {a.rate:,.0f} vs "
                f"{b.rate:,.0f} calls/s (local / Docker {k:.2f})",
            )
        )
        k = a.seq.p50 / b.seq.p50
        out.append(
            (
                abs(k - 1) <= 0.10,
                f"functions round trip p50, local within 10% of Docker: {fmt_ms(a.seq.p50)} vs "
                f"{fmt_ms(b.seq.p50)} ms (local / Docker {k:.2f})",
            )
        )
    return out


def print_report(r: Results) -> str:
    """Print the tables; the markdown (printed last) is returned for ``--markdown``."""
    console.rule("[bold]aviato runtimes benchmark")
    load = os.getloadavg()
    console.print(
        f"image {IMAGE}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, run id {RUN_ID},"
        f" load {load[0]:.2f}/{load[1]:.2f} at the end"
    )
    for c in r.clusters:
        console.print(
            f"cluster [bold]{c.name}[/]: agent runtime {c.runtime!r}, started in {ms(c.start_s)} ms"
        )
    if r.exec is not None:
        e = r.exec
        rows = [e.supervisor, e.docker_exec, e.sdk, *([e.local] if e.local else []), e.ping]
        console.print(latency_table("a. exec(['true']) round trip, warm sandbox", rows, rows[0]))
        for name, path in e.paths.items():
            console.print(f"   {name}: exec'd shell's parent: [dim]{path}[/]")
        console.print(
            f"   docker exec / supervisor (p50): [bold]{times(e.docker_exec.p50, e.supervisor.p50)}"
            f"[/], p99: {times(e.docker_exec.p99, e.supervisor.p99)};   Docker SDK exec_run / "
            f"supervisor (p50): [bold]{times(e.sdk.p50, e.supervisor.p50)}[/], p99: "
            f"{times(e.sdk.p99, e.supervisor.p99)}"
        )
    if r.create is not None:
        rows = r.create.rows
        console.print(
            latency_table("b. create → first exec(['true'])", [*rows, *r.create.steps], rows[0])
        )
    if r.functions:
        t = new_table(
            f"c. remote functions, no-op, max_workers={r.plan.max_workers} (same client code)",
            [
                "",
                "first gather s",
                "calls",
                "calls/s (median)",
                "runs (calls/s)",
                "workers",
                "round trips",
                "p50 ms",
                "p99 ms",
                "mean ms",
            ],
            left={""},
        )
        for f in r.functions:
            t.add_row(
                f"{f.name} runtime",
                f"{f.first_s:.2f}",
                f"{r.plan.fn_calls:,}",
                f"{f.rate:,.0f}",
                ", ".join(f"{x:,.0f}" for x in f.rates),
                str(f.workers),
                str(len(f.seq.samples)),
                fmt_ms(f.seq.p50),
                fmt_ms(f.seq.p99),
                fmt_ms(f.seq.mean),
            )
        if len(r.functions) == 2:
            a, b = r.functions
            t.add_row(
                "local / Docker",
                times(a.first_s, b.first_s),
                "",
                times(a.rate, b.rate),
                "",
                "",
                "",
                times(a.seq.p50, b.seq.p50),
                times(a.seq.p99, b.seq.p99),
                times(a.seq.mean, b.seq.mean),
            )
        console.print(t)
    return print_markdown(r)


def print_markdown(r: Results) -> str:
    lines = [
        f"Image `{IMAGE}`, {os.cpu_count()} CPUs, one run of `python benchmarks/runtimes.py"
        f"{' --quick' if r.plan is QUICK else ''}` (the client and daemons on uvloop).",
        "",
        "| Benchmark | aviato | compared with | theirs | ratio | target |",
        "|---|---:|---|---:|---:|---|",
    ]
    if r.exec is not None:
        e = r.exec
        n = len(e.supervisor.samples)
        for p in (50, 99):
            sv, dv, kv = e.supervisor.q(p), e.docker_exec.q(p), e.sdk.q(p)
            label = f"exec(['true']) p{p}, ms (n={n}), supervisor (Docker runtime)"
            target = "< 3 ms, > 15x faster" if p == 50 else ""
            lines.append(
                f"| {label} | {fmt_ms(sv)} | docker exec (`--no-supervisor` agent) | {fmt_ms(dv)}"
                f" | {times(dv, sv)} faster | {target} |"
            )
            lines.append(
                f"| {label} | {fmt_ms(sv)} | Docker SDK `exec_run`, plain container | {fmt_ms(kv)}"
                f" | {times(kv, sv)} faster | |"
            )
        if e.local is not None:
            for p in (50, 99):
                lv, sv = e.local.q(p), e.supervisor.q(p)
                lines.append(
                    f"| exec(['true']) p{p}, ms, local runtime (supervisor) | {fmt_ms(lv)} |"
                    f" supervisor, Docker runtime | {fmt_ms(sv)} | {ratio(lv, sv)} | |"
                )
    if r.create is not None and len(r.create.rows) == 2:
        loc, dck = r.create.rows
        n = len(loc.samples)
        for p in (50, 99):
            # Under 100 samples there is no p99 to speak of: the max instead.
            if p == 99 and n < 100:
                lv, dv = max(loc.samples), max(dck.samples)
                label = f"create → first exec, max of {n}, ms, local runtime"
            else:
                lv, dv = loc.q(p), dck.q(p)
                label = f"create → first exec p{p}, ms (n={n}), local runtime"
            target = "< 30 ms" if p == 50 else ""
            lines.append(
                f"| {label} | {fmt_ms(lv)} | Docker runtime | {fmt_ms(dv)} | {times(dv, lv)}"
                f" faster | {target} |"
            )
    if len(r.functions) == 2:
        a, b = r.functions
        lines.append(
            f"| functions no-op calls/s ({r.plan.fn_calls:,} calls, median of {r.plan.fn_reps}),"
            f" local runtime | {a.rate:,.0f} | Docker runtime | {b.rate:,.0f} |"
            f" {ratio(a.rate, b.rate)} | within 10% |"
        )
        for p in (50, 99):
            av, bv = a.seq.q(p), b.seq.q(p)
            lines.append(
                f"| functions round trip p{p}, ms (n={len(a.seq.samples)}), local runtime |"
                f" {fmt_ms(av)} | Docker runtime | {fmt_ms(bv)} | {ratio(av, bv)} |"
                f" {'within 10%' if p == 50 else ''} |"
            )
    lines.append("")
    for ok, text in verdicts(r):
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")
    for note in r.notes:
        lines.append(f"- {note}")
    console.rule("markdown")
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    return text


# --------------------------------------------------------------------------- main


def pytest_running() -> list[int]:
    """pytest runs on this host (``python -m pytest``, ``pytest``), which skew the numbers;
    not the processes they start (whose paths may mention pytest)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            heads = [os.path.basename(a) for a in cmd[:2]]
            if "pytest" in " ".join(cmd[1:3]).split() or {"pytest", "py.test"} & set(heads):
                found.append(proc.info["pid"])
    return found


async def amain(plan: Plan, cleanup: Cleanup, only: set[str], results: Results) -> None:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    peers = DockerPeers()
    try:
        peers.client.ping()
        try:
            peers.client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            raise SystemExit(
                f"image {IMAGE} is not on this host: build it with scripts/build-image.sh"
            ) from None

        with console.status("starting the Docker and local clusters"):
            docker_c = await start_embedded(cleanup, "Docker", "docker")
            local_c = await start_embedded(cleanup, "local", "local")
        results.clusters += [docker_c, local_c]

        if "exec" in only:
            with console.status("starting the --no-supervisor cluster"):
                nosup = await start_no_supervisor(cleanup)
            results.clusters.append(nosup)
            try:
                results.exec = await bench_exec(plan.exec_n, docker_c, nosup, local_c, peers)
            finally:
                with console.status("stopping the --no-supervisor cluster"):
                    await asyncio.to_thread(stop_cluster, cleanup, nosup)
        if "create" in only:
            results.create = await bench_create(plan.create_n, [local_c, docker_c], peers)
        if "functions" in only:
            results.functions = await bench_functions(plan, [local_c, docker_c])
    finally:
        close_all()
        peers.close()


def write_plots(r: Results, markdown: Path) -> None:
    """The distributions of exec and of create → first exec, from this run's samples."""
    note = f"{os.cpu_count()} cores; samples of one run"
    if r.exec is not None:
        e = r.exec
        paths = [e.supervisor, e.docker_exec, e.sdk, *([e.local] if e.local else [])]
        plots.latency_cdf(
            plots.beside(markdown, "exec"),
            {s.name: s.samples for s in paths},
            'exec(["true"]) round trip on a warm sandbox',
            note,
        )
    if r.create is not None:
        plots.latency_cdf(
            plots.beside(markdown, "create"),
            {s.name: s.samples for s in r.create.rows},
            "create → first exec",
            note,
        )
    if r.functions:
        plots.latency_cdf(
            plots.beside(markdown, "calls"),
            {f.name: f.seq.samples for f in r.functions},
            "one function call's round trip, sequential",
            note,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated subset of: {','.join(PARTS)}",
    )
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        parser.error(f"--only: unknown part(s) {sorted(only - set(PARTS))}")
    for var in ("AVIATO_SCHEDULER", "AVIATO_TOKEN"):
        if os.environ.pop(var, None):
            console.print(f"[yellow]ignoring ${var}: this run measures clusters of its own[/]")
    busy = pytest_running()
    if busy:
        console.print(f"[yellow]pytest is running (pids {busy}): the numbers may be skewed[/]")
    plan = QUICK if args.quick else FULL
    results = Results(plan)
    cleanup = Cleanup()
    t0 = time.perf_counter()
    code = 0
    try:
        uvloop.run(amain(plan, cleanup, only, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted: cleaning up[/]")
        code = 130
    finally:
        with console.status("cleaning up"):
            cleanup.sweep()
            killed = sweep_local_state(cleanup.agent_ids)
        if killed:
            console.print(f"[yellow]cleanup: killed {killed} leftover local sandbox tree(s)[/]")
    if code:
        return code
    text = print_report(results)
    if args.markdown is not None:
        write_markdown(args.markdown, text)
        write_plots(results, args.markdown)
    console.print(f"[dim]total {time.perf_counter() - t0:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
