"""The scheduler's lifecycle decisions (issue 13): idle timeouts, lifetime extensions,
pause and resume, and where a create from a snapshot may go. Pure, as state.py: each
entry point takes the time and returns the actions.

Idle timeouts cost O(what is due) per tick, never a walk of the table: a sandbox with
an idle timeout has one entry in ``_idle_timers`` at a time (``rec.idle_armed``).
Activity only moves ``rec.idle_deadline`` (O(1), no heap push); when the entry comes
due and the deadline has moved, it is pushed again at the new deadline. A paused
sandbox's entry is dropped when it comes due: resume arms a fresh one, so that the
idle clock does not run while a sandbox is paused (its max lifetime still does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aviato.protocol import (
    EndedBy,
    ErrorCode,
    ErrorReply,
    Message,
    PauseSandbox,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    snapshot_agent_key,
    snapshot_holder_key,
)
from scheduler.indexes import Timers
from scheduler.queries import sandbox_info
from scheduler.records import (
    ACTIVE,
    STOP_CONFIRM_SECONDS,
    Action,
    AgentRecord,
    Config,
    Reply,
    ReplyKey,
    SandboxRecord,
    SendToAgent,
    _new_sandbox_id,
    _not_found,
)
from scheduler.tables import Tables

__all__ = ["LifecycleState"]


@dataclass(slots=True)
class _PauseWaiter:
    key: ReplyKey
    pause: bool
    deadline: float


class LifecycleState(Tables):
    """The lifecycle half of the scheduler's decisions (``SchedulerState`` is the rest)."""

    def __init__(
        self,
        config: Config | None = None,
        new_id: Callable[[], str] = _new_sandbox_id,
        started_at: float = 0.0,
    ) -> None:
        super().__init__(config, new_id, started_at)
        self._idle_timers: Timers[tuple[str, float]] = Timers()
        #: A pause or resume sent to the agent, unanswered: one per sandbox at a time.
        self._pausing: dict[str, _PauseWaiter] = {}
        #: snapshot_agent_key(agent id) -> agent id, for the agents that registered.
        self._snapshot_keys: dict[str, str] = {}

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
        raise NotImplementedError  # SchedulerState's

    # ------------------------------------------------------------------ idle timeout

    def _arm_idle(self, rec: SandboxRecord, now: float) -> None:
        """Start (or restart) ``rec``'s idle clock, if it has an idle timeout."""
        idle = rec.spec.idle_timeout_seconds
        if idle is None:
            return
        rec.idle_deadline = now + idle
        if rec.idle_armed is None or rec.idle_armed > rec.idle_deadline:
            rec.idle_armed = rec.idle_deadline
            self._idle_timers.add(rec.idle_deadline, (rec.sandbox_id, rec.idle_deadline))

    def activity(self, agent_id: str, sandbox_ids: Iterable[str], now: float) -> None:
        """An agent saw exec, process, file or call traffic on these sandboxes: their
        idle clocks start again. O(ids reported); ids not on that agent are ignored."""
        live = self.live
        for sid in sandbox_ids:
            rec = live.get(sid)
            if rec is not None and rec.agent_id == agent_id and rec.idle_deadline is not None:
                idle = rec.spec.idle_timeout_seconds
                if idle is not None and rec.status is SandboxStatus.RUNNING:
                    rec.idle_deadline = now + idle

    def _idle_due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for sid, armed in self._idle_timers.due(now):
            rec = self.live.get(sid)
            if rec is None or rec.idle_armed != armed:
                continue  # ended, or a stale entry (another one is armed)
            rec.idle_armed = None
            if rec.status is not SandboxStatus.RUNNING or rec.idle_deadline is None:
                continue  # paused (resume arms it again), or still starting
            if now < rec.idle_deadline:  # busy since: wait until the moved deadline
                rec.idle_armed = rec.idle_deadline
                self._idle_timers.add(rec.idle_deadline, (sid, rec.idle_deadline))
                continue
            idle = rec.spec.idle_timeout_seconds or 0.0
            reason = f"idle timeout of {idle:g}s reached (no exec, process, file or call)"
            actions += self._end(
                rec,
                SandboxStatus.TERMINATED,
                now,
                reason,
                stop=True,
                ended_by=EndedBy.IDLE_TIMEOUT,
            )
        return actions

    # ------------------------------------------------------------------ lifetime

    def extend_lifetime(self, sandbox_id: str, seconds: float, now: float) -> Message:
        """Push the sandbox's max-lifetime deadline ``seconds`` out: its row, or why not.
        A sandbox with no max lifetime keeps none (its row is the answer)."""
        if not 0 < seconds < math.inf:  # NaN too
            why = f"extend_lifetime takes a positive, finite number of seconds, got {seconds}"
            return ErrorReply(ErrorCode.BAD_REQUEST, why, {"sandbox_id": sandbox_id})
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return _not_found(sandbox_id)
        if rec.status not in ACTIVE:
            return _ended(rec, "extend its lifetime")
        if rec.deadline is not None:
            rec.deadline += seconds
            self._lifetimes.add(rec.deadline, sandbox_id)
        return SandboxReply(sandbox_info(rec, self.agents))

    # ------------------------------------------------------------------ pause

    def request_pause(
        self, key: ReplyKey, sandbox_id: str, pause: bool, now: float
    ) -> list[Action]:
        """Pause (or resume) a sandbox: sent to its agent, answered once it did it."""
        rec = self.sandboxes.get(sandbox_id)
        verb = "pause" if pause else "resume"
        if rec is None:
            return [Reply(key, _not_found(sandbox_id))]
        detail = {"sandbox_id": sandbox_id}
        if rec.status not in ACTIVE:
            return [Reply(key, _ended(rec, verb))]
        if rec.status is SandboxStatus.CREATING:
            why = f"sandbox {sandbox_id} is still starting: {verb} it once start() returned"
            return [Reply(key, ErrorReply(ErrorCode.NOT_RUNNING, why, detail))]
        if sandbox_id in self._pausing:
            why = f"a pause or resume of sandbox {sandbox_id} is under way: await it first"
            return [Reply(key, ErrorReply(ErrorCode.BAD_REQUEST, why, detail))]
        if pause and rec.status is SandboxStatus.PAUSED:
            why = f"sandbox {sandbox_id} is already paused: call resume() to continue it"
            return [Reply(key, ErrorReply(ErrorCode.PAUSED, why, detail))]
        if not pause and rec.status is not SandboxStatus.PAUSED:
            why = f"sandbox {sandbox_id} is not paused ({rec.status.value}): nothing to resume"
            return [Reply(key, ErrorReply(ErrorCode.NOT_PAUSED, why, detail))]
        agent = self.agents.get(rec.agent_id) if rec.agent_id else None
        if agent is None or not agent.alive:
            why = f"the agent of sandbox {sandbox_id} is not reachable: cannot {verb} it now"
            return [Reply(key, ErrorReply(ErrorCode.UNAVAILABLE, why, detail))]
        self._pausing[sandbox_id] = _PauseWaiter(key, pause, now + STOP_CONFIRM_SECONDS)
        return [SendToAgent(agent.agent_id, PauseSandbox(sandbox_id, pause))]

    def pause_done(self, sandbox_id: str, error: ErrorReply | None, now: float) -> list[Action]:
        """The agent answered a PauseSandbox (``error``: it could not)."""
        waiter = self._pausing.pop(sandbox_id, None)
        if waiter is None:
            return []
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return [Reply(waiter.key, _not_found(sandbox_id))]
        if error is not None:
            return [Reply(waiter.key, error)]
        if rec.status not in ACTIVE:  # ended meanwhile (stopped, a limit)
            return [Reply(waiter.key, _ended(rec, "pause" if waiter.pause else "resume"))]
        if waiter.pause:
            self._set_status(rec, SandboxStatus.PAUSED)
        else:
            self._set_status(rec, SandboxStatus.RUNNING)
            self._arm_idle(rec, now)
        return [Reply(waiter.key, SandboxReply(sandbox_info(rec, self.agents)))]

    def _pauses_due(self, now: float) -> list[Action]:
        """Pauses whose agent never answered (it died): answered, best effort."""
        late = [sid for sid, w in self._pausing.items() if w.deadline <= now]
        actions: list[Action] = []
        for sid in late:
            why = f"the agent of sandbox {sid} did not answer the pause or resume in time"
            actions += self.pause_done(sid, ErrorReply(ErrorCode.UNAVAILABLE, why), now)
        return actions

    # ------------------------------------------------------------------ snapshots

    def _agent_added(self, agent: AgentRecord) -> None:
        self._snapshot_keys[snapshot_agent_key(agent.agent_id)] = agent.agent_id

    def snapshot_problem(self, spec: SandboxSpec) -> ErrorReply | None:
        """Why a create from a snapshot cannot be placed (None: it is no snapshot, or
        its agent is alive). A snapshot lives on the agent that took it."""
        key = snapshot_holder_key(spec.image)
        if key is None:
            return None
        agent_id = self._snapshot_keys.get(key)
        agent = self.agents.get(agent_id) if agent_id else None
        if agent is None or not agent.alive:
            why = (
                f"snapshot {spec.image} lives on the agent that took it, and that agent "
                "is not alive in this cluster: start it again (snapshots are local "
                "images or archives on its host, never copied between hosts)"
            )
            return ErrorReply(ErrorCode.FAILED, why)
        return None

    def snapshot_agent(self, spec: SandboxSpec) -> tuple[bool, AgentRecord | None]:
        """For ``choose_agent``: (whether ``spec`` is a snapshot's, the agent that holds
        it if it can take a sandbox now, else None: the create waits for it)."""
        key = snapshot_holder_key(spec.image)
        if key is None:
            return False, None
        agent = self.agents.get(self._snapshot_keys.get(key, ""))
        ready = agent is not None and agent.alive and agent.free > 0
        return True, agent if ready else None


def _ended(rec: SandboxRecord, what: str) -> ErrorReply:
    why = f"sandbox {rec.sandbox_id} has ended ({rec.status.value}: {rec.reason}): cannot {what}"
    return ErrorReply(ErrorCode.NOT_RUNNING, why, {"sandbox_id": rec.sandbox_id})
