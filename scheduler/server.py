"""The scheduler's socket loop: decode, hand to the state machine, carry out its actions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from aviato._server import sockets
from aviato._server.auth import ServerKeys, ZapHandler, log_refused_handshakes, request_refusal
from aviato._server.daemon import warn_if_open
from aviato._server.errors import error_reply
from aviato._server.throttle import LogThrottle, more
from aviato.protocol import (
    AgentHeartbeat,
    AgentLocation,
    AgentSpares,
    AgentVolumes,
    ClusterStatus,
    CreateSandbox,
    DashboardViewReply,
    Decoded,
    DecodeError,
    DeregisterAgent,
    Envelope,
    ErrorCode,
    ErrorReply,
    ExtendLifetime,
    Frame,
    GetDashboardView,
    GetSandbox,
    HeartbeatReply,
    ListSandboxes,
    ListVolumes,
    LocateAgent,
    Message,
    MsgType,
    ObjectSessions,
    ObjectSessionsEnded,
    OkReply,
    PauseSandbox,
    Ping,
    PlaceSandbox,
    Pong,
    PoolFigures,
    RegisterAgent,
    SandboxActivity,
    SandboxExited,
    SandboxListReply,
    SandboxReply,
    SandboxSpec,
    SessionClose,
    SessionCloseReply,
    SessionKeepalive,
    StopSandbox,
    WaitSandbox,
    decode_body,
    encode,
    encode_body,
    info_wire,
    open_envelope,
    to_wire,
)
from scheduler.hotpath import CreateDecoder, peek_success
from scheduler.metrics import SchedulerMetrics
from scheduler.object_sessions import ended_sessions
from scheduler.records import Action, AgentDeclaredDead, Config, Reply, SendToAgent
from scheduler.state import SchedulerState

log = logging.getLogger("aviato.scheduler")

TICK_SECONDS = 0.1
#: A tick later than this past its time means the loop was held up: that much of the
#: agents' silence is the scheduler's own (see SchedulerState.scheduler_blind).
LAG_NOTICE_SECONDS = 0.05
#: Messages read and handled in one go before other tasks (the tick) get a turn.
RECV_BATCH = 256
#: After a wake-up that found only a few messages, wait this long before the next:
#: a thousand agents' heartbeats are then read a few per wake-up instead of one (each
#: wake-up costs about what a message does). Bounds the latency it adds.
COALESCE_SECONDS = 0.004
COALESCE_BELOW = 8
#: Python's cycle collector would walk every row of a big table now and then, holding
#: the loop tens of milliseconds (a create's p99): only its young generations run on
#: their own (see ``tune_gc``), and a full collection this often.
FULL_GC_SECONDS = 600.0


def tune_gc() -> None:
    """For the scheduler process (its tables are long-lived and almost cycle-free)."""
    gc.set_threshold(50_000, 50, 1_000_000)


#: An agent that never answers a PlaceSandbox/StopSandbox: forget the request after this.
OUTGOING_TTL_SECONDS = 600.0


@dataclass(slots=True)
class Outgoing:
    """A request this scheduler sent to an agent, waiting for its reply."""

    msg: Message
    sent_at: float


def _peer_address(frame: zmq.Frame | bytes) -> str:
    if isinstance(frame, bytes):
        return "?"
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return "?"


_MORE = zmq.DONTWAIT | zmq.SNDMORE

#: Replies that only say "done" to the scheduler, whatever their body.
_SUCCESS_REPLIES = frozenset({MsgType.SANDBOX_REPLY, MsgType.OK})


def _plain_heartbeat(env: Envelope) -> Decoded | None:
    """A heartbeat that reports no change (most of them), decoded by hand: cheaper than
    the generic checked decoding, as strict (anything else takes that path)."""
    body = env.body
    if (
        env.type is not MsgType.AGENT_HEARTBEAT
        or type(body) is not dict
        or body.get("full") is not False
        or type(body.get("agent_id")) is not str
    ):
        return None
    for key, value in body.items():
        if key not in ("agent_id", "full") and not (key in ("running", "gone") and value == []):
            return None
    return Decoded(AgentHeartbeat(body["agent_id"], full=False), env.request_id, (), env.token)


def _input_waiting(sock: zmq.asyncio.Socket) -> bool:
    """Whether a message waits unread (pyzmq's asyncio socket re-arms its reader when
    EVENTS is read this way)."""
    events = sock.get(zmq.EVENTS)
    return isinstance(events, int) and bool(events & zmq.POLLIN)


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
        self._agent_keys = keys.agent_public_keys() if keys is not None else {}
        self._refusals = LogThrottle()
        self.clock = clock
        self.address: str | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._sock: zmq.asyncio.Socket | None = None
        #: The same socket, driven synchronously: a batch of messages is read, and every
        #: reply sent, without a future each (DONTWAIT: a ROUTER send never waits).
        self._raw: zmq.Socket[bytes] | None = None
        #: Prometheus metrics (scheduler/metrics.py), when served (--metrics).
        self.metrics: SchedulerMetrics | None = None
        #: Each session's functions as its client last reported them (the dashboard's
        #: Sessions page): bounded per session, gone with the session.
        self.session_pools: dict[str, tuple[PoolFigures, ...]] = {}
        #: Creates asked and placements sent so far (a remote dashboard's rate chart).
        self.creates_total = 0
        self.placements_total = 0
        self._agent_identity: dict[str, bytes] = {}
        self._identity_agent: dict[bytes, str] = {}
        self._outgoing: dict[tuple[bytes, int], Outgoing] = {}
        self._next_id = 0
        #: CreateSandbox decoded once per distinct spec (scheduler/hotpath.py).
        self._creates = CreateDecoder()
        #: id(spec) -> (spec, its wire form), see _encode.
        self._spec_wires: dict[int, tuple[SandboxSpec, dict[str, Any]]] = {}
        #: Listings being streamed a page at a time (see ListSandboxes.stream).
        self._streams: set[asyncio.Task[None]] = set()
        #: Messages read as bytes (for small ones, a third cheaper than zmq.Frame), but
        #: as frames under CURVE: their User-Id says which key sent them.
        self._copy = keys is None
        #: When the socket was last found with nothing waiting (every heartbeat read).
        self._drained_at = clock()
        self._handlers: dict[type[Message], Callable[[bytes, Decoded, float], list[Action]]] = {
            CreateSandbox: self._on_create,
            GetSandbox: self._on_get,
            ListSandboxes: self._on_list,
            StopSandbox: self._on_stop,
            WaitSandbox: self._on_wait,
            SessionKeepalive: self._on_keepalive,
            GetDashboardView: self._on_dashboard_view,
            SessionClose: self._on_session_close,
            ClusterStatus: self._on_status,
            RegisterAgent: self._on_register,
            DeregisterAgent: self._on_deregister,
            AgentHeartbeat: self._on_heartbeat,
            AgentSpares: self._on_spares,
            AgentVolumes: self._on_volumes,
            ListVolumes: self._on_list_volumes,
            SandboxExited: self._on_exited,
            Ping: self._on_ping,
            ExtendLifetime: self._on_extend,
            PauseSandbox: self._on_pause,
            SandboxActivity: self._on_activity,
            ObjectSessions: self._on_object_sessions,
            LocateAgent: self._on_locate_agent,
        }

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        ctx = zmq.asyncio.Context()
        zap = ZapHandler(ctx, self.keys, "scheduler") if self.keys is not None else None
        sock, self.address = sockets.router(ctx, self.bind, self.keys)
        self._sock = sock
        self._raw = zmq.Socket.shadow(sock.underlying)
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
                for task in [*tasks, *self._streams]:
                    task.cancel()
        finally:
            if zap is not None:
                zap.close()
            sock.close(linger=0)
            ctx.term()

    # ------------------------------------------------------------------ loops

    async def _recv_loop(self, sock: zmq.asyncio.Socket) -> None:
        raw = self._raw
        assert raw is not None
        handled = 0
        while True:
            # Read what is waiting without waiting, up to a batch; then let the other
            # tasks (the tick) run. Only with nothing waiting, wait (a future) for more.
            if handled == 0:
                await self._serve_one(await sock.recv_multipart(copy=self._copy))
                handled = 1
            else:
                handled = 0
            while handled < RECV_BATCH:
                try:
                    frames = raw.recv_multipart(zmq.NOBLOCK, copy=self._copy)
                except zmq.Again:
                    self._drained_at = self.clock()  # every waiting heartbeat read
                    break
                handled += 1
                await self._serve_one(frames)
            await asyncio.sleep(COALESCE_SECONDS if 0 < handled < COALESCE_BELOW else 0)

    async def _serve_one(self, frames: list[zmq.Frame] | list[bytes]) -> None:
        first = frames[0]
        identity = first if isinstance(first, bytes) else first.bytes
        if len(frames) == 2 and identity in self._identity_agent:
            peeked = peek_success(frames[1])
            if peeked is not None and self._agent_success(identity, *peeked):
                return
        try:
            env = open_envelope(frames[1:])
            if env.type in _SUCCESS_REPLIES and self._agent_success(
                identity, env.request_id, env.token
            ):
                return
            decoded = (
                _plain_heartbeat(env)
                or self._creates.decode(env, frames[1:])
                or decode_body(env, frames[1:])
            )
        except DecodeError as exc:
            assert self._sock is not None
            if self.metrics is not None:
                self.metrics.on_error(exc.code)
            await sockets.reply_decode_error(self._sock, identity, exc, "scheduler")
            return
        if self.keys is not None and not await self._authorized(first, decoded):
            return
        try:
            self._handle(identity, decoded)
        except Exception as exc:  # one bad request must never stop the daemon
            log.exception("scheduler: error handling %s", type(decoded.msg).__name__)
            self._send(identity, error_reply(exc), decoded.request_id)

    def _agent_success(self, identity: bytes, request_id: int, token: str | None) -> bool:
        """An agent's success reply to a request of ours, handled without checking its
        body (which nothing here reads): the bulk of what agents send in a burst of
        creates. False: take the usual path."""
        if self.token is not None and token != self.token:
            return False
        outgoing = self._outgoing.pop((identity, request_id), None)
        if outgoing is None:
            return False
        # Only the agent the request went to can answer it: its identity is its connection.
        self._apply(self._on_agent_reply(outgoing, OkReply(), self.clock()))
        return True

    def _encode(self, msg: Message, request_id: int) -> list[Frame]:
        """``encode``, with each spec converted once (the state shares one object among
        equal specs): most of what the scheduler sends is sandbox rows."""
        body: dict[str, Any]
        if isinstance(msg, PlaceSandbox | SandboxReply):
            body = {"sandbox": info_wire(msg.sandbox, self._spec_wire(msg.sandbox.spec))}
        elif isinstance(msg, SandboxListReply):
            rows = [info_wire(i, self._spec_wire(i.spec)) for i in msg.sandboxes]
            body = {"sandboxes": rows, "next_cursor": msg.next_cursor}
        else:
            return encode(msg, request_id)
        return encode_body(msg.TYPE, request_id, body)

    def _spec_wire(self, spec: SandboxSpec) -> dict[str, Any]:
        found = self._spec_wires.get(id(spec))
        if found is not None and found[0] is spec:
            return found[1]
        if len(self._spec_wires) >= 4096:
            self._spec_wires.clear()  # bounded; the entry holds the spec, so ids stay true
        wire: dict[str, Any] = to_wire(spec)
        self._spec_wires[id(spec)] = (spec, wire)
        return wire

    def _send(self, identity: bytes, msg: Message, request_id: int) -> bool:
        """Send on the ROUTER, never waiting; a peer gone (or not reading) is logged."""
        assert self._raw is not None
        if self.metrics is not None:
            self.metrics.on_error_reply(msg)
        try:
            frames = self._encode(msg, request_id)
            # send_multipart's checks of each part cost a microsecond a message.
            self._raw.send(identity, _MORE)
            for frame in frames[:-1]:
                self._raw.send(frame, _MORE)
            self._raw.send(frames[-1], zmq.DONTWAIT)
        except zmq.ZMQError as exc:
            log.debug("dropping %s to a gone or unread peer: %s", type(msg).__name__, exc)
            return False
        return True

    async def _authorized(self, first: zmq.Frame | bytes, decoded: Decoded) -> bool:
        """Serve an agent's key agent messages only, a client's key client ones only."""
        peer: str | None = None  # bytes (not read as a frame): not authenticated
        if isinstance(first, zmq.Frame):
            with contextlib.suppress(zmq.ZMQError):  # no ZAP verdict on this connection
                peer = str(first.get("User-Id"))
        refusal = request_refusal(peer, decoded.msg, self._agent_keys)
        if not refusal:
            return True
        held = self._refusals.admit(f"{peer} {refusal}")
        if held is not None:
            log.warning(
                "scheduler: refused %s from %s: %s%s",
                peer,
                _peer_address(first),
                refusal,
                more(held),
            )
        assert self._sock is not None
        reply = ErrorReply(ErrorCode.UNAUTHORIZED, refusal)
        if self.metrics is not None:
            self.metrics.on_error_reply(reply)
        identity = first if isinstance(first, bytes) else first.bytes
        await sockets.send_to(self._sock, identity, reply, decoded.request_id)
        return False

    async def _tick_loop(self) -> None:
        last_full_gc = time.monotonic()
        while True:
            if time.monotonic() - last_full_gc > FULL_GC_SECONDS:
                gc.collect()  # its pause is measured below as lag, like any other
                last_full_gc = time.monotonic()
            before = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)
            lag = time.monotonic() - before - TICK_SECONDS
            now = self.clock()
            if lag > LAG_NOTICE_SECONDS:
                # The loop was held up (a long handler, the process stopped): whatever
                # arrived meanwhile is still unread. Not the agents' silence.
                self.state.scheduler_blind(now - lag, now)
                if lag > 1.0:
                    log.warning("scheduler: the event loop stalled for %.1f s", lag)
            assert self._sock is not None
            if _input_waiting(self._sock):
                # Messages (heartbeats among them) wait unread since the socket was last
                # empty: the scheduler is behind, and judges nobody for that time.
                self.state.scheduler_blind(self._drained_at, now)
            self._apply(self.state.tick(now))
            stale = [i for i, o in self._outgoing.items() if now - o.sent_at > OUTGOING_TTL_SECONDS]
            for request_id in stale:
                del self._outgoing[request_id]

    def _handle(self, identity: bytes, decoded: Decoded) -> None:
        if self.token is not None and decoded.token != self.token:
            self._send(
                identity,
                ErrorReply(ErrorCode.UNAUTHORIZED, "missing or wrong cluster token"),
                decoded.request_id,
            )
            return
        now = self.clock()
        msg = decoded.msg
        if self.metrics is not None:
            self.metrics.on_request((identity, decoded.request_id), msg, now)
        if isinstance(msg, SandboxReply | ErrorReply | OkReply):
            # Only agents send replies: to requests this scheduler sent them.
            outgoing = self._outgoing.pop((identity, decoded.request_id), None)
            if outgoing is not None:
                self._apply(self._on_agent_reply(outgoing, msg, now))
            return
        handler = self._handlers.get(type(msg))
        if handler is None:
            error = ErrorReply(
                ErrorCode.BAD_REQUEST, f"the scheduler does not serve {type(msg).__name__}"
            )
            self._send(identity, error, decoded.request_id)
            return
        self._apply(handler(identity, decoded, now))

    def _apply(self, actions: list[Action]) -> None:
        if self.metrics is not None:
            self.metrics.on_actions(actions, self.clock())
        for action in actions:
            if isinstance(action, Reply):
                to: tuple[bytes, int] = action.to  # type: ignore[assignment]
                self._send(to[0], action.msg, to[1])
            elif isinstance(action, AgentDeclaredDead):
                log.warning(
                    "agent %s declared dead: %s (last heartbeat %.1f s ago, %.1f s of it "
                    "the scheduler's own stall or backlog; %d sandbox(es) failed)",
                    action.agent_id,
                    action.reason,
                    action.seconds_since_heartbeat,
                    action.blind_seconds,
                    action.sandboxes,
                )
            elif isinstance(action, SendToAgent):
                identity = self._agent_identity.get(action.agent_id)
                if identity is None:
                    log.warning("no connection to agent %s for %s", action.agent_id, action.msg)
                    if isinstance(action.msg, StopSandbox):  # nobody to wait for
                        self._apply(self.state.stop_confirmed(action.msg.sandbox_id))
                    elif isinstance(action.msg, PauseSandbox):
                        why = ErrorReply(ErrorCode.UNAVAILABLE, "no connection to its agent")
                        sid = action.msg.sandbox_id
                        self._apply(self.state.pause_done(sid, why, self.clock()))
                    continue
                if isinstance(action.msg, PlaceSandbox):
                    self.placements_total += 1
                    placed = action.msg.sandbox
                    log.info(
                        "placing sandbox %s (session %s, %s) on agent %s",
                        placed.sandbox_id,
                        placed.spec.session_id or "-",
                        placed.spec.image,
                        action.agent_id,
                    )
                self._next_id += 1
                self._outgoing[(identity, self._next_id)] = Outgoing(action.msg, self.clock())
                self._send(identity, action.msg, self._next_id)

    # ------------------------------------------------------------------ handlers

    def _on_agent_reply(self, outgoing: Outgoing, msg: Message, now: float) -> list[Action]:
        if isinstance(outgoing.msg, PlaceSandbox):
            sid = outgoing.msg.sandbox.sandbox_id
            if self.metrics is not None:
                failed = isinstance(msg, ErrorReply)
                self.metrics.on_placement_answer(now - outgoing.sent_at, failed)
            return self.state.placement_done(sid, msg if isinstance(msg, ErrorReply) else None, now)
        if isinstance(msg, ErrorReply):
            log.warning("agent refused %s: %s", type(outgoing.msg).__name__, msg.message)
        if isinstance(outgoing.msg, StopSandbox):
            error = msg if isinstance(msg, ErrorReply) else None
            return self.state.stop_confirmed(outgoing.msg.sandbox_id, error)
        if isinstance(outgoing.msg, PauseSandbox):
            error = msg if isinstance(msg, ErrorReply) else None
            return self.state.pause_done(outgoing.msg.sandbox_id, error, now)
        return []

    def _on_create(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, CreateSandbox)
        self.creates_total += 1
        actions = self.state.request_create(
            (identity, d.request_id), d.msg.spec, d.msg.timeout_seconds, now, d.msg.sandbox_id
        )
        for action in actions:
            if isinstance(action, Reply) and isinstance(action.msg, ErrorReply):
                log.info("create %s refused: %s", d.msg.sandbox_id or "(no id)", action.msg.message)
        return actions

    def _on_get(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, GetSandbox)
        return [Reply((identity, d.request_id), self.state.get(d.msg.sandbox_id))]

    def _on_list(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, ListSandboxes)
        msg = d.msg
        if msg.stream:
            task = asyncio.get_running_loop().create_task(self._stream_list(identity, d))
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
            return []
        reply = self.state.list_sandboxes(
            msg.tags,
            msg.statuses,
            msg.session_id,
            agent_id=msg.agent_id,
            cursor=msg.cursor,
            limit=msg.limit,
        )
        return [Reply((identity, d.request_id), reply)]

    async def _stream_list(self, identity: bytes, d: Decoded) -> None:
        """Every page of a listing, each sent as soon as it is made; other messages are
        served between pages (a page holds the loop a few milliseconds)."""
        msg = d.msg
        assert isinstance(msg, ListSandboxes)
        cursor = msg.cursor
        while True:
            reply = self.state.list_sandboxes(
                msg.tags,
                msg.statuses,
                msg.session_id,
                agent_id=msg.agent_id,
                cursor=cursor,
                limit=msg.limit,
            )
            if not self._send(identity, reply, d.request_id) or not reply.next_cursor:
                return
            cursor = reply.next_cursor
            await asyncio.sleep(0)

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
        if d.msg.pools or d.msg.session_id in self.session_pools:
            self.session_pools[d.msg.session_id] = pool_figures(d.msg.pools)
        if len(self.session_pools) > len(self.state.sessions) + 64:  # ended sessions' go
            for gone in set(self.session_pools) - set(self.state.sessions):
                del self.session_pools[gone]
        return [Reply((identity, d.request_id), OkReply())]

    def _on_session_close(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, SessionClose)
        self.session_pools.pop(d.msg.session_id, None)
        stopped, actions = self.state.session_close(d.msg.session_id, "session closed", now)
        return [*actions, Reply((identity, d.request_id), SessionCloseReply(tuple(stopped)))]

    def _on_dashboard_view(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        """The dashboard's view for one served elsewhere (``aviato dashboard``): the
        same bounded rows as our own dashboard's, as JSON."""
        assert isinstance(d.msg, GetDashboardView)
        from scheduler.dashboard import snapshot  # the web server's package: not at start

        rec = self.state.sandboxes.get(d.msg.sandbox_id) if d.msg.sandbox_id else None
        view = {
            "cluster": snapshot.cluster(self.state, now, snapshot.Rates(), self.session_pools),
            "sandboxes": snapshot.sandboxes(self.state, now),
            "sandbox": snapshot.sandbox_row(rec, now) if rec is not None else None,
            "totals": [self.creates_total, self.placements_total],
        }
        body = json.dumps(view, separators=(",", ":")).encode()
        assert self._raw is not None
        frames = encode(DashboardViewReply(), d.request_id, (body,))
        with contextlib.suppress(zmq.ZMQError):  # a gone peer: as _send
            self._raw.send_multipart([identity, *frames], zmq.DONTWAIT)
        return []

    def _on_status(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, ClusterStatus)
        reply = self.state.status(now, d.msg.cursor, d.msg.limit)
        return [Reply((identity, d.request_id), reply)]

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
        msg = d.msg
        actions = (
            self.state.heartbeat(agent_id, msg.running, now, full=msg.full, gone=msg.gone)
            if known
            else []
        )
        reply = HeartbeatReply(
            registered=known,
            dead_agents=self.state.dead_agents(now),
            heartbeat_interval=self.state.heartbeat_interval(),
        )
        return [Reply((identity, d.request_id), reply), *actions]

    def _on_spares(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, AgentSpares)
        if self._agent_identity.get(d.msg.agent_id) == identity:  # only from the agent
            self.state.set_spares(d.msg.agent_id, d.msg.spares, d.msg.shapes)
        return [Reply((identity, d.request_id), OkReply())]

    def _on_volumes(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, AgentVolumes)
        if self._agent_identity.get(d.msg.agent_id) == identity:  # only from the agent
            self.state.set_volumes(d.msg.agent_id, d.msg.names)
        return [Reply((identity, d.request_id), OkReply())]

    def _on_list_volumes(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        return [Reply((identity, d.request_id), self.state.list_volumes())]

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

    # ------------------------------------------------------------------ lifecycle

    def _on_extend(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, ExtendLifetime)
        reply = self.state.extend_lifetime(d.msg.sandbox_id, d.msg.seconds, now)
        return [Reply((identity, d.request_id), reply)]

    def _on_pause(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, PauseSandbox)
        key = (identity, d.request_id)
        return self.state.request_pause(key, d.msg.sandbox_id, d.msg.pause, now)

    def _on_activity(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, SandboxActivity)
        if self._agent_identity.get(d.msg.agent_id) == identity:  # only from the agent
            self.state.activity(d.msg.agent_id, d.msg.sandbox_ids, now)
        return [Reply((identity, d.request_id), OkReply())]

    def _on_object_sessions(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, ObjectSessions)
        ended: tuple[str, ...] = ()
        if self._agent_identity.get(d.msg.agent_id) == identity:  # only from the agent
            ended = ended_sessions(self.state, d.msg.session_ids, now)
        return [Reply((identity, d.request_id), ObjectSessionsEnded(ended))]

    def _on_locate_agent(self, identity: bytes, d: Decoded, now: float) -> list[Action]:
        assert isinstance(d.msg, LocateAgent)
        reply = AgentLocation(d.msg.wanted)
        wanted = self.state.agents.get(d.msg.wanted)
        asker = self._agent_identity.get(d.msg.agent_id) == identity  # only agents ask
        if asker and wanted is not None and wanted.alive:
            reply = AgentLocation(wanted.agent_id, wanted.address, wanted.public_key)
        return [Reply((identity, d.request_id), reply)]


#: Functions kept per session, and characters per name (a client's report is bounded).
MAX_POOLS = 32
MAX_NAME = 120


def pool_figures(pools: tuple[PoolFigures, ...]) -> tuple[PoolFigures, ...]:
    """A session's report as kept: at most ``MAX_POOLS``, names cut, figures that are
    not finite and non-negative made 0 (it is shown, never trusted)."""

    def fine(x: float) -> float:
        return float(x) if math.isfinite(x) and x >= 0 else 0.0

    return tuple(
        dataclasses.replace(
            p,
            name=p.name[:MAX_NAME],
            calls_per_second=fine(p.calls_per_second),
            run_p50_ms=fine(p.run_p50_ms),
            run_p99_ms=fine(p.run_p99_ms),
            round_trip_p50_ms=fine(p.round_trip_p50_ms),
            round_trip_p99_ms=fine(p.round_trip_p99_ms),
        )
        for p in pools[:MAX_POOLS]
    )
