"""What a dashboard asks an agent (aviato/protocol/observe_more.py): its running
sandboxes' tunnels and processes (the Sandboxes page), and a sandbox's last exec
results (the detail page). Answered from the agent's own tables, on demand: nothing
is reported on creates or heartbeats. Bounded: rows, tunnels and processes per row
are capped, only sandboxes a process was spawned in are asked for theirs (all at
once, each within ``ASK_SECONDS``), and a sandbox's tunnels are read once."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.processes import ProcessRequests
from aviato import link as schema
from aviato.protocol import (
    AgentSandboxesReply,
    Decoded,
    ExecResultsReply,
    GetAgentSandboxes,
    GetExecResults,
    Message,
)

if TYPE_CHECKING:
    from agent.data_plane import DataPlane

__all__ = ["MAX_PROCESSES", "MAX_ROWS", "MAX_TUNNELS", "DashboardRequests", "processes_row"]

#: Sandboxes answered for at most (the page shows as many), tunnels per sandbox,
#: processes listed per sandbox (the running first; the count is of them all), and
#: sandboxes whose processes are asked for in one answer.
MAX_ROWS = 500
MAX_TUNNELS = 16
MAX_PROCESSES = 5
MAX_ASKED = 64
ARGV_CHARS = 80
ASK_SECONDS = 2.0

Handler = Callable[[bytes, Decoded], Awaitable[None]]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def processes_row(procs: tuple[schema.ProcState, ...], unknown: bool = False) -> dict[str, Any]:
    """A sandbox's spawned processes as its row shows them: counts, and a few."""
    ordered = sorted(procs, key=lambda p: not p.running)
    return {
        "unknown": unknown,
        "running": sum(1 for p in procs if p.running),
        "ended": sum(1 for p in procs if not p.running),
        "list": [
            {
                "id": p.id,
                "argv": " ".join(p.argv)[:ARGV_CHARS],
                "running": p.running,
                "exit_code": p.exit_code,
            }
            for p in ordered[:MAX_PROCESSES]
        ],
    }


class DashboardRequests:
    """The data plane's handlers for a dashboard's questions."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        #: Each sandbox's tunnels once read (its ports do not move while it runs).
        self._tunnels: dict[str, list[dict[str, Any]]] = {}

    def handlers(self) -> dict[type[Message], Handler]:
        return {GetAgentSandboxes: self._on_sandboxes, GetExecResults: self._on_execs}

    async def _on_execs(self, identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, GetExecResults)
        body = json.dumps(self.plane.execs.results(d.msg.sandbox), separators=(",", ":"))
        await self.plane._send(identity, d.request_id, ExecResultsReply(), (body.encode(),))

    async def _on_sandboxes(self, identity: bytes, d: Decoded) -> None:
        plane = self.plane
        ids = list(plane.sandboxes)[:MAX_ROWS]
        for gone in set(self._tunnels) - set(plane.sandboxes):
            del self._tunnels[gone]
        plane.spawned_in.intersection_update(plane.sandboxes)
        paused = plane.lifecycle.paused if plane.lifecycle is not None else set()
        asked = [s for s in ids if s in plane.spawned_in and s not in paused][:MAX_ASKED]
        found = await asyncio.gather(*(self._processes(s) for s in asked))
        procs = dict(zip(asked, found, strict=True))
        rows: dict[str, Any] = {}
        for sid in ids:
            run = plane.sandboxes.get(sid)
            if run is None:
                continue
            rows[sid] = {
                "tunnels": await self._tunnels_of(sid) if run.spec.ports else [],
                # Asked and not answered (a busy supervisor): unknown, not none.
                "processes": procs.get(sid) or processes_row((), unknown=sid in procs),
            }
        body = json.dumps(rows, separators=(",", ":")).encode()
        await plane._send(identity, d.request_id, AgentSandboxesReply(), (body,))

    async def _tunnels_of(self, sandbox_id: str) -> list[dict[str, Any]]:
        known = self._tunnels.get(sandbox_id)
        if known is not None:
            return known
        ports = self.plane.ports
        try:
            if ports is None:
                return []
            async with asyncio.timeout(ASK_SECONDS):
                tunnels = await ports.tunnels(sandbox_id)
        except Exception:  # not up yet, or its engine is slow: asked again next time
            return []
        rows = [
            {"port": t.port, "address": _address(t.host, t.host_port)}
            for t in tunnels[:MAX_TUNNELS]
        ]
        self._tunnels[sandbox_id] = rows
        return rows

    async def _processes(self, sandbox_id: str) -> dict[str, Any] | None:
        """Its processes, from its supervisor's table (None: it did not answer)."""
        request = functools.partial(schema.ProcList, proc="", wait=0.0)
        try:
            async with asyncio.timeout(ASK_SECONDS):
                reply, _ = await ProcessRequests(self.plane)._ask(sandbox_id, request)
        except Exception:
            return None
        return processes_row(reply.procs)
