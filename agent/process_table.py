"""The supervisor's table of spawned processes (``sb.spawn``): runs INSIDE a sandbox,
standard library only (copied beside the supervisor as aviato_process_table.py, and
imported on the first process request: no start-up cost for sandboxes without one).

Each process has a stdin to feed (a pipe, or a terminal), and its output goes to a
backlog of ``BACKLOG`` bytes (1 MiB) with absolute offsets: a reader asks from an
offset and gets what is still held, told how many bytes it missed. The process never
waits for a reader (it keeps running when its client goes away); a reader slower than
the process loses the oldest output past the backlog. A writer faster than the process
reads waits: its request is answered once the data is in the pipe.
"""

from __future__ import annotations

import collections
import os
import select
import struct
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

if __package__:
    from aviato import link as schema
else:
    import aviato_link as schema  # type: ignore[import-not-found,no-redef]

#: Output held per process for readers (and for a reattach), in bytes.
BACKLOG = 1 << 20
#: Ended processes kept (their exit code and backlog); the oldest are forgotten.
KEEP_ENDED = 64
#: Processes running at once, at most.
MAX_RUNNING = 1024
CHUNK = 65536
#: How often a blocked write or read looks whether it was given up.
POLL_SECONDS = 0.2
MAX_WAIT = 60.0
#: A reader that read within this many seconds (or a process spawned as long ago: its
#: spawner is about to read) holds the output back: the process waits (its pipe fills)
#: rather than lose bytes that reader has not read yet.
READER_GRACE = 5.0
#: Terminal sizes allowed (rows and columns each).
MAX_TERMINAL = 10000
TIOCSWINSZ = 0x5414  # Linux
SIGKILL = 9
DEFAULT_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ: restored for what we start


class Missing(Exception):
    """No process with that id."""


class Refused(Exception):
    """A request that cannot be served; its message says why."""


def _winsize(rows: int, cols: int) -> bytes:
    if not (1 <= rows <= MAX_TERMINAL and 1 <= cols <= MAX_TERMINAL):
        raise Refused(f"a terminal is 1 to {MAX_TERMINAL} rows and columns, not {rows}x{cols}")
    return struct.pack("HHHH", rows, cols, 0, 0)


class Backlog:
    """The last ``limit`` bytes of a process's output, as chunks at absolute offsets
    (no locking: its owner's)."""

    def __init__(self, limit: int = BACKLOG) -> None:
        self.limit = limit
        self.chunks: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self.start = 0  # offset of the oldest byte held
        self.end = 0  # offset after the newest
        self.kept = 0
        self.reader_at = 0  # the furthest a reader has read
        self.read_at = time.monotonic()  # when one last read: the spawner reads next

    def note_read(self, offset: int) -> None:
        self.reader_at = max(self.reader_at, offset)
        self.read_at = time.monotonic()

    def holds_back(self, size: int, end: int | None = None) -> bool:
        """Whether ``size`` more bytes must wait: a reader reading lately has not read
        the backlog's worth of bytes before them yet. ``end``: where they would start
        (by default, after what is held)."""
        end = self.end if end is None else end
        return (
            time.monotonic() - self.read_at < READER_GRACE
            and end + size - self.reader_at > self.limit
        )

    def append(self, fd: int, data: bytes) -> None:
        self.chunks.append((self.end, fd, data))
        self.end += len(data)
        self.kept += len(data)
        while self.kept > self.limit:
            at, first_fd, first = self.chunks[0]
            over = self.kept - self.limit
            if len(first) <= over:
                self.chunks.popleft()
                self.kept -= len(first)
            else:
                self.chunks[0] = (at + over, first_fd, first[over:])
                self.kept -= over
        self.start = self.chunks[0][0] if self.chunks else self.end

    def start_at(self, offset: int) -> tuple[int, int]:
        """Where a read asked at ``offset`` (-1: a new reader) starts, and the bytes
        before it that it never sees (dropped from the backlog)."""
        offset = max(offset, 0)
        skipped = max(self.start - offset, 0)
        return min(max(offset, self.start), self.end), skipped

    def take(self, offset: int, most: int) -> tuple[list[int], list[bytes], int]:
        """At most ``most`` bytes from ``offset``: the streams, the chunks (neighbours of
        one stream joined) and how many bytes."""
        fds: list[int] = []
        blobs: list[bytes] = []
        taken = 0
        for at, fd, data in self.chunks:
            if at + len(data) <= offset or taken >= most:
                continue
            piece = data[max(0, offset - at) :][: most - taken]
            if fds and fds[-1] == fd:
                blobs[-1] += piece
            else:
                fds.append(fd)
                blobs.append(piece)
            taken += len(piece)
        return fds, blobs, taken


class Proc:
    def __init__(self, pid: str, argv: tuple[str, ...], os_pid: int, stdin: int, pty: bool):
        self.id = pid
        self.argv = argv
        self.pid = os_pid
        self.stdin: int | None = stdin  # the pipe's write end, or the terminal's master
        self.pty = pty
        self.cond = threading.Condition()
        self.write_lock = threading.Lock()
        self.output = Backlog()
        self.open_outputs = 0
        self.code: int | None = None
        self.signal: int | None = None

    # ------------------------------------------------------------------ state

    @property
    def running(self) -> bool:
        return self.code is None

    def state(self) -> schema.ProcState:
        return schema.ProcState(self.id, self.argv, self.running, self.code, self.signal, self.pty)

    def finished(self) -> bool:
        """Exited, and all its output read in."""
        return self.code is not None and self.open_outputs == 0

    # ------------------------------------------------------------------ output

    def append(self, fd: int, data: bytes) -> None:
        with self.cond:
            while self.output.holds_back(len(data)):
                self.cond.wait(POLL_SECONDS)  # a reader is behind: the process waits
            self.output.append(fd, data)
            self.cond.notify_all()

    def pump(self, fd: int, pipe: int) -> None:
        try:
            while True:
                try:
                    data = os.read(pipe, CHUNK)
                except OSError:  # EIO: a terminal whose last holder closed it
                    data = b""
                if not data:
                    return
                self.append(fd, data)
        finally:
            if not self.pty:
                os.close(pipe)
            with self.cond:
                self.open_outputs -= 1
                self.cond.notify_all()

    def read(
        self, rid: int, offset: int, wait: float, most: int, cancelled: list[bool]
    ) -> tuple[schema.ProcReply, list[bytes]]:
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
        with self.cond:
            offset, skipped = self.output.start_at(offset)
            self.output.note_read(offset)
            while self.output.end <= offset and not self.finished() and not cancelled[0]:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, POLL_SECONDS))
            fds, blobs, taken = self.output.take(offset, most)
            self.output.note_read(offset + taken)
            self.cond.notify_all()  # a pump waiting for this reader goes on
            eof = self.finished() and offset + taken >= self.output.end
            reply = schema.ProcReply(
                rid,
                procs=(self.state(),),
                offset=offset,
                skipped=skipped,
                eof=eof,
                fds=tuple(fds),
            )
        return reply, blobs

    # ------------------------------------------------------------------ input

    def write(self, data: bytes, eof: bool, cancelled: list[bool]) -> None:
        with self.write_lock:  # one writer at a time: their bytes stay in order
            fd = self.stdin
            if fd is None:
                raise Refused(f"the stdin of process {self.id} is closed")
            view = memoryview(data)
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            while view:
                if cancelled[0]:
                    return
                if not self.running:
                    raise Refused(f"process {self.id} exited before it read all its stdin")
                if not poller.poll(int(POLL_SECONDS * 1000)):
                    continue  # the process reads slower than we write: wait for it
                try:
                    view = view[os.write(fd, view[:CHUNK]) :]
                except BlockingIOError:
                    continue
                except OSError as exc:  # EPIPE: it closed its stdin; EIO: its terminal
                    raise Refused(
                        f"process {self.id} no longer reads its stdin ({exc.strerror or exc})"
                    ) from None
            if eof:
                if self.pty:
                    os.write(fd, b"\x04")  # a terminal's end of file: ^D, as typed
                else:
                    self.stdin = None
                    os.close(fd)

    def resize(self, rows: int, cols: int) -> None:
        import fcntl

        size = _winsize(rows, cols)
        if not self.pty:
            raise Refused(f"process {self.id} has no terminal: spawn it with pty=True")
        if self.running and self.stdin is not None:
            fcntl.ioctl(self.stdin, TIOCSWINSZ, size)  # the kernel sends it SIGWINCH

    def send_signal(self, number: int) -> None:
        if not 1 <= number <= 64:
            raise Refused(f"{number} is not a signal number (1 to 64)")
        if self.running:
            try:
                os.killpg(self.pid, number)  # its group: as ^C reaches a job
            except OSError:
                try:
                    os.kill(self.pid, number)
                except OSError:
                    pass

    def reap(self) -> None:
        while True:
            try:
                status = os.waitpid(self.pid, 0)[1]
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status = 0
                break
        code = os.waitstatus_to_exitcode(status)
        with self.cond:
            if code < 0:
                self.signal, self.code = -code, 128 - code
            else:
                self.code = code
            self.cond.notify_all()
        if self.pty:
            # The terminal's output is read until nothing holds it (EIO), or a moment
            # (a background job may hold it for ever). Closed here, not by the reader:
            # a write may still use it.
            with self.cond:
                while self.open_outputs and self.cond.wait(2.0):
                    pass
        with self.write_lock:  # a write under way sees the exit and lets go
            fd, self.stdin = self.stdin, None
            if fd is not None:
                os.close(fd)

    def wait(self, seconds: float, cancelled: list[bool]) -> None:
        deadline = time.monotonic() + min(max(seconds, 0.0), MAX_WAIT)
        with self.cond:
            while self.running and not cancelled[0]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(min(left, POLL_SECONDS))


class ProcessTable:
    """Every process spawned in this sandbox, by id. ``find`` resolves argv[0] on a
    PATH (the supervisor's own), ``base_env`` is the environment commands get."""

    def __init__(self, find: Callable[[str, dict[str, str]], str], base_env: dict[str, str]):
        self.find = find
        self.base_env = base_env
        self.lock = threading.Lock()
        self.procs: dict[str, Proc] = {}

    def pids(self) -> list[int]:
        with self.lock:
            return [p.pid for p in self.procs.values() if p.running]

    def serve(
        self, header: schema.Header, blobs: list[bytes], cancelled: list[bool]
    ) -> tuple[schema.ProcReply, list[bytes]]:
        """The answer to one request."""
        rid = header.rid  # type: ignore[attr-defined]
        try:
            if isinstance(header, schema.ProcSpawn):
                return schema.ProcReply(rid, procs=(self.spawn(header).state(),)), []
            if isinstance(header, schema.ProcList):
                if not header.proc:
                    with self.lock:
                        procs = tuple(p.state() for p in self.procs.values())
                    return schema.ProcReply(rid, procs=procs), []
                proc = self.get(header.proc)
                proc.wait(header.wait, cancelled)
                return schema.ProcReply(rid, procs=(proc.state(),)), []
            proc = self.get(header.proc)  # type: ignore[attr-defined]
            if isinstance(header, schema.ProcRead):
                return proc.read(rid, header.offset, header.wait, max(header.max, 1), cancelled)
            if isinstance(header, schema.ProcWrite):
                proc.write(blobs[0] if blobs else b"", header.eof, cancelled)
            elif isinstance(header, schema.ProcSignal):
                proc.send_signal(header.signal)
            elif isinstance(header, schema.ProcResize):
                proc.resize(header.rows, header.cols)
            else:
                raise Refused(f"not a process request: {type(header).__name__}")
            return schema.ProcReply(rid, procs=(proc.state(),)), []
        except Missing as exc:
            return schema.ProcReply(rid, error=str(exc), missing=True), []
        except Refused as exc:
            return schema.ProcReply(rid, error=str(exc)), []
        except OSError as exc:
            return schema.ProcReply(rid, error=exc.strerror or str(exc)), []

    def get(self, pid: str) -> Proc:
        with self.lock:
            proc = self.procs.get(pid)
        if proc is None:
            raise Missing(f"no process {pid[:60]!r}")
        return proc

    def spawn(self, request: schema.ProcSpawn) -> Proc:
        with self.lock:
            if sum(p.running for p in self.procs.values()) >= MAX_RUNNING:
                raise Refused(f"{MAX_RUNNING} processes run already: kill some first")
        env = {**self.base_env, **request.env}
        argv = list(request.argv)
        if request.cwd is not None:
            if not os.path.isdir(request.cwd):
                raise Refused(f"cwd {request.cwd[:200]!r}: no such directory")
            # posix_spawn cannot chdir (before Python 3.13): a shell does, then execs.
            argv = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', request.cwd, *argv]
        try:
            path = self.find(argv[0], env)
        except OSError:
            raise Refused(f"{argv[0][:200]!r}: command not found") from None
        pid = "proc-" + os.urandom(8).hex()  # unguessable: an id is only good in its sandbox
        if request.pty:
            proc = self._spawn_pty(pid, path, argv, env, request)
        else:
            proc = self._spawn_pipes(pid, path, argv, env, tuple(request.argv))
        with self.lock:
            self.procs[pid] = proc
            ended = [p.id for p in self.procs.values() if not p.running]
            for old in ended[: max(0, len(ended) - KEEP_ENDED)]:
                del self.procs[old]
        threading.Thread(target=proc.reap, daemon=True).start()
        return proc

    def _spawn_pipes(
        self, pid: str, path: str, argv: list[str], env: dict[str, str], shown: tuple[str, ...]
    ) -> Proc:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            os_pid = os.posix_spawn(
                path,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsid=True,
                setsigdef=DEFAULT_SIGNALS,
            )
        except OSError as exc:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise Refused(f"{shown[0][:200]!r}: {exc.strerror or exc}") from None
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        os.set_blocking(in_w, False)  # writes poll, so that a give-up is seen
        proc = Proc(pid, shown, os_pid, in_w, pty=False)
        proc.open_outputs = 2
        for fd, pipe in ((1, out_r), (2, err_r)):
            threading.Thread(target=proc.pump, args=(fd, pipe), daemon=True).start()
        return proc

    def _spawn_pty(
        self,
        pid: str,
        path: str,
        argv: list[str],
        env: dict[str, str],
        request: schema.ProcSpawn,
    ) -> Proc:
        import fcntl

        size = _winsize(request.rows, request.cols)
        env.setdefault("TERM", "xterm-256color")
        master, slave = os.openpty()
        try:
            fcntl.ioctl(slave, TIOCSWINSZ, size)
            name = os.ttyname(slave)
            # A new session opening its terminal without O_NOCTTY makes it the
            # session's controlling terminal (posix_spawn does setsid first): ^C then
            # reaches the foreground job, as in any terminal.
            os_pid = os.posix_spawn(
                path,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, name, os.O_RDWR, 0),
                    (os.POSIX_SPAWN_DUP2, 0, 1),
                    (os.POSIX_SPAWN_DUP2, 0, 2),
                ],
                setsid=True,
                setsigdef=DEFAULT_SIGNALS,
            )
        except OSError as exc:
            os.close(master)
            raise Refused(f"{request.argv[0][:200]!r}: {exc.strerror or exc}") from None
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        proc = Proc(pid, tuple(request.argv), os_pid, master, pty=True)
        proc.open_outputs = 1
        threading.Thread(target=self._pump_pty, args=(proc, master), daemon=True).start()
        return proc

    @staticmethod
    def _pump_pty(proc: Proc, master: int) -> None:
        """A terminal's output, read from its (non-blocking) master."""
        poller = select.poll()
        poller.register(master, select.POLLIN)
        try:
            while True:
                events = poller.poll(int(POLL_SECONDS * 1000))
                if not events:
                    if proc.stdin is None:
                        return
                    continue
                try:
                    data = os.read(master, CHUNK)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: nothing holds the terminal any more
                    return
                if not data:
                    return
                proc.append(1, data)
        finally:
            with proc.cond:
                proc.open_outputs -= 1
                proc.cond.notify_all()

    def kill_all(self) -> None:
        for os_pid in self.pids():
            try:
                os.killpg(os_pid, SIGKILL)
            except OSError:
                pass
