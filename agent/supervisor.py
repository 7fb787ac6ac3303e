"""The in-sandbox supervisor and function worker: runs INSIDE a sandbox, with the
standard library only (and cloudpickle, for function calls; the agent mounts this
file and cloudpickle read-only at /run/aviato-lib).

It connects to the agent over a Unix socket mounted into the container (so a
sandbox with no network still works), says hello, then serves:

- ``calls``: batches of remote-function calls, run one after another on the main
  thread (a function may use signals) with outcomes sent back as they finish;
- ``exec``: a command spawned with pipes (its stdin the request's blob, then EOF, or
  empty), its output streamed or collected, its exit code reported (each exec on its
  own thread, so many run at once);
- ``read`` / ``write``: files; streamed ones (any size, flow-controlled), listings
  and removals in agent/supervisor_files.py.

It exits when the agent closes the socket. The link's ops, headers and framing are
aviato/link.py's: frame 0 of a message is a header, marshal from the agent (we trust
it), JSON to the agent (it must parse what a sandbox sends safely); the rest are
opaque blobs.
"""

from __future__ import annotations

# Builtin modules only at start-up: socket, subprocess, threading, queue and signal
# would cost a sandbox ~20 ms before it can serve its first exec.
import _queue
import _socket
import _thread
import io
import marshal
import os
import struct
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds at start-up; only the checker needs it
    from collections.abc import Sequence
    from typing import Any

# The link's schema and framing (aviato/link.py), and its worker side (shared memory,
# result pickling): beside us in the sandbox (/run/aviato-lib/aviato_link.py and
# aviato_supervisor_link.py), in their packages on the host.
if __package__:
    from agent import supervisor_concurrent, worker_actors, worker_objects
    from agent.supervisor_link import (
        SHM,
        FdReader,
        Outbox,
        _send_all,
        error_record,
        make_picklers,
        send_shared,
        to_json,
        too_large_record,
    )
    from agent.supervisor_output import forward as forward_output
    from aviato import link as schema
else:
    import aviato_link as schema  # type: ignore[import-not-found,no-redef]
    import aviato_supervisor_concurrent as supervisor_concurrent  # type: ignore[import-not-found,no-redef]
    import aviato_worker_actors as worker_actors  # type: ignore[import-not-found,no-redef]
    import aviato_worker_objects as worker_objects  # type: ignore[import-not-found,no-redef]
    from aviato_supervisor_link import (  # type: ignore[import-not-found,no-redef]
        SHM,
        FdReader,
        Outbox,
        _send_all,
        error_record,
        make_picklers,
        send_shared,
        to_json,
        too_large_record,
    )
    from aviato_supervisor_output import forward as forward_output  # type: ignore[import-not-found,no-redef]

#: Headers of streamed files, for agent/supervisor_files.py.
STREAM_OPS = (
    schema.ReadStream,
    schema.WriteOpen,
    schema.WriteChunk,
    schema.ChunkAck,
    schema.ListRequest,
    schema.RemoveRequest,
)
SIGKILL = 9  # Linux; the signal module would cost an import (enum) at start-up
#: Python ignores these; a program we start must not inherit that (a writer to a closed
#: pipe dies of SIGPIPE, as under a shell or docker exec).
DEFAULT_SIGNALS = (13, 25)  # SIGPIPE, SIGXFSZ
#: Outcomes are sent at the latest this long after the first unsent one finished.
FLUSH_SECONDS = 0.002
#: Variables the agent sets for us, kept out of the commands we run.
OUR_ENV = (
    "AVIATO_WORKER_SOCKET",
    "AVIATO_WORKER_SHM",
    "AVIATO_SHM_SPARE",
    "AVIATO_CLIENT_PYTHON",
    "AVIATO_WATCHDOG",
    "AVIATO_TAG_OUTPUT",
)
#: With AVIATO_TAG_OUTPUT (the local runtime, whose log is one file), our stdout and
#: stderr and those of the command we run become records in that file: the magic, the
#: stream (1 or 2), the length, then the bytes. Docker keeps the streams apart itself.
LOG_MAGIC = b"\x00avl"
LOG_RECORD = struct.Struct("!4sBI")
CHUNK = 65536
READ_CHUNK = 1 << 20  # a cancel or the size cap is noticed at most this late
WRITE_CHUNK = 1 << 20


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in OUR_ENV}


def _wait_for_the_reader() -> None:
    """The agent is gone. The reader thread sees it too: it stops what we started (and
    the container, as a watchdog) and ends the process. Returning from main instead
    would race it."""
    while True:
        time.sleep(3600)


def _connect(path: str, timeout: float) -> _socket.socket | None:
    """Connect to the agent's socket for this sandbox (None: it never listened)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            if isinstance(exc, ConnectionRefusedError) and _watchdog():
                _stop_container()  # the agent that listened there is gone already
            if time.monotonic() > deadline:
                sock.close()
                return None
            time.sleep(0.01)


def _open_running_marker() -> int | None:
    """The agent made ``running`` beside our socket, writable by any user."""
    path = os.path.join(
        os.path.dirname(os.environ.get("AVIATO_WORKER_SOCKET", "/run/aviato/worker.sock")),
        "running",
    )
    try:
        return os.open(path, os.O_WRONLY)
    except OSError:
        return None


def _watchdog() -> bool:
    """Set for a sidecar beside the container's command, only ever inside a container's
    own PID namespace: an agent killed, or gone for good, would leave it running."""
    return os.environ.get("AVIATO_WATCHDOG") == "container"


def _stop_container() -> None:
    """Take every process of the container down but us; its init then exits, and the
    container stops. Then go too."""
    try:
        os.kill(-1, SIGKILL)
    except OSError:
        pass
    os._exit(0)


class Supervisor:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.running_fd = _open_running_marker()
        self.lock = _thread.allocate_lock()
        self.calls: _queue.SimpleQueue[tuple[schema.CallBatch, list[bytes]] | None] = (
            _queue.SimpleQueue()
        )
        self.functions: dict[str, Any] = {}
        self.runners: dict[str, Any] = {}  # digest -> its calls' runner, if they run at once
        self.cloudpickle: Any = None
        self.base_env = _user_env()
        self.procs: dict[int, int] = {}  # exec request id -> its process (group) id
        #: read/write request id -> [cancelled]: set by a kill, seen between chunks.
        self.files: dict[int, list[bool]] = {}
        self.main: int | None = None  # the sandbox's command (--main): pid = its group
        self.detached = False
        #: Where results go: the calls link when there is one (see serve_calls_on).
        self.results_to: _socket.socket | None = None
        #: Results in shared memory: once the agent's probe came through (calls link).
        self.shm = False
        #: Spawned processes (aviato_process_table), made at the first request for one.
        self.table: Any = None
        self.streams: Any = None  # supervisor_files.Files, made at the first file op
        #: Outcomes on their way (sent by this thread, or the outbox's flusher: locked).
        self.outbox = Outbox(self.send_results, FLUSH_SECONDS)
        worker_actors.SEND = self.send  # actor handles passed in call this worker's agent

    # ------------------------------------------------------------------ sending

    def send(self, header: schema.Header | bytes, blobs: Sequence[bytes | bytearray] = ()) -> None:
        head = header if isinstance(header, bytes) else to_json(schema.encode(header))
        with self.lock:
            _send_all(self.sock, schema.pack([head, *blobs]))

    def send_results(self, header: bytes, blobs: list[Any]) -> None:
        """Only under the outbox's lock (its flusher sends too)."""
        if self.results_to is None:
            self.send(header, blobs)
        elif self.shm:  # only under the outbox's lock: no other lock
            send_shared(self.results_to, [header, *blobs])
        else:
            _send_all(self.results_to, schema.pack([header, *blobs]))

    # ------------------------------------------------------------------ reading

    def reader(self) -> None:
        stream = io.BufferedReader(io.FileIO(self.sock.fileno(), "rb", closefd=False), 1 << 16)
        try:
            while True:
                try:
                    frames = schema.read(stream)
                    if frames is None:
                        break
                    header = schema.decode(marshal.loads(frames[0]))  # from the agent: trusted
                except schema.ProtocolError:  # cut off mid-message: the agent is gone
                    break
                if isinstance(header, schema.CallBatch):
                    self.calls.put((header, frames[1:]))
                elif isinstance(header, schema.ObjectFrames | schema.ObjectDrop):
                    worker_objects.on_header(header, frames[1:])
                elif header.OP == "actor-reply":  # an actor's, to a handle here (a call's)
                    worker_actors.on_reply(header, frames[1:])
                elif isinstance(header, schema.ExecRequest):
                    _thread.start_new_thread(self.do_exec, (header, frames[1:]))
                elif isinstance(header, schema.ReadRequest):
                    self.files[header.rid] = [False]  # before its thread: a kill may come
                    _thread.start_new_thread(self.do_read, (header, frames[1:]))
                elif isinstance(header, schema.WriteRequest):
                    self.files[header.rid] = [False]
                    _thread.start_new_thread(self.do_write, (header, frames[1:]))
                elif isinstance(header, PROC_REQUESTS):
                    self.files[header.rid] = [False]  # a kill gives it up
                    _thread.start_new_thread(self.do_proc, (header, frames[1:]))
                elif isinstance(header, STREAM_OPS):
                    self.file_streams().on_header(header, frames[1:])
                elif isinstance(header, schema.Kill):
                    self.kill(header.rid)
                elif isinstance(header, schema.Detach):  # the agent exits, its sandboxes stay
                    self.detached = True
        finally:
            # The agent went away: so do we, and everything we started (a watchdog:
            # without namespaces nothing else would stop them).
            if self.streams is not None:
                self.streams.abandon_all()  # no write can finish: no temporary file stays
            keep = [self.main] if self.main and self.detached else []
            spawned = self.table.pids() if self.table and not self.detached else []
            for pid in [*self.procs.values(), *spawned, *([self.main] if self.main else [])]:
                if pid not in keep:
                    _kill_group(pid)
            if _watchdog() and not self.detached:
                _stop_container()
            if not keep:  # else the main thread waits on the sandbox's command
                os._exit(0)

    # ------------------------------------------------------------------ calls

    def serve_calls(self) -> None:
        try:
            while True:
                item = self.calls.get()
                if item is None:
                    return
                self.run_batch(*item)
        except OSError:  # the agent went away mid-send: the reader ends the process
            _wait_for_the_reader()

    def serve_calls_on(self, link: _socket.socket) -> None:
        """Calls over a connection of their own, read by this (the main) thread: a call
        then wakes one thread here, not the reader and then us. The reader keeps exec,
        files and the watch on the agent; when the agent goes, it ends the process."""
        self.results_to = link
        _send_all(link, schema.pack([to_json(schema.encode(schema.CallsLink(shm=SHM)))]))
        stream = FdReader(link)
        try:
            while True:
                frames = schema.read(stream)
                if frames is None:
                    break
                header = schema.decode(marshal.loads(frames[0]))  # from the agent: trusted
                if isinstance(header, schema.CallBatch):
                    self.run_batch(header, frames[1:])
                elif isinstance(header, schema.ObjectFrames | schema.ObjectDrop):
                    worker_objects.on_header(header, frames[1:])
                elif isinstance(header, schema.ShmProbe):  # did its descriptor get here?
                    got = frames[1] if len(frames) == 2 else None
                    self.shm = got is not None and bytes(got) == schema.SHM_PROBE
                    _send_all(
                        link, schema.pack([to_json(schema.encode(schema.ShmProbe(ok=self.shm)))])
                    )
        except (OSError, schema.ProtocolError):  # reset, or cut off (the agent closed)
            pass
        _wait_for_the_reader()

    def run_batch(self, batch: schema.CallBatch, blobs: list[bytes]) -> None:
        if self.cloudpickle is None:
            import pickle

            import cloudpickle

            self.cloudpickle = cloudpickle
            self.dumps_plain, self.dumps_cloud = make_picklers(pickle, cloudpickle)
        index = 0
        nbufs = batch.buffers
        calls = batch.calls
        buffers = blobs[len(blobs) - nbufs :] if nbufs else []
        views = [memoryview(b) for b in buffers]
        if nbufs:  # a buffer several calls share is theirs to read, not to change
            uses: dict[int, int] = {}
            for call in calls:
                for i in call.buffers:
                    uses[i] = uses.get(i, 0) + 1
            views = [v.toreadonly() if uses.get(i, 0) > 1 else v for i, v in enumerate(views)]
        outbox = self.outbox
        outbox.begin(len(calls))
        for call in calls:
            fn_blob = None
            if call.ship_function:
                fn_blob = blobs[index]
                index += 1
            args_blob = blobs[index]
            index += 1
            mine = [views[i] for i in call.buffers]
            if fn_blob is not None:
                fn_blob = supervisor_concurrent.load(self, call.digest, fn_blob)
            runner = self.runners.get(call.digest)
            if runner is not None:  # an actor's with max_concurrency > 1: not in order here
                runner.submit(call, args_blob, mine)
                continue
            self.mark_running(call.call_id)
            outcome, result = self.run_one(call, fn_blob, args_blob, mine)
            self.mark_running(0)
            outbox.add(outcome, result)
        outbox.end()

    def mark_running(self, call_id: int) -> None:
        """Which call runs now, in a file the agent reads if we die: it is the one to
        charge an attempt, not the others of its batch (two syscalls, about 2 us)."""
        if self.running_fd is not None:
            try:
                os.pwrite(self.running_fd, schema.RUNNING.pack(call_id), 0)
            except OSError:
                self.running_fd = None

    def run_one(
        self,
        call: schema.CallHeader,
        fn_blob: bytes | None,
        args_blob: bytes,
        buffers: Sequence[memoryview] = (),
    ) -> tuple[schema.CallOutcome, list[Any]]:
        """Run one call: its outcome, and the frames of its result (the pickle, then
        its out-of-band buffers, sent as they are: views of the result's memory)."""
        cp = self.cloudpickle
        use_json = call.serialization is schema.Serialization.JSON
        import json

        started = time.perf_counter()
        views: list[Any] = []
        try:
            if fn_blob is not None:
                self.functions[call.digest] = cp.loads(fn_blob)
            fn = self.functions.get(call.digest)
            if fn is None:
                raise LookupError(f"function {call.digest} was never shipped to this worker")
            if use_json:
                args, kwargs = json.loads(args_blob)
            else:
                args, kwargs = cp.loads(args_blob, buffers=buffers)
            value = fn(*args, **kwargs)
            try:
                if use_json:
                    blob = json.dumps(value).encode()
                else:
                    try:  # plain pickle is ten times faster for plain data
                        blob, views = self.dumps_plain(value)
                    except Exception:  # what only cloudpickle carries (a lambda, say)
                        blob, views = self.dumps_cloud(value)
            except Exception as exc:
                raise TypeError(
                    f"the return value ({type(value).__name__}) cannot be serialized: {exc}"
                ) from exc
            limit = call.max_result_bytes
            size = len(blob) + sum(v.nbytes for v in views)
            if limit and size > limit:
                too_large = schema.CallOutcome(call.call_id, schema.CallStatus.ERROR)
                return too_large, [too_large_record(size, limit)]
            status = schema.CallStatus.OK
        except BaseException as exc:  # user code may raise anything, SystemExit included
            blob = error_record(exc, None if use_json else cp.dumps)
            status = schema.CallStatus.ERROR
            views = []
        secs = time.perf_counter() - started
        return schema.CallOutcome(call.call_id, status, secs, "", len(views)), [blob, *views]

    # ------------------------------------------------------------------ exec

    def do_exec(self, request: schema.ExecRequest, blobs: list[bytes]) -> None:
        rid, stream = request.rid, request.stream
        env = {**self.base_env, **request.env}
        stdin = (blobs[0] if blobs else b"") if request.stdin else None
        try:
            # A session of its own: a timeout kills the whole group.
            pid, out_r, err_r, in_w = spawn(
                list(request.argv), env, request.cwd or None, stdin is not None
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"exec {request.argv[0]!r}: {exc.strerror or exc}\n".encode()
            if stream:
                self.send(schema.Output(rid, 2), [message])
                self.send(schema.Exit(rid, code))
            else:
                self.send(schema.Exit(rid, code), [b"", message])
            return
        self.procs[rid] = pid
        if in_w is not None:
            # On a thread of its own: the command may write before it reads.
            _thread.start_new_thread(_feed, (in_w, stdin or b""))
        collected: dict[int, list[bytes]] = {1: [], 2: []}

        def pump(fd: int, pipe: int, done: Any) -> None:
            try:
                while True:
                    data = os.read(pipe, CHUNK)
                    if not data:
                        return
                    if stream:
                        self.send(schema.Output(rid, fd), [data])
                    else:
                        collected[fd].append(data)
            finally:
                os.close(pipe)
                done.release()

        readers = [_thread.allocate_lock(), _thread.allocate_lock()]
        for fd, pipe, done in ((1, out_r, readers[0]), (2, err_r, readers[1])):
            done.acquire()
            _thread.start_new_thread(pump, (fd, pipe, done))
        exited = _thread.allocate_lock()
        exited.acquire()
        timed_out = []
        timeout = request.timeout
        if timeout is not None:

            def watchdog() -> None:
                if not exited.acquire(timeout=max(timeout, 0.0)):
                    timed_out.append(True)
                    _kill_group(pid)

            _thread.start_new_thread(watchdog, ())
        code = _wait(pid)
        exited.release()
        for done in readers:  # an escaped grandchild may hold a pipe: not for ever
            if done.acquire(timeout=2.0 if timed_out else -1):
                done.release()
        self.procs.pop(rid, None)
        head = schema.Exit(rid, code, timed_out=bool(timed_out))
        if stream:
            self.send(head)
        else:
            self.send(head, [b"".join(collected[1]), b"".join(collected[2])])

    def do_proc(self, request: Any, blobs: list[bytes]) -> None:
        cancelled = self.files.get(request.rid) or [False]
        try:
            with self.lock:  # one table, made once
                if self.table is None:
                    self.table = _process_table().ProcessTable(_find, self.base_env)
            reply, out = self.table.serve(request, blobs, cancelled)
        except Exception as exc:  # the agent must hear back whatever happened
            reply = schema.ProcReply(request.rid, error=f"{type(exc).__name__}: {exc}")
            out = []
        finally:
            self.files.pop(request.rid, None)
        self.send(reply, out)

    def kill(self, rid: int) -> None:
        """The agent gave up on a request (its client left): kill an exec's process
        group; a read or write stops at its next chunk."""
        pid = self.procs.get(rid)
        if pid is not None:
            _kill_group(pid)
        cancelled = self.files.get(rid)
        if cancelled is not None:
            cancelled[0] = True
        if self.streams is not None:
            self.streams.kill(rid)

    def file_streams(self) -> Any:
        """Streamed files' handler, imported at the first use (no start-up cost)."""
        if self.streams is None:
            if __package__:
                from agent.supervisor_files import Files
            else:
                from aviato_supervisor_files import Files  # type: ignore[import-not-found,no-redef]
            self.streams = Files(self.send, schema)
        return self.streams

    # ------------------------------------------------------------------ files

    def do_read(self, request: schema.ReadRequest, _blobs: list[bytes]) -> None:
        rid, path = request.rid, request.path
        cancelled = self.files.get(rid) or [False]
        try:
            data = read_capped(path, request.max, cancelled)
        except OSError as exc:
            self.send(schema.FileDone(rid, error=_file_error(exc)))
            return
        except TooLarge:
            self.send(schema.FileDone(rid, error="too large", too_large=True))
            return
        finally:
            self.files.pop(rid, None)
        if data is not None:  # else the agent gave up on it: nobody waits
            self.send(schema.FileDone(rid), [data])

    def do_write(self, request: schema.WriteRequest, blobs: list[bytes]) -> None:
        rid, path = request.rid, request.path
        cancelled = self.files.get(rid) or [False]
        try:
            parent = os.path.dirname(path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, request.mode)
            with os.fdopen(fd, "wb") as f:
                data = memoryview(blobs[0] if blobs else b"")
                for at in range(0, len(data), WRITE_CHUNK):
                    if cancelled[0]:
                        return
                    f.write(data[at : at + WRITE_CHUNK])
            os.chmod(path, request.mode)
        except OSError as exc:
            self.send(schema.FileDone(rid, error=_file_error(exc)))
            return
        finally:
            self.files.pop(rid, None)
        self.send(schema.FileDone(rid))


PROC_REQUESTS = (
    schema.ProcSpawn,
    schema.ProcWrite,
    schema.ProcRead,
    schema.ProcSignal,
    schema.ProcResize,
    schema.ProcList,
)


def _process_table() -> Any:
    """The process table's module, imported at its first use (threading costs start-up)."""
    if __package__:
        from agent import process_table
    else:
        import aviato_process_table as process_table  # type: ignore[import-not-found,no-redef]
    return process_table


class TooLarge(Exception):
    pass


def read_capped(path: str, limit: int, cancelled: list[bool]) -> bytearray | None:
    """The file's bytes, read a chunk at a time: past ``limit`` (0: none) it raises
    TooLarge, having held no more than that (an endless file, /dev/zero, ends there);
    None once ``cancelled[0]`` is set. A FIFO or device is polled, so that a cancel
    also ends a wait for a writer that never comes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not block
    try:
        st = os.fstat(fd)
        poller = None
        if (st.st_mode & 0o170000) == 0o100000:  # a regular file
            if limit and st.st_size > limit:
                raise TooLarge  # known too large before any read
            os.set_blocking(fd, True)
        else:
            import select

            poller = select.poll()
            poller.register(fd, select.POLLIN)
        data = bytearray()
        while not cancelled[0]:
            if poller is not None and not poller.poll(200):
                continue  # nothing yet (a FIFO with no writer so far): check the cancel
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                return data
            data += chunk
            if limit and len(data) > limit:
                raise TooLarge
        return None
    finally:
        os.close(fd)


def _file_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def _find(argv0: str, env: dict[str, str]) -> str:
    """The executable ``argv0`` names, searched on the command's own PATH."""
    if "/" in argv0:
        return argv0
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(2, "No such file or directory", argv0)


def _feed(pipe: int, data: bytes) -> None:
    """Write an exec's stdin, then close it: the command sees EOF. A command that exits
    (or closes its stdin) without reading it all just loses the rest."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(pipe, view[:CHUNK]) :]
    except OSError:  # EPIPE: it stopped reading
        pass
    finally:
        os.close(pipe)


def spawn(
    argv: list[str], env: dict[str, str], cwd: str | None, stdin: bool = False
) -> tuple[int, int, int, int | None]:
    """Start ``argv`` in a session of its own, output to two pipes; stdin empty, or a
    pipe when ``stdin``. Returns its pid, the output pipes' read ends and the stdin
    pipe's write end (None without). posix_spawn: no fork of this process."""
    if cwd is not None:
        if not os.path.isdir(cwd):
            raise FileNotFoundError(2, "No such file or directory", cwd)
        # posix_spawn cannot chdir (before Python 3.13): a shell does, then execs.
        argv = ["/bin/sh", "-c", 'cd -- "$0" && exec "$@"', cwd, *argv]
    path = _find(argv[0], env)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    # Pipes are close-on-exec: the child keeps only what is dup2'ed onto 0, 1 and 2.
    in_r, in_w = os.pipe() if stdin else (-1, None)
    first: Any = (
        (os.POSIX_SPAWN_DUP2, in_r, 0)
        if stdin
        else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)
    )
    try:
        pid = os.posix_spawn(
            path,
            argv,
            env,
            file_actions=[first, (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
            setsid=True,
            setsigdef=DEFAULT_SIGNALS,
        )
    except BaseException:
        for fd in (out_r, err_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)
    return pid, out_r, err_r, in_w


def _wait(pid: int) -> int:
    """The exit code, as subprocess gives it: negative for a signal."""
    while True:
        try:
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        except InterruptedError:
            continue


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, SIGKILL)
    except OSError:
        try:
            os.kill(pid, SIGKILL)
        except OSError:
            pass


def run_main_command(argv: list[str]) -> int | None:
    """``--main -- CMD...``: the sandbox's own command, as our child (local runtime),
    in a process group of its own so that it can be killed with all its children."""
    env = _user_env()
    try:
        return os.posix_spawn(
            _find(argv[0], env),
            argv,
            env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)],
            setpgroup=0,
            setsigdef=DEFAULT_SIGNALS,
        )
    except OSError as exc:
        print(f"aviato: cannot run {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return None


def tag_output() -> Any:
    """Send our stdout and stderr (and so those of what we start) through pipes, and
    write what comes out as tagged records to where they went: one thread polls both,
    so the records are in the order the output was read. Returns a lock held until
    both pipes are closed (their writers all gone)."""
    import select  # only under the local runtime: no start-up cost in containers

    log_fd = os.dup(1)
    pipes = {}
    for fd in (1, 2):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        pipes[r] = fd
    done = _thread.allocate_lock()
    done.acquire()

    def pump() -> None:
        poller = select.poll()
        for r in pipes:
            poller.register(r, select.POLLIN)
        try:
            while pipes:
                for r, _ in poller.poll():
                    data = os.read(r, CHUNK)
                    if not data:
                        poller.unregister(r)
                        os.close(r)
                        del pipes[r]
                        continue
                    record = memoryview(LOG_RECORD.pack(LOG_MAGIC, pipes[r], len(data)) + data)
                    while record:
                        record = record[os.write(log_fd, record) :]
        except OSError:
            pass
        finally:
            done.release()

    _thread.start_new_thread(pump, ())
    return done


def _drain(tagged: Any) -> None:
    """Our output's last records written (unless something we started holds the pipes)."""
    if tagged is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open("/dev/null", os.O_WRONLY)
        os.dup2(devnull, 1)  # our ends of the pipes closed, the fds still valid
        os.dup2(devnull, 2)
        tagged.acquire(timeout=1.0)


def main() -> int:
    tagged = tag_output() if os.environ.get("AVIATO_TAG_OUTPUT") == "1" else None
    try:
        return _serve(tagged)
    finally:  # an early error return; the usual ends are os._exit
        _drain(tagged)


def _serve(tagged: Any) -> int:
    main_proc = None
    if "--main" in sys.argv:
        rest = sys.argv[sys.argv.index("--main") + 1 :]
        main_proc = run_main_command(rest[1:] if rest[:1] == ["--"] else rest)
        if main_proc is None:
            return 127
    # cloudpickle sits beside this file; found without touching PYTHONPATH, which the
    # commands we run would inherit.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("AVIATO_WORKER_SOCKET", "/run/aviato/worker.sock")
    sock = _connect(path, 30)
    if sock is None:
        print(f"aviato worker: cannot reach the agent at {path}", file=sys.stderr)
        return 2
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    want = os.environ.get("AVIATO_CLIENT_PYTHON")
    error = None
    if want and want != mine:
        error = (
            f"the image's Python is {mine} but the client's is {want}: functions are "
            f"pickled by the client, so both must match; use an image with Python {want}"
        )
    elif want:  # a function worker: it needs cloudpickle
        try:
            import cloudpickle  # noqa: F401
        except ImportError as exc:
            error = f"the worker cannot import cloudpickle: {exc}"
    # A function worker takes calls on a second connection, made before the hello so
    # that the agent, told of it there, is sure to get it.
    calls = _connect(path, 5) if want and main_proc is None and error is None else None
    supervisor = Supervisor(sock)
    supervisor.main = main_proc
    supervisor.send(
        schema.Hello(sys.version.split()[0], os.getpid(), error=error, calls=calls is not None)
    )
    if error is not None:
        return 3
    _thread.start_new_thread(supervisor.reader, ())
    if calls is not None:  # its output to its client, if asked (supervisor_output.py)
        forward_output(supervisor, schema)
    if main_proc is not None:
        code = _wait(main_proc)  # the sandbox lives as long as its command
        _drain(tagged)
        os._exit(code if code >= 0 else 128 - code)
    if calls is not None:
        supervisor.serve_calls_on(calls)
    supervisor.serve_calls()
    return 0


if __name__ == "__main__":
    sys.exit(main())
