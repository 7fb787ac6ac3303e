"""The agent's side of actor handles used inside sandboxes (issue 14 part 4): a
worker's ``ActorCall`` (aviato/link_actors.py) relayed, unopened, to the client that
watches that worker (``WatchActorCalls``, aviato/protocol/actors_more.py) as an
``ActorCallRequest``; the client's ``ActorCallReply`` back to the worker as an
``ActorReply``.

Isolation: a worker reaches only the client that owns it, and through it only its
session's actors (the client looks the key up among its own handles); the worker
gets no address, token or key. Only the watching client may answer a worker's call,
only once, and each worker has at most ``MAX_PENDING`` calls waiting.
"""

from __future__ import annotations

import logging
import marshal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.checks import shown
from aviato import link
from aviato.exceptions import SandboxNotRunningError
from aviato.link_actors import STATUSES, ActorCall, ActorReply
from aviato.protocol import (
    ActorCallReply,
    ActorCallRequest,
    Decoded,
    Message,
    OkReply,
    Payload,
    WatchActorCalls,
)

if TYPE_CHECKING:
    from agent.data_plane import DataPlane

__all__ = ["MAX_PENDING", "ActorRelay", "handlers"]

log = logging.getLogger("aviato.agent.actors")

SendNow = Callable[[bytes, int, Message, tuple[Payload, ...]], None]
#: Frames to a worker's supervisor (False: it is gone).
ToWorker = Callable[[str, Sequence[Payload]], bool]

#: Actor calls one worker may have waiting at once.
MAX_PENDING = 1024
#: Longest actor key or method name relayed (the worker's to say).
MAX_NAME = 200


@dataclass(slots=True)
class _Watched:
    route: tuple[bytes, int]
    pending: set[int] = field(default_factory=set)


class ActorRelay:
    def __init__(self, send: SendNow, to_worker: ToWorker) -> None:
        self._send = send
        self._to_worker = to_worker
        self._watched: dict[str, _Watched] = {}

    def watch(self, sandbox_id: str, identity: bytes, request_id: int) -> None:
        """This client relays the actor calls of ``sandbox_id`` from now on."""
        old = self._watched.get(sandbox_id)
        self._watched[sandbox_id] = _Watched((identity, request_id))
        if old is not None:  # its calls waited on another request: they fail
            for rid in old.pending:
                self._fail(sandbox_id, rid, "the client relaying this worker's calls changed")

    def on_call(self, sandbox_id: str, header: ActorCall, blobs: Sequence[Payload]) -> None:
        """A worker calls an actor: on to its client, or failed at once."""
        rid = header.rid
        watched = self._watched.get(sandbox_id)
        if len(blobs) != 1 or len(header.actor) > MAX_NAME or len(header.method) > MAX_NAME:
            self._fail(sandbox_id, rid, "malformed actor call (one blob, short names)")
        elif watched is None:
            self._fail(
                sandbox_id,
                rid,
                "no client relays this worker's actor calls: an actor handle works in the "
                "workers of the session that made it",
            )
        elif rid in watched.pending or len(watched.pending) >= MAX_PENDING:
            self._fail(sandbox_id, rid, f"more than {MAX_PENDING} actor calls wait, or a rid again")
        else:
            watched.pending.add(rid)
            request = ActorCallRequest(sandbox_id, rid, header.actor, header.method)
            self._send(*watched.route, request, (blobs[0],))

    def on_reply(self, identity: bytes, msg: ActorCallReply, payloads: Sequence[Payload]) -> None:
        """The client's outcome of a relayed call: on to the worker that waits for it."""
        watched = self._watched.get(msg.sandbox_id)
        if watched is None or watched.route[0] != identity or msg.rid not in watched.pending:
            raise ValueError(
                f"worker {shown(msg.sandbox_id)} waits for no actor call {msg.rid} from you"
            )
        want = {"ok": 1 + msg.buffers, "error": 1, "failed": 0}.get(msg.status)
        if msg.status not in STATUSES or msg.buffers < 0 or want != len(payloads):
            raise ValueError(
                f"ActorCallReply: status {shown(msg.status)} with {len(payloads)} payloads "
                f"(ok: 1 + buffers, error: 1, failed: 0)"
            )
        watched.pending.discard(msg.rid)
        reply = ActorReply(
            msg.rid,
            msg.status,
            msg.detail,
            msg.error_type,
            msg.buffers,
            msg.actor_sandbox_id,
            msg.seconds,
        )
        if not self._to_worker(msg.sandbox_id, [_pack(reply), *payloads]):
            raise SandboxNotRunningError(
                f"sandbox {msg.sandbox_id} has no live function worker on this agent",
                sandbox_id=msg.sandbox_id,
            )

    def _fail(self, sandbox_id: str, rid: int, detail: str) -> None:
        reply = ActorReply(rid, "failed", detail, "ActorError")
        if not self._to_worker(sandbox_id, [_pack(reply)]):
            log.debug("worker %s gone before its actor call %d failed", sandbox_id, rid)

    def forget(self, sandbox_id: str) -> None:
        """The worker is gone."""
        self._watched.pop(sandbox_id, None)


def _pack(header: link.Header) -> bytes:
    return marshal.dumps(link.encode(header))


def handlers(
    plane: DataPlane,
) -> dict[type[Message], Callable[[bytes, Decoded], Awaitable[None]]]:
    """The data plane's handlers of the client's messages (its ``_handlers``)."""

    async def on_watch(identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, WatchActorCalls)
        plane._check_running(msg.sandbox_id)
        hub = plane.hub
        if hub is None or not hub.supervised(msg.sandbox_id):
            raise SandboxNotRunningError(
                f"sandbox {msg.sandbox_id} has no function worker on this agent",
                sandbox_id=msg.sandbox_id,
            )
        hub.actors.watch(msg.sandbox_id, identity, d.request_id)

    async def on_reply(identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, ActorCallReply)
        hub = plane.hub
        if hub is None:
            raise SandboxNotRunningError(f"sandbox {msg.sandbox_id} has no function worker")
        hub.actors.on_reply(identity, msg, d.payloads)
        plane.send_now(identity, d.request_id, OkReply())

    return {WatchActorCalls: on_watch, ActorCallReply: on_reply}
