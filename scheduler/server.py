"""The scheduler's socket loop: decode, hand to the state machine, carry out its actions."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from aviato import _zmq
from aviato._auth import (
    LogThrottle,
    Role,
    ServerKeys,
    ZapHandler,
    log_refused_handshakes,
    request_refusal,
)
from aviato._daemon import warn_if_open
from aviato._errors import error_reply
from aviato.protocol import (
    AgentHeartbeat,
    AgentSpares,
    ClusterStatus,
    CreateSandbox,
    Decoded,
    DecodeError,
    DeregisterAgent,
    ErrorCode,
    ErrorReply,
    GetSandbox,
    HeartbeatReply,
    ListSandboxes,
    Message,
    OkReply,
    Ping,
    PlaceSandbox,
    Pong,
    RegisterAgent,
    SandboxExited,
    SandboxReply,
    SessionClose,
    SessionCloseReply,
    SessionKeepalive,
    StopSandbox,
    WaitSandbox,
    decode,
)
from scheduler.state import Action, Config, Reply, SchedulerState, SendToAgent

log = logging.getLogger("aviato.scheduler")

TICK_SECONDS = 0.1
#: An agent that never answers a PlaceSandbox/StopSandbox: forget the request after this.
OUTGOING_TTL_SECONDS = 600.0


@dataclass(slots=True)
class Outgoing:
    """A request this scheduler sent to an agent, waiting for its reply."""

    msg: Message
    sent_at: float


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return "?"


class SchedulerServer:
    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:5555",
        *,
        config: Config | None = None,
        token: str | None = None,
        keys: ServerKeys | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bind = bind
        self.state = SchedulerState(config, started_at=clock())
        self.token = token
        #: CURVE: admit only these agent and client keys, each to its own messages.
        self.keys = keys
        self._agent_keys = keys.public_keys(Role.AGENT) if keys is not None else {}
        self._refusals = LogThrottle()
        self.clock = clock
        self.address: str | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._sock: zmq.asyncio.Socket | None = None
        self._agent_identity: dict[str, bytes] = {}
        self._identity_agent: dict[bytes, str] = {}
        self._outgoing: dict[tuple[bytes, int], Outgoing] = {}
        self._next_id = 0
        self._handlers: dict[type[Message], Callable[[bytes, Decoded, float], list[Action]]] = {
            CreateSandbox: self._on_create,
            GetSandbox: self._on_get,
            ListSandboxes: self._on_list,
            StopSandbox: self._on_stop,
            WaitSandbox: self._on_wait,
            SessionKeepalive: self._on_keepalive,
            SessionClose: self._on_session_close,
            ClusterStatus: self._on_status,
            RegisterAgent: self._on_register,
            DeregisterAgent: self._on_deregister,
            AgentHeartbeat: self._on_heartbeat,
            AgentSpares: self._on_spares,
            SandboxExited: self._on_exited,
            Ping: self._on_ping,
        }

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        ctx = zmq.asyncio.Context()
        zap = ZapHandler(ctx, self.keys, "scheduler") if self.keys is not None else None
        sock, self.address = _zmq.router(ctx, self.bind, self.keys)
        self._sock = sock
        log.info("scheduler listening on %s", self.address)
        key_dir = self.keys.directory if self.keys else None
        warn_if_open(log, "scheduler", self.address, self.token, key_dir)
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._recv_loop(sock)), tg.create_task(self._tick_loop())]
                if zap is not None:
                    tasks.append(tg.create_task(zap.run()))
                    tasks.append(tg.create_task(log_refused_handshakes(sock, "scheduler")))
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            if zap is not None:
                zap.close()
            sock.close(linger=0)
            ctx.term()

    # ------------------------------------------------------------------ loops

    async def _recv_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            # A receive (and a send) with messages queued completes without yielding:
            # under a flood this loop would starve every other task (heartbeats, ticks).
            await asyncio.sleep(0)
            frames = await sock.recv_multipart(copy=False)
            identity = frames[0].bytes
            try:
                decoded = decode(frames[1:])
            except DecodeError as exc:
                await _zmq.reply_decode_error(sock, identity, exc, "scheduler")
                continue
            if self.keys is not None and not await self._authorized(frames[0], decoded):
                continue
            try:
                await self._handle(identity, decoded)
            except Exception as exc:  # one bad request must never stop the daemon
                log.exception("scheduler: error handling %s", type(decoded.msg).__name__)
                await _zmq.send_to(sock, identity, error_reply(exc), decoded.request_id)

    async def _authorized(self, first: zmq.Frame, decoded: Decoded) -> bool:
        """Serve an agent's key agent messages only, a client's key client ones only."""
        try:
            peer: str | None = str(first.get("User-Id"))
        except zmq.ZMQError:  # no ZAP verdict on this connection
            peer = None
        refusal = request_refusal(peer, decoded.msg, self._agent_keys)
        if not refusal:
            return True
        held = self._refusals.admit(f"{peer} {refusal}")
        if held is not None:
            more = f" ({held} more like it held back)" if held else ""
            log.warning(
                "scheduler: refused %s from %s: %s%s", peer, _peer_address(first), refusal, more
            )
        assert self._sock is not None
        reply = ErrorReply(ErrorCode.UNAUTHORIZED, refusal)
        await _zmq.send_to(self._sock, first.bytes, reply, decoded.request_id)
        return False

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = self.clock()
            await self._apply(self.state.tick(now))
            stale = [i for i, o in self._outgoing.items() if now - o.sent_at > OUTGOING_TTL_SECONDS]
            for request_id in stale:
                del self._outgoing[request_id]

    async def _handle(self, identity: bytes, decoded: Decoded) -> None:
        assert self._sock is not None
        if self.token is not None and decoded.token != self.token:
            await _zmq.send_to(
                self._sock,
                identity,
                ErrorReply(ErrorCode.UNAUTHORIZED, "missing or wrong cluster token"),
                decoded.request_id,
            )
            return
        now = self.clock()
        msg = decoded.msg
        if isinstance(msg, SandboxReply | ErrorReply | OkReply):
            # Only agents send replies: to requests this scheduler sent them.
            outgoing = self._outgoing.pop((identity, decoded.request_id), None)
            if outgoing is not None:
                await self._apply(self._on_agent_reply(outgoing, msg, now))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            error = ErrorReply(
                ErrorCode.BAD_REQUEST, f"the scheduler does not serve {type(msg).__name__}"
            )
            await _zmq.send_to(self._sock, identity, error, decoded.request_id)
            return
        await self._apply(handler(identity, decoded, now))

    async def _apply(self, actions: list[Action]) -> None:
        assert self._sock is not None
        for action in actions:
            if isinstance(action, Reply):
                to: tuple[bytes, int] = action.to  # type: ignore[assignment]
                await _zmq.send_to(self._sock, to[0], action.msg, to[1])
            elif isinstance(action, SendToAgent):
                identity = self._agent_identity.get(action.agent_id)
                if identity is None:
                    log.warning("no connection to agent %s for %s", action.agent_id, action.msg)
                    if isinstance(action.msg, StopSandbox):  # nobody to wait for
                        await self._apply(self.state.stop_confirmed(action.msg.sandbox_id))
                    continue
                self._next_id += 1
                self._outgoing[(identity, self._next_id)] = Outgoing(action.msg, self.clock())
                await _zmq.send_to(self._sock, identity, action.msg, self._next_id)

    # ------------------------------------------------------------------ handlers

    def _on_agent_reply(self, outgoing: Outgoing, msg: Message, now: float) -> list[Action]:
        if isinstance(outgoing.msg, PlaceSandbox):
            sid = outgoing.msg.sandbox.sandbox_id
            return self.state.placement_done(sid, msg if isinstance(msg, ErrorReply) else None, now)
        if isinstance(msg, ErrorReply):
            log.warning("agent refused %s: %s", type(outgoing.msg).__name__, msg.message)
        if isinstance(outgoing.msg, StopSandbox):
            error = msg if isinstance(msg, ErrorReply) else None
            return self.state.stop_confirmed(outgoing.msg.sandbox_id, error)
        return []

    def _on_create(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, CreateSandbox)
        return self.state.request_create(
            (identity, d.request_id), d.msg.spec, d.msg.timeout_seconds, now, d.msg.sandbox_id
        )

    def _on_get(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, GetSandbox)
        return [Reply((identity, d.request_id), self.state.get(d.msg.sandbox_id))]

    def _on_list(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, ListSandboxes)
        reply = self.state.list_sandboxes(d.msg.tags, d.msg.statuses, d.msg.session_id)
        return [Reply((identity, d.request_id), reply)]

    def _on_stop(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, StopSandbox)
        key = (identity, d.request_id)
        reply, actions = self.state.request_stop(d.msg.sandbox_id, d.msg.reason, now, key)
        return actions if reply is None else [*actions, Reply(key, reply)]

    def _on_wait(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, WaitSandbox)
        return self.state.wait(
            (identity, d.request_id), d.msg.sandbox_id, d.msg.timeout_seconds, now
        )

    def _on_keepalive(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, SessionKeepalive)
        self.state.session_keepalive(d.msg.session_id, d.msg.lease_seconds, now)
        return [Reply((identity, d.request_id), OkReply())]

    def _on_session_close(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, SessionClose)
        stopped, actions = self.state.session_close(d.msg.session_id, "session closed", now)
        return [*actions, Reply((identity, d.request_id), SessionCloseReply(tuple(stopped)))]

    def _on_status(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        return [Reply((identity, d.request_id), self.state.status(now))]

    def _on_ping(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        return [Reply((identity, d.request_id), Pong(server="scheduler"))]

    def _on_register(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, RegisterAgent)
        msg = d.msg
        reply, actions = self.state.register_agent(msg, now)
        if isinstance(reply, ErrorReply):
            log.warning("refused an agent's registration: %s", reply.message)
            return [Reply((identity, d.request_id), reply)]
        old = self._agent_identity.get(msg.agent_id)
        if old is not None and old != identity:
            self._identity_agent.pop(old, None)
        self._agent_identity[msg.agent_id] = identity
        self._identity_agent[identity] = msg.agent_id
        log.info(
            "agent %s registered at %s (%d slots, %s; adopt %d, reap %d)",
            msg.agent_id,
            msg.address,
            msg.slots,
            msg.runtime,
            len(reply.adopt),
            len(reply.reap),
        )
        return [Reply((identity, d.request_id), reply), *actions]

    def _on_heartbeat(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, AgentHeartbeat)
        agent_id = d.msg.agent_id
        known = (
            self.state.is_registered(agent_id) and self._agent_identity.get(agent_id) == identity
        )
        actions = self.state.heartbeat(agent_id, d.msg.running, now) if known else []
        reply = HeartbeatReply(registered=known, dead_agents=self.state.dead_agents(now))
        return [Reply((identity, d.request_id), reply), *actions]

    def _on_spares(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, AgentSpares)
        if self._agent_identity.get(d.msg.agent_id) == identity:  # only from the agent
            self.state.set_spares(d.msg.agent_id, d.msg.spares)
        return [Reply((identity, d.request_id), OkReply())]

    def _on_deregister(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, DeregisterAgent)
        agent_id = d.msg.agent_id
        actions: list[Action] = []
        if self._agent_identity.get(agent_id) == identity:  # only the holder may leave
            actions = self.state.deregister_agent(agent_id, d.msg.instance, now)
            if agent_id not in self.state.agents:
                del self._agent_identity[agent_id]
                self._identity_agent.pop(identity, None)
                log.info("agent %s stopped and left the cluster", agent_id)
        return [Reply((identity, d.request_id), OkReply()), *actions]

    def _on_exited(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, SandboxExited)
        rec = self.state.sandboxes.get(d.msg.sandbox_id)
        if rec is not None and rec.agent_id != self._identity_agent.get(identity):
            log.warning("ignoring exit of %s from an agent that does not own it", rec.sandbox_id)
            return [Reply((identity, d.request_id), OkReply())]
        actions = self.state.sandbox_exited(d.msg.sandbox_id, d.msg.exit_code, d.msg.reason, now)
        return [Reply((identity, d.request_id), OkReply()), *actions]
