"""Objects fetched agent-to-agent (issue 14 part 3): a batch on this agent names an object
another agent holds; it is asked for once (concurrent batches wait on the same fetch)
and then held here too, as a copy, for the calls that follow.

One DEALER per peer agent, each with a reader task matching replies to requests.
Agents serving CURVE accept client keys only, so a fetch from an agent with a public
key is refused here with a typed error rather than tried."""

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
from aviato.exceptions import ObjectLostError
from aviato.protocol import (
    ClusterStatus,
    ClusterStatusReply,
    Decoded,
    DecodeError,
    ErrorReply,
    GetObject,
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
#: How long the scheduler's list of agents is trusted before it is asked again.
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
        self._peers: dict[str, zmq.asyncio.Socket] = {}
        self._waiting: dict[int, asyncio.Future[Decoded]] = {}
        self._ids = itertools.count(1)
        #: Objects asked of other agents since we started (once each, not per batch).
        self.fetches = 0
        #: The agent's request to the scheduler (set by the agent): a source's address
        #: is fetched from only if the scheduler lists that agent there. The client
        #: wrote the source, and the fetch carries the cluster token.
        self.ask_scheduler: AskScheduler | None = None
        self._agents: dict[str, str] = {}  # agent id -> data-plane address
        self._agents_at = -AGENTS_FRESH
        #: Fetches under way, by object id: a second batch waits on the first's.
        self._fetching: dict[str, asyncio.Future[list[Payload]]] = {}

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
        if source.agent_public_key:
            raise ObjectLostError(
                f"object {source.object_id} is on {where}, which serves CURVE: agents do "
                "not fetch objects from each other with keys yet; run the calls that use it "
                "on that agent's workers, or serve without keys"
            )
        if not await self._is_agent(source):
            raise ObjectLostError(
                f"object {source.object_id}: {where} is not a live agent of this cluster"
            )
        sock = self._peer(source.agent_address)
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

    async def _is_agent(self, source: ObjectSource) -> bool:
        """Whether the scheduler lists ``source``'s agent at that address (asked at most
        every AGENTS_FRESH seconds, and again for an agent it did not list)."""
        if self._agents.get(source.agent_id) == source.agent_address:
            if time.monotonic() - self._agents_at < AGENTS_FRESH:
                return True
        ask = self.ask_scheduler
        if ask is None:
            return False
        agents: dict[str, str] = {}
        cursor = ""
        while True:  # every page of agents
            reply = await ask(ClusterStatus(cursor=cursor), 10.0)
            if not isinstance(reply, ClusterStatusReply):
                return False
            agents.update((a.agent_id, a.address) for a in reply.agents if a.alive)
            cursor = reply.next_cursor
            if not cursor:
                break
        self._agents, self._agents_at = agents, time.monotonic()
        return agents.get(source.agent_id) == source.agent_address

    def _peer(self, address: str) -> zmq.asyncio.Socket:
        sock = self._peers.get(address)
        if sock is None:
            if self._ctx is None:
                self._ctx = zmq.asyncio.Context()
            sock = self._peers[address] = _zmq.dealer(self._ctx, address)
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
