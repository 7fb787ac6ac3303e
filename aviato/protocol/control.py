"""Control-plane messages: client <-> scheduler, and agent <-> scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from aviato.protocol.records import (
    AgentInfo,
    Message,
    MsgType,
    SandboxInfo,
    SandboxSpec,
    SandboxStatus,
    SpareShape,
)


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
class PoolFigures:
    """One remote function of a session, as its client sees it (the dashboard's
    Sessions page): its pool's workers and queue, its calls settled so far and per
    second lately, its own run time (in the worker) and its round trip (in the
    client) over its recent calls, the pool's retries and lost workers."""

    name: str
    workers: int = 0
    queued: int = 0
    in_flight: int = 0
    calls: int = 0
    calls_per_second: float = 0.0
    run_p50_ms: float = 0.0
    run_p99_ms: float = 0.0
    retries: int = 0
    workers_lost: int = 0
    #: Submit to result, as the caller sees it (queueing, batching, the wire and
    #: the run), over its recent calls.
    round_trip_p50_ms: float = 0.0
    round_trip_p99_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionKeepalive(Message):
    TYPE = MsgType.SESSION_KEEPALIVE
    session_id: str
    lease_seconds: float
    #: The session's functions (the scheduler keeps the first ``MAX_POOLS``).
    pools: tuple[PoolFigures, ...] = ()


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
    #: Isolation levels it offers, its default first; what probing them found.
    isolations: tuple[str, ...] = ()
    probe: str = ""
    #: Its capacity for placement: cores, memory, GPU ids (0 / empty: not advertised).
    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: tuple[str, ...] = ()
    #: Where root inside its sandboxes is on the host ("" when it is the host's root).
    userns: str = ""


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
