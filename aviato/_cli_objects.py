"""``aviato status``'s object table: what each live agent's object store holds (object
refs, issue 14 part 3), asked of the agents themselves."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aviato._connection import default_connections
from aviato._defaults import SandboxDefaults
from aviato._objects import curve_for
from aviato.exceptions import AviatoError
from aviato.protocol import AgentInfo, ObjectStats, ObjectStatsReply

__all__ = ["OBJECT_COLUMNS", "object_stats", "objects_record", "objects_rows"]

OBJECT_COLUMNS = ("agent", "objects", "in memory", "on disk", "memory budget", "disk cap")


async def object_stats(
    agents: Sequence[AgentInfo], defaults: SandboxDefaults
) -> dict[str, ObjectStatsReply | None]:
    """Each live agent's store, by agent id (None: it did not answer in time)."""
    conns = default_connections()
    timeout = min(defaults.request_timeout_seconds, 5.0)

    async def one(agent: AgentInfo) -> ObjectStatsReply | None:
        conn = conns.get(
            agent.address,
            defaults.cluster_token(),
            curve_for(defaults, agent.public_key),
            agent.lane if defaults.lane_enabled() else "",
        )
        try:
            reply = await conn.request(ObjectStats(), timeout=timeout)
        except AviatoError:
            return None
        return reply.msg if isinstance(reply.msg, ObjectStatsReply) else None

    live = [a for a in agents if a.alive]
    found = await asyncio.gather(*(one(a) for a in live))
    return {a.agent_id: s for a, s in zip(live, found, strict=True)}


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def objects_rows(stats: dict[str, ObjectStatsReply | None]) -> list[list[str]]:
    rows = []
    for agent_id, s in stats.items():
        if s is None:
            rows.append([agent_id, "?", "?", "?", "?", "?"])
        else:
            rows.append(
                [
                    agent_id,
                    str(s.objects),
                    _size(s.memory_bytes),
                    _size(s.disk_bytes),
                    _size(s.memory_budget),
                    _size(s.disk_budget),
                ]
            )
    return rows


def objects_record(stats: dict[str, ObjectStatsReply | None]) -> dict[str, Any]:
    return {
        agent_id: None
        if s is None
        else {
            "objects": s.objects,
            "memory_bytes": s.memory_bytes,
            "disk_bytes": s.disk_bytes,
            "memory_budget": s.memory_budget,
            "disk_budget": s.disk_budget,
        }
        for agent_id, s in stats.items()
    }
