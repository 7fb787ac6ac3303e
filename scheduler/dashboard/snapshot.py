"""What the dashboard shows, as JSON-ready dicts, read from the scheduler's tables:
pure functions of the state and the time. The cluster's state only: never a
sandbox's environment, arguments or files (user data); its logs go by logs.py."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from itertools import islice, pairwise
from typing import Any

from aviato.protocol import PoolFigures, SandboxStatus
from scheduler.placement import GIB
from scheduler.records import ACTIVE, AgentRecord, SandboxRecord
from scheduler.state import SchedulerState

__all__ = ["ROWS", "Rates", "cluster", "sandbox_row", "sandboxes"]

#: Sandbox rows sent at most: the live ones (newest first), then the latest ended.
ROWS = 500
ENDED_ROWS = 100


def _host(address: str) -> str:
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0].strip("[]")


def resources_text(a: AgentRecord) -> str:
    """Held / advertised per resource ("" when it advertises none)."""
    parts = []
    if a.cpus_milli:
        parts.append(f"cpu {a.cpus_used_milli / 1000:g}/{a.cpus_milli / 1000:g}")
    if a.memory_bytes:
        parts.append(f"mem {a.memory_used / GIB:.1f}/{a.memory_bytes / GIB:.1f}G")
    if a.gpus:
        parts.append(f"gpu {len(a.gpu_holders)}/{len(a.gpus)}")
    return " · ".join(parts)


def cluster(
    state: SchedulerState,
    now: float,
    rates: Rates,
    pools: Mapping[str, tuple[PoolFigures, ...]] | None = None,
) -> dict[str, Any]:
    agents = []
    for a in sorted(state.agents.values(), key=lambda a: a.agent_id):
        used = len(a.active)
        agents.append(
            {
                "id": a.agent_id,
                "host": _host(a.address),
                "address": a.address,
                "runtime": a.runtime,
                "slots": a.slots,
                "used": used,
                "free": max(0, a.slots - used),
                "spares": a.spares,
                "resources": resources_text(a),
                "heartbeat_age": round(max(0.0, now - a.last_seen), 1),
                "labels": dict(a.labels),
                "state": "alive" if a.alive else "dead",
            }
        )
    counts = {s.value: state.counts.get(s, 0) for s in SandboxStatus}
    return {
        "now": now,
        "agents": agents,
        "alive": sum(1 for a in agents if a["state"] == "alive"),
        "queue": len(state.pending),
        "sessions": len(state.sessions),
        "session_rows": session_rows(state, now, pools or {}),
        "counts": counts,
        "free_slots": state.free_slots(),
        "rates": rates.series(),
    }


#: Sessions listed at most (those whose lease ends last first: the live ones).
SESSION_ROWS = 100


def session_rows(
    state: SchedulerState, now: float, pools: Mapping[str, tuple[PoolFigures, ...]]
) -> list[dict[str, Any]]:
    """Each session with its lease left, its live sandboxes (function workers or
    not) and its functions as its client reports them, the longest-leased first;
    bounded."""
    top = sorted(state.sessions.items(), key=lambda kv: kv[1], reverse=True)[:SESSION_ROWS]
    rows = []
    for session_id, expiry in top:
        # The session index (live rows only): O(its sandboxes), not O(the table).
        ids = state._by_session.get(session_id, ())
        live = [state.live[s] for s in ids if s in state.live]
        rows.append(
            {
                "id": session_id,
                "lease_left": round(max(0.0, expiry - now), 1),
                "sandboxes": sum(1 for r in live if not r.spec.function_worker),
                "workers": sum(1 for r in live if r.spec.function_worker),
                "pools": [dataclasses.asdict(p) for p in pools.get(session_id, ())],
            }
        )
    return rows


def sandbox_row(rec: SandboxRecord, now: float) -> dict[str, Any]:
    spec = rec.spec
    ended = rec.ended_at if rec.ended_at is not None else now
    left = None
    if rec.deadline is not None and rec.status in ACTIVE:
        left = round(max(0.0, rec.deadline - now), 1)
    return {
        "id": rec.sandbox_id,
        "state": rec.status.value,
        "image": spec.image,
        # Not its command line, env or files: those are the user's (and may hold secrets).
        "kind": "function worker" if spec.function_worker else "sandbox",
        "agent": rec.agent_id or "",
        "tags": list(spec.tags),
        "session": spec.session_id or "",
        "age": round(max(0.0, ended - rec.created_at), 1),
        "lifetime_left": left,
        "exit_code": rec.exit_code,
        "reason": rec.reason,
    }


def sandboxes(state: SchedulerState, now: float) -> list[dict[str, Any]]:
    """The newest live sandboxes, then the latest ended ones: bounded."""
    live = sorted(state.live.values(), key=lambda r: r.seq, reverse=True)[:ROWS]
    rows = [sandbox_row(r, now) for r in live]
    ended_ids = list(islice(reversed(state.ended), ENDED_ROWS))
    for sid in ended_ids:
        rec = state.sandboxes.get(sid)
        if rec is not None:
            rows.append(sandbox_row(rec, now))
    return rows


class Rates:
    """Creates and placements per second over the last minutes, from running totals
    sampled once a second (for the cluster page's chart)."""

    def __init__(self, points: int = 120) -> None:
        self._samples: deque[tuple[float, int, int, float]] = deque(maxlen=points + 1)

    def sample(self, now: float, creates: int, placements: int, calls: float = 0.0) -> None:
        """``calls``: function calls per second just now, as the sessions report them."""
        self._samples.append((now, creates, placements, calls))

    def series(self) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {"creates": [], "placements": [], "calls": []}
        pairs = list(self._samples)
        for (t0, c0, p0, _), (t1, c1, p1, calls) in pairwise(pairs):
            dt = max(1e-6, t1 - t0)
            out["creates"].append([round(t1, 1), round((c1 - c0) / dt, 2)])
            out["placements"].append([round(t1, 1), round((p1 - p0) / dt, 2)])
            out["calls"].append([round(t1, 1), round(calls, 2)])
        return out
