#!/usr/bin/env python
"""aviato against raw Docker, and the scheduler's control-plane throughput.

    python benchmarks/cluster.py [--quick]

One run, one image (python:3.11, never pulled), measures:

1. create-to-first-exec latency: ``Sandbox.create("sleep", "infinity")`` + ``exec(["true"])``
   against ``docker run -d`` + ``docker exec`` (CLI) and ``containers.run`` + ``exec_run``
   (Docker SDK), and against the SDK making the same Docker calls aviato's runtime makes
   (to split aviato's time into Docker's and its own). The methods are interleaved; each
   stop/removal is outside the timing and finished before the next sample starts.
2. ``exec(["true"])`` round trip on one warm sandbox (the same container for all), plus
   where aviato's time goes: a protocol Ping to the agent, the SDK calls it makes.
3. scheduler throughput: a real ``python -m scheduler`` and 50 fake agents (DEALER
   sockets in this process speaking aviato.protocol, no containers) serving pipelined
   CreateSandbox / StopSandbox from a few client sockets: all creates then all stops
   (creates/s, stops/s), then create-and-stop-each-at-once (mixed requests/s). The
   scheduler's and the host's CPU use are shown: on a busy host they bound the result.

plus the embedded cluster's start time and idle memory. Prints rich tables, then a
plain markdown table for the README. Every container it creates carries the label
``aviato-bench.run=<run id>`` (aviato's carry the agent ids it started) and is
removed at exit, Ctrl-C and SIGTERM included; so is every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import msgpack
import psutil
import uvloop
import zmq
import zmq.asyncio
from rich.console import Console
from rich.table import Table

from agent.runtime.base import LABEL_AGENT, LABEL_SANDBOX
from aviato import Sandbox, _local
from aviato._connection import close_all, connection
from aviato._local import LocalCluster
from aviato.protocol import (
    PROTOCOL_VERSION,
    ClusterStatus,
    ClusterStatusReply,
    CreateSandbox,
    MsgType,
    Ping,
    PlaceSandbox,
    RegisterAgent,
    RegisterReply,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    decode,
    encode,
    to_wire,
)

IMAGE = "python:3.11"
RUN_ID = uuid.uuid4().hex[:8]
BENCH_LABEL = "aviato-bench.run"
ROOT = Path(__file__).resolve().parent.parent
# What aviato's Docker runtime asks for on create (agent/runtime/docker.py at the time of
# writing), replayed through the SDK to split aviato's create time into Docker's and its own.
AVIATO_CAPS = [
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"
]  # fmt: skip
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T = TypeVar("T")

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Plan:
    create_n: int  # samples per method, benchmark 1
    exec_n: int  # samples per method, benchmark 2
    sched_sandboxes: int  # sandboxes per scheduler phase (each one create + one stop)
    fake_agents: int = 50
    agent_slots: int = 100_000
    clients: int = 4
    window: int = 64  # outstanding requests per client socket
    create_timeout: float = 5.0  # CreateSandbox.timeout_seconds in benchmark 3


FULL = Plan(create_n=20, exec_n=200, sched_sandboxes=2500)
QUICK = Plan(create_n=5, exec_n=40, sched_sandboxes=500)


# --------------------------------------------------------------------------- stats


@dataclass
class Stats:
    name: str
    samples: list[float] = field(default_factory=list)  # seconds

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def q(self, p: int) -> float:
        """The p-th percentile (linear interpolation between closest ranks)."""
        xs = self.samples
        if not xs:
            return float("nan")
        if len(xs) == 1:
            return xs[0]
        return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]

    @property
    def p50(self) -> float:
        return self.q(50)

    @property
    def p99(self) -> float:
        return self.q(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value != value:  # NaN
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b <= 0:  # NaN or zero
        return "-"
    return f"{a / b:.2f}x"


def latency_table(title: str, rows: list[Stats], baseline: Stats | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms"):
        table.add_column(col, justify="left" if not col else "right")
    if baseline is not None:
        table.add_column(f"p50 vs {baseline.name}", justify="right")
    for s in rows:
        cells = [
            s.name,
            str(len(s.samples)),
            ms(s.p50),
            ms(s.p99),
            ms(s.mean),
            ms(min(s.samples, default=float("nan"))),
            ms(max(s.samples, default=float("nan"))),
        ]
        if baseline is not None:
            cells.append(ratio(s.p50, baseline.p50))
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- cleanup


class Cleanup:
    """Everything this run created, removed once (at the end, on error or on a signal)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clusters: list[LocalCluster] = []
        self.agent_ids: set[str] = {f"embedded-{os.getpid()}"}  # LocalCluster's default id
        self.dirs: list[str] = []
        self.done = False

    def sweep(self) -> None:
        if self.done:
            return
        self.done = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for cluster in self.clusters:
            with contextlib.suppress(Exception):
                cluster.stop()  # the agent removes its sandboxes as it exits
        with contextlib.suppress(Exception):
            _local.shutdown()
        removed = self._remove_containers()
        if removed:
            console.print(f"[yellow]cleanup: removed {removed} leftover container(s)[/]")
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _remove_containers(self) -> int:
        filters = [f"label={BENCH_LABEL}={RUN_ID}"]
        filters += [f"label={LABEL_AGENT}={a}" for a in sorted(self.agent_ids)]
        ids: set[str] = set()
        for flt in filters:
            try:
                out = subprocess.run(
                    ["docker", "ps", "-aq", "--no-trunc", "--filter", flt],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout
            except (subprocess.SubprocessError, OSError) as exc:
                console.print(f"[red]cleanup: cannot list containers ({flt}): {exc}[/]")
                continue
            ids.update(out.split())
        if ids:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["docker", "rm", "-f", *sorted(ids)],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
        return len(ids)


# --------------------------------------------------------------------------- helpers


async def sh(*argv: str, timeout: float = 60.0) -> str:
    """Run a command; its stdout, stripped. Killed (and raised) after ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode().strip()}")
    return out.decode().strip()


async def timed(coro: Awaitable[T], timeout: float, what: str) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        raise TimeoutError(f"{what} took more than {timeout:g}s") from None


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def rotated(items: list[T], k: int) -> list[T]:
    k %= len(items)
    return items[k:] + items[:k]


def cluster_procs(address: str, agent_id: str) -> dict[str, psutil.Process]:
    """The scheduler (listening on ``address``'s port) and the agent (``agent_id``) of an
    embedded cluster this process started."""
    port = int(address.rsplit(":", 1)[1])
    found: dict[str, psutil.Process] = {}
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if cmd[1:3] == ["-m", "agent"] and agent_id in cmd:
                found["agent"] = child
            elif cmd[1:3] == ["-m", "scheduler"] and any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                for c in child.net_connections("tcp")
            ):
                found["scheduler"] = child
    if set(found) != {"scheduler", "agent"}:
        raise RuntimeError(f"cannot find the embedded cluster's processes (found {list(found)})")
    return found


def rss_mib(procs: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: p.memory_info().rss / 2**20 for name, p in procs.items()}


# --------------------------------------------------------------------------- docker baselines


class DockerBaselines:
    """Plain Docker, through the CLI and through the Docker SDK."""

    def __init__(self) -> None:
        self.client = docker.from_env(timeout=120)
        self.labels = {BENCH_LABEL: RUN_ID}

    def close(self) -> None:
        self.client.close()

    async def cli_create_exec(self) -> float:
        t0 = time.perf_counter()
        cid = await sh(
            "docker", "run", "-d", "--label", f"{BENCH_LABEL}={RUN_ID}", IMAGE, "sleep", "infinity"
        )
        await sh("docker", "exec", cid, "true")
        elapsed = time.perf_counter() - t0
        await sh("docker", "rm", "-f", cid, timeout=120)
        return elapsed

    def sdk_create_exec(self) -> float:
        # Blocking on purpose: the SDK as a plain synchronous caller uses it.
        t0 = time.perf_counter()
        c = self.client.containers.run(
            IMAGE, ["sleep", "infinity"], detach=True, labels=self.labels
        )
        try:
            result = c.exec_run(["true"])
            elapsed = time.perf_counter() - t0
            if result.exit_code != 0:
                raise RuntimeError(f"exec_run(['true']) exited {result.exit_code}")
        finally:
            c.remove(force=True)
        return elapsed

    def aviato_calls_create_exec(self, steps: dict[str, Stats], n: int) -> float:
        """The Docker API calls aviato's runtime makes to create a sandbox and run its first
        exec, made directly: create_container (init, dropped caps, no-new-privileges, pids
        limit), inspect + HEAD /archive per $PATH entry (the "command exists?" probe),
        start, then a streamed exec + exec_inspect. ``steps`` gets each step's time."""
        api = self.client.api
        t0 = time.perf_counter()
        host_config = api.create_host_config(
            init=True,
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            cap_add=AVIATO_CAPS,
            pids_limit=1024,
        )
        cid = api.create_container(
            IMAGE,
            name=f"aviato-bench-{RUN_ID}-{n}",
            entrypoint=["sleep"],
            command=["infinity"],
            labels=self.labels,
            host_config=host_config,
            detach=True,
        )["Id"]
        try:
            t1 = time.perf_counter()
            env = api.inspect_container(cid)["Config"]["Env"] or []
            path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
            url = api._url("/containers/{0}/archive", cid)
            probes = 0
            for d in path.split(":"):
                probes += 1
                if api.head(url, params={"path": f"{d}/sleep"}, timeout=30).status_code != 404:
                    break
            t2 = time.perf_counter()
            api.start(cid)
            t3 = time.perf_counter()
            retries: list[int] = []
            self.sdk_stream_exec(cid, retries)
            t4 = time.perf_counter()
        finally:
            api.remove_container(cid, force=True)
        for name, dt in (
            ("create_container", t1 - t0),
            (f"inspect + {probes} HEAD /archive probes", t2 - t1),
            ("start", t3 - t2),
            ("first exec (create/start/inspect)", t4 - t3),
        ):
            steps.setdefault(name, Stats(name)).add(dt)
        return t4 - t0

    async def cli_exec(self, cid: str) -> float:
        t0 = time.perf_counter()
        await sh("docker", "exec", cid, "true")
        return time.perf_counter() - t0

    def sdk_exec(self, container: Any) -> float:
        t0 = time.perf_counter()
        result = container.exec_run(["true"])
        elapsed = time.perf_counter() - t0
        if result.exit_code != 0:
            raise RuntimeError(f"exec_run(['true']) exited {result.exit_code}")
        return elapsed

    def sdk_stream_exec(self, cid: str, retries: list[int]) -> float:
        """The SDK calls aviato's Docker runtime makes for one exec: exec_create,
        exec_start(stream=True, demux=True) read to the end, then exec_inspect until an
        exit code shows up (``retries`` gets how many extra inspects that took)."""
        api = self.client.api
        t0 = time.perf_counter()
        exec_id = api.exec_create(cid, ["true"])["Id"]
        stream = api.exec_start(exec_id, stream=True, demux=True)
        for _ in stream:
            pass
        stream.close()
        extra = 0
        while api.exec_inspect(exec_id)["ExitCode"] is None:
            extra += 1
            if extra > 200:
                raise RuntimeError("exec_inspect never reported an exit code")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        retries.append(extra)
        return elapsed

    def _ids_of(self, sandbox_id: str, *, all: bool) -> list[str]:
        # The low-level call: containers.list() inspects each row and races removals.
        rows = self.client.api.containers(
            all=all, filters={"label": f"{LABEL_SANDBOX}={sandbox_id}"}
        )
        return [row["Id"] for row in rows]

    def container_of(self, sandbox_id: str) -> Any:
        found = self._ids_of(sandbox_id, all=False)
        if len(found) != 1:
            raise RuntimeError(f"expected one container for sandbox {sandbox_id}, got {found}")
        return self.client.containers.get(found[0])

    def sandbox_gone(self, sandbox_id: str) -> bool:
        return not self._ids_of(sandbox_id, all=True)


# --------------------------------------------------------------------------- 0. cluster start


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
    procs = cluster_procs(cluster.address, agent_id)
    idle = rss_mib(procs)
    t0 = time.perf_counter()
    cluster.stop()
    stop_s = time.perf_counter() - t0
    cleanup.clusters.remove(cluster)
    return StartResult(start_s, stop_s, idle)


# --------------------------------------------------------------------------- 1. create


async def aviato_create_exec(docker_b: DockerBaselines) -> tuple[float, str]:
    t0 = time.perf_counter()
    sb = await timed(
        Sandbox.create("sleep", "infinity", container_image=IMAGE), 180, "Sandbox.create"
    )
    try:
        result = await timed(sb.exec(["true"]), 60, "first exec")
        elapsed = time.perf_counter() - t0
        if result.returncode != 0:
            raise RuntimeError(f"exec(['true']) exited {result.returncode}")
    finally:
        await timed(sb.stop(), 60, "Sandbox.stop")
    sid = sb.sandbox_id or ""
    # The scheduler answers the stop at once and the agent removes the container after:
    # wait for that too, so no removal overlaps the next sample (nor the baselines').
    wait_until(lambda: docker_b.sandbox_gone(sid), 60, f"sandbox {sid}'s container to go")
    return elapsed, sid


@dataclass
class CreateResults:
    rows: list[Stats]  # aviato, docker CLI, Docker SDK
    replica: Stats  # the SDK making aviato's Docker calls
    steps: list[Stats]  # the replica's steps


async def bench_create(plan: Plan, docker_b: DockerBaselines) -> CreateResults:
    avi, cli, sdk = Stats("aviato"), Stats("docker CLI"), Stats("Docker SDK")
    rep = Stats("SDK making aviato's Docker calls")
    steps: dict[str, Stats] = {}
    counter = iter(range(1_000_000))

    async def one(s: Stats, record: bool) -> None:
        if s is avi:
            elapsed, _ = await aviato_create_exec(docker_b)
        elif s is cli:
            elapsed = await cli_create_exec_t(docker_b)
        elif s is sdk:
            elapsed = docker_b.sdk_create_exec()
        else:
            elapsed = docker_b.aviato_calls_create_exec(steps, next(counter))
        if record:
            s.add(elapsed)

    methods = [avi, cli, sdk, rep]
    for s in methods:  # warm-up: caches, first connections; not recorded
        await one(s, record=False)
    steps.clear()
    with console.status("create→first exec") as status:
        for i in range(plan.create_n):
            for s in rotated(methods, i):
                status.update(f"create→first exec: sample {i + 1}/{plan.create_n} ({s.name})")
                await one(s, record=True)
    return CreateResults([avi, cli, sdk], rep, list(steps.values()))


async def cli_create_exec_t(docker_b: DockerBaselines) -> float:
    return await timed(docker_b.cli_create_exec(), 240, "docker run + exec + rm")


# --------------------------------------------------------------------------- 2. exec


@dataclass
class ExecResults:
    rows: list[Stats]
    breakdown: list[Stats]
    inspect_retries: list[int]


async def bench_exec(plan: Plan, docker_b: DockerBaselines) -> ExecResults:
    avi, cli, sdk = Stats("aviato"), Stats("docker CLI"), Stats("Docker SDK")
    ping, sched_ping, stream = (
        Stats("aviato Ping → agent"),
        Stats("aviato Ping → scheduler"),
        Stats("SDK stream exec"),
    )
    retries: list[int] = []
    sb = await timed(
        Sandbox.create("sleep", "infinity", container_image=IMAGE), 180, "Sandbox.create"
    )
    try:
        sid = sb.sandbox_id or ""
        container = docker_b.container_of(sid)
        info = sb.info
        assert info is not None and info.agent_address is not None
        agent_conn = connection(info.agent_address)
        sched_conn = connection(await _local.ensure_cluster())

        async def aviato_exec() -> float:
            t0 = time.perf_counter()
            result = await timed(sb.exec(["true"]), 30, "exec")
            elapsed = time.perf_counter() - t0
            if result.returncode != 0:
                raise RuntimeError(f"exec(['true']) exited {result.returncode}")
            return elapsed

        async def rtt(conn: Any) -> float:
            t0 = time.perf_counter()
            await conn.request(Ping(), timeout=10)
            return time.perf_counter() - t0

        async def cli_exec() -> float:
            return await timed(docker_b.cli_exec(container.id), 60, "docker exec")

        async def sdk_exec() -> float:
            return docker_b.sdk_exec(container)

        async def stream_exec() -> float:
            return docker_b.sdk_stream_exec(container.id, retries)

        runs: list[tuple[Stats, Callable[[], Awaitable[float]]]] = [
            (avi, aviato_exec),
            (cli, cli_exec),
            (sdk, sdk_exec),
            (stream, stream_exec),
            (ping, lambda: rtt(agent_conn)),
            (sched_ping, lambda: rtt(sched_conn)),
        ]
        for _, fn in runs:  # warm-up
            for _ in range(5):
                await fn()
        retries.clear()
        block = 10  # interleave methods in blocks, so drift hits all of them alike
        with console.status("exec round trip") as status:
            for i in range(0, plan.exec_n, block):
                for s, fn in rotated(runs, i // block):
                    status.update(f"exec round trip: {i}/{plan.exec_n} ({s.name})")
                    for _ in range(min(block, plan.exec_n - i)):
                        s.add(await fn())
    finally:
        await timed(sb.stop(), 60, "Sandbox.stop")
    return ExecResults([avi, cli, sdk], [avi, stream, sdk, ping, sched_ping], retries)


# --------------------------------------------------------------------------- 3. scheduler


def _frame(t: MsgType, request_id: int, body: dict[str, Any]) -> bytes:
    """One envelope, exactly as ``aviato.protocol.encode`` lays it out (no token)."""
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": int(t), "id": request_id, "b": body}, use_bin_type=True
    )


def _unpack(frame: bytes) -> dict[str, Any]:
    env: dict[str, Any] = msgpack.unpackb(frame, raw=False)
    return env


class FakeAgent:
    """An agent with a fake runtime: every placement starts, every stop succeeds, at once.

    Messages are read and written with msgpack directly (the envelope of
    aviato.protocol), so that this process's decoding stays cheaper than the
    scheduler's; the first placement is cross-checked with the full codec."""

    checked = False

    def __init__(self, ctx: zmq.asyncio.Context, address: str, agent_id: str, slots: int) -> None:
        self.agent_id = agent_id
        self.slots = slots
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(address)
        self.running: set[str] = set()
        self.placed = 0
        self.stopped = 0
        self.errors = 0
        self.unregistered = 0
        self.heartbeats = 0
        self.max_heartbeat_gap = 0.0
        self._next_id = 0
        self.interval = 0.5

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def register(self) -> None:
        msg = RegisterAgent(self.agent_id, "tcp://127.0.0.1:9", self.slots, "fake", fresh=True)
        await self.sock.send_multipart(encode(msg, self._id()))
        if not await self.sock.poll(10_000):
            raise TimeoutError(f"{self.agent_id}: no RegisterReply within 10 s")
        reply = decode(await self.sock.recv_multipart()).msg
        if not isinstance(reply, RegisterReply):
            raise RuntimeError(f"{self.agent_id}: registration refused: {reply}")
        self.interval = reply.heartbeat_interval

    async def serve(self) -> None:
        sock = self.sock
        while True:
            frames = await sock.recv_multipart()
            env = _unpack(frames[0])
            t, rid, body = env["t"], env["id"], env["b"]
            if t == MsgType.PLACE_SANDBOX:
                info = body["sandbox"]
                self.running.add(info["sandbox_id"])
                reply = _frame(
                    MsgType.SANDBOX_REPLY,
                    rid,
                    {"sandbox": {**info, "status": SandboxStatus.RUNNING.value}},
                )
                if not FakeAgent.checked:
                    self._check(frames, reply)
                self.placed += 1
                await sock.send(reply)
            elif t == MsgType.STOP_SANDBOX:
                self.running.discard(body["sandbox_id"])
                self.stopped += 1
                await sock.send(_frame(MsgType.OK, rid, {}))
            elif t == MsgType.HEARTBEAT_REPLY:
                if not body["registered"]:
                    self.unregistered += 1
            elif t == MsgType.ERROR:
                self.errors += 1

    @staticmethod
    def _check(frames: list[bytes], reply: bytes) -> None:
        place = decode(frames).msg
        assert isinstance(place, PlaceSandbox), place
        ours = decode([reply]).msg
        assert isinstance(ours, SandboxReply) and ours.sandbox.status is SandboxStatus.RUNNING
        assert dataclasses.replace(ours.sandbox, status=place.sandbox.status) == place.sandbox
        FakeAgent.checked = True

    async def heartbeat(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.max_heartbeat_gap = max(self.max_heartbeat_gap, now - last)
            last = now
            body = {"agent_id": self.agent_id, "running": list(self.running)}
            await self.sock.send(_frame(MsgType.AGENT_HEARTBEAT, self._id(), body))
            self.heartbeats += 1


@dataclass
class Phase:
    name: str
    wall: float = 0.0
    creates: Stats = field(default_factory=lambda: Stats("create"))
    stops: Stats = field(default_factory=lambda: Stats("stop"))
    errors: dict[str, int] = field(default_factory=dict)
    sched_cpu: float = 0.0  # scheduler CPU seconds during the phase
    self_cpu: float = 0.0  # this process's CPU seconds during the phase
    host_busy: float = 0.0  # the whole machine's busy CPU seconds (all cores) during it

    @property
    def ops(self) -> int:
        return len(self.creates.samples) + len(self.stops.samples)


class Client:
    """One DEALER socket keeping up to ``window`` requests in flight."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, window: int, create: dict[str, Any]
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(address)
        self.window = window
        self._create_body = create
        self._next_id = 0

    async def run(
        self,
        phase: Phase,
        creates: int,
        stops: list[str],
        stop_after_create: bool,
        created: list[str],
        recv_timeout: float = 30.0,
    ) -> None:
        """Send ``creates`` CreateSandbox and a StopSandbox for each id in ``stops`` (and,
        with ``stop_after_create``, for each sandbox as soon as its create is answered)."""
        todo_stops: deque[str] = deque(stops)
        pending: dict[int, tuple[bool, float]] = {}  # id -> (is_create, sent at)
        left = creates
        sock = self.sock
        while left or todo_stops or pending:
            while len(pending) < self.window and (todo_stops or left):
                self._next_id += 1
                rid = self._next_id
                if todo_stops:
                    sid = todo_stops.popleft()
                    frame = _frame(MsgType.STOP_SANDBOX, rid, {"sandbox_id": sid, "reason": "x"})
                    pending[rid] = (False, time.perf_counter())
                else:
                    left -= 1
                    frame = _frame(MsgType.CREATE_SANDBOX, rid, self._create_body)
                    pending[rid] = (True, time.perf_counter())
                await sock.send(frame)
            if not await sock.poll(int(recv_timeout * 1000)):
                raise TimeoutError(f"{len(pending)} request(s) unanswered for {recv_timeout:g}s")
            while True:  # drain what has arrived
                try:
                    frame = await sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.perf_counter()
                env = _unpack(frame)
                is_create, sent = pending.pop(env["id"])
                if env["t"] == MsgType.ERROR:
                    key = f"{'create' if is_create else 'stop'}: {env['b'].get('code')}"
                    phase.errors[key] = phase.errors.get(key, 0) + 1
                    continue
                if is_create:
                    phase.creates.add(now - sent)
                    sid = env["b"]["sandbox"]["sandbox_id"]
                    if stop_after_create:
                        todo_stops.append(sid)
                    else:
                        created.append(sid)
                else:
                    phase.stops.add(now - sent)


def create_body(spec: SandboxSpec, timeout: float) -> dict[str, Any]:
    """CreateSandbox's wire body, checked once against the real codec."""
    body: dict[str, Any] = to_wire(CreateSandbox(spec, timeout))
    decoded = decode([_frame(MsgType.CREATE_SANDBOX, 7, body)])
    assert decoded.request_id == 7 and decoded.msg == CreateSandbox(spec, timeout)
    return body


@dataclass
class SchedResult:
    phases: list[Phase]
    agents: int
    alive_at_end: int
    placed: int
    stopped_on_agents: int
    unregistered: int
    max_heartbeat_gap: float
    idle_rss: float
    end_rss: float


async def bench_scheduler(plan: Plan, cleanup: Cleanup, profile: str | None = None) -> SchedResult:
    tmp = tempfile.mkdtemp(prefix="aviato-bench-")
    cleanup.dirs.append(tmp)
    ready = Path(tmp) / "scheduler.addr"
    env = {k: v for k, v in os.environ.items() if k != "AVIATO_TOKEN"}
    env["AVIATO_PARENT_PID"] = str(os.getpid())  # it exits by itself if we die
    with open(Path(tmp) / "scheduler.log", "wb") as log:
        prof = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen(
            [
                sys.executable,
                *prof,
                "-m",
                "scheduler",
                "--bind",
                "tcp://127.0.0.1:*",  # a free loopback port, picked by the kernel
                "--ready-file",
                str(ready),
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    cleanup.procs.append(proc)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (Path(tmp) / "scheduler.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"benchmark scheduler did not come up:\n{tail}")
        await asyncio.sleep(0.02)
    address = ready.read_text().strip()
    sched = psutil.Process(proc.pid)
    me = psutil.Process()

    ctx = zmq.asyncio.Context()
    agents = [
        FakeAgent(ctx, address, f"fake-{RUN_ID}-{i:02d}", plan.agent_slots)
        for i in range(plan.fake_agents)
    ]
    tasks: list[asyncio.Task[None]] = []
    clients: list[Client] = []
    try:
        await timed(asyncio.gather(*(a.register() for a in agents)), 30, "fake agent registration")
        for a in agents:
            tasks.append(asyncio.create_task(a.serve()))
            tasks.append(asyncio.create_task(a.heartbeat()))
        await asyncio.sleep(1.0)  # a couple of heartbeats
        idle_rss = sched.memory_info().rss / 2**20

        spec = SandboxSpec(image=IMAGE, command="sleep", args=("infinity",))
        body = create_body(spec, plan.create_timeout)
        clients = [Client(ctx, address, plan.window, body) for _ in range(plan.clients)]
        per_client = _split(plan.sched_sandboxes, plan.clients)

        async def run_phase(phase: Phase, work: Callable[[int, Client], Awaitable[None]]) -> Phase:
            c0, s0, h0 = sched.cpu_times(), me.cpu_times(), psutil.cpu_times()
            t0 = time.perf_counter()
            try:
                await timed(
                    asyncio.gather(*(work(i, c) for i, c in enumerate(clients))), 300, phase.name
                )
            except Exception:
                # A fake agent that died makes clients time out: show why it died instead.
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        raise RuntimeError("a fake agent failed") from task.exception()
                if proc.poll() is not None:
                    raise RuntimeError(f"the scheduler exited ({proc.returncode})") from None
                raise
            phase.wall = time.perf_counter() - t0
            c1, s1, h1 = sched.cpu_times(), me.cpu_times(), psutil.cpu_times()
            phase.sched_cpu = (c1.user + c1.system) - (c0.user + c0.system)
            phase.self_cpu = (s1.user + s1.system) - (s0.user + s0.system)
            phase.host_busy = min(_busy(h1) - _busy(h0), phase.wall * (os.cpu_count() or 1))
            return phase

        # Warm-up: a few round trips through every socket, not recorded.
        warm = Phase("warm-up")
        await run_phase(warm, lambda i, c: c.run(warm, 16, [], True, []))

        created: list[list[str]] = [[] for _ in clients]
        burst_c, burst_s, mixed = Phase("creates"), Phase("stops"), Phase("create→stop")
        await run_phase(burst_c, lambda i, c: c.run(burst_c, per_client[i], [], False, created[i]))
        await run_phase(burst_s, lambda i, c: c.run(burst_s, 0, created[i], False, []))
        await run_phase(mixed, lambda i, c: c.run(mixed, per_client[i], [], True, []))
        expected_stops = len(burst_s.stops.samples) + len(mixed.stops.samples)
        expected_stops += len(warm.stops.samples)
        # Stops reach the agents after the scheduler answered the client: let them land.
        deadline = time.monotonic() + 10
        while sum(a.stopped for a in agents) < expected_stops and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        status_sock = ctx.socket(zmq.DEALER)
        status_sock.setsockopt(zmq.LINGER, 0)
        status_sock.connect(address)
        try:
            await status_sock.send_multipart(encode(ClusterStatus(), 1))
            if not await status_sock.poll(10_000):
                raise TimeoutError("no ClusterStatusReply within 10 s")
            status = decode(await status_sock.recv_multipart()).msg
            assert isinstance(status, ClusterStatusReply)
        finally:
            status_sock.close()
        return SchedResult(
            phases=[burst_c, burst_s, mixed],
            agents=len(agents),
            alive_at_end=sum(1 for a in status.agents if a.alive),
            placed=sum(a.placed for a in agents),
            stopped_on_agents=sum(a.stopped for a in agents),
            unregistered=sum(a.unregistered for a in agents),
            max_heartbeat_gap=max(a.max_heartbeat_gap for a in agents),
            idle_rss=idle_rss,
            end_rss=sched.memory_info().rss / 2**20,
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents:
            a.sock.close()
        for c in clients:
            c.sock.close()
        ctx.term()
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


def _busy(t: Any) -> float:
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# --------------------------------------------------------------------------- report


@dataclass
class Results:
    plan: Plan
    start: StartResult | None = None
    first_create: float | None = None
    create: CreateResults | None = None
    exec: ExecResults | None = None
    loaded_rss: dict[str, float] = field(default_factory=dict)
    sched: SchedResult | None = None


def print_report(r: Results) -> None:
    console.rule("[bold]aviato cluster benchmark")
    console.print(
        f"image {IMAGE}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, run id {RUN_ID}"
    )
    if r.start is not None:
        s = r.start
        console.print(
            f"embedded cluster start (LocalCluster().start()): [bold]{ms(s.start_s)} ms[/]"
            f"   (stop: {ms(s.stop_s)} ms)"
        )
        console.print(
            f"embedded cluster idle RSS: [bold]{sum(s.idle_rss.values()):.1f} MiB[/]  ("
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(s.idle_rss.items()))
            + ")"
        )
    if r.first_create is not None:
        console.print(
            f"first Sandbox.create + exec, including the embedded cluster's auto-start: "
            f"{ms(r.first_create)} ms"
        )
    if r.loaded_rss:
        console.print(
            f"embedded cluster RSS after benchmarks 1-2: {sum(r.loaded_rss.values()):.1f} MiB  ("
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r.loaded_rss.items()))
            + ")"
        )
    if r.create is not None:
        rows = r.create.rows
        console.print(latency_table("1. create → first exec(['true'])", rows, baseline=rows[2]))
        console.print(
            latency_table(
                "   where aviato's create time goes",
                [rows[0], r.create.replica, *r.create.steps],
                baseline=rows[0],
            )
        )
    if r.exec is not None:
        console.print(
            latency_table("2. exec(['true']) round trip, warm sandbox", r.exec.rows, r.exec.rows[2])
        )
        console.print(latency_table("   where aviato's exec time goes", r.exec.breakdown))
        retries = r.exec.inspect_retries
        if retries:
            late = sum(1 for x in retries if x)
            console.print(
                f"   SDK stream exec: exec_inspect had no exit code yet in {late}/{len(retries)}"
                f" execs (max {max(retries)} extra inspect(s), 5 ms sleep each)"
            )
    if r.sched is not None:
        sr = r.sched
        table = Table(
            title=f"3. scheduler control plane ({sr.agents} fake agents, "
            f"{r.plan.clients} clients x window {r.plan.window})",
            title_justify="left",
        )
        for col in (
            "phase",
            "requests",
            "wall s",
            "ops/s",
            "create p50/p99 ms",
            "stop p50/p99 ms",
            "sched CPU",
            "bench CPU",
            "host CPU",
            "sched CPU/req",
            "errors",
        ):
            table.add_column(col, justify="left" if col in ("phase", "errors") else "right")
        for p in sr.phases:
            table.add_row(
                p.name,
                str(p.ops),
                f"{p.wall:.2f}",
                f"{p.ops / p.wall:,.0f}" if p.wall else "-",
                f"{ms(p.creates.p50)}/{ms(p.creates.p99)}" if p.creates.samples else "-",
                f"{ms(p.stops.p50)}/{ms(p.stops.p99)}" if p.stops.samples else "-",
                f"{100 * p.sched_cpu / p.wall:.0f}%" if p.wall else "-",
                f"{100 * p.self_cpu / p.wall:.0f}%" if p.wall else "-",
                f"{100 * p.host_busy / p.wall:.0f}%/{100 * (os.cpu_count() or 1)}%"
                if p.wall
                else "-",
                f"{1e6 * p.sched_cpu / p.ops:.0f} µs" if p.ops else "-",
                ", ".join(f"{k} x{v}" for k, v in p.errors.items()) or "0",
            )
        console.print(table)
        console.print(
            f"   fake agents: {sr.alive_at_end}/{sr.agents} alive at the end, {sr.placed} "
            f"placements and {sr.stopped_on_agents} stops served, {sr.unregistered} "
            f"'not registered' heartbeat replies, longest heartbeat gap "
            f"{sr.max_heartbeat_gap:.2f}s; scheduler RSS {sr.idle_rss:.1f} MiB idle → "
            f"{sr.end_rss:.1f} MiB after"
        )
    print_markdown(r)


def print_markdown(r: Results) -> None:
    lines = [
        f"Image `{IMAGE}`, {os.cpu_count()} CPUs, one run of `python benchmarks/cluster.py"
        f"{' --quick' if r.plan is QUICK else ''}`.",
        "",
        "| Benchmark | aviato | docker CLI | Docker SDK | aviato / CLI | aviato / SDK | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    if r.create is not None:
        a, c, s = r.create.rows
        lines += [
            f"| create → first exec, p50 (ms, n={len(a.samples)}) | {ms(a.p50)} | {ms(c.p50)} |"
            f" {ms(s.p50)} | {ratio(a.p50, c.p50)} | {ratio(a.p50, s.p50)} | ≤ 1.3x raw |",
            f"| create → first exec, p99 (ms) | {ms(a.p99)} | {ms(c.p99)} | {ms(s.p99)} |"
            f" {ratio(a.p99, c.p99)} | {ratio(a.p99, s.p99)} | |",
        ]
    if r.exec is not None:
        a, c, s = r.exec.rows
        lines += [
            f"| exec(['true']) round trip, p50 (ms, n={len(a.samples)}) | {ms(a.p50)} |"
            f" {ms(c.p50)} | {ms(s.p50)} | {ratio(a.p50, c.p50)} | {ratio(a.p50, s.p50)} |"
            " ≤ 1.0x SDK |",
            f"| exec(['true']) round trip, p99 (ms) | {ms(a.p99)} | {ms(c.p99)} | {ms(s.p99)} |"
            f" {ratio(a.p99, c.p99)} | {ratio(a.p99, s.p99)} | |",
        ]
    lines += ["", "| Measure | Value | target |", "|---|---:|---|"]
    if r.sched is not None:
        creates, stops, mixed = r.sched.phases
        n = r.sched.agents
        lines += [
            f"| scheduler creates/s ({n} fake agents, {len(creates.creates.samples)} creates)"
            f" | {creates.ops / creates.wall:,.0f} | ≥ 2,000 ops/s |",
            f"| scheduler stops/s ({len(stops.stops.samples)} stops)"
            f" | {stops.ops / stops.wall:,.0f} | ≥ 2,000 ops/s |",
            f"| scheduler create→stop mixed, requests/s ({mixed.ops} requests)"
            f" | {mixed.ops / mixed.wall:,.0f} | ≥ 2,000 ops/s |",
        ]
    if r.start is not None:
        lines += [
            f"| embedded cluster start (`LocalCluster().start()`) | {ms(r.start.start_s)} ms | |",
            f"| embedded cluster idle RSS (scheduler + agent) |"
            f" {sum(r.start.idle_rss.values()):.1f} MiB | |",
        ]
    console.rule("markdown")
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------- main


async def amain(plan: Plan, cleanup: Cleanup, only: set[str], profile: str | None) -> Results:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = Results(plan)
    docker_b = DockerBaselines()
    try:
        docker_b.client.ping()
        try:
            docker_b.client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            raise SystemExit(
                f"image {IMAGE} is not on this host: build it with scripts/build-image.sh"
            ) from None

        if "start" in only:
            with console.status("embedded cluster start"):
                results.start = bench_cluster_start(cleanup)
        if only & {"create", "exec"}:
            with console.status("first sandbox (starts the embedded cluster)"):
                results.first_create, _ = await aviato_create_exec(docker_b)
        if "create" in only:
            results.create = await bench_create(plan, docker_b)
        if "exec" in only:
            results.exec = await bench_exec(plan, docker_b)
        if only & {"create", "exec"}:
            address = await _local.ensure_cluster()
            results.loaded_rss = rss_mib(cluster_procs(address, f"embedded-{os.getpid()}"))
            close_all()
            with console.status("stopping the embedded cluster"):
                _local.shutdown()
        if "sched" in only:
            with console.status("scheduler throughput"):
                results.sched = await bench_scheduler(plan, cleanup, profile)
    finally:
        docker_b.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only",
        default="start,create,exec,sched",
        help="comma-separated subset of: start,create,exec,sched",
    )
    parser.add_argument(
        "--profile-scheduler",
        metavar="FILE",
        help="run benchmark 3's scheduler under cProfile, writing its stats to FILE",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"start", "create", "exec", "sched"}:
        parser.error(
            f"--only: unknown part(s) {sorted(only - {'start', 'create', 'exec', 'sched'})}"
        )
    if os.environ.pop("AVIATO_SCHEDULER", None):
        console.print("[yellow]ignoring $AVIATO_SCHEDULER: this measures the embedded cluster[/]")
    plan = QUICK if args.quick else FULL
    cleanup = Cleanup()
    t0 = time.perf_counter()
    try:
        results = uvloop.run(amain(plan, cleanup, only, args.profile_scheduler))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        with console.status("cleaning up"):
            cleanup.sweep()
    print_report(results)
    console.print(f"[dim]total {time.perf_counter() - t0:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
