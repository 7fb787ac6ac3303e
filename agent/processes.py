"""The agent's side of spawned processes (aviato/protocol/processes.py): each request
checked, then relayed to the sandbox's supervisor, whose process table holds them
(agent/process_table.py). A sandbox without a supervisor (an image with no Python)
refuses them with a ``UnsupportedOperationError`` naming its runtime."""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from agent.checks import shown
from aviato import link as schema
from aviato.exceptions import (
    PayloadTooLargeError,
    ProcessNotFoundError,
    SandboxError,
    UnsupportedOperationError,
)
from aviato.protocol import (
    MAX_STDIN_CHUNK,
    MAX_TERMINAL,
    MAX_WAIT_SECONDS,
    Decoded,
    ListProcesses,
    Message,
    OkReply,
    ProcessInfo,
    ProcessOutput,
    ProcessReply,
    ReadOutput,
    ResizeTerminal,
    SignalProcess,
    SpawnProcess,
    WriteStdin,
)

if TYPE_CHECKING:
    from agent.data_plane import DataPlane

__all__ = ["ProcessRequests"]

Handler = Callable[[bytes, Decoded], Awaitable[None]]
#: Output bytes one read answer carries at most.
READ_MAX = 1 << 20
#: How long a request waits for a sandbox's supervisor that is still starting.
SUPERVISOR_WAIT = 30.0


def _info(state: schema.ProcState) -> ProcessInfo:
    return ProcessInfo(
        state.id, tuple(state.argv), state.running, state.exit_code, state.signal, state.pty
    )


def problem(msg: Message) -> str:
    """Why a process request cannot be served ("" when it can)."""
    if isinstance(msg, SpawnProcess):
        if not msg.argv or not msg.argv[0]:
            return "spawn needs a non-empty argv, e.g. ['bash']"
        if any("\x00" in a for a in msg.argv) or (msg.cwd and "\x00" in msg.cwd):
            return "an argument or the cwd holds a NUL byte"
        for name, value in msg.env.items():
            if not name or "=" in name or "\x00" in name or "\x00" in value:
                return f"environment variable {shown(name)!r} is not one"
        if msg.pty:
            return _size_problem(msg.rows, msg.cols)
    if isinstance(msg, ResizeTerminal):
        return _size_problem(msg.rows, msg.cols)
    if isinstance(msg, ReadOutput | ListProcesses):
        wait = msg.wait_seconds
        if math.isnan(wait) or not 0 <= wait <= MAX_WAIT_SECONDS:
            return f"wait_seconds must be 0 to {MAX_WAIT_SECONDS:g}, not {wait}"
    if isinstance(msg, SignalProcess) and not 1 <= msg.signal <= 64:
        return f"{msg.signal} is not a signal number (1 to 64)"
    return ""


def _size_problem(rows: int, cols: int) -> str:
    if 1 <= rows <= MAX_TERMINAL and 1 <= cols <= MAX_TERMINAL:
        return ""
    return f"a terminal is 1 to {MAX_TERMINAL} rows and columns, not {rows}x{cols}"


class ProcessRequests:
    """The data plane's handlers for process messages."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def handlers(self) -> dict[type[Message], Handler]:
        return {
            SpawnProcess: self._on_spawn,
            WriteStdin: self._on_write,
            ReadOutput: self._on_read,
            SignalProcess: self._on_signal,
            ResizeTerminal: self._on_resize,
            ListProcesses: self._on_list,
        }

    async def _ask(
        self,
        sandbox_id: str,
        request: Callable[[int], schema.Header],
        blobs: tuple[bytes, ...] = (),
        process_id: str = "",
    ) -> tuple[schema.ProcReply, Sequence[bytes | memoryview]]:
        plane = self.plane
        plane._check_running(sandbox_id)
        hub = plane.hub
        reply: object
        out: Sequence[bytes | memoryview]
        if hub is not None and await hub.supervisor_ready(sandbox_id, SUPERVISOR_WAIT):
            reply, out = await hub._one_reply(sandbox_id, request, blobs)
            if not isinstance(reply, schema.ProcReply):
                raise hub._gone(sandbox_id)
        else:
            backend = plane.runtime.process_backend()
            if backend is None:
                raise UnsupportedOperationError(
                    f"sandbox {sandbox_id} has no supervisor, so it cannot keep processes "
                    f"(the {plane.runtime.name} runtime needs python3 in the image for "
                    "them); use exec, or an image with Python",
                    sandbox_id=sandbox_id,
                )
            reply, out = await backend.serve(sandbox_id, request(0), [bytes(b) for b in blobs])
        if reply.missing:
            raise ProcessNotFoundError(
                f"sandbox {sandbox_id} has no process {shown(process_id)!r}: an id is only "
                "good in the sandbox that spawned it (sb.processes() lists them)",
                sandbox_id=sandbox_id,
            )
        if reply.error is not None:
            raise SandboxError(f"sandbox {sandbox_id}: {reply.error}", sandbox_id=sandbox_id)
        return reply, out

    def _checked(self, d: Decoded) -> Message:
        why = problem(d.msg)
        if why:
            raise ValueError(why)
        return d.msg

    async def _on_spawn(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, SpawnProcess)
        env = self.plane._exec_env(msg.sandbox_id, msg.env) or {}
        request = functools.partial(
            schema.ProcSpawn,
            argv=msg.argv,
            cwd=msg.cwd,
            env=env,
            pty=msg.pty,
            rows=msg.rows,
            cols=msg.cols,
        )
        reply, _ = await self._ask(msg.sandbox_id, request, ())
        spawned = self.plane.spawned_in  # the dashboard asks only these; ended ones go
        spawned.add(msg.sandbox_id)
        if len(spawned) > len(self.plane.sandboxes) + 16:
            spawned.intersection_update(self.plane.sandboxes)
        out = ProcessReply(tuple(_info(s) for s in reply.procs))
        await self.plane._send(identity, d.request_id, out)

    async def _on_write(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, WriteStdin)
        if len(d.payloads) > 1:
            raise ValueError("a stdin write carries at most one payload frame")
        data = bytes(d.payloads[0]) if d.payloads else b""
        if len(data) > MAX_STDIN_CHUNK:
            raise PayloadTooLargeError(
                f"a stdin write of {len(data)} bytes is above the {MAX_STDIN_CHUNK}-byte "
                "piece limit: send it in pieces (Process.write does)",
                sandbox_id=msg.sandbox_id,
            )
        request = functools.partial(schema.ProcWrite, proc=msg.process_id, eof=msg.eof)
        await self._ask(msg.sandbox_id, request, (data,), msg.process_id)
        await self.plane._send(identity, d.request_id, OkReply())

    async def _on_read(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, ReadOutput)
        request = functools.partial(
            schema.ProcRead,
            proc=msg.process_id,
            offset=max(msg.offset, -1),
            wait=msg.wait_seconds,
            max=READ_MAX,
        )
        reply, blobs = await self._ask(msg.sandbox_id, request, (), msg.process_id)
        if len(reply.fds) != len(blobs) or not reply.procs:
            raise SandboxError(f"sandbox {msg.sandbox_id}: a malformed output reply")
        out = ProcessOutput(
            _info(reply.procs[0]),
            reply.offset,
            reply.skipped,
            reply.eof,
            tuple(2 if fd == 2 else 1 for fd in reply.fds),
        )
        await self.plane._send(identity, d.request_id, out, tuple(blobs))

    async def _on_signal(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, SignalProcess)
        request = functools.partial(schema.ProcSignal, proc=msg.process_id, signal=msg.signal)
        await self._ask(msg.sandbox_id, request, (), msg.process_id)
        await self.plane._send(identity, d.request_id, OkReply())

    async def _on_resize(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, ResizeTerminal)
        request = functools.partial(
            schema.ProcResize, proc=msg.process_id, rows=msg.rows, cols=msg.cols
        )
        await self._ask(msg.sandbox_id, request, (), msg.process_id)
        await self.plane._send(identity, d.request_id, OkReply())

    async def _on_list(self, identity: bytes, d: Decoded) -> None:
        msg = self._checked(d)
        assert isinstance(msg, ListProcesses)
        request = functools.partial(schema.ProcList, proc=msg.process_id, wait=msg.wait_seconds)
        reply, _ = await self._ask(msg.sandbox_id, request, (), msg.process_id)
        out = ProcessReply(tuple(_info(s) for s in reply.procs))
        await self.plane._send(identity, d.request_id, out)
