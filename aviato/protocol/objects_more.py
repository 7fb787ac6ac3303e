"""Object refs, more (MsgType 270-279): an agent asks the scheduler which of the
sessions whose objects it holds have ended, so that the objects of a client that died
without closing its session are freed once its lease lapses; and where another agent
is (its address and CURVE key), before it fetches an object from it."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType

__all__ = [
    "MAX_OBJECT_SESSIONS",
    "AgentLocation",
    "LocateAgent",
    "ObjectSessions",
    "ObjectSessionsEnded",
]

#: Sessions named in one ObjectSessions at most (the scheduler reads no more).
MAX_OBJECT_SESSIONS = 4096


@dataclass(frozen=True, slots=True)
class ObjectSessions(Message):
    """Agent -> scheduler: the sessions it holds objects of. Answered by
    ``ObjectSessionsEnded``; a session the scheduler does not know (it restarted) is
    given a lease of its own, which its client, if alive, renews."""

    TYPE = MsgType.OBJECT_SESSIONS
    agent_id: str
    session_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ObjectSessionsEnded(Message):
    """Those of them that ended (closed, or their lease expired): free their objects."""

    TYPE = MsgType.OBJECT_SESSIONS_ENDED
    session_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LocateAgent(Message):
    """Agent ``agent_id`` -> scheduler: where live agent ``wanted`` serves its data plane
    (an object source names it; the client wrote that source, so the agent checks it
    here). Answered by ``AgentLocation``."""

    TYPE = MsgType.LOCATE_AGENT
    agent_id: str
    wanted: str


@dataclass(frozen=True, slots=True)
class AgentLocation(Message):
    """``address`` "" when ``agent_id`` is not a live agent of the cluster."""

    TYPE = MsgType.AGENT_LOCATION
    agent_id: str
    address: str = ""
    #: Its data plane's CURVE public key (z85; "" when keys are off).
    public_key: str = ""
