"""What the dashboard asks agents itself (aviato/protocol/observe_more.py): each live
agent's sandboxes' tunnels and processes, every ``EXTRAS_SECONDS`` and only while a
page watches (the scheduler holds neither: nothing is added to creates or
heartbeats), and a sandbox's last exec results, for its detail page."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from aviato.protocol import (
    AgentSandboxesReply,
    ErrorReply,
    ExecResultsReply,
    GetAgentSandboxes,
    GetExecResults,
    Message,
    decode,
    encode,
)

__all__ = ["EXTRAS_SECONDS", "MAX_AGENTS", "AgentAsker", "Extras"]

#: How often the rows' tunnels and processes are asked for while a page is open,
#: how long an agent has to answer, and agents asked at most in one round.
EXTRAS_SECONDS = 2.0
ASK_SECONDS = 5.0
MAX_AGENTS = 256
#: The JSON an agent's answer may hold (its own bounds keep it far below).
MAX_ANSWER_BYTES = 4 << 20


class AgentAsker:
    """Asks agents on their data plane (a short-lived socket per question, as
    logs.py's ``LogSource`` does), with the cluster token if there is one."""

    def __init__(self, ctx: zmq.asyncio.Context, token: str | None, curve: bool) -> None:
        self.ctx = ctx
        self.token = token
        self.curve = curve
        self._ids = itertools.count(1)

    async def ask(self, address: str, msg: Message, expect: type[Message]) -> Any:
        """The JSON an agent answers ``msg`` with; ``RuntimeError`` saying why not."""
        if self.curve:
            raise RuntimeError(
                "not shown on a cluster with CURVE keys (agents serve client keys only)"
            )
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(address)
            request_id = next(self._ids)
            await sock.send_multipart(encode(msg, request_id, token=self.token))
            if not await sock.poll(int(ASK_SECONDS * 1000)):
                raise RuntimeError(f"the agent at {address} did not answer")
            decoded = decode(await sock.recv_multipart())
        finally:
            sock.close()
        reply = decoded.msg
        if isinstance(reply, ErrorReply):
            raise RuntimeError(reply.message)
        if not isinstance(reply, expect) or len(decoded.payloads) != 1:
            raise RuntimeError(f"unexpected answer {type(reply).__name__}")
        body = bytes(decoded.payloads[0])
        if len(body) > MAX_ANSWER_BYTES:
            raise RuntimeError(f"the agent at {address} answered {len(body)} bytes")
        return json.loads(body)

    async def exec_results(self, address: str, sandbox_id: str) -> list[dict[str, Any]]:
        found = await self.ask(address, GetExecResults(sandbox_id), ExecResultsReply)
        if not isinstance(found, list):
            raise RuntimeError("the agent's exec results are not a list")
        return found


class Extras:
    """Tunnels and processes by sandbox id, as their agents last answered; asked for
    while ``watching()`` says a page is open, from the agents ``agents()`` lists
    (their data-plane addresses)."""

    def __init__(
        self,
        asker: AgentAsker,
        agents: Callable[[], Sequence[str]],
        watching: Callable[[], bool],
    ) -> None:
        self.asker = asker
        self.agents = agents
        self.watching = watching
        self.rows: dict[str, dict[str, Any]] = {}

    async def refresh(self) -> None:
        """One round: every listed agent asked at once; an agent that does not answer
        keeps no rows (its sandboxes show no tunnels or processes until it does)."""
        addresses = list(dict.fromkeys(self.agents()))[:MAX_AGENTS]
        answers = await asyncio.gather(
            *(self.asker.ask(a, GetAgentSandboxes(), AgentSandboxesReply) for a in addresses),
            return_exceptions=True,
        )
        rows: dict[str, dict[str, Any]] = {}
        for answer in answers:
            if isinstance(answer, dict):
                rows.update((k, v) for k, v in answer.items() if isinstance(v, dict))
        self.rows = rows

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.watching():
                await self.refresh()
            elif self.rows:
                self.rows = {}  # stale by the time a page opens again
            await asyncio.sleep(EXTRAS_SECONDS)

    def add_to(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows with their sandboxes' tunnels and processes (None: not known)."""
        extras = self.rows
        out = []
        for row in rows:
            found = extras.get(row.get("id", ""), {})
            out.append(
                {**row, "tunnels": found.get("tunnels"), "processes": found.get("processes")}
            )
        return out
