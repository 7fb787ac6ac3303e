"""The wire protocol: every message aviato's processes exchange, and its encoding.

A message travels as ZeroMQ frames ``[envelope, *payloads]``. The envelope is a
msgpack map ``{"v": version, "t": type, "id": request id, "tok": token, "b": body}``
where ``body`` holds the message dataclass's fields. Payloads (file contents,
command output, pickled user data) are opaque extra frames: they are never put
inside the msgpack body, never copied to be decoded, and never unpickled here.

Every request carries a request id; its replies echo it. ``decode`` checks the
version and every field's type, so a daemon can answer a malformed message with
an :class:`ErrorReply` instead of failing somewhere deeper.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import msgpack

from aviato._codec import CodecError, brief, decoder, encode_value
from aviato._options import SandboxOptions
from aviato.exceptions import ConfigurationError, ProtocolError

# A call's header and outcome travel on to the function worker and back: their
# records are the worker link's (stdlib-only, as the worker inside a sandbox needs).
from aviato.link import CallHeader as CallHeader
from aviato.link import CallOutcome as CallOutcome
from aviato.link import CallStatus as CallStatus
from aviato.link import Serialization as Serialization

PROTOCOL_VERSION = 1

#: Default cap on the bytes of one message's payloads; larger requests are refused
#: before they are sent (:class:`aviato.exceptions.PayloadTooLargeError`).
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024
#: Daemons drop any single inbound frame above this (ZMQ_MAXMSGSIZE): a safety net
#: against a peer that ignores the limit above.
MAX_FRAME_BYTES = MAX_PAYLOAD_BYTES + 1024 * 1024

Payload: TypeAlias = bytes | memoryview
Frame: TypeAlias = bytes | memoryview


class MsgType(enum.IntEnum):
    # replies shared by every request
    OK = 1
    ERROR = 2
    # client <-> scheduler (control plane)
    CREATE_SANDBOX = 10
    GET_SANDBOX = 11
    LIST_SANDBOXES = 12
    STOP_SANDBOX = 13
    WAIT_SANDBOX = 14
    SESSION_KEEPALIVE = 15
    SESSION_CLOSE = 16
    CLUSTER_STATUS = 17
    SANDBOX_REPLY = 20
    SANDBOX_LIST_REPLY = 21
    SESSION_CLOSE_REPLY = 22
    CLUSTER_STATUS_REPLY = 23
    # agent <-> scheduler
    REGISTER_AGENT = 30
    REGISTER_REPLY = 31
    AGENT_HEARTBEAT = 32
    HEARTBEAT_REPLY = 33
    PLACE_SANDBOX = 34
    SANDBOX_EXITED = 35
    DEREGISTER_AGENT = 36
    AGENT_SPARES = 39
    # client <-> agent (data plane)
    EXEC = 50
    EXEC_CHUNK = 51
    EXEC_REPLY = 52
    WRITE_FILE = 53
    READ_FILE = 54
    FILE_REPLY = 55
    GET_LOGS = 56
    LOGS_REPLY = 57
    PING = 58
    PONG = 59
    CANCEL = 60
    # client <-> agent <-> function worker
    RUN_CALLS = 70
    CALL_RESULTS = 71


class SandboxStatus(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({SandboxStatus.COMPLETED, SandboxStatus.FAILED, SandboxStatus.TERMINATED})


class ErrorCode(enum.StrEnum):
    """Why a request failed; the client maps each to one exception class."""

    MALFORMED = "malformed"
    VERSION_MISMATCH = "version_mismatch"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    NOT_RUNNING = "not_running"
    TIMEOUT = "timeout"
    FAILED = "failed"
    TERMINATED = "terminated"
    FILE_ERROR = "file_error"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    #: An agent id that a live agent holds (a second agent asked to register with it).
    ID_IN_USE = "id_in_use"
    INTERNAL = "internal"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What to run: everything the agent needs to create the sandbox."""

    image: str
    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    session_id: str | None = None
    max_lifetime_seconds: float | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: str | None = None
    working_dir: str | None = None
    #: Runs aviato's function worker: the agent mounts the worker and its socket in.
    function_worker: bool = False

    @classmethod
    def of(
        cls,
        options: SandboxOptions,
        *,
        session_id: str | None = None,
        function_worker: bool = False,
    ) -> SandboxSpec:
        """The spec of merged options; ``ConfigurationError`` says what is wrong with
        them (the scheduler's own check, made before sending)."""
        problems = options.problems()
        if problems:
            raise ConfigurationError("; ".join(problems))
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        values["args"] = options.args or ()
        return cls(**values, session_id=session_id, function_worker=function_worker)

    def problems(self) -> list[str]:
        """Why this spec cannot make a sandbox (none: it can): ``SandboxOptions.problems``."""
        return SandboxOptions.of(self).problems()


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """One row of the scheduler's sandbox table, as the client sees it."""

    sandbox_id: str
    spec: SandboxSpec
    status: SandboxStatus
    agent_id: str | None = None
    agent_address: str | None = None
    exit_code: int | None = None
    reason: str = ""
    created_at: float = 0.0
    deadline: float | None = None
    runtime: str = ""
    #: The agent's CURVE public key (z85) for its data plane; "" when keys are off.
    agent_public_key: str = ""
    #: The agent's local lane (``unix:<host key>:<path>``; see aviato/_lane.py), which
    #: a client on its host uses instead of ``agent_address``; "" when it has none.
    agent_lane: str = ""


@dataclass(frozen=True, slots=True)
class SpareShape:
    """An image and resource shape an agent holds pre-started spares of, and how many
    are ready: a create whose spec has this shape is ready in milliseconds there."""

    image: str
    cpus: float | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None
    network: str | None = None
    working_dir: str | None = None
    ready: int = 0

    @property
    def key(self) -> tuple[object, ...]:
        return (
            self.image,
            self.cpus,
            self.memory_bytes,
            self.pids_limit,
            self.network,
            self.working_dir,
        )


def spare_key(spec: SandboxSpec) -> tuple[object, ...] | None:
    """The ``SpareShape.key`` of the spares that can serve ``spec`` (None: none can: a
    function worker's main command is the worker, made afresh)."""
    if spec.function_worker:
        return None
    return (
        spec.image,
        spec.cpus,
        spec.memory_bytes,
        spec.pids_limit,
        spec.network,
        spec.working_dir,
    )


@dataclass(frozen=True, slots=True)
class AgentInfo:
    agent_id: str
    address: str
    slots: int
    used: int
    alive: bool
    runtime: str
    labels: dict[str, str] = field(default_factory=dict)
    seconds_since_heartbeat: float = 0.0
    #: Its local lane for clients on its host ("" when it has none).
    lane: str = ""
    #: Pre-started spare sandboxes it holds ready: each fills one of its free slots.
    spares: int = 0


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[MsgType]


@dataclass(frozen=True, slots=True)
class OkReply(Message):
    TYPE = MsgType.OK


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    TYPE = MsgType.ERROR
    code: ErrorCode
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CreateSandbox(Message):
    """Place a sandbox; the reply comes once it runs, or ``timeout_seconds`` passed."""

    TYPE = MsgType.CREATE_SANDBOX
    spec: SandboxSpec
    timeout_seconds: float
    #: Chosen by the client ("" lets the scheduler choose): a create it gave up on can
    #: then be stopped by id, and a retried create is not a second sandbox.
    sandbox_id: str = ""


@dataclass(frozen=True, slots=True)
class GetSandbox(Message):
    TYPE = MsgType.GET_SANDBOX
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class ListSandboxes(Message):
    """One page of the matching rows, from after ``cursor`` ("" for the first page);
    ``limit`` caps its rows (0: the scheduler's page size). Filters are all applied by
    the scheduler. The reply's ``next_cursor`` asks for the next page ("" when done)."""

    TYPE = MsgType.LIST_SANDBOXES
    tags: tuple[str, ...] = ()
    statuses: tuple[SandboxStatus, ...] = ()
    session_id: str | None = None
    agent_id: str | None = None
    limit: int = 0
    cursor: str = ""
    #: Every page from ``cursor`` on, each its own reply to this one request (the
    #: last with no ``next_cursor``): the client decodes one while the next is made.
    stream: bool = False


@dataclass(frozen=True, slots=True)
class StopSandbox(Message):
    """Client -> scheduler, and scheduler -> agent."""

    TYPE = MsgType.STOP_SANDBOX
    sandbox_id: str
    reason: str = "stopped by user"


@dataclass(frozen=True, slots=True)
class WaitSandbox(Message):
    """Long poll: answered when the sandbox ends, or with its status at the deadline."""

    TYPE = MsgType.WAIT_SANDBOX
    sandbox_id: str
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class SessionKeepalive(Message):
    TYPE = MsgType.SESSION_KEEPALIVE
    session_id: str
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class SessionClose(Message):
    TYPE = MsgType.SESSION_CLOSE
    session_id: str


@dataclass(frozen=True, slots=True)
class ClusterStatus(Message):
    """A page of the agents (by id, after ``cursor``; ``limit`` of them at most, 0 for
    the scheduler's page size) with the cluster's counts."""

    TYPE = MsgType.CLUSTER_STATUS
    limit: int = 0
    cursor: str = ""


@dataclass(frozen=True, slots=True)
class SandboxReply(Message):
    TYPE = MsgType.SANDBOX_REPLY
    sandbox: SandboxInfo


@dataclass(frozen=True, slots=True)
class SandboxListReply(Message):
    TYPE = MsgType.SANDBOX_LIST_REPLY
    sandboxes: tuple[SandboxInfo, ...]
    #: Where the next page starts ("" after the last one). A page may be short, even
    #: empty, and still have a next one: the scheduler bounds the rows it looks at.
    next_cursor: str = ""


@dataclass(frozen=True, slots=True)
class SessionCloseReply(Message):
    TYPE = MsgType.SESSION_CLOSE_REPLY
    stopped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClusterStatusReply(Message):
    TYPE = MsgType.CLUSTER_STATUS_REPLY
    agents: tuple[AgentInfo, ...]
    sandbox_counts: dict[str, int]
    sessions: int
    #: The next page of agents ("" after the last).
    next_cursor: str = ""
    #: Free slots on live agents, cluster-wide (whatever the page).
    free_slots: int = 0


@dataclass(frozen=True, slots=True)
class RegisterAgent(Message):
    """``fresh`` is true on the first registration after the agent process started:
    the scheduler then reaps what it does not know instead of adopting it.

    ``instance`` is a nonce of the agent process: the same process registering again
    (a lost link, a restarted scheduler) is told apart from a second agent claiming a
    live agent's id, which is refused. ``replaces`` names the instance this process
    succeeds (read from the agent's state file, whose lock it now holds): a restart
    after ``kill -9`` takes its id back at once, before the old one is declared dead."""

    TYPE = MsgType.REGISTER_AGENT
    agent_id: str
    address: str
    slots: int
    runtime: str
    fresh: bool
    labels: dict[str, str] = field(default_factory=dict)
    sandboxes: tuple[SandboxInfo, ...] = ()
    #: The CURVE public key (z85) its data plane serves with; "" when keys are off.
    public_key: str = ""
    #: Its local lane for clients on its host ("" when it has none).
    lane: str = ""
    instance: str = ""
    replaces: str = ""
    #: Pre-started spares it holds (see AgentSpares).
    spares: int = 0
    spare_shapes: tuple[SpareShape, ...] = ()


@dataclass(frozen=True, slots=True)
class DeregisterAgent(Message):
    """A cleanly stopping agent leaves the cluster (its sandboxes are stopped or kept
    by ``--keep-on-exit``): the scheduler forgets it instead of declaring it dead."""

    TYPE = MsgType.DEREGISTER_AGENT
    agent_id: str
    instance: str = ""


@dataclass(frozen=True, slots=True)
class RegisterReply(Message):
    TYPE = MsgType.REGISTER_REPLY
    heartbeat_interval: float
    adopt: tuple[str, ...] = ()
    reap: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentHeartbeat(Message):
    """With ``full``, ``running`` lists every sandbox the agent has (a resync, now and
    then); otherwise ``gone`` lists those it no longer has since its last heartbeat,
    and ``running`` is empty: a heartbeat's cost follows the changes, not the table."""

    TYPE = MsgType.AGENT_HEARTBEAT
    agent_id: str
    running: tuple[str, ...] = ()
    full: bool = True
    gone: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AgentSpares(Message):
    """How many pre-started spare sandboxes the agent holds ready, sent when it changes
    (apart from heartbeats). Spares live in free slots: a create that matches one is
    ready in milliseconds, one that does not makes the agent drop a spare for room."""

    TYPE = MsgType.AGENT_SPARES
    agent_id: str
    spares: int
    #: Of which shapes: the scheduler places a create of one on an agent holding it.
    shapes: tuple[SpareShape, ...] = ()


@dataclass(frozen=True, slots=True)
class HeartbeatReply(Message):
    """``registered`` false means the scheduler forgot us (it restarted): register again.
    ``dead_agents``: agents declared dead long enough ago that their sandboxes left on
    an engine are anybody's to remove (a killed agent that never came back)."""

    TYPE = MsgType.HEARTBEAT_REPLY
    registered: bool
    dead_agents: tuple[str, ...] = ()
    #: The interval to beat at from now on (0: unchanged). It grows with the cluster,
    #: so that heartbeats stay a small part of the scheduler's work.
    heartbeat_interval: float = 0.0


@dataclass(frozen=True, slots=True)
class PlaceSandbox(Message):
    TYPE = MsgType.PLACE_SANDBOX
    sandbox: SandboxInfo


@dataclass(frozen=True, slots=True)
class SandboxExited(Message):
    TYPE = MsgType.SANDBOX_EXITED
    sandbox_id: str
    exit_code: int | None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Exec(Message):
    """Payloads: ``[stdin]`` optionally (the command reads it, then end of file; without
    it, an empty stdin). Buffered reply: ``ExecReply`` with payloads ``[stdout, stderr]``;
    streamed: ``ExecChunk``s then an ``ExecReply`` with none."""

    TYPE = MsgType.EXEC
    sandbox_id: str
    argv: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class ExecChunk(Message):
    """One piece of streamed output; payload ``[data]``. ``fd`` is 1 or 2."""

    TYPE = MsgType.EXEC_CHUNK
    fd: int


@dataclass(frozen=True, slots=True)
class ExecReply(Message):
    TYPE = MsgType.EXEC_REPLY
    returncode: int
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class WriteFile(Message):
    """Payload ``[data]``."""

    TYPE = MsgType.WRITE_FILE
    sandbox_id: str
    path: str
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class ReadFile(Message):
    """``max_bytes``: a file larger than this is refused while it is read (0: the
    payload limit), with a ``too_large`` error."""

    TYPE = MsgType.READ_FILE
    sandbox_id: str
    path: str
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class FileReply(Message):
    """Payload ``[data]``."""

    TYPE = MsgType.FILE_REPLY
    size: int


@dataclass(frozen=True, slots=True)
class GetLogs(Message):
    TYPE = MsgType.GET_LOGS
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class LogsReply(Message):
    """The sandbox's output in the order it was written: one payload frame per chunk,
    ``fds[i]`` naming the stream (1 stdout, 2 stderr) of frame ``i``."""

    TYPE = MsgType.LOGS_REPLY
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Client -> agent, no reply: the client gave up on the request whose id this
    message carries (an exec, read or write); the agent stops it at its source."""

    TYPE = MsgType.CANCEL


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE = MsgType.PING


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE = MsgType.PONG
    server: str
    server_id: str = ""


@dataclass(frozen=True, slots=True)
class RunCalls(Message):
    """Client -> agent: run these calls on the worker in ``sandbox_id``. Answered by one
    or more CallResults (echoing the request id) until every call has an outcome."""

    TYPE = MsgType.RUN_CALLS
    sandbox_id: str
    calls: tuple[CallHeader, ...]
    #: Out-of-band buffer frames after the calls' own, each sent once per batch however
    #: many of its calls use it (see CallHeader.buffers).
    buffers: int = 0


@dataclass(frozen=True, slots=True)
class CallResults(Message):
    """One payload frame per outcome with status ok/error (and its buffers), in order."""

    TYPE = MsgType.CALL_RESULTS
    sandbox_id: str
    outcomes: tuple[CallOutcome, ...]


# From the module's names, not Message.__subclasses__(): slots=True dataclasses leave
# their discarded pre-slots class among the subclasses.
MESSAGE_TYPES: dict[MsgType, type[Message]] = {
    obj.TYPE: obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
}


# --------------------------------------------------------------------------- encoding


class DecodeError(ProtocolError):
    """A message that cannot be decoded; carries what could be read of it."""

    def __init__(self, message: str, *, code: ErrorCode, request_id: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Decoded:
    msg: Message
    request_id: int
    payloads: tuple[Payload, ...] = ()
    token: str | None = None


def to_wire(value: Any) -> Any:
    """A dataclass tree as plain msgpack-able values (enums become their values)."""
    return encode_value(value)


def encode(
    msg: Message,
    request_id: int,
    payloads: Sequence[Payload] = (),
    *,
    token: str | None = None,
) -> list[Frame]:
    return encode_body(msg.TYPE, request_id, to_wire(msg), payloads, token=token)


def encode_body(
    msg_type: MsgType,
    request_id: int,
    body: dict[str, Any],
    payloads: Sequence[Payload] = (),
    *,
    token: str | None = None,
) -> list[Frame]:
    """``encode`` for a body already in wire form (see ``info_wire``)."""
    envelope: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": int(msg_type),
        "id": request_id,
        "b": body,
    }
    if token is not None:
        envelope["tok"] = token
    return [msgpack.packb(envelope, use_bin_type=True), *payloads]


_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxInfo))


def info_wire(info: SandboxInfo, spec_wire: dict[str, Any]) -> dict[str, Any]:
    """``to_wire(info)`` with its spec's wire form given: a sender of many rows that
    share a spec (the scheduler) converts the spec once."""
    out = {name: getattr(info, name) for name in _INFO_FIELDS}
    out["spec"] = spec_wire
    out["status"] = info.status.value
    return out


def _frame_bytes(frame: Any) -> Payload:
    # zmq.Frame (copy=False) exposes .buffer; keep payloads as zero-copy memoryviews.
    buffer = getattr(frame, "buffer", None)
    if buffer is not None:
        return memoryview(buffer)
    if isinstance(frame, bytes | memoryview):
        return frame
    if isinstance(frame, bytearray):
        return bytes(frame)
    raise DecodeError(
        f"frame of type {type(frame).__name__}", code=ErrorCode.MALFORMED, request_id=None
    )


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message's envelope, checked, with its body not yet checked (see ``decode``)."""

    type: MsgType
    request_id: int
    token: str | None
    body: Any


def open_envelope(frames: Sequence[Any]) -> Envelope:
    """The checked envelope of ``[envelope, *payloads]``, its body as msgpack gave it:
    for a daemon that may not need the body (a reply whose content it ignores).
    Raises :class:`DecodeError`, never anything else."""
    if not frames:
        raise DecodeError("empty message", code=ErrorCode.MALFORMED, request_id=None)
    try:
        envelope = msgpack.unpackb(_frame_bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(
            f"envelope is not msgpack: {exc}", code=ErrorCode.MALFORMED, request_id=None
        ) from None
    if not isinstance(envelope, dict):
        raise DecodeError("envelope is not a map", code=ErrorCode.MALFORMED, request_id=None)
    request_id = envelope.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise DecodeError("envelope has no integer 'id'", code=ErrorCode.MALFORMED, request_id=None)
    version = envelope.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError(
            f"peer speaks aviato protocol version {brief(version)}, this side speaks "
            f"{PROTOCOL_VERSION}; upgrade the older side so both match",
            code=ErrorCode.VERSION_MISMATCH,
            request_id=request_id,
        )
    try:
        msg_type = MsgType(envelope.get("t", -1))
        MESSAGE_TYPES[msg_type]
    except (ValueError, KeyError):
        raise DecodeError(
            f"unknown message type {brief(envelope.get('t'))}",
            code=ErrorCode.MALFORMED,
            request_id=request_id,
        ) from None
    token = envelope.get("tok")
    if token is not None and not isinstance(token, str):
        raise DecodeError("token is not a string", code=ErrorCode.MALFORMED, request_id=request_id)
    return Envelope(msg_type, request_id, token, envelope.get("b", {}))


def decode(frames: Sequence[Any]) -> Decoded:
    """Decode ``[envelope, *payloads]``; raises :class:`DecodeError`, never anything else."""
    return decode_body(open_envelope(frames), frames)


def decode_body(env: Envelope, frames: Sequence[Any]) -> Decoded:
    """The typed message of an opened envelope (``frames`` for its payloads)."""
    cls = MESSAGE_TYPES[env.type]
    try:
        msg = from_wire(cls, env.body, cls.__name__)
        payloads = tuple(_frame_bytes(f) for f in frames[1:])
    except DecodeError as exc:
        exc.request_id = env.request_id
        raise
    return Decoded(msg=msg, request_id=env.request_id, payloads=payloads, token=env.token)


def from_wire(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build the typed value."""
    try:
        return decoder(tp)(value)
    except CodecError as exc:
        path = (
            f"{where}.{exc.path}"
            if exc.path and not exc.path.startswith("[")
            else (f"{where}{exc.path}")
        )
        raise DecodeError(
            f"{path}: {exc.message}", code=ErrorCode.MALFORMED, request_id=None
        ) from None


def payload_size(payloads: Sequence[Payload]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in payloads)
