"""``Process``: a command spawned in a sandbox (``sb.spawn``) that you keep: feed its
stdin, read its output as it comes, signal it, resize its terminal, wait for its end,
and find it again from any client (``sb.process(id)``).

The process lives in the sandbox's supervisor, not in this client: it keeps running
when the client goes away, and ends with its sandbox. Its output is kept there in a
backlog of the last 1 MiB (``BACKLOG_BYTES``): a handle reads from the oldest byte
still held, so a reattach sees up to 1 MiB of what came before, then what comes next;
a reader slower than the process loses the oldest bytes past that bound (``skipped``
counts them). Writes wait for the process to read (back-pressure): ``write`` returns
once the data is in its stdin pipe, so memory stays bounded however fast you write.
"""

from __future__ import annotations

import asyncio
import signal as _signal
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

from aviato._connection import Channel
from aviato._exec import exec_argv
from aviato._types import OutputChunk
from aviato.exceptions import SandboxTimeoutError
from aviato.protocol import (
    MAX_STDIN_CHUNK,
    MAX_TERMINAL,
    ListProcesses,
    ProcessInfo,
    ProcessOutput,
    ProcessReply,
    ReadOutput,
    ResizeTerminal,
    SandboxInfo,
    SignalProcess,
    SpawnProcess,
    WriteStdin,
)

__all__ = ["BACKLOG_BYTES", "Process", "ProcessInfo", "list_processes", "spawn"]

#: Output the sandbox keeps per process for readers and reattaches (the last bytes).
BACKLOG_BYTES = 1 << 20
#: Each write request carries at most this much; a larger write is several, in order.
_WRITE_PIECE = 256 * 1024
#: A long poll (read, wait) holds its request at most this long, then asks again.
_POLL_SECONDS = 10.0
#: A write waits for the process to read it; a day is "forever", but bounded.
_WRITE_SECONDS = 24 * 3600.0

Agent = Callable[[], tuple[SandboxInfo, Channel]]


def _check_size(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    # Checked by the agent too (a typed SandboxError); here for a ValueError at once.
    if not (1 <= rows <= MAX_TERMINAL and 1 <= cols <= MAX_TERMINAL):
        raise ValueError(f"a terminal is 1 to {MAX_TERMINAL} rows and columns, not {rows}x{cols}")


class Process:
    """A process spawned in a sandbox. ``id`` names it for the sandbox's life."""

    def __init__(self, agent: Agent, info: ProcessInfo, request_timeout: float) -> None:
        self._agent = agent
        self._info = info
        self._timeout = request_timeout
        #: The next output byte this handle reads (-1: the oldest the sandbox holds).
        self._offset = -1
        #: Output bytes this handle missed: the backlog had dropped them.
        self.skipped = 0
        self._eof = False
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Process({self.id!r}, argv={list(self.argv)!r}, running={self._info.running})"

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def argv(self) -> tuple[str, ...]:
        return self._info.argv

    @property
    def pty(self) -> bool:
        return self._info.pty

    @property
    def info(self) -> ProcessInfo:
        """The state last heard (``refresh`` asks again)."""
        return self._info

    @property
    def returncode(self) -> int | None:
        """Its exit code once it ended (128+N for signal N), else None."""
        return self._info.exit_code

    async def refresh(self) -> ProcessInfo:
        return await self._state(0.0)

    async def _state(self, wait: float) -> ProcessInfo:
        info, conn = self._agent()
        reply = await conn.request(
            ListProcesses(info.sandbox_id, self.id, wait),
            timeout=wait + self._timeout,
            cancel_at_source=True,
        )
        assert isinstance(reply.msg, ProcessReply)
        self._info = reply.msg.processes[0]
        return self._info

    # ------------------------------------------------------------------ input

    async def write(self, data: bytes | bytearray | memoryview | str) -> None:
        """Write ``data`` to its stdin (a str as UTF-8); returns once the process's pipe
        took it all: a process that reads slowly makes this wait. Writes of one handle
        go in order; any size (sent in pieces)."""
        if isinstance(data, str):
            data = data.encode()
        view = memoryview(data).cast("B")
        async with self._write_lock:
            for at in range(0, len(view), _WRITE_PIECE):
                await self._write(view[at : at + _WRITE_PIECE], eof=False)

    async def close_stdin(self) -> None:
        """Close its stdin: it reads end of file (on a terminal: ^D is typed)."""
        async with self._write_lock:
            await self._write(b"", eof=True)

    async def _write(self, piece: bytes | memoryview, *, eof: bool) -> None:
        assert len(piece) <= MAX_STDIN_CHUNK
        info, conn = self._agent()
        await conn.request(
            WriteStdin(info.sandbox_id, self.id, eof),
            (piece,),
            timeout=_WRITE_SECONDS,
            cancel_at_source=True,
        )

    # ------------------------------------------------------------------ output

    async def output(self) -> AsyncIterator[OutputChunk]:
        """Its output as it comes (``chunk.stream`` "stdout" or "stderr"; a terminal's
        is all "stdout"), from where this handle is: a new handle starts at the oldest
        byte the sandbox still holds (at most ``BACKLOG_BYTES`` back). Ends when the
        process ended and all its output was read."""
        while not self._eof:
            info, conn = self._agent()
            reply = await conn.request(
                ReadOutput(info.sandbox_id, self.id, self._offset, _POLL_SECONDS),
                timeout=_POLL_SECONDS + self._timeout,
                cancel_at_source=True,
            )
            msg = reply.msg
            assert isinstance(msg, ProcessOutput)
            self._info = msg.process
            self.skipped += msg.skipped
            offset = msg.offset
            for fd, data in zip(msg.fds, reply.payloads, strict=False):
                offset += len(data)
                self._offset = offset
                yield OutputChunk(2 if fd == 2 else 1, bytes(data))
            self._offset = offset
            self._eof = msg.eof

    # ------------------------------------------------------------------ control

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for it to end; its exit code (128+N when signal N ended it: see
        ``info.signal``). ``timeout``: ``SandboxTimeoutError`` past it (it runs on)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = _POLL_SECONDS if deadline is None else deadline - loop.time()
            if left <= 0:
                raise SandboxTimeoutError(
                    f"process {self.id} ({' '.join(self.argv)[:80]!r}) still runs after "
                    f"{timeout:g}s"
                )
            info = await self._state(min(left, _POLL_SECONDS))
            if info.exit_code is not None:
                return info.exit_code

    async def signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. ``signal.SIGINT``) to its process group; nothing once
        it ended."""
        info, conn = self._agent()
        await conn.request(
            SignalProcess(info.sandbox_id, self.id, int(signum)), timeout=self._timeout
        )

    async def kill(self) -> None:
        """SIGKILL it (and its process group)."""
        await self.signal(_signal.SIGKILL)

    async def resize(self, *, rows: int, cols: int) -> None:
        """Resize its terminal (a ``pty=True`` process): it gets SIGWINCH."""
        _check_size(rows, cols)
        info, conn = self._agent()
        await conn.request(
            ResizeTerminal(info.sandbox_id, self.id, rows, cols), timeout=self._timeout
        )


async def spawn(
    agent: Agent,
    request_timeout: float,
    command: Sequence[str],
    *,
    cwd: str | None,
    env: Mapping[str, str] | None,
    pty: bool,
    rows: int,
    cols: int,
) -> Process:
    argv = exec_argv(command)
    if pty:
        _check_size(rows, cols)
    info, conn = agent()
    reply = await conn.request(
        SpawnProcess(info.sandbox_id, argv, cwd, dict(env or {}), pty, rows, cols),
        timeout=request_timeout,
    )
    assert isinstance(reply.msg, ProcessReply)
    return Process(agent, reply.msg.processes[0], request_timeout)


async def list_processes(agent: Agent, request_timeout: float) -> list[ProcessInfo]:
    info, conn = agent()
    reply = await conn.request(ListProcesses(info.sandbox_id), timeout=request_timeout)
    assert isinstance(reply.msg, ProcessReply)
    return list(reply.msg.processes)


async def attach(agent: Agent, request_timeout: float, process_id: str) -> Process:
    if not isinstance(process_id, str) or not process_id:
        raise TypeError(f"a process id is a non-empty str, not {process_id!r}")
    info, conn = agent()
    reply = await conn.request(ListProcesses(info.sandbox_id, process_id), timeout=request_timeout)
    assert isinstance(reply.msg, ProcessReply)
    return Process(agent, reply.msg.processes[0], request_timeout)
