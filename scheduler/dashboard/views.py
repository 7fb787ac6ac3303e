"""Where the dashboard's data comes from: the scheduler's own state (``StateView``, the
dashboard inside ``python -m scheduler --dashboard``), or a running scheduler asked
over ZeroMQ (``RemoteView``, the dashboard ``aviato dashboard`` serves). Both give the
page the same rows (scheduler/dashboard/snapshot.py makes them)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import zmq
import zmq.asyncio

from aviato.protocol import (
    DashboardViewReply,
    ErrorReply,
    GetDashboardView,
    PoolFigures,
    SandboxStatus,
    decode,
    encode,
)
from scheduler.dashboard.snapshot import Rates, cluster, sandbox_row, sandboxes
from scheduler.state import SchedulerState

__all__ = ["RemoteView", "StateView", "View"]

#: How often a remote view asks the scheduler, and how long it waits for an answer.
POLL_SECONDS = 0.5
ASK_SECONDS = 5.0


class View(Protocol):
    def cluster(self) -> dict[str, Any]: ...

    def sandboxes(self) -> list[dict[str, Any]]: ...

    async def sandbox(self, sandbox_id: str) -> dict[str, Any] | None:
        """Its row, None when the cluster no longer knows it."""

    async def agent_address(self, sandbox_id: str) -> str | None:
        """The data-plane address of the agent running it (None: it or its agent is
        gone)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the view current until ``stop`` (rates sampled once a second)."""


class StateView:
    """The scheduler's own state, read in its process."""

    def __init__(
        self,
        state: SchedulerState,
        totals: Callable[[], tuple[int, int]],
        pools: Mapping[str, tuple[PoolFigures, ...]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.totals = totals
        self.pools = pools
        self.clock = clock
        self.rates = Rates()

    def cluster(self) -> dict[str, Any]:
        return cluster(self.state, self.clock(), self.rates, self.pools)

    def sandboxes(self) -> list[dict[str, Any]]:
        return sandboxes(self.state, self.clock())

    async def sandbox(self, sandbox_id: str) -> dict[str, Any] | None:
        rec = self.state.sandboxes.get(sandbox_id)
        return sandbox_row(rec, self.clock()) if rec is not None else None

    async def agent_address(self, sandbox_id: str) -> str | None:
        rec = self.state.sandboxes.get(sandbox_id)
        agent = self.state.agents.get(rec.agent_id) if rec and rec.agent_id else None
        return agent.address if agent is not None else None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            creates, placements = self.totals()
            calls = sum(p.calls_per_second for ps in list(self.pools.values()) for p in ps)
            self.rates.sample(self.clock(), creates, placements, calls)
            await asyncio.sleep(1.0)


class RemoteView:
    """A running scheduler's view, asked for every ``POLL_SECONDS`` (GetDashboardView,
    over a DEALER socket of its own, with the cluster token if there is one)."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, token: str | None) -> None:
        self.ctx = ctx
        self.address = address
        self.token = token
        self.rates = Rates()
        self._view: dict[str, Any] = {"cluster": None, "sandboxes": []}
        self._ids = itertools.count(1)
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = asyncio.Lock()
        #: Why the last ask failed ("" when it did not): shown on the page.
        self.problem = ""

    async def ask(self, sandbox_id: str = "") -> dict[str, Any]:
        """One view from the scheduler; ``RuntimeError`` saying why when none came."""
        async with self._lock:  # one request at a time on the socket
            if self._sock is None:
                self._sock = self.ctx.socket(zmq.DEALER)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.connect(self.address)
            sock = self._sock
            request_id = next(self._ids)
            msg = GetDashboardView(sandbox_id)
            await sock.send_multipart(encode(msg, request_id, token=self.token))
            deadline = time.monotonic() + ASK_SECONDS
            while True:  # replies to requests we gave up on may still come: skipped
                left = deadline - time.monotonic()
                if left <= 0 or not await sock.poll(int(left * 1000)):
                    # A new socket next time: the late reply must not be taken for it.
                    sock.close()
                    self._sock = None
                    raise RuntimeError(f"the scheduler at {self.address} did not answer")
                decoded = decode(await sock.recv_multipart())
                if decoded.request_id == request_id:
                    break
        reply = decoded.msg
        if isinstance(reply, ErrorReply):
            raise RuntimeError(f"the scheduler refused: {reply.message}")
        if not isinstance(reply, DashboardViewReply) or len(decoded.payloads) != 1:
            raise RuntimeError(f"unexpected answer {type(reply).__name__}")
        view: dict[str, Any] = json.loads(bytes(decoded.payloads[0]))
        return view

    def cluster(self) -> dict[str, Any]:
        found = self._view.get("cluster")
        if not isinstance(found, dict):
            return _empty_cluster(self.problem or "asking the scheduler…")
        return {**found, "rates": self.rates.series(), "problem": self.problem}

    def sandboxes(self) -> list[dict[str, Any]]:
        rows = self._view.get("sandboxes")
        return rows if isinstance(rows, list) else []

    async def sandbox(self, sandbox_id: str) -> dict[str, Any] | None:
        row = (await self.ask(sandbox_id)).get("sandbox")
        return row if isinstance(row, dict) else None

    async def agent_address(self, sandbox_id: str) -> str | None:
        try:
            view = await self.ask(sandbox_id)
        except RuntimeError:
            return None
        row = view.get("sandbox") or {}
        agents = (view.get("cluster") or {}).get("agents") or []
        for agent in agents:
            if agent.get("id") == row.get("agent") and agent.get("state") == "alive":
                return str(agent.get("address"))
        return None

    async def run(self, stop: asyncio.Event) -> None:
        sampled = 0.0
        try:
            while not stop.is_set():
                try:
                    self._view = await self.ask()
                    self.problem = ""
                except RuntimeError as exc:
                    self.problem = str(exc)
                now = time.time()
                if now - sampled >= 1.0:
                    sampled = now
                    creates, placements = self._view.get("totals") or (0, 0)
                    found = self._view.get("cluster") or {}
                    calls = sum(
                        p.get("calls_per_second", 0.0)
                        for s in found.get("session_rows", [])
                        for p in s.get("pools", [])
                    )
                    self.rates.sample(now, int(creates), int(placements), float(calls))
                await asyncio.sleep(POLL_SECONDS)
        finally:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _empty_cluster(problem: str) -> dict[str, Any]:
    """What the cluster page shows before the first answer (or while none comes)."""
    return {
        "now": time.time(),
        "agents": [],
        "alive": 0,
        "queue": 0,
        "sessions": 0,
        "session_rows": [],
        "counts": {s.value: 0 for s in SandboxStatus},
        "free_slots": 0,
        "rates": {"creates": [], "placements": [], "calls": []},
        "problem": problem,
    }
