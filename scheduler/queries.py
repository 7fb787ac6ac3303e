"""Read-only views of the scheduler's tables: a sandbox's row as clients see it, and
bounded pages of the sandbox and agent lists. Pure functions over the records, so that
no listing can change a decision, and none holds the loop for long (a page looks at
PAGE_SCAN rows at most)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aviato.protocol import (
    AgentInfo,
    ClusterStatusReply,
    SandboxInfo,
    SandboxListReply,
    SandboxStatus,
)
from scheduler.indexes import RowOrder
from scheduler.records import (
    MAX_PAGE_AGENTS,
    MAX_PAGE_ROWS,
    PAGE_AGENTS,
    PAGE_ROWS,
    PAGE_SCAN,
    AgentRecord,
    SandboxRecord,
    _cursor_seq,
    _seq_of,
)

__all__ = ["Filter", "list_page", "sandbox_info", "status_page"]


@dataclass(frozen=True, slots=True)
class Filter:
    """What a listing asks for; an empty set or None matches everything."""

    tags: frozenset[str] = frozenset()
    statuses: frozenset[SandboxStatus] = frozenset()
    session_id: str | None = None
    agent_id: str | None = None

    def matches(self, rec: SandboxRecord) -> bool:
        return (
            (not self.statuses or rec.status in self.statuses)
            and (self.session_id is None or rec.spec.session_id == self.session_id)
            and (self.agent_id is None or rec.agent_id == self.agent_id)
            and (not self.tags or self.tags <= set(rec.spec.tags))
        )


def shown_isolation(asked: str | None, agent: AgentRecord | None) -> str:
    """The isolation a sandbox runs under: its spec's, else its agent's default; with
    "+userns" where root inside it is not the host's root."""
    level = asked or (agent.isolations[0] if agent and agent.isolations else "")
    return f"{level}+userns" if level and agent is not None and agent.userns else level


def sandbox_info(rec: SandboxRecord, agents: Mapping[str, AgentRecord]) -> SandboxInfo:
    """``rec`` as clients see it, with where to reach its agent."""
    agent = agents.get(rec.agent_id) if rec.agent_id else None
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
        ended_by=rec.ended_by,
        isolation=shown_isolation(rec.spec.isolation, agent),
        gpu_ids=rec.gpu_ids,
    )


def list_page(
    order: RowOrder[SandboxRecord],
    sandboxes: Mapping[str, SandboxRecord],
    agents: Mapping[str, AgentRecord],
    session_rows: Sequence[SandboxRecord] | None,
    want: Filter,
    cursor: str = "",
    limit: int | None = None,
) -> SandboxListReply:
    """One page of the rows that match, in the order the scheduler learnt of them,
    from after ``cursor``; ``next_cursor`` is "" after the last page. A page holds at
    most ``limit`` rows (PAGE_ROWS by default) and looks at PAGE_SCAN rows at most:
    a page may be short (even empty) with a cursor to go on from. ``session_rows``:
    the candidates from the session index when the caller has them (live rows of one
    session), instead of the whole table."""
    rows_max = min(MAX_PAGE_ROWS, PAGE_ROWS if limit is None or limit <= 0 else limit)
    after = _cursor_seq(cursor)
    rows: list[SandboxInfo] = []
    scanned = 0
    last = after
    more = False
    if session_rows is not None:
        ordered = sorted((r for r in session_rows if r.seq > after), key=_seq_of)
        source = iter(ordered)
    else:
        source = order.after(after)
    for rec in source:
        if scanned >= PAGE_SCAN or len(rows) >= rows_max:
            more = True
            break
        scanned += 1
        last = rec.seq
        if sandboxes.get(rec.sandbox_id) is not rec:
            continue  # forgotten since
        if want.matches(rec):
            rows.append(sandbox_info(rec, agents))
    return SandboxListReply(tuple(rows), next_cursor=f"{last}" if more else "")


def status_page(
    agents: Mapping[str, AgentRecord],
    counts: dict[str, int],
    sessions: int,
    free_slots: int,
    now: float,
    cursor: str = "",
    limit: int | None = None,
) -> ClusterStatusReply:
    """The counts, and a page of the agents by id after ``cursor`` (PAGE_AGENTS by
    default: a status of thousands of agents does not hold the loop either)."""
    ids = sorted(agents)
    start = bisect.bisect_right(ids, cursor) if cursor else 0
    size = min(MAX_PAGE_AGENTS, PAGE_AGENTS if limit is None or limit <= 0 else limit)
    page = ids[start : start + size]
    more = start + size < len(ids)
    shown = tuple(
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
            public_key=a.public_key,
            isolations=a.isolations,
            probe=a.probe,
            userns=a.userns,
            cpus=a.cpus_milli / 1000,
            memory_bytes=a.memory_bytes,
            gpus=a.gpus,
            cpus_used=a.cpus_used_milli / 1000,
            memory_used=a.memory_used,
            gpus_used=tuple(g for g in a.gpus if g in a.gpu_holders),
        )
        for a in map(agents.__getitem__, page)
    )
    return ClusterStatusReply(
        agents=shown,
        sandbox_counts=counts,
        sessions=sessions,
        next_cursor=page[-1] if more and page else "",
        free_slots=free_slots,
    )
