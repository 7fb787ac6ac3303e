"""The agent daemon: registers with the scheduler, runs sandboxes through a Runtime,
and serves the data plane (exec, files, logs, function calls) to clients on its own
ROUTER socket, and to clients on its host over its local lane (agent/lane.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import zmq
import zmq.asyncio

from agent.checks import request_problem, shown
from agent.lane import LaneServer
from agent.runtime.base import (
    LABEL_AGENT,
    LABEL_CREATED,
    ExitStatus,
    Runtime,
    SandboxExit,
    sandbox_labels,
    spec_from_labels,
)
from agent.workers import WorkerHub
from aviato import _zmq
from aviato._auth import CurveKeys, ServerKeys, ZapHandler, log_refused_handshakes
from aviato._daemon import warn_if_open
from aviato._errors import error_reply
from aviato.exceptions import (
    AviatoError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
)
from aviato.protocol import (
    AgentHeartbeat,
    Decoded,
    DecodeError,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecChunk,
    ExecReply,
    FileReply,
    GetLogs,
    HeartbeatReply,
    LogsReply,
    Message,
    OkReply,
    Payload,
    Ping,
    PlaceSandbox,
    Pong,
    ReadFile,
    RegisterAgent,
    RegisterReply,
    RunCalls,
    SandboxExited,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    StopSandbox,
    WriteFile,
    decode,
    encode,
)

log = logging.getLogger("aviato.agent")

#: How many ended sandbox ids to remember, to tell "not running" from "unknown".
ENDED_MEMORY = 4096
#: Agent ids of embedded clusters: this prefix and the owning process's pid.
EMBEDDED_PREFIX = "embedded-"
#: How long a function worker may take from container start to its hello.
WORKER_START_SECONDS = 60.0


@dataclass(slots=True)
class Running:
    spec: SandboxSpec
    created_at: float


class AgentServer:
    def __init__(
        self,
        runtime: Runtime,
        *,
        scheduler: str,
        agent_id: str,
        slots: int,
        bind: str = "tcp://127.0.0.1:0",
        advertise_host: str | None = None,
        labels: dict[str, str] | None = None,
        token: str | None = None,
        keys: tuple[ServerKeys, CurveKeys] | None = None,
        register_timeout: float = 2.0,
        supervisor: bool = True,
    ) -> None:
        self.runtime = runtime
        self.scheduler = scheduler
        self.agent_id = agent_id
        self.slots = slots
        self.bind = bind
        self.advertise_host = advertise_host
        self.labels = labels or {}
        self.token = token
        #: CURVE: the data plane's server keys (client keys only), the scheduler link's.
        self.keys = keys
        self.register_timeout = register_timeout
        #: Run exec and files through an in-sandbox supervisor when the image has Python.
        self.supervisor = supervisor
        self.address = ""
        self.ready = asyncio.Event()  # set once registered the first time
        self.sandboxes: dict[str, Running] = {}
        self.creating: set[str] = set()
        self._early_exits: dict[str, SandboxExit] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        self._stop = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._data: zmq.asyncio.Socket | None = None
        self._sched: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._data_handlers: dict[type[Message], Callable[[bytes, Decoded], Awaitable[None]]] = {
            Exec: self._on_exec,
            WriteFile: self._on_write,
            ReadFile: self._on_read,
            GetLogs: self._on_logs,
        }
        self._hub: WorkerHub | None = None
        self._lane: LaneServer | None = None
        #: Where clients on this host reach the data plane without ZeroMQ ("": nowhere).
        self.lane_address = ""

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, *, cleanup_on_exit: bool = True) -> None:
        server_keys = self.keys[0] if self.keys is not None else None
        who = f"agent {self.agent_id}"
        zap = ZapHandler(self._ctx, server_keys, who) if server_keys is not None else None
        data, bound = _zmq.router(self._ctx, self.bind, server_keys)
        self._data = data
        self.address = _zmq.advertised(bound, self.advertise_host)
        log.info(
            "agent %s serving clients on %s (runtime %s)", self.agent_id, bound, self.runtime.name
        )
        warn_if_open(log, who, bound, self.token, server_keys.directory if server_keys else None)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._hub = WorkerHub(self._send_now, self._spawn, self.agent_id)
                self._start_lane(self._hub)
                if zap is not None:
                    self._task(zap.run())
                    self._task(log_refused_handshakes(data, who))
                self._task(self._data_loop(data))
                self._task(self._scheduler_link())
                self._task(self._exits_loop())
                await self._stop.wait()
                for task in list(self._tasks):
                    task.cancel()
        finally:
            if cleanup_on_exit:
                await self._stop_all()
            if self._lane is not None:
                self._lane.close()
            if self._hub is not None:
                await self._hub.close_all(detach=not cleanup_on_exit)
            await self.runtime.close()
            if zap is not None:
                zap.close()
            data.close(linger=0)
            if self._sched is not None:
                self._sched.close(linger=0)
            self._ctx.destroy(linger=0)  # term() would wait on any socket left open

    def _start_lane(self, hub: WorkerHub) -> None:
        lane = LaneServer(hub.root / "lane", self._on_message)
        try:
            lane.start()
        except OSError as exc:  # clients then use the ZeroMQ data plane, as remote ones do
            log.warning("agent %s: no local lane (%s)", self.agent_id, exc)
            return
        self._lane = lane
        self.lane_address = lane.address

    async def _stop_all(self) -> None:
        """Stop everything of ours, including stops still under way when we were told to
        exit (their tasks were just cancelled): ask the runtime, not only our tables."""
        wanted = set(self.sandboxes) | self.creating
        try:
            async with asyncio.timeout(30):
                wanted |= {s.sandbox_id for s in await self.runtime.list(self.agent_id)}
        except Exception as exc:
            log.warning("could not list sandboxes to stop on exit: %s", exc)
        ids = sorted(wanted)
        if ids:
            log.info("agent %s stopping %d sandbox(es) on exit", self.agent_id, len(ids))
        results = await asyncio.gather(
            *(asyncio.wait_for(self.runtime.stop(s), 30) for s in ids), return_exceptions=True
        )
        for sid, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("could not stop %s on exit: %s", sid, result)

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` in the agent's task group; tracked so ``stop`` can cancel it."""
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._task(self._guard(coro))

    @staticmethod
    async def _guard(coro: Awaitable[None]) -> None:
        # A failing request handler is logged; it must not take the task group down.
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent: request handler failed")

    # ------------------------------------------------------------------ scheduler link

    def _new_scheduler_socket(self) -> zmq.asyncio.Socket:
        if self._sched is not None:
            self._sched.close(linger=0)
        sock = _zmq.dealer(self._ctx, self.scheduler, self.keys[1] if self.keys else None)
        self._sched = sock
        return sock

    async def _scheduler_link(self) -> None:
        fresh = True
        backoff = 0.1
        sock = self._new_scheduler_socket()
        reader = self._task(self._scheduler_recv(sock))
        while True:
            reply = await self._register(fresh)
            if reply is None:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if backoff >= 1.6:
                    # A fresh socket drops whatever the old one had queued.
                    reader.cancel()
                    sock = self._new_scheduler_socket()
                    reader = self._task(self._scheduler_recv(sock))
                continue
            fresh, backoff = False, 0.1
            self.ready.set()
            await self._heartbeat_until_lost(reply.heartbeat_interval)
            log.warning("agent %s: scheduler lost or restarted; registering again", self.agent_id)
            # On a fresh socket: once (under heavy load, seen in CI) the old one
            # stopped delivering replies, and registering on it failed for 10 s.
            reader.cancel()
            sock = self._new_scheduler_socket()
            reader = self._task(self._scheduler_recv(sock))

    async def _register(self, fresh: bool) -> RegisterReply | None:
        reported: list[SandboxInfo] = []
        if fresh:
            for found in await self.runtime.list(self.agent_id):
                spec = spec_from_labels(found.labels)
                created = float(found.labels.get(LABEL_CREATED, "0") or 0)
                # A function worker cannot be reconnected to a new agent process.
                if found.running and spec is not None and not spec.function_worker:
                    self.sandboxes.setdefault(found.sandbox_id, Running(spec, created))
                else:
                    await self.runtime.stop(found.sandbox_id)
            if self.agent_id.startswith(EMBEDDED_PREFIX):
                await self._reap_dead_embedded()
        for sid, run in self.sandboxes.items():
            reported.append(
                SandboxInfo(sid, run.spec, SandboxStatus.RUNNING, created_at=run.created_at)
            )
        msg = RegisterAgent(
            agent_id=self.agent_id,
            address=self.address,
            slots=self.slots,
            runtime=self.runtime.name,
            fresh=fresh,
            labels=self.labels,
            sandboxes=tuple(reported),
            public_key=self.keys[0].public.decode() if self.keys is not None else "",
            lane=self.lane_address,
        )
        reply = await self._ask_scheduler(msg, self.register_timeout)
        if not isinstance(reply, RegisterReply):
            if isinstance(reply, ErrorReply):
                log.error("scheduler refused registration: %s", reply.message)
            return None
        for sid in reply.reap:
            log.info("reaping sandbox %s unknown to the scheduler", sid)
            self._forget(sid, "reaped: unknown to the scheduler")
            await self.runtime.stop(sid)
        log.info("agent %s registered with %s", self.agent_id, self.scheduler)
        return reply

    async def _reap_dead_embedded(self) -> None:
        """Embedded agents are named after their owner's pid, so one killed with its
        owner (kill -9 of both) would leave its sandboxes to nobody: the next embedded
        agent on this host removes those whose owner process is gone."""
        for found in await self.runtime.list_all():
            owner = found.labels.get(LABEL_AGENT, "")
            if not owner.startswith(EMBEDDED_PREFIX) or owner == self.agent_id:
                continue
            pid = owner.removeprefix(EMBEDDED_PREFIX)
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                log.info("reaping %s of dead embedded agent %s", found.sandbox_id, owner)
                await self.runtime.stop(found.sandbox_id)

    async def _heartbeat_until_lost(self, interval: float) -> None:
        misses = 0
        while True:
            await asyncio.sleep(interval)
            running = tuple(self.sandboxes) + tuple(self.creating)
            reply = await self._ask_scheduler(
                AgentHeartbeat(self.agent_id, running), max(1.0, 2 * interval)
            )
            if isinstance(reply, HeartbeatReply):
                if not reply.registered:
                    return
                misses = 0
            else:
                misses += 1
                if misses >= 3:
                    return

    async def _ask_scheduler(self, msg: Message, timeout: float) -> Message | None:
        """A request to the scheduler; None when it does not answer in time."""
        sock = self._sched
        assert sock is not None
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await sock.send_multipart(encode(msg, request_id, token=self.token))
            return await asyncio.wait_for(future, timeout)
        except (TimeoutError, zmq.ZMQError):
            return None
        finally:
            self._pending.pop(request_id, None)

    async def _scheduler_recv(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                decoded = decode(frames)
            except DecodeError as exc:
                log.warning("agent: undecodable message from the scheduler: %s", exc)
                continue
            msg = decoded.msg
            if isinstance(msg, PlaceSandbox):
                self._spawn(self._on_place(sock, decoded.request_id, msg.sandbox))
            elif isinstance(msg, StopSandbox):
                self._spawn(self._on_stop(sock, decoded.request_id, msg))
            else:
                future = self._pending.get(decoded.request_id)
                if future is not None and not future.done():
                    future.set_result(msg)

    async def _reply_scheduler(
        self, sock: zmq.asyncio.Socket, request_id: int, msg: Message
    ) -> None:
        try:
            await sock.send_multipart(encode(msg, request_id, token=self.token))
        except zmq.ZMQError as exc:
            log.warning("could not answer the scheduler: %s", exc)

    async def _on_place(self, sock: zmq.asyncio.Socket, request_id: int, info: SandboxInfo) -> None:
        sid = info.sandbox_id
        if sid not in self.sandboxes:
            self.creating.add(sid)
            labels = sandbox_labels(sid, self.agent_id, info.spec, info.created_at)
            try:
                await self._create(sid, info.spec, labels)
            except Exception as exc:
                self._early_exits.pop(sid, None)
                log.info("create of %s failed: %s", sid, exc)
                await self._reply_scheduler(sock, request_id, error_reply(exc))
                return
            finally:
                self.creating.discard(sid)
            self.sandboxes[sid] = Running(info.spec, info.created_at)
        running = dataclasses.replace(info, status=SandboxStatus.RUNNING)
        await self._reply_scheduler(sock, request_id, SandboxReply(running))
        early = self._early_exits.pop(sid, None)
        if early is not None:
            await self._handle_exit(early)

    async def _create(self, sid: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        """Create the sandbox with the supervisor's socket and library mounted in. A
        function worker's main command is the supervisor; any other sandbox gets one
        started beside its command, when the image has a Python (else exec and files
        go through the runtime, transparently)."""
        hub = self._hub
        assert hub is not None
        mounts = await hub.prepare(sid)
        try:
            if spec.function_worker:
                command, args = hub.worker_command()
                env = {**spec.env, **hub.worker_env()}
                spec = dataclasses.replace(spec, command=command, args=args, env=env)
            await self.runtime.create(sid, spec, labels, mounts)
            if spec.function_worker or self.runtime.supervisor_is_main:
                try:
                    await hub.wait_ready(sid, WORKER_START_SECONDS)
                except SandboxFailedError as exc:
                    tail = (await self.runtime.logs(sid))[-2000:].decode(errors="replace")
                    if tail.strip():
                        raise SandboxFailedError(
                            f"{exc}\n--- sandbox output:\n{tail}", sandbox_id=sid
                        ) from exc
                    raise
        except BaseException:
            await hub.close(sid, "failed to start")
            await self.runtime.stop(sid)
            raise
        if not spec.function_worker and self.supervisor and not self.runtime.supervisor_is_main:
            self._spawn(self._start_supervisor(sid))

    async def _start_supervisor(self, sid: str) -> None:
        assert self._hub is not None
        command, args = self._hub.worker_command("python3", functions=False)
        # A sidecar is its container's watchdog: it stops the container if we vanish.
        env = {**self._hub.worker_env(), "AVIATO_WATCHDOG": "container"}
        if await self.runtime.start_sidecar(sid, (command, *args), env):
            with contextlib.suppress(AviatoError):
                hello = await self._hub.wait_ready(sid, WORKER_START_SECONDS)
                log.debug("supervisor up in %s (python %s)", sid, hello.get("python"))

    async def _on_stop(self, sock: zmq.asyncio.Socket, request_id: int, msg: StopSandbox) -> None:
        self._forget(msg.sandbox_id, msg.reason)
        try:
            # The runtime first: it kills the sandbox's whole process tree while the
            # supervisor still holds it together.
            await self.runtime.stop(msg.sandbox_id)
        except Exception as exc:
            await self._reply_scheduler(sock, request_id, error_reply(exc))
            return
        finally:
            if self._hub is not None:
                await self._hub.close(msg.sandbox_id, msg.reason)
        await self._reply_scheduler(sock, request_id, OkReply())

    def _forget(self, sandbox_id: str, reason: str) -> None:
        self.sandboxes.pop(sandbox_id, None)
        self.ended[sandbox_id] = reason
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)

    async def _exits_loop(self) -> None:
        async for exit_ in self.runtime.exits():
            if exit_.sandbox_id in self.creating:
                # Ended while starting: handled once its create is answered (the
                # scheduler must hear "running" before "exited"); a create still
                # waiting for the supervisor's hello fails now instead of timing out.
                self._early_exits[exit_.sandbox_id] = exit_
                if self._hub is not None and not self._hub.supervised(exit_.sandbox_id):
                    await self._hub.close(exit_.sandbox_id, f"exited with code {exit_.exit_code}")
                continue
            await self._handle_exit(exit_)

    async def _handle_exit(self, exit_: SandboxExit) -> None:
        if exit_.sandbox_id not in self.sandboxes:
            return
        reason = ""
        if exit_.oom_killed:
            reason = "killed: out of memory (raise memory_bytes)"
        how = reason or f"exited with code {exit_.exit_code}"
        self._forget(exit_.sandbox_id, how)
        if self._hub is not None:
            await self._hub.close(exit_.sandbox_id, how)
        log.info(
            "sandbox %s exited (%s, oom=%s)", exit_.sandbox_id, exit_.exit_code, exit_.oom_killed
        )
        if self._sched is not None:
            # Best effort: a lost report is caught by the heartbeat's running list.
            await self._ask_scheduler(SandboxExited(exit_.sandbox_id, exit_.exit_code, reason), 2.0)

    # ------------------------------------------------------------------ data plane

    async def _data_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            # A receive (and a send) with messages queued completes without yielding:
            # under a flood this loop would starve every other task (heartbeats, ticks).
            await asyncio.sleep(0)
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            if self._lane is not None and self._lane.owns(identity):
                # A DEALER that chose a lane peer's routing id: its replies would go to
                # that local client. Nothing can be told to it; drop it.
                _zmq.refusals.warning(
                    "agent %s: dropped a message from a ZeroMQ peer posing as a local lane client",
                    self.agent_id,
                )
                continue
            self._on_message(identity, frames[1:])

    def _on_message(self, identity: bytes, frames: Sequence[Any]) -> None:
        """One data-plane request, from ZeroMQ or the lane. Function calls and pings are
        served right here (no task: they are the hot path); the rest get a task each."""
        try:
            decoded = decode(frames)
        except DecodeError as exc:
            who = f"agent {self.agent_id}"
            if exc.request_id is None:
                _zmq.refusals.warning("%s: dropped an undecodable message: %s", who, exc)
            else:
                _zmq.refusals.warning("%s: refused a message: %s", who, exc)
                self._send_now(identity, exc.request_id, ErrorReply(exc.code, str(exc)))
            return
        if self.token is not None and decoded.token != self.token:
            error = ErrorReply(ErrorCode.UNAUTHORIZED, "missing or wrong cluster token")
            self._send_now(identity, decoded.request_id, error)
            return
        msg = decoded.msg
        problem = request_problem(msg)
        if problem:
            self._send_now(identity, decoded.request_id, ErrorReply(ErrorCode.BAD_REQUEST, problem))
            return
        if type(msg) is RunCalls:
            try:
                assert self._hub is not None
                self._check_running(msg.sandbox_id)
                self._hub.run_calls(identity, decoded.request_id, msg, decoded.payloads)
            except Exception as exc:
                if not isinstance(exc, AviatoError):
                    log.exception("agent: RunCalls failed")
                self._send_now(identity, decoded.request_id, error_reply(exc))
            return
        if type(msg) is Ping:
            pong = Pong(server="agent", server_id=self.agent_id)
            self._send_now(identity, decoded.request_id, pong)
            return
        handler = self._data_handlers.get(type(msg))
        if handler is None:
            error = ErrorReply(
                ErrorCode.BAD_REQUEST, f"an agent does not serve {type(msg).__name__}"
            )
            self._send_now(identity, decoded.request_id, error)
            return
        self._spawn(self._serve_one(handler, identity, decoded))

    async def _serve_one(
        self, handler: Callable[[bytes, Decoded], Awaitable[None]], identity: bytes, d: Decoded
    ) -> None:
        try:
            await handler(identity, d)
        except Exception as exc:
            if not isinstance(exc, AviatoError):
                log.exception("agent: %s failed", type(d.msg).__name__)
            await self._send(identity, d.request_id, error_reply(exc))

    async def _send(
        self, identity: bytes, request_id: int, msg: Message, payloads: tuple[Payload, ...] = ()
    ) -> None:
        self._send_now(identity, request_id, msg, payloads)

    def _send_now(
        self, identity: bytes, request_id: int, msg: Message, payloads: Sequence[Payload] = ()
    ) -> None:
        """Replies never wait: a peer that went away (or reads nothing) loses them."""
        lane = self._lane
        if lane is not None and lane.owns(identity):
            if not lane.send(identity, encode(msg, request_id, payloads)):
                log.debug("dropping %s to a closed lane", type(msg).__name__)
            return
        assert self._data is not None
        _zmq.send_now(self._data, identity, msg, request_id, payloads)

    def _check_running(self, sandbox_id: str) -> None:
        if sandbox_id in self.sandboxes:
            return
        reason = self.ended.get(sandbox_id)
        if reason is not None or sandbox_id in self.creating:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running ({reason or 'still starting'})",
                sandbox_id=sandbox_id,
            )
        raise SandboxNotFoundError(
            f"sandbox {shown(sandbox_id)} is not on agent {self.agent_id}", sandbox_id=sandbox_id
        )

    async def _on_exec(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, Exec)
        self._check_running(msg.sandbox_id)
        if not msg.argv or not msg.argv[0]:
            raise ValueError("exec needs a non-empty argv, e.g. ['echo', 'hi']")
        if d.payloads:
            raise ValueError("exec with stdin is not supported yet")
        hub = self._hub
        via: Runtime | WorkerHub = (
            hub if hub is not None and hub.supervised(msg.sandbox_id) else self.runtime
        )
        if not msg.stream:
            out = await via.exec(
                msg.sandbox_id,
                msg.argv,
                cwd=msg.cwd,
                env=msg.env,
                timeout_seconds=msg.timeout_seconds,
            )
            reply = ExecReply(out.returncode, out.timed_out)
            await self._send(identity, d.request_id, reply, (out.stdout, out.stderr))
            return
        async for event in via.exec_stream(
            msg.sandbox_id,
            msg.argv,
            cwd=msg.cwd,
            env=msg.env,
            timeout_seconds=msg.timeout_seconds,
        ):
            if isinstance(event, ExitStatus):
                await self._send(
                    identity, d.request_id, ExecReply(event.returncode, event.timed_out)
                )
            else:
                await self._send(identity, d.request_id, ExecChunk(event.fd), (event.data,))

    async def _on_write(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, WriteFile)
        self._check_running(msg.sandbox_id)
        if len(d.payloads) != 1:
            raise ValueError("write_file carries exactly one payload frame (the data)")
        await self._files(msg.sandbox_id).write_file(
            msg.sandbox_id, msg.path, d.payloads[0], msg.mode
        )
        await self._send(identity, d.request_id, OkReply())

    async def _on_read(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, ReadFile)
        self._check_running(msg.sandbox_id)
        data = await self._files(msg.sandbox_id).read_file(msg.sandbox_id, msg.path)
        await self._send(identity, d.request_id, FileReply(len(data)), (data,))

    def _files(self, sandbox_id: str) -> Runtime | WorkerHub:
        hub = self._hub
        return hub if hub is not None and hub.supervised(sandbox_id) else self.runtime

    async def _on_logs(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, GetLogs)
        if msg.sandbox_id not in self.sandboxes and msg.sandbox_id not in self.ended:
            self._check_running(msg.sandbox_id)
        data = await self.runtime.logs(msg.sandbox_id)
        await self._send(identity, d.request_id, LogsReply(), (data,))
