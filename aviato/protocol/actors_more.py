"""Actor handles used inside sandboxes (issue 14 part 4, MsgType 260-269): a worker
calls a method of one of its session's actors through its agent, which relays the
call to the client that owns the worker; that client runs it through the actor's own
handle and sends the outcome back the same way (aviato/_actor_relay.py,
agent/actor_relay.py; the worker's side of the link in aviato/link_actors.py).

- ``WatchActorCalls`` (client -> agent): relay the actor calls of the worker in
  ``sandbox_id`` to me. Sent once per worker of a session that has actors, before any
  call that may carry a handle, on the channel its calls use; answered only by
  ``ActorCallRequest``s echoing its request id, for as long as the worker lives.
- ``ActorCallRequest`` (agent -> client): the worker's call ``rid`` of ``method`` of
  the actor ``actor``; payload ``[args]``, the pickled arguments, never opened by
  the agent or the client: they go on to the actor's worker as they are.
- ``ActorCallReply`` (client -> agent): its outcome, for the worker (``status`` as the
  link's ``ActorReply``: "ok", payloads the result then ``buffers`` buffers; "error",
  payload the method's error record; "failed", none: ``error_type`` and ``detail``
  say why). Answered by ``OkReply``, or an error when that worker waits for no such
  call.
"""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType

__all__ = ["ActorCallReply", "ActorCallRequest", "WatchActorCalls"]


@dataclass(frozen=True, slots=True)
class WatchActorCalls(Message):
    TYPE = MsgType.WATCH_ACTOR_CALLS
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class ActorCallRequest(Message):
    """Payload ``[args]``."""

    TYPE = MsgType.ACTOR_CALL_REQUEST
    sandbox_id: str
    rid: int
    actor: str
    method: str


@dataclass(frozen=True, slots=True)
class ActorCallReply(Message):
    """Payloads: the result and its buffers ("ok"), the error record ("error"), none."""

    TYPE = MsgType.ACTOR_CALL_REPLY
    sandbox_id: str
    rid: int
    status: str
    detail: str = ""
    error_type: str = ""
    buffers: int = 0
    actor_sandbox_id: str = ""
    seconds: float = 0.0
