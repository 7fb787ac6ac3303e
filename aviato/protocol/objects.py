"""Object refs (issue 14 part 3; MsgType 240-259): values a client put in the cluster,
or results a call left there, held by an agent as opaque bytes (a pickle and its
out-of-band buffers, never unpickled outside a sandbox), handed to workers on that
agent, fetched by clients, released by them or with their session."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class ObjectSource:
    """Where an object is held: its agent's data plane, as a sandbox's info gives it."""

    object_id: str
    agent_id: str
    agent_address: str
    agent_public_key: str = ""
    #: Its local lane ("" when none): clients on its host use it.
    agent_lane: str = ""
    #: The session it belongs to: a copy fetched by another agent is freed with it.
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class KeepResult:
    """A call of a RunCalls whose result stays on the agent as ``object_id`` (``fn.ref``):
    the client is sent ``None`` in its place."""

    call_id: int
    object_id: str
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class PutObject(Message):
    """Client -> agent: hold these bytes as ``object_id``. Payloads: the pickle, then its
    ``buffers`` out-of-band buffers. Answered by ``ObjectStored``."""

    TYPE = MsgType.PUT_OBJECT
    object_id: str
    session_id: str = ""
    buffers: int = 0


@dataclass(frozen=True, slots=True)
class ObjectStored(Message):
    TYPE = MsgType.OBJECT_STORED
    object_id: str
    size: int
    agent_id: str
    #: False when it went straight to disk (past the agent's memory budget).
    in_memory: bool = True


@dataclass(frozen=True, slots=True)
class GetObject(Message):
    """Client (or another agent) -> agent: an object's bytes (``ObjectData``)."""

    TYPE = MsgType.GET_OBJECT
    object_id: str


@dataclass(frozen=True, slots=True)
class ObjectData(Message):
    """Payloads: the pickle, then its ``buffers`` out-of-band buffers."""

    TYPE = MsgType.OBJECT_DATA
    object_id: str
    buffers: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseObjects(Message):
    """Client -> agent: free these objects, and with ``session_id`` every object of that
    session (its close). Answered by ``ObjectsReleased``."""

    TYPE = MsgType.RELEASE_OBJECTS
    object_ids: tuple[str, ...] = ()
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class ObjectsReleased(Message):
    TYPE = MsgType.OBJECTS_RELEASED
    count: int
    size: int


@dataclass(frozen=True, slots=True)
class ObjectStats(Message):
    """Client -> agent: what its object store holds (``ObjectStatsReply``)."""

    TYPE = MsgType.OBJECT_STATS


@dataclass(frozen=True, slots=True)
class ObjectStatsReply(Message):
    TYPE = MsgType.OBJECT_STATS_REPLY
    agent_id: str
    objects: int
    memory_bytes: int
    disk_bytes: int
    memory_budget: int
    disk_budget: int
    #: Since it started: objects it fetched from other agents, and GetObject requests
    #: it answered (from clients and agents).
    fetched: int = 0
    served: int = 0
    #: Objects handed to its workers (once per worker and object, not per call).
    handed: int = 0
