"""The scheduler's decisions, as a pure state machine: no sockets, no clock.

Every entry point takes the current time and returns the :data:`Action` list the
socket layer must carry out (a reply to a client, a request to an agent). The
tables here are soft state: after a restart they are rebuilt from what agents
report when they register again.
"""

from __future__ import annotations

from collections.abc import Iterable

from aviato.protocol import (
    ClusterStatusReply,
    EndedBy,
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
    SpareShape,
    StopSandbox,
    VolumeListReply,
)
from scheduler.placement import PlacementState
from scheduler.queries import Filter, list_page, sandbox_info, status_page
from scheduler.records import (
    _SPEC_FIELDS,
    ACTIVE,
    BLIND_MEMORY_SECONDS,
    MAX_INTERNED_SPECS,
    MAX_PASSED_SPECS,
    MAX_STOPPED_UNKNOWN,
    STOP_CONFIRM_SECONDS,
    Action,
    AgentDeclaredDead,
    AgentRecord,
    Config,
    PendingCreate,
    Reply,
    ReplyKey,
    SandboxRecord,
    SendToAgent,
    Waiter,
    _check_sandbox_id,
    _not_found,
    registration_refusal,
    validate_spec,
)

#: The state machine and the records its callers use (defined in scheduler/records.py).
__all__ = [
    "STOP_CONFIRM_SECONDS",
    "Action",
    "AgentDeclaredDead",
    "Config",
    "Reply",
    "SchedulerState",
    "SendToAgent",
    "registration_refusal",
    "validate_spec",
]


class SchedulerState(PlacementState):
    """The decisions: each event handler takes the time and returns the actions (those
    of idle timeouts, lifetimes, pause and snapshots are in scheduler/lifecycle.py; of
    placement and resources, in scheduler/placement.py)."""

    #: Session leases that expired (for the metrics).
    leases_expired: int = 0

    # ------------------------------------------------------------------ queries

    def info(self, rec: SandboxRecord) -> SandboxInfo:
        """The row as clients see it."""
        return sandbox_info(rec, self.agents)

    def get(self, sandbox_id: str) -> Message:
        """One sandbox's row, or NOT_FOUND."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return _not_found(sandbox_id)
        return SandboxReply(self.info(rec))

    def list_sandboxes(
        self,
        tags: Iterable[str] = (),
        statuses: Iterable[SandboxStatus] = (),
        session_id: str | None = None,
        *,
        agent_id: str | None = None,
        cursor: str = "",
        limit: int | None = None,
    ) -> SandboxListReply:
        """One bounded page of the rows that match (see ``queries.list_page``)."""
        want = Filter(frozenset(tags), frozenset(statuses), session_id, agent_id)
        if session_id is not None and not (want.statuses and want.statuses <= ACTIVE):
            session_rows = None  # the session index holds live rows only
        elif session_id is not None:
            ids = self._by_session.get(session_id, set())
            session_rows = [self.live[s] for s in ids]
        else:
            session_rows = None
        return list_page(
            self._order,
            self.sandboxes,
            self.agents,
            session_rows,
            want,
            cursor,
            limit,
        )

    def status(self, now: float, cursor: str = "", limit: int | None = None) -> ClusterStatusReply:
        """The counts, and one bounded page of the agents (see ``queries.status_page``)."""
        counts: dict[str, int] = {s.value: n for s, n in self.counts.items()}
        counts["queued"] = len(self.pending)
        return status_page(
            self.agents, counts, len(self.sessions), self.free_slots(), now, cursor, limit
        )

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
            self._alive_count += 1
        else:
            if agent.instance != msg.instance:
                # Another process now: its predecessor will confirm no stop it was sent.
                actions += self._agent_gone(msg.agent_id)
            agent.address, agent.slots, agent.runtime = msg.address, msg.slots, msg.runtime
            agent.labels, agent.last_seen = dict(msg.labels), now
            agent.public_key, agent.lane = msg.public_key, msg.lane
            agent.instance, agent.dead_since = msg.instance, None
            self._set_alive(agent, True)
        self._set_capacity(agent, msg)
        self._agent_added(agent)
        self._set_isolations(agent, tuple(msg.isolations), msg.probe)
        agent.userns = msg.userns
        self._set_spares(agent, msg.spares, msg.spare_shapes)
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
                    actions += self._started(rec, now)
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
        self._agent_changed(agent)
        actions += self._dispatch(now)
        reply = RegisterReply(
            heartbeat_interval=self.heartbeat_interval(),
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
        self._set_alive(agent, False)  # first: what its sandboxes free is not placed there
        for sid in list(agent.active):
            actions += self._end(self.sandboxes[sid], SandboxStatus.TERMINATED, now, reason)
        actions += self._agent_gone(agent_id)
        del self.agents[agent_id]
        self._volumes.drop(agent_id)
        return actions

    def dead_agents(self, now: float) -> tuple[str, ...]:
        """Agents dead for longer than the orphan grace: whatever they left on an engine
        may be removed by any agent on it."""
        # Cached (asked with every heartbeat): recomputed only when it can have changed.
        if not (self._dead_valid_from <= now < self._dead_valid_until):
            self._find_dead_agents(now)
        return self._dead_agents

    def _find_dead_agents(self, now: float) -> None:
        grace = self.config.orphan_grace_seconds
        dead = []
        until = float("inf")
        for a in self.agents.values():
            if a.dead_since is None:
                continue
            if now - a.dead_since >= grace:
                dead.append(a.agent_id)
            else:
                until = min(until, a.dead_since + grace)
        self._dead_agents = tuple(sorted(dead))
        self._dead_valid_from, self._dead_valid_until = now, until

    def is_registered(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is a live registered agent."""
        agent = self.agents.get(agent_id)
        return agent is not None and agent.alive

    def set_spares(self, agent_id: str, spares: int, shapes: Iterable[SpareShape] = ()) -> None:
        """An agent reports the spares it holds ready, per shape (AgentSpares)."""
        agent = self.agents.get(agent_id)
        if agent is not None:
            self._set_spares(agent, spares, shapes)

    def heartbeat(
        self,
        agent_id: str,
        running: Iterable[str],
        now: float,
        *,
        full: bool = True,
        gone: Iterable[str] = (),
    ) -> list[Action]:
        """An agent is alive. With ``full``, ``running`` is every sandbox it has (a
        periodic resync: O(its sandboxes)); otherwise ``gone`` lists those it no longer
        has since its last heartbeat (O(changes))."""
        agent = self.agents.get(agent_id)
        if agent is None or not agent.alive:
            return []
        agent.last_seen = now
        actions: list[Action] = []
        if full:
            still = set(running)
            missing = [sid for sid in agent.active if sid not in still]
        else:
            missing = [sid for sid in gone if sid in agent.active]
        for sid in missing:
            rec = self.sandboxes[sid]
            if rec.status in (SandboxStatus.RUNNING, SandboxStatus.PAUSED):
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
        spec = self._intern(reported.spec)
        deadline = None
        if spec.max_lifetime_seconds is not None:
            deadline = reported.created_at + spec.max_lifetime_seconds
        paused = reported.status is SandboxStatus.PAUSED
        rec = SandboxRecord(
            sandbox_id=reported.sandbox_id,
            spec=spec,
            status=SandboxStatus.PAUSED if paused else SandboxStatus.RUNNING,
            created_at=reported.created_at,
            agent_id=agent_id,
            deadline=deadline,
        )
        self._add_row(rec)
        if not paused:
            self._arm_idle(rec, now)
        self._hold(self.agents[agent_id], rec, reported.gpu_ids)
        if spec.session_id and spec.session_id not in self.sessions:
            # The client, if alive, renews this with its next keepalive.
            self._lease(spec.session_id, now + self.config.adopted_lease_seconds, now)
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
        """A client asks for a sandbox: refused, queued for a slot, or placed at once."""
        spec, problem = self._checked_spec(spec)
        problem = problem or _check_sandbox_id(sandbox_id)
        if problem:
            return [Reply(key, ErrorReply(ErrorCode.BAD_REQUEST, problem))]
        refusal = self.snapshot_problem(spec)
        if refusal is not None:
            return [Reply(key, refusal)]
        why_not = self._no_agents(now)
        if why_not:
            return [Reply(key, ErrorReply(ErrorCode.UNAVAILABLE, why_not))]
        why_not = self._no_isolation(spec, now)
        if why_not:
            return [Reply(key, ErrorReply(ErrorCode.ISOLATION_UNAVAILABLE, why_not))]
        why_not = self._never_fits(spec, now)
        if why_not:
            return [Reply(key, self._refusal(why_not))]
        if sandbox_id in self.stopped_unknown:
            why = f"sandbox {sandbox_id} was stopped before its create arrived"
            return [Reply(key, ErrorReply(ErrorCode.TERMINATED, why))]
        if sandbox_id in self.sandboxes or sandbox_id in self._pending_ids:
            why = f"sandbox id {sandbox_id} is taken: a create is sent once per id"
            return [Reply(key, ErrorReply(ErrorCode.BAD_REQUEST, why))]
        session_id = spec.session_id
        if session_id and session_id in self.closed_sessions:
            why = f"session {session_id} is closed; open a new session"
            return [Reply(key, ErrorReply(ErrorCode.TERMINATED, why))]
        if session_id and session_id not in self.sessions:
            # Not heard of since a restart: a lease of its own, renewed by a live client,
            # so that its sandboxes are reaped if none is.
            self._lease(session_id, now + self.config.adopted_lease_seconds, now)
        self.pending.append(
            PendingCreate(key, spec, now + max(0.0, timeout_seconds), now, sandbox_id)
        )
        if sandbox_id:
            self._pending_ids.add(sandbox_id)
        return self._dispatch(now)

    def _checked_spec(self, spec: SandboxSpec) -> tuple[SandboxSpec, str | None]:
        """``spec`` as shared (``_intern``), and why it cannot be placed
        (``validate_spec``): both pure, so found once per spec object."""
        known = self._checked.get(id(spec))
        if known is not None and known[0] is spec:
            return known[1], known[2]
        problem = validate_spec(spec)
        shared = spec if problem else self._intern(spec)
        if len(self._checked) >= MAX_INTERNED_SPECS:
            self._checked.clear()  # bounded; an entry holds its spec, so ids stay true
        self._checked[id(spec)] = (spec, shared, problem)
        return shared, problem

    def _intern(self, spec: SandboxSpec) -> SandboxSpec:
        """One object for equal specs (memory: most sandboxes share a few specs)."""
        key = tuple(
            tuple(v.items()) if type(v) is dict else v
            for v in map(spec.__getattribute__, _SPEC_FIELDS)
        )
        try:
            found = self._specs.get(key)
        except TypeError:  # an unhashable value: not shared
            return spec
        if found is not None:
            return found
        if len(self._specs) >= MAX_INTERNED_SPECS:
            self._specs.clear()  # bounded: many distinct specs just go unshared
        self._specs[key] = spec
        return spec

    def set_volumes(self, agent_id: str, names: Iterable[str]) -> None:
        """An agent reports the named volumes its host holds (AgentVolumes)."""
        if agent_id in self.agents:
            self._volumes.set(agent_id, names)

    def list_volumes(self) -> VolumeListReply:
        return VolumeListReply(self._volumes.listing(self.agents))

    def _dispatch(self, now: float) -> list[Action]:
        """Place queued creates, in order, while an agent has room. One that fits no
        agent now (its GPUs are taken) is passed over, not waited behind: the walk
        goes on while any agent has a free slot, past a few hundred specs at most."""
        actions: list[Action] = []
        i = 0
        passed: set[int] = set()  # specs (interned: equal ones are one) that fit nowhere
        reserved: set[str] = set()  # agents held for starved creates (placement.py)
        while i < len(self.pending) and len(self._free) and len(passed) < MAX_PASSED_SPECS:
            req = self.pending[i]
            if id(req.spec) in passed:
                i += 1
                continue
            if reserved:
                agent = self._choose_around(req.spec, reserved)
            else:
                agent = self.choose_agent(req.spec)
            if agent is None:
                passed.add(id(req.spec))
                self._reserve(req, now, reserved)
                i += 1
                continue
            del self.pending[i]
            self._pending_ids.discard(req.sandbox_id)
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
            self._add_row(rec)
            assert rec.creator_deadline is not None
            self._placing[sid] = rec.creator_deadline
            self._hold(agent, rec)
            agent.inflight.add(sid)
            if agent.spare_shapes:
                self._took_spare(agent, req.spec)
            self._agent_changed(agent)
            actions.append(SendToAgent(agent.agent_id, PlaceSandbox(self.info(rec))))
        return actions

    def placement_done(self, sandbox_id: str, error: ErrorReply | None, now: float) -> list[Action]:
        """The agent answered a PlaceSandbox."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return []
        rec.placing = False
        self._track_inflight(rec)
        if rec.status is not SandboxStatus.CREATING:
            # Stopped (or lost) while starting: make sure it does not linger (unless its
            # agent has left: it stopped its sandboxes, and would confirm no stop).
            if error is None and rec.agent_id and rec.agent_id in self.agents:
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
        return self._started(rec, now)

    def _started(self, rec: SandboxRecord, now: float) -> list[Action]:
        self._set_status(rec, SandboxStatus.RUNNING)
        self._arm_idle(rec, now)
        self._placing.pop(rec.sandbox_id, None)
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
            queued = (
                [p for p in self.pending if p.sandbox_id == sandbox_id]
                if sandbox_id in self._pending_ids
                else []
            )
            if queued and sandbox_id:  # still waiting for a slot: it never starts
                self.pending.remove(queued[0])
                self._pending_ids.discard(sandbox_id)
                why = f"sandbox {sandbox_id} was stopped while queued: {reason}"
                return _not_found(sandbox_id), [
                    Reply(queued[0].key, ErrorReply(ErrorCode.TERMINATED, why))
                ]
            if not sandbox_id:  # "" names no sandbox: remembered, it refused every
                return _not_found(sandbox_id), []  # create that lets us choose the id
            if len(self.stopped_unknown) >= MAX_STOPPED_UNKNOWN:  # bounded: oldest goes
                del self.stopped_unknown[next(iter(self.stopped_unknown))]
            self.stopped_unknown[sandbox_id] = now
            return _not_found(sandbox_id), []
        actions: list[Action] = []
        if rec.status in ACTIVE:
            actions = self._end(
                rec, SandboxStatus.TERMINATED, now, reason, stop=True, ended_by=EndedBy.STOPPED
            )
        if key is not None and self._stop_in_flight(rec):
            # Answered once the agent has stopped it: a handle made after this reply
            # must find nothing left to exec in (see stop_confirmed).
            waiter = Waiter(key, now + STOP_CONFIRM_SECONDS)
            self._stop_waiters.setdefault(sandbox_id, []).append(waiter)
            return None, actions
        return SandboxReply(self.info(rec)), actions

    def _stop_on_agent(self, rec: SandboxRecord, agent_id: str, reason: str) -> SendToAgent:
        rec.stops_unconfirmed += 1
        self._track_inflight(rec)
        return SendToAgent(agent_id, StopSandbox(rec.sandbox_id, reason))

    def stop_confirmed(self, sandbox_id: str, error: ErrorReply | None = None) -> list[Action]:
        """The agent answered a StopSandbox: done, or ``error`` (its runtime could not
        remove the sandbox), which the stop's callers then get: not a false "stopped"."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return []
        rec.stops_unconfirmed = max(0, rec.stops_unconfirmed - 1)
        self._track_inflight(rec)
        if error is not None and sandbox_id in self._stop_waiters:
            waiters = self._stop_waiters.pop(sandbox_id)
            return [Reply(w.key, error) for w in waiters]
        return self._answer_stop_waiters(rec)

    def _answer_stop_waiters(self, rec: SandboxRecord, *, force: bool = False) -> list[Action]:
        if rec.sandbox_id not in self._stop_waiters or (self._stop_in_flight(rec) and not force):
            return []
        waiters = self._stop_waiters.pop(rec.sandbox_id)
        reply = SandboxReply(self.info(rec))
        return [Reply(w.key, reply) for w in waiters]

    def sandbox_exited(
        self, sandbox_id: str, exit_code: int | None, reason: str, now: float
    ) -> list[Action]:
        """An agent reports a sandbox's command ended (``reason``: why, if it failed)."""
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
        ended_by: str = "",
    ) -> list[Action]:
        """Move an active sandbox to a terminal status; free its slot; wake waiters.
        ``ended_by``: which limit (or who) ended it, an ``EndedBy`` value."""
        actions: list[Action] = []
        agent = self.agents.get(rec.agent_id) if rec.agent_id else None
        if agent is not None:
            self._release(agent, rec)
            self._agent_changed(agent)
            if stop and agent.alive:
                actions.append(self._stop_on_agent(rec, agent.agent_id, reason))
        self._set_status(rec, status)
        rec.reason = reason
        rec.ended_by = ended_by
        rec.ended_at = now
        self._row_ended(rec, now)
        if rec.creator is not None:
            code = ErrorCode.TERMINATED if status is SandboxStatus.TERMINATED else ErrorCode.FAILED
            detail = {"sandbox_id": rec.sandbox_id}
            if ended_by:
                detail["ended_by"] = ended_by
            actions.append(Reply(rec.creator, ErrorReply(code, reason, detail)))
            rec.creator = None
        for waiter in self.waiters.pop(rec.sandbox_id, []):
            actions.append(Reply(waiter.key, SandboxReply(self.info(rec))))
        actions += self._dispatch(now)
        return actions

    def wait(
        self, key: ReplyKey, sandbox_id: str, timeout_seconds: float, now: float
    ) -> list[Action]:
        """A client waits for a sandbox to end: answered then, or at its timeout."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return [Reply(key, _not_found(sandbox_id))]
        if rec.status not in ACTIVE or not timeout_seconds > 0:  # NaN too: now, not never
            return [Reply(key, SandboxReply(self.info(rec)))]
        self.waiters.setdefault(sandbox_id, []).append(Waiter(key, now + timeout_seconds))
        return []

    # ------------------------------------------------------------------ sessions

    def session_keepalive(self, session_id: str, lease_seconds: float, now: float) -> None:
        """A live client renews its session's lease."""
        if session_id not in self.closed_sessions:  # a keepalive late after the close
            self._lease(session_id, now + max(0.1, lease_seconds), now)

    def _lease(self, session_id: str, expiry: float, now: float) -> None:
        self.sessions[session_id] = expiry
        self._lease_renewed[session_id] = now
        self._lease_timers.add(expiry, session_id)

    def session_close(
        self, session_id: str, reason: str, now: float
    ) -> tuple[list[str], list[Action]]:
        """A session ends (closed, or its lease expired): its sandboxes are stopped and
        its queued creates refused; returns the ids stopped."""
        self.sessions.pop(session_id, None)
        self._lease_renewed.pop(session_id, None)
        self.closed_sessions.pop(session_id, None)  # re-inserted: kept in time order
        self.closed_sessions[session_id] = now
        stopped: list[str] = []
        actions: list[Action] = []
        # Its queued creates go first: the slots freed below must not be given to them.
        for req in [p for p in self.pending if p.spec.session_id == session_id]:
            self.pending.remove(req)
            self._pending_ids.discard(req.sandbox_id)
            actions.append(Reply(req.key, ErrorReply(ErrorCode.TERMINATED, reason)))
        for sid in sorted(self._by_session.get(session_id, ()), key=lambda s: self.live[s].seq):
            rec = self.live[sid]
            stopped.append(sid)
            actions += self._end(
                rec, SandboxStatus.TERMINATED, now, reason, stop=True, ended_by=EndedBy.SESSION
            )
        return stopped, actions

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Action]:
        """Everything that happens because time passed: O(what is due), never a walk of
        the sandbox table (agents are walked: a few thousand at most)."""
        actions = self._judge_agents(now)
        for sid, waiters in list(self._stop_waiters.items()):
            rec = self.sandboxes.get(sid)
            if rec is None:
                del self._stop_waiters[sid]
            elif any(w.deadline <= now for w in waiters):
                actions += self._answer_stop_waiters(rec, force=True)  # best effort
        keep = self.config.keep_ended_seconds
        while self.ended:
            sid, ended_at = next(iter(self.ended.items()))
            if now - ended_at <= keep:
                break
            self._forget_row(sid)
        for sid in self._lifetimes.due(now):
            rec = self.live.get(sid)
            if rec is not None and rec.deadline is not None and now >= rec.deadline:
                lifetime = rec.deadline - rec.created_at  # extend_lifetime included
                reason = f"max lifetime of {lifetime:g}s reached"
                actions += self._end(
                    rec,
                    SandboxStatus.TERMINATED,
                    now,
                    reason,
                    stop=True,
                    ended_by=EndedBy.MAX_LIFETIME,
                )
        actions += self._idle_due(now)
        if self._pausing:
            actions += self._pauses_due(now)
        late = [sid for sid, when in self._placing.items() if now >= when]
        for sid in late:
            rec = self.live.get(sid)
            self._placing.pop(sid, None)
            if rec is not None and rec.status is SandboxStatus.CREATING:
                actions += self._end(
                    rec, SandboxStatus.FAILED, now, "agent did not start it in time", stop=True
                )
        for forget in (self.closed_sessions, self.stopped_unknown):
            while forget:  # in time order: the oldest first
                key, when = next(iter(forget.items()))
                if now - when <= keep:
                    break
                del forget[key]
        for session_id in list(self._lease_timers.due(now)):
            expiry = self.sessions.get(session_id)
            if expiry is None or now < expiry:
                continue
            # A keepalive unread while the scheduler was blind is not the client's fault.
            credit = self.blind.blind_since(self._lease_renewed.get(session_id, expiry), now)
            if now < expiry + credit:
                self._lease_timers.add(expiry + credit, session_id)
                continue
            if expiry is not None and now >= expiry:
                self.leases_expired += 1
                _, more = self.session_close(
                    session_id, f"session {session_id} lease expired (client gone)", now
                )
                actions += more
        expired = [p for p in self.pending if p.deadline <= now] if self.pending else []
        # Queued in the start-up grace (or before its only agent left): an isolation
        # that no live agent offers now is refused rather than waited for.
        unserved = [
            (p, why)
            for p in self.pending
            if p.spec.isolation is not None and (why := self._no_isolation(p.spec, now))
        ]
        for req, why in unserved:
            if req.deadline > now:
                self.pending.remove(req)
                self._pending_ids.discard(req.sandbox_id)
                actions.append(Reply(req.key, ErrorReply(ErrorCode.ISOLATION_UNAVAILABLE, why)))
        for req, why in self._unplaceable(now):
            if req in self.pending and req.deadline > now:
                self.pending.remove(req)
                self._pending_ids.discard(req.sandbox_id)
                actions.append(Reply(req.key, self._refusal(why)))
        for req in expired:
            self.pending.remove(req)
            self._pending_ids.discard(req.sandbox_id)
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
            keep_waiting = [w for w in waiters if w.deadline > now]
            if len(keep_waiting) == len(waiters):
                continue
            found = self.sandboxes.get(sid)
            for w in waiters:
                if w.deadline <= now:
                    msg: Message = SandboxReply(self.info(found)) if found else _not_found(sid)
                    actions.append(Reply(w.key, msg))
            if keep_waiting:
                self.waiters[sid] = keep_waiting
            else:
                del self.waiters[sid]
        return actions

    def scheduler_blind(self, start: float, end: float) -> None:
        """The scheduler heard nobody from ``start`` to ``end`` (its loop stalled, or
        heartbeats sat unread behind a backlog): silence then is not the agents'."""
        self.blind.add(start, end)

    def _judge_agents(self, now: float) -> list[Action]:
        """Declare dead the agents silent for longer than dead-after, not counting the
        time the scheduler itself was blind (see ``scheduler_blind``)."""
        actions: list[Action] = []
        dead_after = self.dead_after()
        blind = self.blind
        for agent in list(self.agents.values()):
            if agent.alive:
                heard = now - agent.last_seen
                if heard <= dead_after:
                    continue
                blind_for = blind.blind_since(agent.last_seen, now)
                if heard - blind_for <= dead_after:
                    continue
                agent.dead_since = now
                self._dead_list_changed()
                self._set_alive(agent, False)
                reason = f"agent {agent.agent_id} lost: no heartbeat for {heard:.1f}s"
                actions.append(
                    AgentDeclaredDead(agent.agent_id, reason, heard, blind_for, len(agent.active))
                )
                for sid in list(agent.active):
                    actions += self._end(self.sandboxes[sid], SandboxStatus.FAILED, now, reason)
                actions += self._agent_gone(agent.agent_id)
            elif (
                agent.dead_since is not None
                and now - agent.dead_since > self.config.forget_dead_seconds
            ):
                del self.agents[agent.agent_id]  # dead long ago: no longer news
                self._volumes.drop(agent.agent_id)
                self._dead_list_changed()
        self.blind.forget_before(now - BLIND_MEMORY_SECONDS)
        return actions

    def _agent_gone(self, agent_id: str) -> list[Action]:
        """A dead agent answers nothing more: stops waiting on it are answered now."""
        actions: list[Action] = []
        agent = self.agents.get(agent_id)
        if agent is None:
            return actions
        inflight, agent.inflight = agent.inflight, set()
        for sid in sorted(inflight):
            rec = self.sandboxes.get(sid)
            if rec is not None and rec.agent_id == agent_id and self._stop_in_flight(rec):
                rec.placing, rec.stops_unconfirmed = False, 0
                actions += self._answer_stop_waiters(rec)
        return actions
