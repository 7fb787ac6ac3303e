"""Processes (``sb.spawn``) in Docker containers with no supervisor (images without a
Python): each one an exec through the engine's API, attached with stdin on a hijacked
connection (with ``pty``, a terminal of the engine's), its output kept in the same
1 MiB backlog a supervisor keeps (agent/process_table.py's ``Backlog``).

Answers the supervisor's link requests (``ProcSpawn``, ``ProcWrite``, ...) with the
same ``ProcReply``s, so the agent serves both alike (agent/processes.py). Differences
from a supervisor, the engine's: a program that cannot start is a process that exits
126/127 with runc's words in its output (not a refused spawn); an exit code above 128
is taken to be a signal's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from docker.utils.socket import frames_iter

from agent.process_table import (
    BACKLOG,
    KEEP_ENDED,
    MAX_RUNNING,
    MAX_WAIT,
    POLL_SECONDS,
    Backlog,
)
from agent.runtime.docker_errors import DockerError
from aviato import link as schema

__all__ = ["DockerProcesses"]

Target = Callable[[str, Mapping[str, str] | None], tuple[str, Mapping[str, str] | None]]
CHUNK = 65536


@dataclass(eq=False)
class _Proc:
    id: str
    argv: tuple[str, ...]
    pty: bool
    exec_id: str
    sock: socket.socket
    raw: Any
    output: Backlog = field(default_factory=lambda: Backlog(BACKLOG))
    code: int | None = None
    signal: int | None = None
    reading: bool = True
    stdin_open: bool = True
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Set (and replaced) whenever output comes or the process ends: readers wait on it.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Where the output thread waits for a reader that is behind (see Backlog.holds_back).
    gate: threading.Condition = field(default_factory=threading.Condition)

    @property
    def running(self) -> bool:
        return self.code is None

    def finished(self) -> bool:
        return self.code is not None and not self.reading

    def state(self) -> schema.ProcState:
        return schema.ProcState(self.id, self.argv, self.running, self.code, self.signal, self.pty)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def append(self, fd: int, data: bytes) -> None:
        self.output.append(fd, data)
        self.notify()


class Refused(Exception):
    pass


class DockerProcesses:
    """Every such process, by sandbox and id. ``api`` is the engine's client, ``target``
    the container and env an exec in a sandbox gets (docker.py's ``_exec_target``)."""

    def __init__(self, api: Callable[[], Any], target: Target) -> None:
        self._api = api
        self._target = target
        self._tables: dict[str, dict[str, _Proc]] = {}
        # Engine calls and writes (a write waits for the process to read, polling).
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="aviato-docker-proc")

    async def serve(
        self, sandbox_id: str, header: schema.Header, blobs: list[bytes]
    ) -> tuple[schema.ProcReply, list[bytes]]:
        rid: int = getattr(header, "rid", 0)
        table = self._tables.setdefault(sandbox_id, {})
        try:
            if isinstance(header, schema.ProcSpawn):
                proc = await self._spawn(sandbox_id, table, header)
                return schema.ProcReply(rid, procs=(proc.state(),)), []
            if isinstance(header, schema.ProcList):
                if not header.proc:
                    return schema.ProcReply(rid, procs=tuple(p.state() for p in table.values())), []
                proc = self._get(table, header.proc)
                await self._wait(proc, header.wait, lambda: not proc.running)
                return schema.ProcReply(rid, procs=(proc.state(),)), []
            proc = self._get(table, getattr(header, "proc", ""))
            if isinstance(header, schema.ProcRead):
                return await self._read(rid, proc, header)
            if isinstance(header, schema.ProcWrite):
                await self._write(proc, blobs[0] if blobs else b"", header.eof)
            elif isinstance(header, schema.ProcSignal):
                await self._signal(proc, header.signal)
            elif isinstance(header, schema.ProcResize):
                if not proc.pty:
                    raise Refused(f"process {proc.id} has no terminal: spawn it with pty=True")
                if proc.running:
                    await self._call(
                        lambda: self._api().exec_resize(
                            proc.exec_id, height=header.rows, width=header.cols
                        )
                    )
            else:
                raise Refused(f"not a process request: {type(header).__name__}")
            return schema.ProcReply(rid, procs=(proc.state(),)), []
        except KeyError as exc:
            return schema.ProcReply(rid, error=str(exc), missing=True), []
        except (Refused, OSError) as exc:
            return schema.ProcReply(rid, error=str(exc)), []
        except DockerError as exc:
            return schema.ProcReply(rid, error=f"the engine refused: {exc}"), []

    @staticmethod
    def _get(table: dict[str, _Proc], pid: str) -> _Proc:
        proc = table.get(pid)
        if proc is None:
            raise KeyError(pid)
        return proc

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def _wait(self, proc: _Proc, seconds: float, done: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(seconds, 0.0), MAX_WAIT)
        while not done() and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.changed.wait(), left)

    # ------------------------------------------------------------------ spawn

    async def _spawn(
        self, sandbox_id: str, table: dict[str, _Proc], request: schema.ProcSpawn
    ) -> _Proc:
        if sum(p.running for p in table.values()) >= MAX_RUNNING:
            raise Refused(f"{MAX_RUNNING} processes run already: kill some first")
        target, env = self._target(sandbox_id, request.env)
        env = {**(env or {})}
        if request.pty:
            env.setdefault("TERM", "xterm-256color")

        def start() -> tuple[str, Any]:
            api = self._api()
            made = api.exec_create(
                target,
                list(request.argv),
                stdin=True,
                tty=request.pty,
                environment=env,
                workdir=request.cwd,
            )
            raw = api.exec_start(made["Id"], socket=True, tty=request.pty)
            if request.pty:
                with contextlib.suppress(*DockerError):  # it may have ended already
                    api.exec_resize(made["Id"], height=request.rows, width=request.cols)
            return made["Id"], raw

        exec_id, raw = await self._call(start)
        sock: socket.socket = getattr(raw, "_sock", raw)
        pid = "proc-" + os.urandom(8).hex()
        proc = _Proc(pid, tuple(request.argv), request.pty, exec_id, sock, raw)
        table[pid] = proc
        ended = [p.id for p in table.values() if not p.running]
        for old in ended[: max(0, len(ended) - KEEP_ENDED)]:
            self._close(table.pop(old))
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._pump, args=(loop, proc), name="aviato-docker-proc-out", daemon=True
        ).start()
        return proc

    def _pump(self, loop: asyncio.AbstractEventLoop, proc: _Proc) -> None:
        """The exec's output into its backlog; at its end, its exit code."""
        try:
            sent = 0  # the output's end once the loop appended all we handed it
            for fd, chunk in frames_iter(proc.raw, tty=proc.pty):
                if chunk:
                    with proc.gate:  # a reader is behind: we wait (and the engine stops
                        while proc.output.holds_back(len(chunk), sent):  # reading it)
                            proc.gate.wait(POLL_SECONDS)
                    sent += len(chunk)
                    loop.call_soon_threadsafe(proc.append, 2 if fd == 2 else 1, chunk)
        except (OSError, ValueError):
            pass  # closed: the sandbox went, or we forgot it
        code, sig = -1, None
        for _ in range(200):  # the stream can end just before the exit is recorded
            try:
                info = self._api().exec_inspect(proc.exec_id)
            except DockerError:
                break
            if not info.get("Running") and info.get("ExitCode") is not None:
                code = int(info["ExitCode"])
                sig = code - 128 if 128 < code <= 128 + 64 else None
                break
            threading.Event().wait(0.05)
        with contextlib.suppress(RuntimeError):  # the loop closed: the agent is gone
            loop.call_soon_threadsafe(self._ended, proc, code, sig)

    @staticmethod
    def _ended(proc: _Proc, code: int, sig: int | None) -> None:
        proc.code, proc.signal, proc.reading = code, sig, False
        proc.stdin_open = False
        proc.notify()

    # ------------------------------------------------------------------ read, write

    async def _read(
        self, rid: int, proc: _Proc, request: schema.ProcRead
    ) -> tuple[schema.ProcReply, list[bytes]]:
        offset, skipped = proc.output.start_at(request.offset)
        proc.output.note_read(offset)
        await self._wait(proc, request.wait, lambda: proc.output.end > offset or proc.finished())
        fds, blobs, taken = proc.output.take(offset, max(request.max, 1))
        proc.output.note_read(offset + taken)
        with proc.gate:
            proc.gate.notify_all()
        eof = proc.finished() and offset + taken >= proc.output.end
        reply = schema.ProcReply(
            rid,
            procs=(proc.state(),),
            offset=offset,
            skipped=skipped,
            eof=eof,
            fds=tuple(fds),
        )
        return reply, blobs

    async def _write(self, proc: _Proc, data: bytes, eof: bool) -> None:
        async with proc.write_lock:  # one writer at a time: their bytes stay in order
            if not proc.stdin_open:
                raise Refused(f"the stdin of process {proc.id} is closed")
            given_up = threading.Event()

            def send() -> None:
                view = memoryview(data)
                poller = select.poll()
                poller.register(proc.sock, select.POLLOUT)
                while view and not given_up.is_set():
                    if not poller.poll(int(POLL_SECONDS * 1000)):
                        continue  # the process reads slower than we write: wait for it
                    try:
                        view = view[proc.sock.send(view[:CHUNK], socket.MSG_DONTWAIT) :]
                    except BlockingIOError:
                        continue
                if eof and not given_up.is_set():
                    if proc.pty:
                        proc.sock.send(b"\x04")  # a terminal's end of file: ^D, as typed
                    else:
                        proc.sock.shutdown(socket.SHUT_WR)

            try:
                await self._call(send)
            except OSError as exc:
                raise Refused(
                    f"process {proc.id} no longer reads its stdin ({exc.strerror or exc})"
                ) from None
            except asyncio.CancelledError:
                given_up.set()  # the thread sees it within POLL_SECONDS
                raise
            if eof and not proc.pty:
                proc.stdin_open = False

    async def _signal(self, proc: _Proc, number: int) -> None:
        if not 1 <= number <= 64 or not proc.running:
            return
        pid = await self._call(lambda: self._pid(proc))
        if pid > 0:
            # Host pids: the agent runs beside the engine. A terminal's process leads
            # its own group (^C's reach); a plain exec's is the process alone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if proc.pty:
                    os.killpg(pid, number)
                else:
                    os.kill(pid, number)

    def _pid(self, proc: _Proc) -> int:
        """The exec's host pid (0: it ended). The engine marks an exec running only
        after its start returned, and output can flow before: "not running, no exit
        code" means "not yet"."""
        for _ in range(200):
            info = self._api().exec_inspect(proc.exec_id)
            if info.get("Running") and info.get("Pid"):
                return int(info["Pid"])
            if info.get("ExitCode") is not None:
                return 0
            threading.Event().wait(0.05)
        return 0

    # ------------------------------------------------------------------ the end

    @staticmethod
    def _close(proc: _Proc) -> None:
        with contextlib.suppress(OSError):
            proc.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            proc.raw.close()

    def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: so are its processes (their connections closed)."""
        for proc in self._tables.pop(sandbox_id, {}).values():
            self._close(proc)

    def close(self) -> None:
        for sandbox_id in list(self._tables):
            self.forget(sandbox_id)
        self._pool.shutdown(wait=False, cancel_futures=True)
