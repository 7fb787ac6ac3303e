"""The agent's data plane: clients' requests (exec, files, logs, function calls, pings,
cancels), from its ROUTER socket or its local lane, each checked, then served on the
runtime or through the sandbox's supervisor; replies never wait, and a request stops
when its client cancels it or leaves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq.asyncio

from agent import actor_relay
from agent.checks import request_problem, shown
from agent.dashboard_view import DashboardRequests
from agent.exec_history import ExecHistory
from agent.file_streams import FileStreams
from agent.kept_logs import KeptLogs
from agent.lane_server import LaneServer
from agent.lifecycle import AgentLifecycle, data_handlers
from agent.objects import ObjectService
from agent.processes import ProcessRequests
from agent.resources import gpu_ids_of
from agent.runtime.base import ExitStatus, Runtime
from agent.runtime.labels import LABEL_CREATED, LABEL_SPARE, spec_from_labels
from agent.supervisor_hub import WorkerHub
from aviato._server import sockets
from aviato._server.auth import data_plane_refusal
from aviato._server.errors import error_reply
from aviato.exceptions import AviatoError, SandboxNotFoundError, SandboxNotRunningError
from aviato.protocol import (
    MAX_PAYLOAD_BYTES,
    Cancel,
    Decoded,
    DecodeError,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecChunk,
    ExecReply,
    FileChunk,
    FileReply,
    GetLogs,
    LogsReply,
    Message,
    OkReply,
    Payload,
    Ping,
    Pong,
    ReadFile,
    RunCalls,
    SandboxInfo,
    SandboxSpec,
    SandboxStatus,
    StreamAck,
    WatchOutput,
    WriteFile,
    decode,
    encode,
)

if TYPE_CHECKING:
    from agent.ports import PortService

__all__ = ["DataPlane", "Running"]

log = logging.getLogger("aviato.agent")


@dataclass(slots=True)
class Running:
    """A sandbox this agent runs: a row of its table."""

    spec: SandboxSpec
    created_at: float
    #: Made from a pre-started spare: its container's env lacks ``spec.env``, so
    #: exec adds it (as a fresh container's env would have it).
    spare: bool = False
    #: The GPU ids the scheduler gave it (reported again when we re-register).
    gpu_ids: tuple[str, ...] = ()

    @classmethod
    def found(cls, labels: Mapping[str, str]) -> Running | None:
        """The row of a running sandbox found on the runtime at start, from its labels
        (None: not ours to keep: a function worker cannot be reconnected to a new agent
        process)."""
        spec = spec_from_labels(labels)
        if spec is None or spec.function_worker:
            return None
        created = float(labels.get(LABEL_CREATED, "0") or 0)
        return cls(spec, created, bool(labels.get(LABEL_SPARE)), gpu_ids_of(labels))

    def report(self, sandbox_id: str, status: SandboxStatus) -> SandboxInfo:
        """The row as the scheduler is told it when we (re-)register."""
        return SandboxInfo(
            sandbox_id, self.spec, status, created_at=self.created_at, gpu_ids=self.gpu_ids
        )


class DataPlane:
    """Reads the agent's tables (what runs, starts, ended) and never changes them. The
    agent sets ``socket``, ``lane`` and ``hub`` as it starts them; ``start`` runs a
    coroutine as a task of the agent's, its failure logged."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        agent_id: str,
        token: str | None,
        sandboxes: Mapping[str, Running],
        creating: Set[str],
        ended: Mapping[str, str],
        kept_logs: KeptLogs,
        start: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        self.runtime = runtime
        self.agent_id = agent_id
        self.token = token
        self.sandboxes = sandboxes
        self.creating = creating
        self.ended = ended
        self.kept_logs = kept_logs
        self._start = start
        self.socket: zmq.asyncio.Socket | None = None
        self.lane: LaneServer | None = None
        self.hub: WorkerHub | None = None
        #: The last execs per sandbox, and the agent's published ports (set by the
        #: agent): what a dashboard asks for (agent/dashboard_view.py).
        self.execs = ExecHistory(sandboxes)
        self.ports: PortService | None = None
        #: Sandboxes a process was spawned in (others have none to list).
        self.spawned_in: set[str] = set()
        self._handlers: dict[type[Message], Callable[[bytes, Decoded], Awaitable[None]]] = {
            Exec: self._on_exec,
            WriteFile: self._on_write,
            ReadFile: self._on_read,
            GetLogs: self._on_logs,
            **ProcessRequests(self).handlers(),
            **DashboardRequests(self).handlers(),
        }
        #: Streamed files and logs (agent/file_streams.py).
        self.files = FileStreams(self)
        self._handlers.update(self.files.handlers())
        #: Object refs (agent/objects.py): put, get, release, and calls that use them.
        self.objects = ObjectService(self, start)
        self._handlers.update(self.objects.handlers())
        self._handlers.update(actor_relay.handlers(self))  # actor handles in sandboxes
        #: Requests under way, by (client, request id): a Cancel stops one.
        self._inflight: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        #: Activity, pause and snapshots (agent/lifecycle.py), once the agent sets it.
        self.lifecycle: AgentLifecycle | None = None

    def use_lifecycle(self, life: AgentLifecycle) -> None:
        self.lifecycle = life
        self._handlers.update(data_handlers(life, self.send_now))

    def serve_also(
        self, msg_type: type[Message], handler: Callable[[bytes, Decoded], Awaitable[None]]
    ) -> None:
        """Serve ``msg_type`` with ``handler`` too (a part of the agent in its own module:
        volumes, ports); it replies with ``send_now``, and what it raises is the reply."""
        self._handlers[msg_type] = handler

    async def serve(self, sock: zmq.asyncio.Socket) -> None:
        """Serve the ROUTER socket's requests (until cancelled)."""
        keyed = bool(sock.curve_server)  # (then other agents' keys are admitted too)
        while True:
            # A receive (and a send) with messages queued completes without yielding:
            # under a flood this loop would starve every other task (heartbeats, ticks).
            await asyncio.sleep(0)
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            if self.lane is not None and self.lane.owns(identity):
                # A DEALER that chose a lane peer's routing id: its replies would go to
                # that local client. Nothing can be told to it; drop it.
                sockets.refusals.warning(
                    log,
                    "agent %s: dropped a message from a ZeroMQ peer posing as a local lane client",
                    self.agent_id,
                )
                continue
            if keyed and self._refused_peer(identity, frames):
                continue
            self.on_message(identity, frames[1:])

    def _refused_peer(self, identity: bytes, frames: Sequence[Any]) -> bool:
        """Whether the request is another agent's that it may not send (refused, then):
        an agent's key fetches objects here, nothing else (data_plane_refusal)."""
        try:
            peer = str(frames[0].get("User-Id"))
        except zmq.ZMQError:  # no ZAP verdict on this connection
            return False
        if not peer.startswith("agent:"):
            return False  # a client's key: anything (the common case, decided here)
        try:
            decoded = decode(frames[1:])
        except DecodeError:
            return False  # on_message answers it
        refusal = data_plane_refusal(peer, decoded.msg)
        if not refusal:
            return False
        sockets.refusals.warning(log, "agent %s: refused %s: %s", self.agent_id, peer, refusal)
        self.send_now(identity, decoded.request_id, ErrorReply(ErrorCode.UNAUTHORIZED, refusal))
        return True

    def on_message(self, identity: bytes, frames: Sequence[Any]) -> None:
        """One data-plane request, from ZeroMQ or the lane. Function calls and pings are
        served right here (no task: they are the hot path); the rest get a task each."""
        try:
            decoded = decode(frames)
        except DecodeError as exc:
            who = f"agent {self.agent_id}"
            if exc.request_id is None:
                sockets.refusals.warning(log, "%s: dropped an undecodable message: %s", who, exc)
            else:
                sockets.refusals.warning(log, "%s: refused a message: %s", who, exc)
                self.send_now(identity, exc.request_id, ErrorReply(exc.code, str(exc)))
            return
        if self.token is not None and decoded.token != self.token:
            error = ErrorReply(ErrorCode.UNAUTHORIZED, "missing or wrong cluster token")
            self.send_now(identity, decoded.request_id, error)
            return
        msg = decoded.msg
        problem = request_problem(msg)
        if problem:
            self.send_now(identity, decoded.request_id, ErrorReply(ErrorCode.BAD_REQUEST, problem))
            return
        life = self.lifecycle
        if life is not None:  # activity for idle timeouts; a paused sandbox refuses
            refusal = life.on_request(msg)
            if refusal is not None:
                self.send_now(identity, decoded.request_id, refusal)
                return
        if type(msg) is RunCalls:
            try:
                assert self.hub is not None
                self._check_running(msg.sandbox_id)
                if msg.objects or msg.keep:  # refs among its arguments, or fn.ref
                    self.objects.run_calls(identity, decoded.request_id, msg, decoded.payloads)
                else:
                    self.hub.run_calls(identity, decoded.request_id, msg, decoded.payloads)
            except Exception as exc:
                if not isinstance(exc, AviatoError):
                    log.exception("agent: RunCalls failed")
                self.send_now(identity, decoded.request_id, error_reply(exc))
            return
        if type(msg) is WatchOutput:  # inline: watched before the calls sent after it
            self._watch_output(identity, decoded.request_id, msg)
            return
        if type(msg) is Ping:
            pong = Pong(server="agent", server_id=self.agent_id)
            self.send_now(identity, decoded.request_id, pong)
            return
        if type(msg) is FileChunk or type(msg) is StreamAck:  # a transfer's, under way
            self.files.on_client(identity, decoded)
            return
        if type(msg) is Cancel:  # the client gave up: stop the work where it runs
            task = self._inflight.pop((identity, decoded.request_id), None)
            if task is not None:
                task.cancel()
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            error = ErrorReply(
                ErrorCode.BAD_REQUEST, f"an agent does not serve {type(msg).__name__}"
            )
            self.send_now(identity, decoded.request_id, error)
            return
        key = (identity, decoded.request_id)
        task = self._start(self._serve_one(handler, identity, decoded))
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._inflight.pop(key, None))

    async def _serve_one(
        self, handler: Callable[[bytes, Decoded], Awaitable[None]], identity: bytes, d: Decoded
    ) -> None:
        try:
            if self.lifecycle is None:
                await handler(identity, d)
            else:
                with self.lifecycle.serving(d.msg):
                    await handler(identity, d)
        except Exception as exc:
            if not isinstance(exc, AviatoError):
                log.exception("agent: %s failed", type(d.msg).__name__)
            await self._send(identity, d.request_id, error_reply(exc))

    async def _send(
        self, identity: bytes, request_id: int, msg: Message, payloads: tuple[Payload, ...] = ()
    ) -> None:
        self.send_now(identity, request_id, msg, payloads)

    def send_now(
        self, identity: bytes, request_id: int, msg: Message, payloads: Sequence[Payload] = ()
    ) -> None:
        """Replies never wait: a peer that went away (or reads nothing) loses them."""
        lane = self.lane
        if lane is not None and lane.owns(identity):
            if not lane.send(identity, encode(msg, request_id, payloads)):
                log.debug("dropping %s to a closed lane", type(msg).__name__)
            return
        assert self.socket is not None
        sockets.send_now(self.socket, identity, msg, request_id, payloads)

    def _watch_output(self, identity: bytes, request_id: int, msg: WatchOutput) -> None:
        """A client will show this worker's output: its chunks go to this request."""
        try:
            self._check_running(msg.sandbox_id)
            if self.hub is None or not self.hub.supervised(msg.sandbox_id):
                raise SandboxNotRunningError(
                    f"sandbox {msg.sandbox_id} has no function worker on this agent",
                    sandbox_id=msg.sandbox_id,
                )
            self.hub.output.watch(msg.sandbox_id, identity, request_id)
        except AviatoError as exc:
            self.send_now(identity, request_id, error_reply(exc))

    def client_gone(self, identity: bytes) -> None:
        """A local client closed its lane (exited, or was killed): what it asked for
        and still waits on stops, as if it had cancelled each request."""
        for key in [k for k in self._inflight if k[0] == identity]:
            self._inflight.pop(key).cancel()

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
        if len(d.payloads) > 1:
            raise ValueError("exec carries at most one payload frame (its stdin)")
        stdin = d.payloads[0] if d.payloads else None
        env = self._exec_env(msg.sandbox_id, msg.env)
        hub = self.hub
        via: Runtime | WorkerHub = (
            hub if hub is not None and hub.supervised(msg.sandbox_id) else self.runtime
        )
        with self.execs.recorded(msg.sandbox_id, msg.argv) as record:  # the dashboard's
            if not msg.stream:
                out = await via.exec(
                    msg.sandbox_id,
                    msg.argv,
                    cwd=msg.cwd,
                    env=env,
                    timeout_seconds=msg.timeout_seconds,
                    stdin=stdin,
                )
                record.output(1, out.stdout)
                record.output(2, out.stderr)
                record.finish(out.returncode, out.timed_out)
                reply = ExecReply(out.returncode, out.timed_out)
                await self._send(identity, d.request_id, reply, (out.stdout, out.stderr))
                return
            async for event in via.exec_stream(
                msg.sandbox_id,
                msg.argv,
                cwd=msg.cwd,
                env=env,
                timeout_seconds=msg.timeout_seconds,
                stdin=stdin,
            ):
                if isinstance(event, ExitStatus):
                    record.finish(event.returncode, event.timed_out)
                    await self._send(
                        identity, d.request_id, ExecReply(event.returncode, event.timed_out)
                    )
                else:
                    record.output(event.fd, event.data)
                    await self._send(identity, d.request_id, ExecChunk(event.fd), (event.data,))

    def _exec_env(self, sandbox_id: str, env: dict[str, str] | None) -> dict[str, str] | None:
        """A spare's container was made before its spec was known: its env is added here
        under the request's own, as a fresh container's env would be."""
        run = self.sandboxes.get(sandbox_id)
        if run is None or not run.spare or not run.spec.env:
            return env
        return {**run.spec.env, **(env or {})}

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
        if msg.max_bytes < 0:
            raise ValueError(f"max_bytes must be positive (or 0: the limit), not {msg.max_bytes}")
        limit = min(msg.max_bytes or MAX_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES)
        data = await self._files(msg.sandbox_id).read_file(msg.sandbox_id, msg.path, limit)
        await self._send(identity, d.request_id, FileReply(len(data)), (data,))

    def _files(self, sandbox_id: str) -> Runtime | WorkerHub:
        hub = self.hub
        return hub if hub is not None and hub.supervised(sandbox_id) else self.runtime

    async def _on_logs(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, GetLogs)
        chunks = self.kept_logs.get(msg.sandbox_id)
        if chunks is None:
            if msg.sandbox_id not in self.sandboxes and msg.sandbox_id not in self.ended:
                self._check_running(msg.sandbox_id)
            chunks = await self.runtime.logs(msg.sandbox_id)
        reply = LogsReply(tuple(c.fd for c in chunks))
        await self._send(identity, d.request_id, reply, tuple(c.data for c in chunks))
