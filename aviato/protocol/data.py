"""Data-plane messages: client <-> agent (exec, files, logs), and the function calls the
agent relays to a sandbox's worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from aviato.link import CallHeader, CallOutcome
from aviato.protocol.objects import KeepResult, ObjectSource
from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class Exec(Message):
    """Payloads: ``[stdin]`` optionally (the command reads it, then end of file; without
    it, an empty stdin). Buffered reply: ``ExecReply`` with payloads ``[stdout, stderr]``;
    streamed: ``ExecChunk``s then an ``ExecReply`` with none."""

    TYPE = MsgType.EXEC
    sandbox_id: str
    argv: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    stream: bool = False


@dataclass(frozen=True, slots=True)
class ExecChunk(Message):
    """One piece of streamed output; payload ``[data]``. ``fd`` is 1 or 2."""

    TYPE = MsgType.EXEC_CHUNK
    fd: int


@dataclass(frozen=True, slots=True)
class ExecReply(Message):
    TYPE = MsgType.EXEC_REPLY
    returncode: int
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class WriteFile(Message):
    """Payload ``[data]``."""

    TYPE = MsgType.WRITE_FILE
    sandbox_id: str
    path: str
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class ReadFile(Message):
    """``max_bytes``: a file larger than this is refused while it is read (0: the
    payload limit), with a ``too_large`` error."""

    TYPE = MsgType.READ_FILE
    sandbox_id: str
    path: str
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class FileReply(Message):
    """Payload ``[data]``."""

    TYPE = MsgType.FILE_REPLY
    size: int


@dataclass(frozen=True, slots=True)
class GetLogs(Message):
    TYPE = MsgType.GET_LOGS
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class LogsReply(Message):
    """The sandbox's output in the order it was written: one payload frame per chunk,
    ``fds[i]`` naming the stream (1 stdout, 2 stderr) of frame ``i``."""

    TYPE = MsgType.LOGS_REPLY
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Client -> agent, no reply: the client gave up on the request whose id this
    message carries (an exec, read or write); the agent stops it at its source."""

    TYPE = MsgType.CANCEL


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE = MsgType.PING


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE = MsgType.PONG
    server: str
    server_id: str = ""


@dataclass(frozen=True, slots=True)
class RunCalls(Message):
    """Client -> agent: run these calls on the worker in ``sandbox_id``. Answered by one
    or more CallResults (echoing the request id) until every call has an outcome."""

    TYPE = MsgType.RUN_CALLS
    sandbox_id: str
    calls: tuple[CallHeader, ...]
    #: Out-of-band buffer frames after the calls' own, each sent once per batch however
    #: many of its calls use it (see CallHeader.buffers).
    buffers: int = 0
    #: Objects the calls' arguments refer to (``ObjectRef``): the agent hands each to
    #: the worker before the batch (aviato/protocol/objects.py).
    objects: tuple[ObjectSource, ...] = ()
    #: Calls whose results stay on the agent as objects (``fn.ref``).
    keep: tuple[KeepResult, ...] = ()


@dataclass(frozen=True, slots=True)
class CallResults(Message):
    """One payload frame per outcome with status ok/error (and its buffers), in order."""

    TYPE = MsgType.CALL_RESULTS
    sandbox_id: str
    outcomes: tuple[CallOutcome, ...]
