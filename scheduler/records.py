"""The scheduler's records and constants: what ``state.py``'s tables hold and what its
entry points return (actions for the socket layer), plus the pure checks they use."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field

from aviato._codec import brief
from aviato.protocol import (
    ErrorCode,
    ErrorReply,
    Message,
    RegisterAgent,
    SandboxSpec,
    SandboxStatus,
)

#: Who is waiting for a reply: opaque to this module (the server uses identity + id).
ReplyKey = Hashable

ACTIVE = frozenset({SandboxStatus.CREATING, SandboxStatus.RUNNING, SandboxStatus.PAUSED})
#: stops of unknown sandboxes remembered at most (a flood of junk ids stays bounded)
MAX_STOPPED_UNKNOWN = 10_000
#: A stop's reply waits for its agent to confirm at most this long (an agent that
#: neither answers nor is declared dead); below a client's request timeout.
STOP_CONFIRM_SECONDS = 20.0
#: A listing's page: rows at most, and rows looked at at most (a filter that matches
#: little must not hold the loop either: the page then ends early, with a cursor).
PAGE_ROWS = 500
MAX_PAGE_ROWS = 5000
PAGE_SCAN = 20_000
PAGE_AGENTS = 1000
MAX_PAGE_AGENTS = 5000
#: Heartbeats the scheduler aims to read per second at most: past it, agents are told
#: to beat less often (up to MAX_HEARTBEAT_INTERVAL, so that a death is still seen
#: within 3 intervals, under 5 s).
HEARTBEAT_RATE = 700.0
MAX_HEARTBEAT_INTERVAL = 1.5
#: Distinct specs shared at most (see SchedulerState._intern).
MAX_INTERNED_SPECS = 4096
#: Queued specs one dispatch passes over at most (each fits no agent now): a queue of
#: waiting GPU creates costs each sandbox's end a bounded walk.
MAX_PASSED_SPECS = 256
#: Spare shapes kept per agent (those with the most ready): each placement on it
#: costs O(its shapes), whatever it reports.
MAX_SPARE_SHAPES = 16
#: Blind spots older than this are forgotten (an agent silent that long is judged).
BLIND_MEMORY_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Reply:
    to: ReplyKey
    msg: Message


@dataclass(frozen=True, slots=True)
class SendToAgent:
    agent_id: str
    msg: Message


@dataclass(frozen=True, slots=True)
class AgentDeclaredDead:
    """For the log: an agent was declared dead (why, and how long since it was heard)."""

    agent_id: str
    reason: str
    seconds_since_heartbeat: float
    blind_seconds: float
    sandboxes: int


Action = Reply | SendToAgent | AgentDeclaredDead


@dataclass(slots=True)
class Config:
    dead_after_seconds: float = 3.0
    heartbeat_interval: float = 0.5
    #: Extra time an agent gets to start a placed sandbox (image pulls, slow disks).
    placement_grace_seconds: float = 120.0
    #: How long ended sandboxes stay visible to get/list.
    keep_ended_seconds: float = 600.0
    #: Lease given to a session first seen through an agent's report (after a restart).
    adopted_lease_seconds: float = 30.0
    #: After an agent is declared dead, how long before the sandboxes it left on an
    #: engine are anybody's to remove (it may come back and reap its own first).
    orphan_grace_seconds: float = 30.0
    #: How long a dead agent stays in the table (and in ``aviato status``).
    forget_dead_seconds: float = 600.0
    #: Just after the scheduler starts, agents are still registering (again): a create
    #: then waits for one instead of failing at once with "no agents registered".
    startup_grace_seconds: float = 10.0
    #: A create that asks for resources and has waited this long reserves the agent it
    #: would fit on once freed: later creates are not placed there until it is (see
    #: placement.py's ``reserve_for``), so a stream of small ones cannot starve it.
    reserve_after_seconds: float = 10.0


@dataclass(slots=True)
class AgentRecord:
    agent_id: str
    address: str
    slots: int
    runtime: str
    labels: dict[str, str]
    last_seen: float
    alive: bool = True
    active: set[str] = field(default_factory=set)
    public_key: str = ""
    lane: str = ""
    #: The agent process's nonce (see RegisterAgent.instance).
    instance: str = ""
    #: When it was declared dead (None while alive).
    dead_since: float | None = None
    #: Pre-started spares it holds, in its free slots (see AgentSpares).
    spares: int = 0
    #: Of which shapes: ``SpareShape.key`` -> how many are ready.
    spare_shapes: dict[tuple[object, ...], int] = field(default_factory=dict)
    #: Its sandboxes with a PlaceSandbox or StopSandbox unanswered (ended ones too).
    inflight: set[str] = field(default_factory=set)
    #: Isolation levels it offers, its default first; what its start-up probe found.
    isolations: tuple[str, ...] = ()
    probe: str = ""
    #: Where root inside its sandboxes is on the host ("": the host's root).
    userns: str = ""
    #: Its capacity (0 / empty: not advertised, so not limited; see placement.py), CPUs
    #: in thousandths (sums of floats drift), and what its active sandboxes asked for.
    cpus_milli: int = 0
    memory_bytes: int = 0
    gpus: tuple[str, ...] = ()
    cpus_used_milli: int = 0
    memory_used: int = 0
    #: GPU id -> the sandbox holding it (each GPU to one sandbox at a time).
    gpu_holders: dict[str, str] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - len(self.active)


@dataclass(slots=True)
class SandboxRecord:
    sandbox_id: str
    spec: SandboxSpec
    status: SandboxStatus
    created_at: float
    agent_id: str | None = None
    exit_code: int | None = None
    reason: str = ""
    deadline: float | None = None
    ended_at: float | None = None
    #: The create request to answer once the agent has started it.
    creator: ReplyKey | None = None
    creator_deadline: float | None = None
    #: A PlaceSandbox is with the agent, unanswered.
    placing: bool = False
    #: StopSandbox requests with the agent, unanswered.
    stops_unconfirmed: int = 0
    #: Its place in listings (see RowOrder).
    seq: int = 0
    #: When its idle timeout stops it (activity moves it; None: no idle timeout), and
    #: the time of its one entry in the idle timers (see scheduler/lifecycle.py).
    idle_deadline: float | None = None
    idle_armed: float | None = None
    #: Which limit (or who) ended it (an ``EndedBy`` value; see SandboxInfo.ended_by).
    ended_by: str = ""
    #: The GPUs of its agent it holds while active (see scheduler/placement.py).
    gpu_ids: tuple[str, ...] = ()


@dataclass(slots=True)
class PendingCreate:
    key: ReplyKey
    spec: SandboxSpec
    deadline: float
    queued_at: float
    sandbox_id: str = ""  # the client's choice, if it made one


@dataclass(slots=True)
class Waiter:
    key: ReplyKey
    deadline: float


def _new_sandbox_id() -> str:
    return "sb-" + os.urandom(8).hex()  # as uuid4's 16 hex digits, at a third the cost


_SANDBOX_ID = re.compile(r"sb-[0-9a-f]{8,32}")


def _check_sandbox_id(sandbox_id: str) -> str:
    """What is wrong with a client-chosen sandbox id ("" for none, or fine)."""
    if sandbox_id and not _SANDBOX_ID.fullmatch(sandbox_id):
        return f"sandbox id {sandbox_id!r} must look like sb-<8 to 32 hex digits>"
    return ""


def registration_refusal(holder: AgentRecord | None, msg: RegisterAgent) -> str:
    """Why ``msg`` may not take its agent id ("" when it may). A live agent's id is
    taken only by the same process registering again (same instance: a lost link, a
    restarted scheduler) or by its successor (it names the holder's instance as the one
    it replaces: it holds the id's lock on that host, so the holder is dead)."""
    if holder is None or not holder.alive:
        return ""
    if msg.instance == holder.instance or (msg.replaces and msg.replaces == holder.instance):
        return ""
    return (
        f"agent id {msg.agent_id!r} is held by a live agent at {holder.address}; the agent "
        f"at {msg.address} cannot register with it: give each agent its own --agent-id "
        "(or leave it unset: the default is unique per host and bind address)"
    )


_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxSpec))


def _seq_of(rec: SandboxRecord) -> int:
    return rec.seq


def _cursor_seq(cursor: str) -> int:
    """A listing cursor is the last row's sequence number; "" (or junk) starts over."""
    return int(cursor) if cursor.isdigit() and len(cursor) < 20 else 0


def validate_spec(spec: SandboxSpec) -> str | None:
    """Why a spec cannot be placed, or None: the client's own check (it refuses the
    same before sending; this is for every other sender)."""
    problems = spec.problems()
    return "; ".join(problems) if problems else None


def _not_found(sandbox_id: str) -> ErrorReply:
    return ErrorReply(
        ErrorCode.NOT_FOUND,
        f"no sandbox {brief(sandbox_id)} in this cluster (never existed, or ended long ago)",
        {"sandbox_id": sandbox_id},
    )
