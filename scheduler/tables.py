"""The scheduler's soft-state tables (agents, sandbox rows, sessions, queued creates)
and their indexes, kept in step by the few methods that change them. Pure: no sockets,
no clock. The decisions that use them are in scheduler/state.py."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from aviato.protocol import SandboxSpec, SandboxStatus, SpareShape
from scheduler.indexes import BlindSpots, FreeIndex, RowOrder, SpareIndex, Timers
from scheduler.records import (
    HEARTBEAT_RATE,
    MAX_HEARTBEAT_INTERVAL,
    MAX_SPARE_SHAPES,
    AgentRecord,
    Config,
    PendingCreate,
    SandboxRecord,
    Waiter,
    _new_sandbox_id,
    _seq_of,
)
from scheduler.volumes import VolumeIndex

__all__ = ["Tables"]


class Tables:
    """The scheduler's tables and the indexes kept in step with them. Every change to
    a row or an agent goes through the methods here, so that an index cannot drift."""

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
        # Indexes: every decision below costs the same at 10 or 100,000 sandboxes.
        #: rows of active sandboxes (``sandboxes`` holds every row, ended ones too)
        self.live: dict[str, SandboxRecord] = {}
        #: ended rows, oldest end first: forgotten from the front
        self.ended: dict[str, float] = {}
        self.counts: dict[SandboxStatus, int] = {s: 0 for s in SandboxStatus}
        self._by_session: dict[str, set[str]] = {}
        self._free = FreeIndex()
        #: agents holding ready spares, per shape: a create of that shape goes there
        self._spares = SpareIndex()
        #: agents holding each named volume: a create naming one goes there when it can
        self._volumes = VolumeIndex()
        #: live agents with free slots, per isolation level they offer (a FreeIndex
        #: each), and live agents per isolation level (free or not)
        self._by_isolation = SpareIndex()
        self._offering: dict[str, set[str]] = {}
        self._alive_count = 0
        self._pending_ids: set[str] = set()
        self._lifetimes: Timers[str] = Timers()
        self._lease_timers: Timers[str] = Timers()
        self._lease_renewed: dict[str, float] = {}
        #: CREATING rows whose creator waits: sandbox id -> when the agent is too late
        self._placing: dict[str, float] = {}
        #: Stop requests answered once the agent confirms ("stopped" means stopped
        #: there), by sandbox id; each answered by its deadline at the latest.
        self._stop_waiters: dict[str, list[Waiter]] = {}
        #: Identical specs (a session's pool asks for many alike) share one object.
        self._specs: dict[tuple[object, ...], SandboxSpec] = {}
        #: id(spec) -> (that spec, its shared one, why it cannot be placed): checked
        #: once per object (the scheduler's decoder hands one object per distinct spec).
        self._checked: dict[int, tuple[SandboxSpec, SandboxSpec, str | None]] = {}
        self._order: RowOrder[SandboxRecord] = RowOrder(_seq_of)
        #: when the scheduler itself could not hear agents (see BlindSpots)
        self.blind = BlindSpots()
        self._dead_agents: tuple[str, ...] = ()
        self._dead_valid_from = self._dead_valid_until = float("-inf")

    # ------------------------------------------------------------------ indexes

    def _add_row(self, rec: SandboxRecord) -> None:
        self.sandboxes[rec.sandbox_id] = rec
        self.live[rec.sandbox_id] = rec
        self.counts[rec.status] += 1
        rec.seq = self._order.add(rec)
        session_id = rec.spec.session_id
        if session_id:
            self._by_session.setdefault(session_id, set()).add(rec.sandbox_id)
        if rec.deadline is not None:
            self._lifetimes.add(rec.deadline, rec.sandbox_id)

    def _set_status(self, rec: SandboxRecord, status: SandboxStatus) -> None:
        self.counts[rec.status] -= 1
        self.counts[status] += 1
        rec.status = status

    def _row_ended(self, rec: SandboxRecord, now: float) -> None:
        sid = rec.sandbox_id
        self.live.pop(sid, None)
        self._placing.pop(sid, None)
        self.ended.pop(sid, None)
        self.ended[sid] = now
        session_id = rec.spec.session_id
        if session_id:
            same = self._by_session.get(session_id)
            if same is not None:
                same.discard(sid)
                if not same:
                    del self._by_session[session_id]

    def _forget_row(self, sid: str) -> None:
        rec = self.sandboxes.pop(sid, None)
        self.ended.pop(sid, None)
        if rec is not None:
            self.counts[rec.status] -= 1
            self._stop_waiters.pop(sid, None)
        self._order.compact(lambda r: self.sandboxes.get(r.sandbox_id) is r, len(self.sandboxes))

    def _agent_changed(self, agent: AgentRecord) -> None:
        """Keep the placement index in step with ``agent``'s free slots and liveness."""
        if agent.alive:
            self._free.set(agent.agent_id, agent.free)
        else:
            self._free.drop(agent.agent_id)
        for level in agent.isolations:  # O(its levels): two at most
            usable = agent.free if agent.alive else 0
            self._by_isolation.set(agent.agent_id, level, usable)
            offering = self._offering.setdefault(level, set())
            if agent.alive:
                offering.add(agent.agent_id)
            else:
                offering.discard(agent.agent_id)
        if agent.spare_shapes:  # O(its shapes): a few at most
            usable = agent.alive and agent.free > 0
            for key, ready in agent.spare_shapes.items():
                self._spares.set(agent.agent_id, key, ready if usable else 0)

    def _set_isolations(self, agent: AgentRecord, levels: tuple[str, ...], probe: str) -> None:
        """``agent`` offers ``levels`` now (a re-registration may change them)."""
        for level in set(agent.isolations) - set(levels):
            self._by_isolation.set(agent.agent_id, level, 0)
            self._offering.get(level, set()).discard(agent.agent_id)
        agent.isolations, agent.probe = levels, probe
        self._agent_changed(agent)

    def _set_spares(self, agent: AgentRecord, spares: int, shapes: Iterable[SpareShape]) -> None:
        held = sorted((s for s in shapes if s.ready > 0), key=lambda s: -s.ready)
        new = {shape.key: shape.ready for shape in held[:MAX_SPARE_SHAPES]}
        for key in agent.spare_shapes.keys() - new.keys():
            self._spares.set(agent.agent_id, key, 0)
        agent.spares = max(0, spares)
        agent.spare_shapes = new
        self._agent_changed(agent)

    def _set_alive(self, agent: AgentRecord, alive: bool) -> None:
        self._dead_list_changed()
        if agent.alive != alive:
            self._alive_count += 1 if alive else -1
        agent.alive = alive
        self._agent_changed(agent)

    def _track_inflight(self, rec: SandboxRecord) -> None:
        agent = self.agents.get(rec.agent_id) if rec.agent_id else None
        if agent is None:
            return
        if self._stop_in_flight(rec):
            agent.inflight.add(rec.sandbox_id)
        else:
            agent.inflight.discard(rec.sandbox_id)

    def heartbeat_interval(self) -> float:
        """What agents are told: the configured interval, longer in a big cluster (so
        that heartbeats stay a small part of the scheduler's work)."""
        n = len(self.agents)
        return max(self.config.heartbeat_interval, min(MAX_HEARTBEAT_INTERVAL, n / HEARTBEAT_RATE))

    def dead_after(self) -> float:
        return max(self.config.dead_after_seconds, 3 * self.heartbeat_interval())

    @staticmethod
    def _stop_in_flight(rec: SandboxRecord) -> bool:
        return rec.placing or rec.stops_unconfirmed > 0

    def _dead_list_changed(self) -> None:
        self._dead_valid_until = float("-inf")

    def free_slots(self) -> int:
        return self._free.total()
