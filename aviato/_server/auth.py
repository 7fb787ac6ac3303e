"""Who may say what to a daemon: the ZAP handler of CURVE server sockets, the server
keys it admits by, and the role of each message (the key files: aviato/_auth.py).

libzmq asks a ZAP handler (:class:`ZapHandler`) about every CURVE handshake; it answers
with a User-Id ``"ROLE:NAME"`` that rides on every message of that connection, so the
scheduler can refuse a client's request from an agent's key and the reverse
(:func:`request_refusal`). The decisions are pure functions, tested without sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from aviato._auth import CurveKeys, Role, own_keypair, read_key, scheduler_public_key
from aviato._server.throttle import LogThrottle, more
from aviato.exceptions import UnauthorizedError
from aviato.protocol import (
    AgentHeartbeat,
    AgentSpares,
    ClusterStatus,
    CreateSandbox,
    DeregisterAgent,
    ErrorReply,
    Exec,
    ExtendLifetime,
    GetDashboardView,
    GetLogs,
    GetObject,
    GetSandbox,
    ListSandboxes,
    ListSnapshots,
    LocateAgent,
    Message,
    ObjectSessions,
    OkReply,
    PauseSandbox,
    Ping,
    ReadFile,
    RegisterAgent,
    RemoveSnapshot,
    RunCalls,
    SandboxActivity,
    SandboxExited,
    SandboxReply,
    SessionClose,
    SessionKeepalive,
    SnapshotSandbox,
    StopSandbox,
    WaitSandbox,
    WriteFile,
)

__all__ = [
    "AGENT_MESSAGES",
    "AGENT_PEER_MESSAGES",
    "CLIENT_MESSAGES",
    "ServerKeys",
    "ZapHandler",
    "ZapVerdict",
    "agent_keys",
    "data_plane_refusal",
    "load_peers",
    "log_refused_handshakes",
    "parse_user_id",
    "request_refusal",
    "role_allows",
    "scheduler_keys",
    "user_id",
    "zap_verdict",
]

log = logging.getLogger("aviato.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"aviato"


#: What an agent's key may send the scheduler: its own traffic and replies to requests
#: the scheduler sent it (PlaceSandbox, StopSandbox).
AGENT_MESSAGES: frozenset[type[Message]] = frozenset(
    {
        RegisterAgent,
        DeregisterAgent,
        AgentHeartbeat,
        AgentSpares,
        SandboxExited,
        SandboxActivity,
        ObjectSessions,
        LocateAgent,
        SandboxReply,
        OkReply,
        ErrorReply,
        Ping,
    }
)
#: What a client's key may send the scheduler (control) and an agent (data plane).
CLIENT_MESSAGES: frozenset[type[Message]] = frozenset(
    {
        CreateSandbox,
        GetSandbox,
        ListSandboxes,
        StopSandbox,
        WaitSandbox,
        SessionKeepalive,
        SessionClose,
        ClusterStatus,
        GetDashboardView,
        Exec,
        WriteFile,
        ReadFile,
        GetLogs,
        RunCalls,
        Ping,
        ExtendLifetime,
        PauseSandbox,
        SnapshotSandbox,
        ListSnapshots,
        RemoveSnapshot,
    }
)


#: What an agent's key may ask another agent's data plane: an object's bytes (a fetch
#: agent-to-agent, agent/object_fetch.py). Clients' keys may ask it anything.
AGENT_PEER_MESSAGES: frozenset[type[Message]] = frozenset({GetObject})


def role_allows(role: Role | None, msg_type: type[Message]) -> bool:
    if role is Role.AGENT:
        return msg_type in AGENT_MESSAGES
    if role is Role.CLIENT:
        return msg_type in CLIENT_MESSAGES
    return False


def user_id(role: Role, name: str) -> str:
    return f"{role.value}:{name}"


def parse_user_id(value: str | None) -> tuple[Role, str] | None:
    """``"client:NAME"`` -> (Role.CLIENT, NAME); None for anything else."""
    role, sep, name = (value or "").partition(":")
    if not sep or role not in {r.value for r in Role}:
        return None
    return Role(role), name


def request_refusal(peer: str | None, msg: Message, agent_keys: Mapping[str, str]) -> str:
    """Why the scheduler refuses ``msg`` from the connection whose ZAP User-Id is
    ``peer`` ("" to serve it). ``agent_keys``: agent key name -> z85 public key."""
    parsed = parse_user_id(peer)
    if parsed is None:
        return "the connection is not authenticated with a cluster key"
    role, name = parsed
    kind = type(msg).__name__
    if not role_allows(role, type(msg)):
        if role is Role.AGENT:
            return f"agent key {name!r} cannot act as a client ({kind})"
        return f"client key {name!r} cannot send agent messages ({kind})"
    if isinstance(msg, RegisterAgent) and msg.public_key != agent_keys.get(name):
        # Clients trust the key the scheduler hands out: it must be the one that
        # authenticated this connection.
        return f"agent key {name!r} announced a data-plane key that is not its own"
    return ""


def data_plane_refusal(peer: str | None, msg: Message) -> str:
    """Why an agent's data plane refuses ``msg`` from the connection whose ZAP User-Id
    is ``peer`` ("" to serve it): another agent's key fetches objects, nothing else."""
    parsed = parse_user_id(peer)
    if parsed is None or parsed[0] is not Role.AGENT or type(msg) in AGENT_PEER_MESSAGES:
        return ""
    return (
        f"agent key {parsed[1]!r} may only fetch objects from another agent, "
        f"not send {type(msg).__name__}"
    )


@dataclass(frozen=True, slots=True)
class ZapVerdict:
    ok: bool
    user_id: str = ""
    reason: str = ""


def zap_verdict(
    peers: Mapping[bytes, tuple[Role, str]],
    accept: frozenset[Role],
    mechanism: bytes,
    credentials: Sequence[bytes],
) -> ZapVerdict:
    """Admit a CURVE handshake whose client key is a known peer of an accepted role."""
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return ZapVerdict(False, reason=f"not a CURVE handshake ({mechanism!r})")
    public = z85.encode(credentials[0])
    peer = peers.get(public)
    if peer is None:
        return ZapVerdict(False, reason=f"unknown key {public.decode()}")
    role, name = peer
    if role not in accept:
        return ZapVerdict(False, reason=f"{role.value} key {name!r} is not admitted here")
    return ZapVerdict(True, user_id=user_id(role, name), reason="OK")


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """A CURVE server socket's keypair, and whom its ZAP handler admits."""

    public: bytes
    secret: bytes
    peers: Mapping[bytes, tuple[Role, str]] = field(default_factory=dict)
    accept: frozenset[Role] = frozenset()
    directory: str = ""

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = ZAP_DOMAIN

    def agent_public_keys(self) -> dict[str, str]:
        """Agent key name -> z85 public key."""
        peers = self.peers.items()
        return {name: key.decode() for key, (role, name) in peers if role is Role.AGENT}


def load_peers(directory: str, roles: Sequence[Role]) -> dict[bytes, tuple[Role, str]]:
    """Every public key of these roles in ``directory``: z85 key -> (role, name)."""
    peers: dict[bytes, tuple[Role, str]] = {}
    for role in roles:
        for path in sorted((Path(directory) / role.folder).glob("*.key")):
            name = path.name.removesuffix(".key")
            public, _ = read_key(path, f"a {role.value} key")
            if public in peers:
                raise UnauthorizedError(f"{path}: the same key is also {peers[public]}")
            peers[public] = (role, name)
    return peers


def scheduler_keys(directory: str) -> ServerKeys:
    public, secret = read_key(
        Path(directory) / "scheduler.key_secret", "the scheduler's secret key"
    )
    if secret is None:
        raise UnauthorizedError(f"{directory}/scheduler.key_secret holds no secret key")
    peers = load_peers(directory, (Role.AGENT, Role.CLIENT))
    return ServerKeys(public, secret, peers, frozenset(Role), directory)


def agent_keys(directory: str, name: str | None) -> tuple[ServerKeys, CurveKeys]:
    """An agent's data-plane server keys (clients; agents, which may only fetch objects:
    ``data_plane_refusal``) and its scheduler-link keys (which also dial other agents)."""
    name, public, secret = own_keypair(directory, Role.AGENT, name)
    peers = load_peers(directory, (Role.AGENT, Role.CLIENT))
    server = ServerKeys(public, secret, peers, frozenset(Role), directory)
    return server, CurveKeys(public, secret, scheduler_public_key(directory))


class ZapHandler:
    """Answers libzmq's ZAP requests for the CURVE server sockets of one context, and
    logs each refusal with the peer's address. Create it before binding them: a
    handshake that finds no handler is let through."""

    def __init__(self, ctx: zmq.asyncio.Context, keys: ServerKeys, who: str) -> None:
        self.keys = keys
        self.who = who
        self._throttle = LogThrottle()
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)

    async def run(self) -> None:
        while True:
            request = await self._sock.recv_multipart()
            await self._sock.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad", b"", b""]
        _version, request_id, _domain, address, _identity, mechanism, *credentials = request
        verdict = zap_verdict(self.keys.peers, self.keys.accept, mechanism, credentials)
        if not verdict.ok:
            peer = address.decode(errors="replace")
            held = self._throttle.admit(f"{peer} {verdict.reason}")
            if held is not None:
                log.warning(
                    "%s: refused a connection from %s: %s%s",
                    self.who,
                    peer,
                    verdict.reason,
                    more(held),
                )
            return [b"1.0", request_id, b"400", verdict.reason.encode()[:255], b"", b""]
        log.debug("%s: admitted %s from %s", self.who, verdict.user_id, address)
        return [b"1.0", request_id, b"200", b"OK", verdict.user_id.encode(), b""]

    def close(self) -> None:
        self._sock.close(linger=0)


async def log_refused_handshakes(sock: zmq.asyncio.Socket, who: str) -> None:
    """Log the handshakes a CURVE server fails before ZAP is asked (a peer with no keys);
    ZAP refusals are logged by :class:`ZapHandler`, with the peer's address."""
    throttle = LogThrottle()
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    try:
        while True:
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                # A peer that hangs up mid-handshake: often one that saw our mechanism
                # differs from its own and left before we read its greeting.
                why = "it ended during the handshake (a peer without CURVE keys?)"
            elif event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                why = "the peer has no CURVE keys (set AVIATO_KEYS on it)"
            else:
                why = f"ZMTP error {event['value']:#x} (wrong server key?)"
            held = throttle.admit(why)
            if held is not None:
                endpoint = event["endpoint"].decode(errors="replace")
                log.warning("%s: refused a connection on %s: %s%s", who, endpoint, why, more(held))
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)
