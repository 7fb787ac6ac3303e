"""``docker exec`` for sandboxes without a supervisor: a command run through the
engine's exec API, its output collected or streamed, stdin fed on a connection of its
own, a timeout or a consumer that leaves killing its process tree, and runc's own
failure to start it told as a shell would tell it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
from docker.utils.socket import frames_iter

from agent.runtime.base import ExecOutput, ExitStatus, OutputChunk
from agent.runtime.docker_bytes import CHUNK
from agent.runtime.docker_errors import DockerError
from agent.runtime.docker_gvisor import kill_tagged
from aviato.exceptions import SandboxError

__all__ = ["DockerExec"]

KILL_GRACE = 2.0  # after a timeout kill, how long the output may take to end before we cut it
_OCI_FAILED = b"OCI runtime exec failed"


@dataclass
class _Exec:
    """One exec in flight, shared by its reader thread and whoever may abort it."""

    target: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str] | None
    #: Written to the process's stdin, then EOF (None: no stdin attached).
    stdin: bytes | memoryview | None = None
    exec_id: str | None = None
    stream: Any = None
    aborted: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    out: list[bytes] = field(default_factory=list)
    err: list[bytes] = field(default_factory=list)


class DockerExec:
    """Runs commands in a container the runtime names (it resolves the container and a
    claimed spare's env first). Each exec is create, start, read and inspect in ONE hop
    to ``pool``; engine errors leave through ``engine_error`` (sandbox id, what, error)."""

    def __init__(
        self,
        api: Callable[[], Any],
        pool: ThreadPoolExecutor,
        engine_error: Callable[[str, str, BaseException], SandboxError],
    ) -> None:
        self._get_api = api
        self._pool = pool
        self._engine_error = engine_error

    @property
    def _api(self) -> Any:
        return self._get_api()

    def _exec_sync(
        self, sandbox_id: str, h: _Exec, emit: Callable[[_Exec, int, bytes], None]
    ) -> int:
        api = self._api
        try:
            try:
                made = api.exec_create(
                    h.target,
                    h.argv,
                    workdir=h.cwd,
                    environment=h.env,
                    stdin=h.stdin is not None,
                )
                h.exec_id = made["Id"]
                if h.aborted:
                    return -9
                relay = _HoldRuncFailure(emit)
                if h.stdin is not None:
                    self._attached_exec(h, relay)
                else:
                    h.stream = api.exec_start(h.exec_id, stream=True, demux=True)
                    for out, err in h.stream:  # ends early when an abort closes the stream
                        if out:
                            relay(h, 1, out)
                        if err:
                            relay(h, 2, err)
                    h.stream.close()
                for _ in range(20):  # the stream can end just before the exit is recorded
                    info = api.exec_inspect(h.exec_id)
                    if info["ExitCode"] is not None or h.aborted:
                        break
                    time.sleep(0.005)
            except DockerError as exc:
                raise self._engine_error(sandbox_id, "exec", exc) from exc
            code = info["ExitCode"]
            held = relay.held
            if held is not None:
                if code == 126:  # said as the supervisor says it: 127 when not found
                    code, message = _exec_failure(h.argv[0], held)
                    emit(h, 2, message)
                else:
                    emit(h, 1, held)
            return int(code) if code is not None else -9 if h.aborted else -1
        finally:
            h.done.set()

    def _attached_exec(self, h: _Exec, emit: Callable[[_Exec, int, bytes], None]) -> None:
        """An exec with stdin: the raw (hijacked) connection, written by a thread of its
        own (the command may write before it reads) and half-closed for EOF, read here."""
        assert h.exec_id is not None and h.stdin is not None
        raw = self._api.exec_start(h.exec_id, socket=True)
        sock: socket.socket = getattr(raw, "_sock", raw)  # a SocketIO over a unix socket
        h.stream = _Hijacked(sock, raw)
        data = h.stdin

        def feed() -> None:
            with contextlib.suppress(OSError):  # it exited without reading it all
                view = memoryview(data).cast("B")
                for i in range(0, len(view), CHUNK):
                    sock.sendall(view[i : i + CHUNK])
                sock.shutdown(socket.SHUT_WR)

        threading.Thread(target=feed, name="aviato-exec-stdin", daemon=True).start()
        try:
            for fd, chunk in frames_iter(raw, tty=False):
                if chunk and fd in (1, 2):
                    emit(h, fd, chunk)
        except OSError:
            if not h.aborted:  # an abort shuts the connection down to end this loop
                raise
        finally:
            h.stream.close()

    def _abort_sync(self, h: _Exec) -> None:
        """Kill the exec's process tree (host pids: we run beside dockerd), then make
        sure its reader returns even if an orphan keeps the output open."""
        h.aborted = True
        # dockerd marks an exec running only after its start call returns, and output can
        # flow before that: under load, "not running, no exit code" means "not yet".
        deadline = time.monotonic() + 10
        while h.exec_id is not None and time.monotonic() < deadline:
            try:
                info = self._api.exec_inspect(h.exec_id)
            except (*DockerError, KeyError, TypeError):
                break
            if info.get("Running") and info.get("Pid"):
                _kill_tree(int(info["Pid"]))
                # Under gVisor that pid is runsc's proxy: kill the command inside too.
                kill_tagged(self._api, h.target, h.env)
                break
            if info.get("ExitCode") is not None or h.done.is_set():
                break
            time.sleep(0.02)
        if not h.done.wait(KILL_GRACE) and h.stream is not None:
            with contextlib.suppress(Exception):
                h.stream.close()

    def _start_exec(
        self,
        sandbox_id: str,
        target: str,
        argv: tuple[str, ...],
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout: float | None,
        emit: Callable[[_Exec, int, bytes], None],
        stdin: bytes | memoryview | None = None,
    ) -> tuple[_Exec, asyncio.Future[int], asyncio.TimerHandle | None]:
        loop = asyncio.get_running_loop()
        h = _Exec(target, list(argv), cwd, dict(env) if env else None, stdin)
        fut = loop.run_in_executor(self._pool, self._exec_sync, sandbox_id, h, emit)
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, self._abort, h)
        return h, fut, timer

    def _abort(self, h: _Exec) -> None:
        if not h.done.is_set():
            with contextlib.suppress(RuntimeError):  # the pool is shut down: we are closing
                self._pool.submit(self._abort_sync, h)

    async def run(
        self,
        sandbox_id: str,
        target: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout_seconds: float | None,
        stdin: bytes | memoryview | None,
    ) -> ExecOutput:
        """The command's whole output and exit (see ``Runtime.exec``)."""

        def collect(h: _Exec, fd: int, data: bytes) -> None:
            (h.out if fd == 1 else h.err).append(data)

        h, fut, timer = self._start_exec(
            sandbox_id, target, argv, cwd, env, timeout_seconds, collect, stdin
        )
        try:
            code = await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._abort(h)  # no-op unless we were cancelled
        return ExecOutput(code, b"".join(h.out), b"".join(h.err), h.aborted)

    async def stream(
        self,
        sandbox_id: str,
        target: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout_seconds: float | None,
        stdin: bytes | memoryview | None,
    ) -> AsyncGenerator[OutputChunk | ExitStatus, None]:
        """The command's output as produced, then its exit (see ``Runtime.exec_stream``)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[OutputChunk | None] = asyncio.Queue()

        def emit(h: _Exec, fd: int, data: bytes) -> None:
            loop.call_soon_threadsafe(q.put_nowait, OutputChunk(fd, data))

        h, fut, timer = self._start_exec(
            sandbox_id, target, argv, cwd, env, timeout_seconds, emit, stdin
        )
        fut.add_done_callback(lambda _: q.put_nowait(None))  # runs after the queued chunks
        try:
            while (chunk := await q.get()) is not None:
                yield chunk
            yield ExitStatus(await fut, h.aborted)
        finally:
            if timer is not None:
                timer.cancel()
            self._abort(h)  # the consumer left early: don't leave the command running


class _Hijacked:
    """An attached exec's connection; ``close`` also wakes a reader blocked on it."""

    def __init__(self, sock: socket.socket, raw: Any) -> None:
        self._sock = sock
        self._raw = raw

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(OSError):
            self._sock.close()


class _HoldRuncFailure:
    """Passes an exec's output on, except runc's own failure ("OCI runtime exec
    failed", on stdout, before anything else), held for the exit code to explain."""

    def __init__(self, emit: Callable[[_Exec, int, bytes], None]) -> None:
        self._emit = emit
        self._first = True
        self.held: bytes | None = None

    def __call__(self, h: _Exec, fd: int, chunk: bytes) -> None:
        if self._first:
            self._first = False
            if fd == 1 and chunk.startswith(_OCI_FAILED):
                self.held = chunk
                return
        if self.held is not None:  # output follows: it was the program's own
            self._emit(h, 1, self.held)
            self.held = None
        self._emit(h, fd, chunk)


def _exec_failure(argv0: str, oci: bytes) -> tuple[int, bytes]:
    """runc's exec failure as a shell (and the supervisor) reports it: 127 and "No such
    file or directory" for a missing program or working directory, else 126."""
    text = oci.decode(errors="replace").lower()
    if "not found" in text or "no such file" in text:
        return 127, f"exec {argv0!r}: No such file or directory\n".encode()
    if "permission denied" in text:
        return 126, f"exec {argv0!r}: Permission denied\n".encode()
    return 126, oci.rstrip(b"\r\n") + b"\n"


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants. The children are listed first (a dead
    parent's children are reparented and lost from view), and each kill stands alone:
    listing can fail under load when other processes come and go."""
    children: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
