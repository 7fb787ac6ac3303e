"""Objects fetched agent-to-agent (issue 14 part 3): a batch on this agent names an object
another agent holds; it is asked for once (concurrent batches wait on the same fetch)
and then held here too, as a copy, for the calls that follow.

One DEALER per peer agent, each with a reader task matching replies to requests. With
CURVE keys, it dials the peer with this agent's own keypair (the one it dials the
scheduler with) and the peer's public key as the scheduler lists it; the peer admits
agent keys for object fetches only (aviato/_server/auth.py, ``data_plane_refusal``)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio

from aviato import _zmq
from aviato._auth import CurveKeys
from aviato.exceptions import ObjectLostError
from aviato.protocol import (
    AgentLocation,
    Decoded,
    DecodeError,
    ErrorReply,
    GetObject,
    LocateAgent,
    Message,
    ObjectData,
    ObjectSource,
    Payload,
    decode,
    encode,
)

__all__ = ["FETCH_TIMEOUT", "Fetcher"]

log = logging.getLogger("aviato.agent")

#: A fetch that takes longer fails its calls (a 100 MB object takes well under a second).
FETCH_TIMEOUT = 60.0
#: How long the scheduler's word on where an agent is is trusted before it is asked again.
AGENTS_FRESH = 10.0

AskScheduler = Callable[[Message, float], Awaitable[Message | None]]


class Fetcher:
    def __init__(
        self, agent_id: str, token: str | None, spawn: Callable[[Coroutine[Any, Any, None]], object]
    ) -> None:
        self.agent_id = agent_id
        self.token = token
        self._spawn = spawn
        self._ctx: zmq.asyncio.Context | None = None
        self._peers: dict[tuple[str, str], zmq.asyncio.Socket] = {}
        self._waiting: dict[int, asyncio.Future[Decoded]] = {}
        self._ids = itertools.count(1)
        #: Objects asked of other agents since we started (once each, not per batch).
        self.fetches = 0
        #: The agent's request to the scheduler (set by the agent): a source's address
        #: is fetched from only if the scheduler lists that agent there. The client
        #: wrote the source, and the fetch carries the cluster token.
        self.ask_scheduler: AskScheduler | None = None
        #: This agent's keypair (its scheduler link's keys), when the cluster uses CURVE.
        self.keys: CurveKeys | None = None
        #: Agent id -> (data-plane address, CURVE public key, when the scheduler said so).
        self._agents: dict[str, tuple[str, str, float]] = {}
        #: Fetches under way, by object id: a second batch waits on the first's.
        self._fetching: dict[str, asyncio.Future[list[Payload]]] = {}

    def link(self, ask: AskScheduler, keys: CurveKeys | None) -> None:
        """The agent's request to the scheduler, and its keys (None: keys are off)."""
        self.ask_scheduler, self.keys = ask, keys

    async def fetch(self, source: ObjectSource) -> list[Payload]:
        """The object's frames from the agent holding it; ObjectLostError if it cannot."""
        under_way = self._fetching.get(source.object_id)
        if under_way is None:
            under_way = asyncio.ensure_future(self._fetch(source))
            self._fetching[source.object_id] = under_way
            under_way.add_done_callback(lambda _: self._fetching.pop(source.object_id, None))
        return await asyncio.shield(under_way)

    async def _fetch(self, source: ObjectSource) -> list[Payload]:
        where = f"agent {source.agent_id} ({source.agent_address})"
        listed = await self._listed(source)
        if listed is None:
            raise ObjectLostError(
                f"object {source.object_id}: {where} is not a live agent of this cluster"
            )
        public_key = listed[1]  # the scheduler's, not the source's (a client wrote that)
        if public_key and self.keys is None:
            raise ObjectLostError(
                f"object {source.object_id} is on {where}, which serves CURVE, but agent "
                f"{self.agent_id} has no keys to fetch it with: start every agent with --keys"
            )
        sock = self._peer(source.agent_address, public_key)
        self.fetches += 1
        request_id = next(self._ids)
        reply: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = reply
        try:
            await sock.send_multipart(
                encode(GetObject(source.object_id), request_id, token=self.token), copy=False
            )
            async with asyncio.timeout(FETCH_TIMEOUT):
                decoded = await reply
        except TimeoutError:
            raise ObjectLostError(
                f"object {source.object_id}: {where} did not answer in {FETCH_TIMEOUT:.0f} s"
            ) from None
        finally:
            self._waiting.pop(request_id, None)
        msg = decoded.msg
        if isinstance(msg, ErrorReply):
            raise ObjectLostError(f"object {source.object_id} from {where}: {msg.message}")
        if not isinstance(msg, ObjectData) or len(decoded.payloads) != 1 + msg.buffers:
            raise ObjectLostError(f"object {source.object_id}: {where} sent a malformed reply")
        return list(decoded.payloads)

    async def _listed(self, source: ObjectSource) -> tuple[str, str] | None:
        """(address, public key) of ``source``'s agent if the scheduler has it live at
        that address (asked at most every AGENTS_FRESH seconds per agent, and again
        when the source names another address); None if it does not."""
        known = self._agents.get(source.agent_id)
        if known is not None and known[0] == source.agent_address:
            if time.monotonic() - known[2] < AGENTS_FRESH:
                return known[0], known[1]
        ask = self.ask_scheduler
        if ask is None:
            return None
        reply = await ask(LocateAgent(self.agent_id, source.agent_id), 10.0)
        if not isinstance(reply, AgentLocation) or not reply.address:
            self._agents.pop(source.agent_id, None)
            return None
        self._agents[source.agent_id] = (reply.address, reply.public_key, time.monotonic())
        if reply.address != source.agent_address:
            return None
        return reply.address, reply.public_key

    def _peer(self, address: str, public_key: str) -> zmq.asyncio.Socket:
        sock = self._peers.get((address, public_key))
        if sock is None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            keys = None
            if public_key and self.keys is not None:
                keys = CurveKeys(self.keys.public, self.keys.secret, public_key.encode())
            sock = _zmq.dealer(self._ctx, address, keys)
            self._peers[(address, public_key)] = sock
            self._spawn(self._read(sock))
        return sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:  # closed
                return
            try:
                decoded = decode(frames)
            except DecodeError as exc:
                log.warning("agent %s: a peer agent's malformed reply: %s", self.agent_id, exc)
                continue
            waiter = self._waiting.pop(decoded.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(decoded)
