"""The agent <-> worker link's ops for actor handles used inside a sandbox (issue 14
part 4): a worker calls a method of one of its session's actors through its agent,
which relays the call to the session's client (agent/actor_relay.py). Beside
aviato/link.py, whose records, encoding and framing these use (``aviato_link`` and
``aviato_link_actors`` in a sandbox): builtin modules only. Importing this module adds
its headers to the link's table, so that ``link.decode`` reads them.

- ``ActorCall`` (worker -> agent): call ``method`` of the session's actor ``actor``;
  one blob, the pickled ``((method, *args), kwargs)`` the actor's dispatch function
  takes. ``rid`` is the worker's, echoed by the reply.
- ``ActorReply`` (agent -> worker): its outcome. ``status`` "ok": the blobs are the
  result's pickle then its ``buffers`` out-of-band buffers; "error": one blob, the
  method's error record (as a call's); "failed": no blob, the call never ran or its
  actor was lost (``error_type`` names the client's exception, ``detail`` says why).
  ``sandbox_id`` and ``seconds``: where and how long the method ran.
"""

from __future__ import annotations

if __package__:
    from aviato import link as schema
else:  # inside a sandbox, copied beside aviato_link
    import aviato_link as schema  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import StrEnum
else:  # enum.StrEnum on the host, the link's stand-in in a sandbox
    StrEnum = schema.StrEnum

__all__ = ["ActorCall", "ActorOp", "ActorReply"]


class ActorOp(StrEnum):
    """The ops of this module (their values are unlike any of ``link.Op``'s)."""

    CALL = "actor-call"
    REPLY = "actor-reply"


@schema.record
class ActorCall(schema.Header):
    OP = ActorOp.CALL  # type: ignore[assignment]
    rid: int
    actor: str
    method: str


@schema.record
class ActorReply(schema.Header):
    OP = ActorOp.REPLY  # type: ignore[assignment]
    rid: int
    status: str
    detail: str = ""
    error_type: str = ""
    buffers: int = 0
    sandbox_id: str = ""
    seconds: float = 0.0


#: The statuses of an ActorReply.
STATUSES = ("ok", "error", "failed")

for _cls in (ActorCall, ActorReply):
    schema._BY_OP[_cls.OP] = _cls  # the link's table of headers, by op
