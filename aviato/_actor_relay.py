"""Actor handles passed to functions and other actors (issue 14 part 4), the client's
side: a session's actors, reachable from its own workers.

A handle pickled among a call's arguments becomes, in the worker, a stub of
agent/worker_actors.py (the handle carries only the actor's key, its class's name
and methods). A stub's call goes to the worker's agent, which relays it here
(``ActorCallRequest`` on this worker's ``WatchActorCalls``); this runs it through the
actor's own handle (its order, its restarts, its loss) and sends the outcome back
(``ActorCallReply``). The arguments and the result stay pickled bytes all the way:
nothing a sandbox sent is unpickled here.

A session watches its workers once it has made an actor: then every worker it has,
and each it starts after, before any call that may carry a handle.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aviato._pool_state import RelayedError
from aviato.exceptions import AviatoError
from aviato.protocol import (
    ActorCallReply,
    ActorCallRequest,
    Decoded,
    Payload,
    WatchActorCalls,
)

if TYPE_CHECKING:
    import asyncio

    from aviato._actor import ActorHandle
    from aviato._connection import Channel
    from aviato._function import FunctionResult
    from aviato._pool import WorkerHandle
    from aviato._session import Session

__all__ = ["ActorRelay"]

log = logging.getLogger("aviato.actors")


class ActorRelay:
    """A session's actors by key, and the watches on its workers."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.handles: dict[str, ActorHandle[Any]] = {}

    def add(self, handle: ActorHandle[Any]) -> None:
        """A new actor: reachable from the session's workers from now on."""
        self.handles[handle.actor_id] = handle

    def start(self) -> None:
        """Watch the workers the session has already (new ones are watched at start)."""
        for pool in list(self.session._pools.values()):
            for worker in pool.workers:
                self.watch(worker)

    def watch(self, worker: WorkerHandle) -> None:
        if worker.relay is not None:
            return
        conn = worker.conn

        def on_request(decoded: Decoded) -> None:
            self._on_request(conn, decoded)

        worker.relay = conn.send_nowait(WatchActorCalls(worker.sandbox_id), (), on_request)

    def _on_request(self, conn: Channel, decoded: Decoded) -> None:
        msg = decoded.msg
        if not isinstance(msg, ActorCallRequest) or len(decoded.payloads) != 1:
            return  # an error: the worker is gone already
        handle = self.handles.get(msg.actor)
        if handle is None:
            self._reply(conn, msg, "failed", f"no actor {msg.actor} in this session")
            return
        try:
            future = handle._relay(msg.method, bytes(decoded.payloads[0]))
        except AviatoError as exc:  # closed, say
            self._reply(conn, msg, "failed", str(exc), type(exc).__name__)
            return
        future.add_done_callback(lambda done: self._settled(conn, msg, done))

    def _settled(
        self, conn: Channel, msg: ActorCallRequest, done: asyncio.Future[FunctionResult[Any]]
    ) -> None:
        if done.cancelled():
            self._reply(conn, msg, "failed", "the call was cancelled (its session closed?)")
            return
        exc = done.exception()
        if isinstance(exc, RelayedError):
            self._reply(conn, msg, "error", payloads=(exc.record,))
        elif exc is not None:
            self._reply(conn, msg, "failed", str(exc), type(exc).__name__)
        else:
            result = done.result()
            blob, buffers = result.value
            self._reply(
                conn,
                msg,
                "ok",
                payloads=(blob, *buffers),
                buffers=len(buffers),
                where=(result.sandbox_id, result.seconds),
            )

    def _reply(
        self,
        conn: Channel,
        msg: ActorCallRequest,
        status: str,
        detail: str = "",
        error_type: str = "",
        *,
        payloads: tuple[Payload, ...] = (),
        buffers: int = 0,
        where: tuple[str, float] = ("", 0.0),
    ) -> None:
        reply = ActorCallReply(
            msg.sandbox_id, msg.rid, status, detail[:4000], error_type, buffers, *where
        )
        sent: list[int] = []

        def answered(decoded: Decoded) -> None:  # the agent's OkReply, or why not
            if sent:
                conn.forget(sent[0])

        try:
            sent.append(conn.send_nowait(reply, payloads, answered))
        except AviatoError as exc:  # too large for the wire: the worker hears why
            if status == "ok":
                self._reply(conn, msg, "failed", str(exc), type(exc).__name__)
            else:
                log.warning("actor call %d of %s not answered: %s", msg.rid, msg.sandbox_id, exc)

    def close(self) -> None:
        self.handles.clear()
