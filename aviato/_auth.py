"""CURVE authentication: a cluster's key files, and who may say what.

``aviato keys DIR`` writes (each ``NAME.key`` public, ``NAME.key_secret`` mode 0600)::

    DIR/scheduler.key   DIR/scheduler.key_secret
    DIR/agents/agent-1.key   DIR/agents/agent-1.key_secret   ...
    DIR/clients/client-1.key DIR/clients/client-1.key_secret ...

Every host gets every public file and the secret of its own key only. The scheduler
serves CURVE with its keypair and admits the keys in ``agents/`` and ``clients/``;
each agent serves its data plane with its own keypair and admits client keys only;
clients learn an agent's public key from the scheduler (``SandboxInfo``).

libzmq asks a ZAP handler (:class:`ZapHandler`) about every CURVE handshake; it answers
with a User-Id ``"ROLE:NAME"`` that rides on every message of that connection, so the
scheduler can refuse a client's request from an agent's key and the reverse
(:func:`request_refusal`). The decisions are pure functions, tested without sockets.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.certs import create_certificates, load_certificate
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from aviato.exceptions import UnauthorizedError
from aviato.protocol import (
    AgentHeartbeat,
    AgentSpares,
    ClusterStatus,
    CreateSandbox,
    DeregisterAgent,
    ErrorReply,
    Exec,
    GetLogs,
    GetSandbox,
    ListSandboxes,
    Message,
    OkReply,
    Ping,
    ReadFile,
    RegisterAgent,
    RunCalls,
    SandboxExited,
    SandboxReply,
    SessionClose,
    SessionKeepalive,
    StopSandbox,
    WaitSandbox,
    WriteFile,
)

log = logging.getLogger("aviato.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"aviato"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Role(enum.StrEnum):
    AGENT = "agent"
    CLIENT = "client"

    @property
    def folder(self) -> str:
        return f"{self.value}s"


#: What an agent's key may send the scheduler: its own traffic and replies to requests
#: the scheduler sent it (PlaceSandbox, StopSandbox).
AGENT_MESSAGES: frozenset[type[Message]] = frozenset(
    {
        RegisterAgent,
        DeregisterAgent,
        AgentHeartbeat,
        AgentSpares,
        SandboxExited,
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
        Exec,
        WriteFile,
        ReadFile,
        GetLogs,
        RunCalls,
        Ping,
    }
)


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


def handshake_refusal(event: int, value: int, address: str, keyed: bool) -> str:
    """What a client tells its user when a handshake with ``address`` fails ("" when
    the event says nothing about credentials)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"{address} refused this client's key (ZAP status {value}): it is not one of "
            "the cluster's client keys; check AVIATO_KEYS and AVIATO_CLIENT_KEY"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # Seen again and again (the caller counts): a CURVE server that cannot read our
        # hello, sealed for a server key that is not its own; or, to a client without
        # keys, one that hung up on its NULL greeting before it could read that the
        # server wants CURVE (a race: each retry is another draw, for seconds).
        if not keyed:
            return (
                f"{address} ends every handshake without a word: it requires CURVE keys "
                "(set AVIATO_KEYS, or SandboxDefaults(keys=...), to the cluster's key "
                "directory), or it is not an aviato daemon"
            )
        return (
            f"{address} does not accept this client's CURVE handshake: the scheduler.key "
            "in AVIATO_KEYS is not its public key (keys made by another `aviato keys` "
            "run?); use the cluster's key directory"
        )
    if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return ""
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if keyed:
            return f"{address} does not use CURVE keys but this client does: unset AVIATO_KEYS"
        return (
            f"{address} requires CURVE keys: set AVIATO_KEYS (or SandboxDefaults(keys=...)) "
            "to the cluster's key directory"
        )
    if keyed:
        return (
            f"CURVE handshake with {address} failed (ZMTP error {value:#x}): is the "
            "scheduler.key in AVIATO_KEYS the scheduler's current public key?"
        )
    return ""


# --------------------------------------------------------------------------- key files


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A connecting socket's keys: its keypair and the server's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


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

    def public_keys(self, role: Role) -> dict[str, str]:
        """Key name -> z85 public key, for one role."""
        return {name: key.decode() for key, (r, name) in self.peers.items() if r is role}


def create_cluster_keys(
    directory: str | os.PathLike[str], agents: int = 1, clients: int = 1, force: bool = False
) -> list[Path]:
    """Write a cluster's keys (the layout in this module's docstring); returns the files.
    Refuses to overwrite keys unless ``force``."""
    if agents < 1 or clients < 1:
        raise ValueError("a cluster needs at least one agent key and one client key")
    root = Path(directory)
    plan = [(root, "scheduler")]
    plan += [(root / Role.AGENT.folder, f"agent-{i}") for i in range(1, agents + 1)]
    plan += [(root / Role.CLIENT.folder, f"client-{i}") for i in range(1, clients + 1)]
    # Only our own layout: DIR may be a folder that holds other things too.
    patterns = ("scheduler.key*", f"{Role.AGENT.folder}/*.key*", f"{Role.CLIENT.folder}/*.key*")
    existing = sorted(str(p) for pattern in patterns for p in root.glob(pattern))
    if existing and not force:
        raise FileExistsError(
            f"{root} already holds keys ({len(existing)} files, e.g. {existing[0]}); "
            "pass --force to replace them all"
        )
    for stale in existing:
        os.unlink(stale)
    written: list[Path] = []
    created = [f for f in dict.fromkeys(f for f, _ in plan) if not f.exists()]
    old_umask = os.umask(0o077)  # no secret is ever readable by others, not even briefly
    try:
        for folder, name in plan:
            folder.mkdir(parents=True, exist_ok=True)
            public, secret = create_certificates(folder, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            written += [Path(public), Path(secret)]
        for folder in created:
            os.chmod(folder, 0o755)  # public files are meant to be read
    finally:
        os.umask(old_umask)
    return written


@functools.lru_cache(maxsize=256)
def _read_key_file(path: str) -> tuple[bytes, bytes | None]:
    return load_certificate(path)


def _read(path: Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        return _read_key_file(str(path))
    except (OSError, ValueError) as exc:
        raise UnauthorizedError(f"cannot read {what} from {path}: {exc}") from None


@functools.lru_cache(maxsize=64)
def own_keypair(directory: str, role: Role, name: str | None) -> tuple[str, bytes, bytes]:
    """(name, public, secret) of this host's key of ``role``: ``name``, else the only
    key of that role whose secret is in ``directory``."""
    folder = Path(directory) / role.folder
    if name is None:
        found = secret_key_names(directory, role)
        if len(found) != 1:
            flag = "--agent-key (AVIATO_AGENT_KEY)" if role is Role.AGENT else "AVIATO_CLIENT_KEY"
            why = (
                f"{len(found)} secret {role.value} keys ({', '.join(found)})"
                if found
                else (f"no secret {role.value} key")
            )
            raise UnauthorizedError(
                f"{folder} holds {why}: name this host's key with {flag}, or keep only "
                f"its own NAME.key_secret there"
            )
        name = found[0]
    if not _NAME.match(name):
        raise UnauthorizedError(f"bad key name {name!r}")
    public, secret = _read(folder / f"{name}.key_secret", f"the secret {role.value} key {name!r}")
    if secret is None:
        raise UnauthorizedError(f"{folder / (name + '.key_secret')} holds no secret key")
    return name, public, secret


def secret_key_names(directory: str, role: Role) -> list[str]:
    """Names of the ``role`` keys whose secret is in ``directory``, sorted."""
    folder = Path(directory) / role.folder
    return sorted(p.name.removesuffix(".key_secret") for p in folder.glob("*.key_secret"))


def scheduler_public_key(directory: str) -> bytes:
    return _read(Path(directory) / "scheduler.key", "the scheduler's public key")[0]


def load_peers(directory: str, roles: Sequence[Role]) -> dict[bytes, tuple[Role, str]]:
    """Every public key of these roles in ``directory``: z85 key -> (role, name)."""
    peers: dict[bytes, tuple[Role, str]] = {}
    for role in roles:
        for path in sorted((Path(directory) / role.folder).glob("*.key")):
            name = path.name.removesuffix(".key")
            public, _ = _read(path, f"a {role.value} key")
            if public in peers:
                raise UnauthorizedError(f"{path}: the same key is also {peers[public]}")
            peers[public] = (role, name)
    return peers


def scheduler_keys(directory: str) -> ServerKeys:
    public, secret = _read(Path(directory) / "scheduler.key_secret", "the scheduler's secret key")
    if secret is None:
        raise UnauthorizedError(f"{directory}/scheduler.key_secret holds no secret key")
    peers = load_peers(directory, (Role.AGENT, Role.CLIENT))
    return ServerKeys(public, secret, peers, frozenset(Role), directory)


def agent_keys(directory: str, name: str | None) -> tuple[ServerKeys, CurveKeys]:
    """An agent's data-plane server keys (clients only) and its scheduler-link keys."""
    name, public, secret = own_keypair(directory, Role.AGENT, name)
    # Agent keys are known (a refusal can say "agent key") but not admitted.
    peers = load_peers(directory, (Role.AGENT, Role.CLIENT))
    server = ServerKeys(public, secret, peers, frozenset({Role.CLIENT}), directory)
    return server, CurveKeys(public, secret, scheduler_public_key(directory))


def client_keys(directory: str, name: str | None, server: bytes | str) -> CurveKeys:
    _, public, secret = own_keypair(directory, Role.CLIENT, name)
    return CurveKeys(public, secret, server.encode() if isinstance(server, str) else server)


# --------------------------------------------------------------------------- daemons


class LogThrottle:
    """At most one log line per key every ``seconds``: a refused peer reconnects about
    ten times a second (libzmq resets its backoff after each TCP connect)."""

    def __init__(self, seconds: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (logged at, held back since)

    def admit(self, key: str) -> int | None:
        """None: hold this line back; else log it, saying how many were held back."""
        now = self.clock()
        logged_at, held = self._last.get(key, (float("-inf"), 0))
        if now - logged_at < self.seconds:
            self._last[key] = (logged_at, held + 1)
            return None
        if len(self._last) >= 4096:  # many addresses: forget rather than grow
            self._last.clear()
        self._last[key] = (now, 0)
        return held


def _more(held: int) -> str:
    return f" ({held} more like it held back)" if held else ""


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
                    _more(held),
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
                log.warning("%s: refused a connection on %s: %s%s", who, endpoint, why, _more(held))
    finally:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close(linger=0)
