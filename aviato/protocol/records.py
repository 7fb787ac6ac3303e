"""The protocol's vocabulary: its version and limits, the message type numbers, the
sandbox status and error codes, the records messages carry, and the message base.

``MsgType`` is the one list of message numbers; each part of the protocol owns a range
(see its comments), so that a new message family takes a range of its own.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from aviato._options import SandboxOptions
from aviato._storage import Mount
from aviato.exceptions import ConfigurationError

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
    # client <-> agent: spawned processes (protocol/processes.py)
    PROCESS_SPAWN = 100
    PROCESS_WRITE = 101
    PROCESS_READ = 102
    PROCESS_OUTPUT = 103
    PROCESS_SIGNAL = 104
    PROCESS_RESIZE = 105
    PROCESS_LIST = 106
    PROCESS_REPLY = 107
    # client <-> agent: streamed files and logs (protocol/files.py), 120-139
    DOWNLOAD_FILE = 120
    UPLOAD_FILE = 121
    FILE_CHUNK = 122
    STREAM_ACK = 123
    TRANSFER_DONE = 124
    LIST_FILES = 125
    FILE_LIST_REPLY = 126
    REMOVE_FILE = 127
    STREAM_LOGS = 128
    LOG_CHUNK = 129
    # lifecycle: idle timeouts, lifetimes, pause, snapshots (aviato/protocol/lifecycle.py)
    EXTEND_LIFETIME = 140
    PAUSE_SANDBOX = 141
    SANDBOX_ACTIVITY = 142
    SNAPSHOT_SANDBOX = 143
    SNAPSHOT_REPLY = 144
    LIST_SNAPSHOTS = 145
    SNAPSHOT_LIST_REPLY = 146
    REMOVE_SNAPSHOT = 147
    # volumes and ports (aviato/protocol/storage.py)
    AGENT_VOLUMES = 160
    LIST_VOLUMES = 161
    VOLUME_LIST_REPLY = 162
    REMOVE_VOLUME = 163
    GET_TUNNELS = 164
    TUNNELS_REPLY = 165
    # client <-> scheduler: what the dashboard shows (protocol/observe.py)
    GET_DASHBOARD_VIEW = 180
    DASHBOARD_VIEW_REPLY = 181
    # client <-> agent <-> agent: object refs (protocol/objects.py)
    PUT_OBJECT = 240
    OBJECT_STORED = 241
    GET_OBJECT = 242
    OBJECT_DATA = 243
    RELEASE_OBJECTS = 244
    OBJECTS_RELEASED = 245
    OBJECT_STATS = 246
    OBJECT_STATS_REPLY = 247
    # agent <-> scheduler: objects of sessions that ended (protocol/objects_more.py)
    OBJECT_SESSIONS = 270
    OBJECT_SESSIONS_ENDED = 271
    LOCATE_AGENT = 272
    AGENT_LOCATION = 273
    # output forwarding: a worker's prints, to its client (aviato/protocol/output.py)
    WATCH_OUTPUT = 200
    FUNCTION_OUTPUT = 201
    # dashboard -> agent: tunnels, processes, exec results (protocol/observe_more.py)
    GET_AGENT_SANDBOXES = 280
    AGENT_SANDBOXES_REPLY = 281
    GET_EXEC_RESULTS = 282
    EXEC_RESULTS_REPLY = 283
    # actor handles used in sandboxes, relayed by their agent (protocol/actors_more.py)
    WATCH_ACTOR_CALLS = 260
    ACTOR_CALL_REQUEST = 261
    ACTOR_CALL_REPLY = 262


class SandboxStatus(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TERMINATED = "terminated"
    #: Its processes frozen (``sb.pause()``): memory and slot kept, no CPU used.
    PAUSED = "paused"

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
    #: No process with that id in the sandbox.
    PROCESS_NOT_FOUND = "process_not_found"
    #: The sandbox's runtime cannot do what was asked (the message says which and why).
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"
    #: The sandbox is paused (an exec, a file, a second pause): resume it first.
    PAUSED = "paused"
    #: Resume of a sandbox that is not paused.
    NOT_PAUSED = "not_paused"
    #: No live agent (or not the one asked) offers the isolation a spec asks for.
    ISOLATION_UNAVAILABLE = "isolation_unavailable"
    #: No live agent could ever hold what a create asks for (CPUs, memory, GPUs, labels).
    RESOURCES_UNAVAILABLE = "resources_unavailable"
    #: An object ref's value is no longer held (released, or its agent restarted).
    OBJECT_LOST = "object_lost"
    #: The agent's object store is over its memory and disk budgets.
    OBJECT_STORE_FULL = "object_store_full"


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
    #: Stopped after this long with no exec, process, file or call activity.
    idle_timeout_seconds: float | None = None
    #: Host directories, named volumes (target -> name) and published ports.
    mounts: tuple[Mount, ...] = ()
    volumes: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    #: Asked for (None: the agent's default; see aviato/_options.py ISOLATIONS).
    isolation: str | None = None
    #: Resources placement honours (see scheduler/placement.py): GPUs (each the
    #: sandbox's own), the agent labels it needs, "spread" (None) or "pack".
    gpus: int | None = None
    agent_labels: dict[str, str] = field(default_factory=dict)
    placement: str | None = None
    #: Egress allow-list (aviato/_egress.py); None: the whole network.
    network_allow: tuple[str, ...] | None = None

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
    #: Which limit (or who) ended it: an ``EndedBy`` value ("" while it runs, or when
    #: its command ended by itself or it failed).
    ended_by: str = ""
    #: The isolation the sandbox runs under (its spec's, else its agent's default).
    isolation: str = ""
    #: The ids of its agent's GPUs it was given (the scheduler's choice; its alone).
    gpu_ids: tuple[str, ...] = ()


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
    function worker's main command is the worker, made afresh; nor with mounts, volumes or
    ports: those are fixed when a sandbox is made; nor with an isolation named: spares
    run the agent's default)."""
    if spec.function_worker or spec.mounts or spec.volumes or spec.ports:
        return None
    if spec.isolation is not None or spec.gpus:
        return None  # a GPU sandbox's env names its GPUs: fixed when it is made
    # Both are fixed when a sandbox is made: the session's network, the rules.
    if spec.network == "internal" or spec.network_allow is not None:
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
    #: Its data plane's CURVE public key (z85; "" when keys are off): a client reaches
    #: the agent itself with it (``aviato snapshot ls``).
    public_key: str = ""
    #: Isolation levels it offers, its default first (see aviato/_options.py).
    isolations: tuple[str, ...] = ()
    #: What its start-up probe of each non-default runtime found.
    probe: str = ""
    #: Its capacity (0: not advertised, not limited) and what its sandboxes asked for.
    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: tuple[str, ...] = ()
    cpus_used: float = 0.0
    memory_used: int = 0
    gpus_used: tuple[str, ...] = ()
    #: Where root inside its sandboxes is on the host ("" when it is the host's root).
    userns: str = ""


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
