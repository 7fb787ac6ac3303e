"""Process messages (issue 13), client <-> agent: spawn a process in a sandbox, feed
its stdin, read its output from an offset, signal it, resize its terminal, list them.
Numbered 100-119. The agent relays each to the sandbox's supervisor, which holds the
process table (agent/process_table.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A process spawned in a sandbox (``sb.processes()``): ``exit_code`` once it ended,
    128+N when signal N ended it (``signal`` is then N), as a shell reports it."""

    id: str
    argv: tuple[str, ...]
    running: bool
    exit_code: int | None = None
    signal: int | None = None
    pty: bool = False


@dataclass(frozen=True, slots=True)
class SpawnProcess(Message):
    """Start ``argv`` with a stdin to feed; ``pty``: on a terminal of ``rows`` x
    ``cols``. Answered by a ProcessReply with the one process."""

    TYPE = MsgType.PROCESS_SPAWN
    sandbox_id: str
    argv: tuple[str, ...]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    pty: bool = False
    rows: int = 24
    cols: int = 80


@dataclass(frozen=True, slots=True)
class WriteStdin(Message):
    """Payload ``[data]`` (at most ``MAX_STDIN_CHUNK`` bytes), written to the process's
    stdin: the OkReply comes once it is in, so a writer waits for a slow reader.
    ``eof``: then close it (on a terminal: type ^D)."""

    TYPE = MsgType.PROCESS_WRITE
    sandbox_id: str
    process_id: str
    eof: bool = False


@dataclass(frozen=True, slots=True)
class ReadOutput(Message):
    """The process's output from ``offset`` (-1: the oldest still held), waiting up to
    ``wait_seconds`` for some. Answered by a ProcessOutput."""

    TYPE = MsgType.PROCESS_READ
    sandbox_id: str
    process_id: str
    offset: int = -1
    wait_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessOutput(Message):
    """Payloads: the chunks from ``offset`` on, ``fds[i]`` (1 or 2) naming the stream
    of chunk ``i``; ``skipped``: bytes before ``offset`` the backlog no longer held;
    ``eof``: the process ended and nothing comes after these."""

    TYPE = MsgType.PROCESS_OUTPUT
    process: ProcessInfo
    offset: int
    skipped: int = 0
    eof: bool = False
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SignalProcess(Message):
    """Send ``signal`` to the process's group (a no-op once it ended). OkReply."""

    TYPE = MsgType.PROCESS_SIGNAL
    sandbox_id: str
    process_id: str
    signal: int


@dataclass(frozen=True, slots=True)
class ResizeTerminal(Message):
    """Resize a ``pty`` process's terminal. OkReply."""

    TYPE = MsgType.PROCESS_RESIZE
    sandbox_id: str
    process_id: str
    rows: int
    cols: int


@dataclass(frozen=True, slots=True)
class ListProcesses(Message):
    """Every process of the sandbox; or (``process_id``) that one, once it ended or
    ``wait_seconds`` passed. Answered by a ProcessReply."""

    TYPE = MsgType.PROCESS_LIST
    sandbox_id: str
    process_id: str = ""
    wait_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessReply(Message):
    TYPE = MsgType.PROCESS_REPLY
    processes: tuple[ProcessInfo, ...] = ()


#: The most bytes one WriteStdin carries (the client splits larger writes).
MAX_STDIN_CHUNK = 1 << 20
#: The longest a read or wait may hold its request open.
MAX_WAIT_SECONDS = 60.0
#: Terminal sizes allowed, rows and columns each.
MAX_TERMINAL = 10000
