"""The scheduler's decisions, as a pure state machine: no sockets, no clock.

Every entry point takes the current time and returns the :data:`Action` list the
socket layer must carry out (a reply to a client, a request to an agent). The
tables here are soft state: after a restart they are rebuilt from what agents
report when they register again.
"""

from __future__ import annotations

import re
import uuid
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from aviato._codec import brief
from aviato.protocol import (
    AgentInfo,
    ClusterStatusReply,
    ErrorCode,
    ErrorReply,
    Message,
    PlaceSandbox,
    RegisterAgent,
    RegisterReply,
    SandboxInfo,
    SandboxListReply,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    StopSandbox,
)

#: Who is waiting for a reply: opaque to this module (the server uses identity + id).
ReplyKey = Hashable

ACTIVE = frozenset({SandboxStatus.CREATING, SandboxStatus.RUNNING})
#: stops of unknown sandboxes remembered at most (a flood of junk ids stays bounded)
MAX_STOPPED_UNKNOWN = 10_000
#: A stop's reply waits for its agent to confirm at most this long (an agent that
#: neither answers nor is declared dead); below a client's request timeout.
STOP_CONFIRM_SECONDS = 20.0


@dataclass(frozen=True, slots=True)
class Reply:
    to: ReplyKey
    msg: Message


@dataclass(frozen=True, slots=True)
class SendToAgent:
    agent_id: str
    msg: Message


Action = Reply | SendToAgent


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
    #: Stop requests answered once the agent confirms: "stopped" means stopped there.
    stop_waiters: list[Waiter] = field(default_factory=list)


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
    return "sb-" + uuid.uuid4().hex[:16]


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


class SchedulerState:
    def __init__(
        self,
        config: Config | None = None,
        new_id: Callable[[], str] = _new_sandbox_id,
        started_at: float = 0.0,
    ) -> None:
        self.config = config or Config()
        self._new_id = new_id
        self.started_at = started_at
        self.agents: dict[str, AgentRecord] = {}
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.pending: deque[PendingCreate] = deque()
        self.sessions: dict[str, float] = {}  # session id -> lease expiry
        #: session id -> when it closed: a create for it arriving late (queued in a
        #: socket across an outage) must not start a sandbox nobody will stop
        self.closed_sessions: dict[str, float] = {}
        #: sandbox id -> when a stop for it came while we did not know it (just after a
        #: restart, before its agent re-registered): reaped when the agent reports it
        self.stopped_unknown: dict[str, float] = {}
        self.waiters: dict[str, list[Waiter]] = {}

    # ------------------------------------------------------------------ queries

    def info(self, rec: SandboxRecord) -> SandboxInfo:
        agent = self.agents.get(rec.agent_id) if rec.agent_id else None
        return SandboxInfo(
            sandbox_id=rec.sandbox_id,
            spec=rec.spec,
            status=rec.status,
            agent_id=rec.agent_id,
            agent_address=agent.address if agent else None,
            exit_code=rec.exit_code,
            reason=rec.reason,
            created_at=rec.created_at,
            deadline=rec.deadline,
            runtime=agent.runtime if agent else "",
            agent_public_key=agent.public_key if agent else "",
            agent_lane=agent.lane if agent else "",
        )

    def get(self, sandbox_id: str) -> Message:
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return _not_found(sandbox_id)
        return SandboxReply(self.info(rec))

    def list_sandboxes(
        self,
        tags: Iterable[str] = (),
        statuses: Iterable[SandboxStatus] = (),
        session_id: str | None = None,
    ) -> SandboxListReply:
        want_tags = set(tags)
        want_status = set(statuses)
        rows = [
            self.info(rec)
            for rec in self.sandboxes.values()
            if want_tags <= set(rec.spec.tags)
            and (not want_status or rec.status in want_status)
            and (session_id is None or rec.spec.session_id == session_id)
        ]
        rows.sort(key=lambda i: (i.created_at, i.sandbox_id))
        return SandboxListReply(tuple(rows))

    def status(self, now: float) -> ClusterStatusReply:
        counts: dict[str, int] = {s.value: 0 for s in SandboxStatus}
        for rec in self.sandboxes.values():
            counts[rec.status.value] += 1
        counts["queued"] = len(self.pending)
        agents = tuple(
            AgentInfo(
                agent_id=a.agent_id,
                address=a.address,
                slots=a.slots,
                used=len(a.active),
                alive=a.alive,
                runtime=a.runtime,
                labels=dict(a.labels),
                seconds_since_heartbeat=max(0.0, now - a.last_seen),
                lane=a.lane,
                spares=a.spares,
            )
            for a in sorted(self.agents.values(), key=lambda a: a.agent_id)
        )
        return ClusterStatusReply(agents=agents, sandbox_counts=counts, sessions=len(self.sessions))

    # ------------------------------------------------------------------ agents

    def register_agent(
        self, msg: RegisterAgent, now: float
    ) -> tuple[RegisterReply | ErrorReply, list[Action]]:
        """An agent (re)joins. Reported sandboxes are adopted or reaped (see RegisterAgent).
        A second live agent with the same id is refused (see ``registration_refusal``)."""
        actions: list[Action] = []
        agent = self.agents.get(msg.agent_id)
        refusal = registration_refusal(agent, msg)
        if refusal:
            return ErrorReply(ErrorCode.ID_IN_USE, refusal), []
        if agent is None:
            agent = AgentRecord(
                agent_id=msg.agent_id,
                address=msg.address,
                slots=msg.slots,
                runtime=msg.runtime,
                labels=dict(msg.labels),
                last_seen=now,
                public_key=msg.public_key,
                lane=msg.lane,
                instance=msg.instance,
            )
            self.agents[msg.agent_id] = agent
        else:
            if agent.instance != msg.instance:
                # Another process now: its predecessor will confirm no stop it was sent.
                actions += self._agent_gone(msg.agent_id)
            agent.address, agent.slots, agent.runtime = msg.address, msg.slots, msg.runtime
            agent.labels, agent.last_seen, agent.alive = dict(msg.labels), now, True
            agent.public_key, agent.lane = msg.public_key, msg.lane
            agent.instance, agent.dead_since = msg.instance, None
        agent.spares = msg.spares
        reported = {s.sandbox_id: s for s in msg.sandboxes}
        adopt: list[str] = []
        reap: list[str] = []
        for sid, reported_info in reported.items():
            rec = self.sandboxes.get(sid)
            if rec is not None and rec.agent_id == msg.agent_id and rec.status in ACTIVE:
                adopt.append(sid)
                if rec.status is SandboxStatus.CREATING and reported_info.status is (
                    SandboxStatus.RUNNING
                ):
                    actions += self._started(rec)
            elif rec is None and not msg.fresh and not self._unwanted(reported_info):
                adopt.append(sid)
                actions += self._adopt(reported_info, msg.agent_id, now)
            else:
                reap.append(sid)
        # Anything we placed there that the agent no longer has is gone.
        for sid in list(agent.active):
            if sid not in reported:
                rec = self.sandboxes[sid]
                if rec.status is SandboxStatus.CREATING and not msg.fresh:
                    continue  # its placement reply is still on the way
                actions += self._end(
                    rec, SandboxStatus.FAILED, now, f"lost when agent {msg.agent_id} restarted"
                )
        actions += self._dispatch(now)
        reply = RegisterReply(
            heartbeat_interval=self.config.heartbeat_interval,
            adopt=tuple(adopt),
            reap=tuple(reap),
        )
        return reply, actions

    def deregister_agent(self, agent_id: str, instance: str, now: float) -> list[Action]:
        """A cleanly stopping agent leaves: forgotten at once (not shown as dead), its
        sandboxes ended (it stopped them, or keeps them for its return). A stale
        deregistration (another instance holds the id now) changes nothing."""
        agent = self.agents.get(agent_id)
        if agent is None or agent.instance != instance:
            return []
        actions: list[Action] = []
        reason = f"agent {agent_id} stopped"
        for sid in list(agent.active):
            actions += self._end(self.sandboxes[sid], SandboxStatus.TERMINATED, now, reason)
        actions += self._agent_gone(agent_id)
        del self.agents[agent_id]
        return actions

    def dead_agents(self, now: float) -> tuple[str, ...]:
        """Agents dead for longer than the orphan grace: whatever they left on an engine
        may be removed by any agent on it."""
        grace = self.config.orphan_grace_seconds
        return tuple(
            sorted(
                a.agent_id
                for a in self.agents.values()
                if a.dead_since is not None and now - a.dead_since >= grace
            )
        )

    def is_registered(self, agent_id: str) -> bool:
        agent = self.agents.get(agent_id)
        return agent is not None and agent.alive

    def set_spares(self, agent_id: str, spares: int) -> None:
        agent = self.agents.get(agent_id)
        if agent is not None:
            agent.spares = max(0, spares)

    def heartbeat(self, agent_id: str, running: Iterable[str], now: float) -> list[Action]:
        agent = self.agents.get(agent_id)
        if agent is None or not agent.alive:
            return []
        agent.last_seen = now
        actions: list[Action] = []
        still = set(running)
        for sid in list(agent.active):
            rec = self.sandboxes[sid]
            if rec.status is SandboxStatus.RUNNING and sid not in still:
                actions += self._end(rec, SandboxStatus.COMPLETED, now, "vanished from its agent")
        return actions

    def _unwanted(self, reported: SandboxInfo) -> bool:
        """Stopped, or its session closed, while we did not know it (after a restart,
        before its agent re-registered): reap it, don't adopt it."""
        session_id = reported.spec.session_id
        return reported.sandbox_id in self.stopped_unknown or bool(
            session_id and session_id in self.closed_sessions
        )

    def _adopt(self, reported: SandboxInfo, agent_id: str, now: float) -> list[Action]:
        """Rebuild a row from an agent's report (the scheduler restarted)."""
        spec = reported.spec
        deadline = None
        if spec.max_lifetime_seconds is not None:
            deadline = reported.created_at + spec.max_lifetime_seconds
        rec = SandboxRecord(
            sandbox_id=reported.sandbox_id,
            spec=spec,
            status=SandboxStatus.RUNNING,
            created_at=reported.created_at,
            agent_id=agent_id,
            deadline=deadline,
        )
        self.sandboxes[rec.sandbox_id] = rec
        self.agents[agent_id].active.add(rec.sandbox_id)
        if spec.session_id and spec.session_id not in self.sessions:
            # The client, if alive, renews this with its next keepalive.
            self.sessions[spec.session_id] = now + self.config.adopted_lease_seconds
        return []

    # ------------------------------------------------------------------ create / place

    def request_create(
        self,
        key: ReplyKey,
        spec: SandboxSpec,
        timeout_seconds: float,
        now: float,
        sandbox_id: str = "",
    ) -> list[Action]:
        problem = validate_spec(spec) or _check_sandbox_id(sandbox_id)
        if problem:
            return [Reply(key, ErrorReply(ErrorCode.BAD_REQUEST, problem))]
        why_not = self._no_agents(now)
        if why_not:
            return [Reply(key, ErrorReply(ErrorCode.UNAVAILABLE, why_not))]
        if sandbox_id in self.stopped_unknown:
            why = f"sandbox {sandbox_id} was stopped before its create arrived"
            return [Reply(key, ErrorReply(ErrorCode.TERMINATED, why))]
        if sandbox_id in self.sandboxes or any(
            p.sandbox_id == sandbox_id and sandbox_id for p in self.pending
        ):
            why = f"sandbox id {sandbox_id} is taken: a create is sent once per id"
            return [Reply(key, ErrorReply(ErrorCode.BAD_REQUEST, why))]
        session_id = spec.session_id
        if session_id and session_id in self.closed_sessions:
            why = f"session {session_id} is closed; open a new session"
            return [Reply(key, ErrorReply(ErrorCode.TERMINATED, why))]
        if session_id and session_id not in self.sessions:
            # Not heard of since a restart: a lease of its own, renewed by a live client,
            # so that its sandboxes are reaped if none is.
            self.sessions[session_id] = now + self.config.adopted_lease_seconds
        self.pending.append(
            PendingCreate(key, spec, now + max(0.0, timeout_seconds), now, sandbox_id)
        )
        return self._dispatch(now)

    def _no_agents(self, now: float) -> str:
        """Why a create cannot even wait for a slot ("" if it can): no live agent, past
        the start-up grace (in which agents register, again after a restart)."""
        if any(a.alive for a in self.agents.values()):
            return ""
        if now - self.started_at < self.config.startup_grace_seconds:
            return ""
        if not self.agents:
            return (
                "no agents registered with this scheduler: start one on each worker host "
                "(python -m agent --scheduler tcp://SCHEDULER:PORT)"
            )
        lost = ", ".join(sorted(self.agents))
        return (
            f"no agents registered that are alive (lost: {lost}); restart them or start "
            "another (python -m agent --scheduler tcp://SCHEDULER:PORT)"
        )

    def choose_agent(self) -> AgentRecord | None:
        """Spread: the live agent with the most free slots (ties by id, for determinism)."""
        best: AgentRecord | None = None
        for agent in self.agents.values():
            if not agent.alive or agent.free <= 0:
                continue
            if best is None or (agent.free, best.agent_id) > (best.free, agent.agent_id):
                best = agent
        return best

    def _dispatch(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self.pending:
            agent = self.choose_agent()
            if agent is None:
                break
            req = self.pending.popleft()
            sid = req.sandbox_id or self._new_id()
            deadline = None
            if req.spec.max_lifetime_seconds is not None:
                deadline = now + req.spec.max_lifetime_seconds
            rec = SandboxRecord(
                sandbox_id=sid,
                spec=req.spec,
                status=SandboxStatus.CREATING,
                created_at=now,
                agent_id=agent.agent_id,
                deadline=deadline,
                creator=req.key,
                creator_deadline=req.deadline + self.config.placement_grace_seconds,
                placing=True,
            )
            self.sandboxes[sid] = rec
            agent.active.add(sid)
            actions.append(SendToAgent(agent.agent_id, PlaceSandbox(self.info(rec))))
        return actions

    def placement_done(self, sandbox_id: str, error: ErrorReply | None, now: float) -> list[Action]:
        """The agent answered a PlaceSandbox."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return []
        rec.placing = False
        if rec.status is not SandboxStatus.CREATING:
            # Stopped (or lost) while starting: make sure it does not linger.
            if error is None and rec.agent_id:
                return [self._stop_on_agent(rec, rec.agent_id, rec.reason)]
            return self._answer_stop_waiters(rec)
        if error is not None:
            creator = rec.creator
            rec.creator = None
            actions = self._end(rec, SandboxStatus.FAILED, now, error.message)
            if creator is not None:
                detail = {**error.detail, "sandbox_id": sandbox_id}
                actions.append(Reply(creator, ErrorReply(error.code, error.message, detail)))
            return actions
        return self._started(rec)

    def _started(self, rec: SandboxRecord) -> list[Action]:
        rec.status = SandboxStatus.RUNNING
        actions: list[Action] = []
        if rec.creator is not None:
            actions.append(Reply(rec.creator, SandboxReply(self.info(rec))))
            rec.creator = None
        return actions

    # ------------------------------------------------------------------ ending

    def request_stop(
        self, sandbox_id: str, reason: str, now: float, key: ReplyKey | None = None
    ) -> tuple[Message | None, list[Action]]:
        """The reply (None: it comes later, to ``key``, once the agent has stopped the
        sandbox) and the actions to take."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            queued = [p for p in self.pending if p.sandbox_id == sandbox_id]
            if queued and sandbox_id:  # still waiting for a slot: it never starts
                self.pending.remove(queued[0])
                why = f"sandbox {sandbox_id} was stopped while queued: {reason}"
                return _not_found(sandbox_id), [
                    Reply(queued[0].key, ErrorReply(ErrorCode.TERMINATED, why))
                ]
            if len(self.stopped_unknown) >= MAX_STOPPED_UNKNOWN:  # bounded: oldest goes
                del self.stopped_unknown[next(iter(self.stopped_unknown))]
            self.stopped_unknown[sandbox_id] = now
            return _not_found(sandbox_id), []
        actions: list[Action] = []
        if rec.status in ACTIVE:
            actions = self._end(rec, SandboxStatus.TERMINATED, now, reason, stop=True)
        if key is not None and self._stop_in_flight(rec):
            # Answered once the agent has stopped it: a handle made after this reply
            # must find nothing left to exec in (see stop_confirmed).
            rec.stop_waiters.append(Waiter(key, now + STOP_CONFIRM_SECONDS))
            return None, actions
        return SandboxReply(self.info(rec)), actions

    @staticmethod
    def _stop_in_flight(rec: SandboxRecord) -> bool:
        return rec.placing or rec.stops_unconfirmed > 0

    def _stop_on_agent(self, rec: SandboxRecord, agent_id: str, reason: str) -> SendToAgent:
        rec.stops_unconfirmed += 1
        return SendToAgent(agent_id, StopSandbox(rec.sandbox_id, reason))

    def stop_confirmed(self, sandbox_id: str, error: ErrorReply | None = None) -> list[Action]:
        """The agent answered a StopSandbox: done, or ``error`` (its runtime could not
        remove the sandbox), which the stop's callers then get: not a false "stopped"."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return []
        rec.stops_unconfirmed = max(0, rec.stops_unconfirmed - 1)
        if error is not None and rec.stop_waiters:
            waiters, rec.stop_waiters = rec.stop_waiters, []
            return [Reply(w.key, error) for w in waiters]
        return self._answer_stop_waiters(rec)

    def _answer_stop_waiters(self, rec: SandboxRecord, *, force: bool = False) -> list[Action]:
        if not rec.stop_waiters or (self._stop_in_flight(rec) and not force):
            return []
        waiters, rec.stop_waiters = rec.stop_waiters, []
        reply = SandboxReply(self.info(rec))
        return [Reply(w.key, reply) for w in waiters]

    def sandbox_exited(
        self, sandbox_id: str, exit_code: int | None, reason: str, now: float
    ) -> list[Action]:
        rec = self.sandboxes.get(sandbox_id)
        if rec is None or rec.status not in ACTIVE:
            return []
        rec.exit_code = exit_code
        status = SandboxStatus.FAILED if reason else SandboxStatus.COMPLETED
        return self._end(rec, status, now, reason or f"exited with code {exit_code}")

    def _end(
        self,
        rec: SandboxRecord,
        status: SandboxStatus,
        now: float,
        reason: str,
        *,
        stop: bool = False,
    ) -> list[Action]:
        """Move an active sandbox to a terminal status; free its slot; wake waiters."""
        actions: list[Action] = []
        agent = self.agents.get(rec.agent_id) if rec.agent_id else None
        if agent is not None:
            agent.active.discard(rec.sandbox_id)
            if stop and agent.alive:
                actions.append(self._stop_on_agent(rec, agent.agent_id, reason))
        rec.status = status
        rec.reason = reason
        rec.ended_at = now
        if rec.creator is not None:
            code = ErrorCode.TERMINATED if status is SandboxStatus.TERMINATED else ErrorCode.FAILED
            detail = {"sandbox_id": rec.sandbox_id}
            actions.append(Reply(rec.creator, ErrorReply(code, reason, detail)))
            rec.creator = None
        for waiter in self.waiters.pop(rec.sandbox_id, []):
            actions.append(Reply(waiter.key, SandboxReply(self.info(rec))))
        actions += self._dispatch(now)
        return actions

    def wait(
        self, key: ReplyKey, sandbox_id: str, timeout_seconds: float, now: float
    ) -> list[Action]:
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return [Reply(key, _not_found(sandbox_id))]
        if rec.status not in ACTIVE or timeout_seconds <= 0:
            return [Reply(key, SandboxReply(self.info(rec)))]
        self.waiters.setdefault(sandbox_id, []).append(Waiter(key, now + timeout_seconds))
        return []

    # ------------------------------------------------------------------ sessions

    def session_keepalive(self, session_id: str, lease_seconds: float, now: float) -> None:
        if session_id not in self.closed_sessions:  # a keepalive late after the close
            self.sessions[session_id] = now + max(0.1, lease_seconds)

    def session_close(
        self, session_id: str, reason: str, now: float
    ) -> tuple[list[str], list[Action]]:
        self.sessions.pop(session_id, None)
        self.closed_sessions[session_id] = now
        stopped: list[str] = []
        actions: list[Action] = []
        # Its queued creates go first: the slots freed below must not be given to them.
        for req in [p for p in self.pending if p.spec.session_id == session_id]:
            self.pending.remove(req)
            actions.append(Reply(req.key, ErrorReply(ErrorCode.TERMINATED, reason)))
        for rec in list(self.sandboxes.values()):
            if rec.spec.session_id == session_id and rec.status in ACTIVE:
                stopped.append(rec.sandbox_id)
                actions += self._end(rec, SandboxStatus.TERMINATED, now, reason, stop=True)
        return stopped, actions

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Action]:
        """Everything that happens because time passed."""
        actions: list[Action] = []
        for agent in list(self.agents.values()):
            if agent.alive and now - agent.last_seen > self.config.dead_after_seconds:
                agent.alive = False
                agent.dead_since = now
                reason = (
                    f"agent {agent.agent_id} lost: no heartbeat for {now - agent.last_seen:.1f}s"
                )
                for sid in list(agent.active):
                    actions += self._end(self.sandboxes[sid], SandboxStatus.FAILED, now, reason)
                actions += self._agent_gone(agent.agent_id)
            elif (
                agent.dead_since is not None
                and now - agent.dead_since > self.config.forget_dead_seconds
            ):
                del self.agents[agent.agent_id]  # dead long ago: no longer news
        for rec in list(self.sandboxes.values()):
            if rec.stop_waiters and any(w.deadline <= now for w in rec.stop_waiters):
                actions += self._answer_stop_waiters(rec, force=True)  # best effort
            if rec.status not in ACTIVE:
                if rec.ended_at is not None and now - rec.ended_at > self.config.keep_ended_seconds:
                    del self.sandboxes[rec.sandbox_id]
                continue
            if rec.deadline is not None and now >= rec.deadline:
                reason = f"max lifetime of {rec.spec.max_lifetime_seconds:g}s reached"
                actions += self._end(rec, SandboxStatus.TERMINATED, now, reason, stop=True)
            elif rec.creator_deadline is not None and rec.status is SandboxStatus.CREATING:
                if now >= rec.creator_deadline:
                    actions += self._end(
                        rec, SandboxStatus.FAILED, now, "agent did not start it in time", stop=True
                    )
        for forget in (self.closed_sessions, self.stopped_unknown):
            for key, when in list(forget.items()):
                if now - when > self.config.keep_ended_seconds:
                    del forget[key]
        for session_id, expiry in list(self.sessions.items()):
            if now >= expiry:
                _, more = self.session_close(
                    session_id, f"session {session_id} lease expired (client gone)", now
                )
                actions += more
        expired = [p for p in self.pending if p.deadline <= now]
        for req in expired:
            self.pending.remove(req)
            waited = now - req.queued_at
            actions.append(
                Reply(
                    req.key,
                    ErrorReply(
                        ErrorCode.TIMEOUT,
                        f"no free sandbox slot in the cluster after {waited:.1f}s "
                        f"({self.free_slots()} free, {len(self.pending)} still queued); "
                        "raise the timeout, stop sandboxes, or add agents",
                    ),
                )
            )
        for sid, waiters in list(self.waiters.items()):
            keep = [w for w in waiters if w.deadline > now]
            found = self.sandboxes.get(sid)
            for w in waiters:
                if w.deadline <= now:
                    msg: Message = SandboxReply(self.info(found)) if found else _not_found(sid)
                    actions.append(Reply(w.key, msg))
            if keep:
                self.waiters[sid] = keep
            else:
                del self.waiters[sid]
        return actions

    def _agent_gone(self, agent_id: str) -> list[Action]:
        """A dead agent answers nothing more: stops waiting on it are answered now."""
        actions: list[Action] = []
        for rec in self.sandboxes.values():
            if rec.agent_id == agent_id and self._stop_in_flight(rec):
                rec.placing, rec.stops_unconfirmed = False, 0
                actions += self._answer_stop_waiters(rec)
        return actions

    def free_slots(self) -> int:
        return sum(a.free for a in self.agents.values() if a.alive)


def validate_spec(spec: SandboxSpec) -> str | None:
    """Why a spec cannot be placed, or None."""
    if not spec.image.strip():
        return "container_image is empty: name an image such as 'python:3.11'"
    if not spec.command.strip():
        return "command is empty: give the program to run, e.g. command='sleep'"
    if spec.max_lifetime_seconds is not None and spec.max_lifetime_seconds <= 0:
        return f"max_lifetime_seconds must be positive, got {spec.max_lifetime_seconds}"
    if spec.memory_bytes is not None and spec.memory_bytes < 6 * 1024 * 1024:
        return f"memory_bytes must be at least 6 MiB, got {spec.memory_bytes}"
    if spec.network not in (None, "none", "bridge"):
        return f"network must be None, 'none' or 'bridge', got {brief(spec.network)}"
    return None


def _not_found(sandbox_id: str) -> ErrorReply:
    return ErrorReply(
        ErrorCode.NOT_FOUND,
        f"no sandbox {brief(sandbox_id)} in this cluster (never existed, or ended long ago)",
        {"sandbox_id": sandbox_id},
    )
