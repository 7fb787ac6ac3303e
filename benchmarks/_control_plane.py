"""Benchmark 3: a real ``python -m scheduler`` and fake agents (DEALER sockets in this
process speaking aviato.protocol, no containers) serving pipelined CreateSandbox /
StopSandbox from a few client sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import os
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq
import zmq.asyncio

from aviato.protocol import (
    PROTOCOL_VERSION,
    ClusterStatus,
    ClusterStatusReply,
    CreateSandbox,
    Message,
    MsgType,
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

from ._cleanup import Cleanup
from ._common import IMAGE, ROOT, RUN_ID, Plan, spawn_daemon, stop_process, timed
from ._stats import Stats

# --------------------------------------------------------------------------- wire


def _frame(t: MsgType, request_id: int, body: dict[str, Any]) -> bytes:
    """One envelope, exactly as ``aviato.protocol.encode`` lays it out (no token)."""
    frame: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": int(t), "id": request_id, "b": body}, use_bin_type=True
    )
    return frame


def _unpack(frame: bytes) -> dict[str, Any]:
    env: dict[str, Any] = msgpack.unpackb(frame, raw=False)
    return env


def _dealer(ctx: zmq.asyncio.Context, address: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(address)
    return sock


async def _request(sock: zmq.asyncio.Socket, msg: Message, request_id: int, what: str) -> Message:
    """Send ``msg`` through the full codec; the decoded reply (``what``, for errors)."""
    await sock.send_multipart(encode(msg, request_id))
    if not await sock.poll(10_000):
        raise TimeoutError(f"no {what} within 10 s")
    return decode(await sock.recv_multipart()).msg


def create_body(spec: SandboxSpec, timeout: float) -> dict[str, Any]:
    """CreateSandbox's wire body, checked once against the real codec."""
    body: dict[str, Any] = to_wire(CreateSandbox(spec, timeout))
    decoded = decode([_frame(MsgType.CREATE_SANDBOX, 7, body)])
    assert decoded.request_id == 7 and decoded.msg == CreateSandbox(spec, timeout)
    return body


# --------------------------------------------------------------------------- fake agent


class FakeAgent:
    """An agent with a fake runtime: every placement starts, every stop succeeds, at once.

    Messages are read and written with msgpack directly (the envelope of
    aviato.protocol), so that this process's decoding stays cheaper than the
    scheduler's; the first placement is cross-checked with the full codec."""

    checked = False

    def __init__(self, ctx: zmq.asyncio.Context, address: str, agent_id: str, slots: int) -> None:
        self.agent_id = agent_id
        self.slots = slots
        self.sock = _dealer(ctx, address)
        self.running: set[str] = set()
        self.placed = 0
        self.stopped = 0
        self.errors = 0
        self.unregistered = 0
        self.heartbeats = 0
        self.max_heartbeat_gap = 0.0
        self._next_id = 0
        self.interval = 0.5
        #: Set: this agent's heartbeats stop (``heartbeat_all``), as if it died.
        self.silent = False
        self._last_beat = 0.0
        # The same socket driven synchronously, for heartbeats: a send through the
        # asyncio socket (a future each) cost more than the heartbeat itself.
        self._raw: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def register(self) -> None:
        msg = RegisterAgent(self.agent_id, "tcp://127.0.0.1:9", self.slots, "fake", fresh=True)
        reply = await _request(self.sock, msg, self._id(), f"RegisterReply for {self.agent_id}")
        if not isinstance(reply, RegisterReply):
            raise RuntimeError(f"{self.agent_id}: registration refused: {reply}")
        self.interval = reply.heartbeat_interval

    async def serve(self) -> None:
        sock = self.sock
        while True:
            reply = self._answer(await sock.recv_multipart())
            if reply is not None:
                await sock.send(reply)

    def on_readable(self) -> None:
        """Every message waiting, read and answered without a future (``serve_all``)."""
        raw = self._raw
        while True:
            try:
                frames = raw.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = self._answer(frames)
            if reply is not None:
                raw.send(reply, zmq.DONTWAIT)

    def _answer(self, frames: list[bytes]) -> bytes | None:
        """What this fake agent does with a message: its reply, if it has one."""
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
            return reply
        if t == MsgType.STOP_SANDBOX:
            self.running.discard(body["sandbox_id"])
            self.stopped += 1
            return _frame(MsgType.OK, rid, {})
        if t == MsgType.HEARTBEAT_REPLY:
            if not body["registered"]:
                self.unregistered += 1
            if body.get("heartbeat_interval"):
                self.interval = body["heartbeat_interval"]
        elif t == MsgType.ERROR:
            self.errors += 1
        return None

    @staticmethod
    def _check(frames: list[bytes], reply: bytes) -> None:
        place = decode(frames).msg
        assert isinstance(place, PlaceSandbox), place
        ours = decode([reply]).msg
        assert isinstance(ours, SandboxReply) and ours.sandbox.status is SandboxStatus.RUNNING
        assert dataclasses.replace(ours.sandbox, status=place.sandbox.status) == place.sandbox
        FakeAgent.checked = True

    def beat(self, now: float, full_every: int = 20) -> None:
        """One heartbeat, as ``heartbeat`` sends them, sent at once (never waits)."""
        if self._last_beat:
            self.max_heartbeat_gap = max(self.max_heartbeat_gap, now - self._last_beat)
        self._last_beat = now
        if self.heartbeats % full_every == 0:
            body: dict[str, Any] = {"agent_id": self.agent_id, "running": list(self.running)}
        else:
            body = {"agent_id": self.agent_id, "full": False}
        self._raw.send(_frame(MsgType.AGENT_HEARTBEAT, self._id(), body), zmq.DONTWAIT)
        self.heartbeats += 1
        # A send can take the socket's wake-up for a message that arrived meanwhile.
        self.on_readable()

    async def heartbeat(self, full_every: int = 20) -> None:
        """As the real agent does: every ``full_every``-th heartbeat lists every sandbox,
        the others only those gone since (none: this runtime loses nothing)."""
        # Spread the first beats over an interval, as agents started at different times.
        await asyncio.sleep(self.interval * (hash(self.agent_id) % 1000) / 1000)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.max_heartbeat_gap = max(self.max_heartbeat_gap, now - last)
            last = now
            if self.heartbeats % full_every == 0:
                body: dict[str, Any] = {"agent_id": self.agent_id, "running": list(self.running)}
            else:
                body = {"agent_id": self.agent_id, "full": False}
            await self.sock.send(_frame(MsgType.AGENT_HEARTBEAT, self._id(), body))
            self.heartbeats += 1


async def serve_all(agents: list[FakeAgent]) -> None:
    """Every fake agent served from the event loop's own readiness callbacks, without
    a task, a future or an asyncio socket each (a wake-up cost the load generator
    several times what the scheduler spends on the same message). Until cancelled.
    The agents' asyncio sockets must have nothing pending (registration is done)."""
    loop = asyncio.get_running_loop()
    fds = []
    try:
        for agent in agents:
            fd = agent.sock.getsockopt(zmq.FD)
            loop.remove_reader(fd)  # the asyncio socket's own: ours replaces it
            loop.add_reader(fd, agent.on_readable)
            fds.append(fd)
            agent.on_readable()  # what arrived before (the FD signals edges only)
        await asyncio.Event().wait()
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def heartbeat_all(agents: list[FakeAgent]) -> None:
    """Every fake agent's heartbeats from one task, each at its own interval and phase
    (a task and a timer per agent made the load generator, not the scheduler, the
    first to fall behind with thousands of agents)."""
    now = time.monotonic()
    due = [(now + a.interval * (hash(a.agent_id) % 1000) / 1000, i) for i, a in enumerate(agents)]
    heapq.heapify(due)
    while True:
        now = time.monotonic()
        while due[0][0] <= now:
            _, i = due[0]
            agent = agents[i]
            if not agent.silent:
                agent.beat(now)
            # From now, not from when it was due: a late beat is not followed by a
            # burst of catching up (the gap it left is recorded, not hidden).
            heapq.heapreplace(due, (now + agent.interval, i))
        await asyncio.sleep(max(0.0, due[0][0] - time.monotonic()))


# --------------------------------------------------------------------------- clients


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

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall


class Client:
    """One DEALER socket keeping up to ``window`` requests in flight."""

    def __init__(
        self, ctx: zmq.asyncio.Context, address: str, window: int, create: dict[str, Any]
    ) -> None:
        self.sock = _dealer(ctx, address)
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


# --------------------------------------------------------------------------- the benchmark


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


async def start_scheduler(
    cleanup: Cleanup, profile: str | None
) -> tuple[subprocess.Popen[bytes], str]:
    """A scheduler on a free loopback port (under cProfile with ``profile``), and its address."""
    tmp = tempfile.mkdtemp(prefix="aviato-bench-")
    cleanup.dirs.append(tmp)
    ready, logfile = Path(tmp) / "scheduler.addr", Path(tmp) / "scheduler.log"
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    argv = [*prof, "-m", "scheduler", "--bind", "tcp://127.0.0.1:*", "--ready-file", str(ready)]
    proc = spawn_daemon(argv, logfile, ROOT)
    cleanup.procs.append(proc)
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"benchmark scheduler did not come up:\n{tail}")
        await asyncio.sleep(0.02)
    return proc, ready.read_text().strip()


def _cpu(t: Any) -> float:
    return float(t.user + t.system)


def _busy(t: Any) -> float:
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def bench_scheduler(plan: Plan, cleanup: Cleanup, profile: str | None = None) -> SchedResult:
    proc, address = await start_scheduler(cleanup, profile)
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
            phase.sched_cpu = _cpu(c1) - _cpu(c0)
            phase.self_cpu = _cpu(s1) - _cpu(s0)
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
        expected_stops = sum(len(p.stops.samples) for p in (warm, burst_s, mixed))
        # Stops reach the agents after the scheduler answered the client: let them land.
        deadline = time.monotonic() + 10
        while sum(a.stopped for a in agents) < expected_stops and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        status_sock = _dealer(ctx, address)
        try:
            status = await _request(status_sock, ClusterStatus(), 1, "ClusterStatusReply")
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
        await asyncio.to_thread(stop_process, proc)
