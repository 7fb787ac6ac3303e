"""The agent's side of function workers: one Unix socket per worker sandbox, relaying
RunCalls batches from clients to the worker and its outcomes back, unopened.

The agent never unpickles anything here: blobs go through as bytes. When a worker's
socket closes, every call routed to it gets a "lost" outcome saying how it died.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import marshal
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from agent.actor_relay import ActorRelay
from agent.output_relay import OutputRelay
from agent.runtime.base import ExecOutput, ExitStatus, Mount, OutputChunk
from agent.supervisor_launch import LIB_DIR, SOCKET_DIR
from aviato import _spare as spare
from aviato import link as schema
from aviato._lane import FramedSocket, shm_wanted
from aviato.exceptions import (
    AgentIdInUseError,
    PayloadTooLargeError,
    SandboxError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotRunningError,
)
from aviato.link import (
    RUNNING,
    RUNNING_FILE,
    SHM_PROBE,
    CallBatch,
    CallOutcome,
    CallsLink,
    CallStatus,
    Chunk,
    ChunkAck,
    Detach,
    ExecRequest,
    Exit,
    FileDone,
    Header,
    Hello,
    Kill,
    Listing,
    Output,
    ProcReply,
    ReadRequest,
    Results,
    ShmProbe,
    StreamEnd,
    WriteRequest,
)
from aviato.link_actors import ActorCall
from aviato.protocol import (
    MAX_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    CallResults,
    KeepResult,
    Message,
    Payload,
    RunCalls,
)

log = logging.getLogger("aviato.agent.supervisor_hub")

#: Calls a worker may leave unread on its socket before the agent refuses more (the
#: client keeps at most two batches in flight per worker: far below this).
MAX_UNREAD_BYTES = 1 << 30

#: A supervisor's reply to an exec or file request; None: the supervisor is gone.
Reply = Output | Exit | FileDone | ProcReply | Chunk | ChunkAck | StreamEnd | Listing | None
Deliver = Callable[[Reply, list[memoryview]], None]
SendNow = Callable[[bytes, int, Message, tuple[Payload, ...]], None]
Spawn = Callable[[Coroutine[Any, Any, None]], object]
Outcome = tuple[CallOutcome, Sequence[Payload]]
Keep = Callable[[KeepResult, CallOutcome, Sequence[Payload]], Outcome]


@dataclass(slots=True)
class Route:
    identity: bytes
    request_id: int
    keep: KeepResult | None = None  # its result stays on the agent (agent/objects.py)


@dataclass(slots=True)
class WorkerLink:
    sandbox_id: str
    directory: Path
    listener: socket.socket | None = None
    #: The worker's connections (see aviato/_lane.py): messages are handled in the
    #: loop's reader callback, and a batch of calls is written without waiting.
    conns: list[FramedSocket] = field(default_factory=list)
    #: The supervisor's (the one that said hello): exec, files, and calls if no other.
    framed: FramedSocket | None = None
    #: A function worker's second connection, for calls alone (read by its main thread).
    calls: FramedSocket | None = None
    hello: asyncio.Future[Hello] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    calls_ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    routes: dict[int, Route] = field(default_factory=dict)
    #: Exec and file requests to the supervisor: request id -> where its replies go.
    pending: dict[int, Deliver] = field(default_factory=dict)
    #: The call the worker was running when its connection ended (its own note).
    culprit: int = 0
    exit_detail: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    closed: bool = False


class WorkerHub:
    def __init__(self, send: SendNow, spawn: Spawn, agent_id: str = "") -> None:
        self._send = send
        self._spawn = spawn
        # One directory per agent id (short: Unix socket paths are limited to about
        # 107 bytes), so that an agent restarted after kill -9 clears its old one.
        self._root_lock: int | None = None
        if agent_id:
            self.root = agent_dir(agent_id)
            self._root_lock = _claim_dir(self.root, agent_id)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="avw-"))
        self.lib = self.root / "lib"
        self._links: dict[str, WorkerLink] = {}
        #: What keeps a ``fn.ref`` call's result as an object (agent/objects.py).
        self.keep: Keep | None = None
        self._rids = itertools.count(1)
        self.output = OutputRelay(send)  # functions' prints, to their clients
        self.actors = ActorRelay(send, self._to_supervisor)  # actor handles in sandboxes
        self._prepare_lib()

    def _prepare_lib(self) -> None:
        """What workers mount read-only: the worker's modules and cloudpickle (pure
        Python)."""
        self.lib.mkdir()
        shutil.copy(Path(__file__).with_name("supervisor.py"), self.lib / "aviato_supervisor.py")
        for mine in (
            "supervisor_link",
            "supervisor_files",
            "worker_objects",
            "supervisor_output",
            "supervisor_concurrent",
            "worker_actors",
        ):
            shutil.copy(Path(__file__).with_name(f"{mine}.py"), self.lib / f"aviato_{mine}.py")
        shutil.copy(Path(schema.__file__), self.lib / "aviato_link.py")
        shutil.copy(
            Path(schema.__file__).with_name("link_actors.py"), self.lib / "aviato_link_actors.py"
        )
        shutil.copy(
            Path(__file__).with_name("process_table.py"), self.lib / "aviato_process_table.py"
        )
        shutil.copy(Path(spare.__file__), self.lib / "aviato_spare.py")
        shutil.copytree(
            Path(cloudpickle.__file__).parent,
            self.lib / "cloudpickle",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        # Bytecode made once here: a sandbox's Python then starts the worker without
        # compiling it (~10 ms each). An interpreter of another version ignores it.
        compileall.compile_dir(str(self.lib), quiet=1)
        for path in [self.root, self.lib, *self.lib.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)

    @staticmethod
    def worker_env() -> dict[str, str]:
        return {
            "AVIATO_WORKER_SOCKET": f"{SOCKET_DIR}/worker.sock",
            # Large frames in shared memory both ways, unless the agent's turned off.
            "AVIATO_WORKER_SHM": "1" if shm_wanted() else "0",
            # Spare memfds for large results likewise (aviato/_spare.py).
            "AVIATO_SHM_SPARE": "1" if spare.ENABLED else "0",
        }

    async def prepare(self, sandbox_id: str) -> list[Mount]:
        """Listen for the worker of ``sandbox_id``; returns the mounts its sandbox needs."""
        directory = self.root / sandbox_id
        directory.mkdir(mode=0o755, exist_ok=True)
        link = WorkerLink(sandbox_id, directory)
        self._links[sandbox_id] = link

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(directory / "worker.sock"))
            listener.listen(4)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        link.listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, link)
        # Where the worker notes the call it is running (see worker.mark_running);
        # made here, so that a worker running as any user can write it.
        marker = directory / RUNNING_FILE
        marker.write_bytes(bytes(RUNNING.size))
        marker.chmod(0o666)
        return [
            Mount(str(directory), SOCKET_DIR, read_only=False),
            Mount(str(self.lib), LIB_DIR, read_only=True),
        ]

    def _accept(self, link: WorkerLink) -> None:
        """The worker connects once or twice (supervisor, then calls); then nothing
        else may (one worker per sandbox)."""
        if link.listener is None:
            return
        try:
            conn, _ = link.listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("worker %s: accept failed: %s", link.sandbox_id, exc)
            self._stop_listening(link)
            return
        if link.closed:
            conn.close()
            return
        holder: list[FramedSocket] = []
        framed = FramedSocket(
            conn,
            functools.partial(self._on_frames, link, holder),
            functools.partial(self._on_end, link, holder),
            max_message=MAX_FRAME_BYTES,
            relay=True,  # large results go on to clients as they came
        )
        holder.append(framed)
        link.conns.append(framed)
        if len(link.conns) >= 4:  # the worker needs two; junk ones are dropped
            self._stop_listening(link)

    @staticmethod
    def _stop_listening(link: WorkerLink) -> None:
        if link.listener is not None:
            asyncio.get_running_loop().remove_reader(link.listener.fileno())
            link.listener.close()
            link.listener = None

    async def wait_ready(self, sandbox_id: str, timeout: float) -> Hello:
        link = self._links.get(sandbox_id)
        if link is None:  # closed (stopped) while its sandbox was being created
            raise SandboxFailedError(
                f"sandbox {sandbox_id} was stopped while it started", sandbox_id=sandbox_id
            )
        try:
            async with asyncio.timeout(timeout):
                hello = await asyncio.shield(link.hello)
        except TimeoutError:
            raise SandboxFailedError(
                f"the function worker in {sandbox_id} did not start within {timeout:g}s: "
                "the image needs a `python` on its PATH",
                sandbox_id=sandbox_id,
            ) from None
        if hello.error is not None:
            raise SandboxFailedError(hello.error, sandbox_id=sandbox_id)
        if hello.calls:  # connected before its hello: it is here, or on its way
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(link.calls_ready)
            except TimeoutError:
                raise SandboxFailedError(
                    f"the function worker in {sandbox_id} opened no calls connection",
                    sandbox_id=sandbox_id,
                ) from None
            if link.calls is None:
                raise SandboxFailedError(
                    f"the function worker in {sandbox_id} exited as it started",
                    sandbox_id=sandbox_id,
                )
        return hello

    def no_supervisor(self, sandbox_id: str, why: str) -> None:
        """The sandbox's supervisor will not come (no Python in its image): those
        waiting for it (processes) hear so now."""
        link = self._links.get(sandbox_id)
        if link is not None and not link.hello.done():
            link.hello.set_result(_failed(why))

    async def supervisor_ready(self, sandbox_id: str, timeout: float) -> bool:
        """Whether the sandbox has a supervisor, waiting up to ``timeout`` for one that
        is starting (beside a fresh container's command)."""
        link = self._links.get(sandbox_id)
        if link is not None and not link.hello.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.hello), timeout)
        return self.supervised(sandbox_id)

    def supervised(self, sandbox_id: str) -> bool:
        """Whether exec and files can go through the sandbox's supervisor."""
        link = self._links.get(sandbox_id)
        return (
            link is not None
            and not link.closed
            and link.framed is not None
            and link.hello.done()
            and link.hello.result().error is None
        )

    def busy(self, sandbox_id: str) -> bool:
        """Whether calls, execs or file requests to the sandbox are under way (activity
        that resets its idle clock while it lasts)."""
        link = self._links.get(sandbox_id)
        return link is not None and bool(link.routes or link.pending)

    async def _ask(
        self, sandbox_id: str, request: Callable[[int], Header], blobs: Sequence[Payload] = ()
    ) -> tuple[int, asyncio.Queue[tuple[Reply, list[memoryview]]], WorkerLink]:
        """Send ``request(rid)`` to the supervisor; its replies come on the queue."""
        link = self._links.get(sandbox_id)
        if link is None or link.framed is None or link.closed:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id
            )
        rid = next(self._rids)
        replies: asyncio.Queue[tuple[Reply, list[memoryview]]] = asyncio.Queue()
        link.pending[rid] = lambda h, b: replies.put_nowait((h, b))
        await self._write(link, [_pack(request(rid)), *blobs])
        return rid, replies, link

    def open_stream(
        self, sandbox_id: str, request: Callable[[int], Header], deliver: Deliver
    ) -> tuple[int, Callable[..., bool]]:
        """A streamed-file request to the supervisor: its replies go to ``deliver`` as
        they come (``None``: the supervisor is gone). Returns its id, and a send of
        more headers for it (False: the supervisor is gone); ``close_stream`` ends it."""
        link = self._links.get(sandbox_id)
        if link is None or link.framed is None or link.closed:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id
            )
        rid = next(self._rids)
        link.pending[rid] = deliver
        framed = link.framed

        def send(header: Header, blobs: Sequence[Payload] = ()) -> bool:
            return not link.closed and framed.send([_pack(header), *blobs])

        if not send(request(rid)):
            link.pending.pop(rid, None)
            raise self._gone(sandbox_id)
        return rid, send

    def close_stream(self, sandbox_id: str, rid: int, *, abandon: bool) -> None:
        """No more replies to ``rid``; ``abandon``: the supervisor stops it (a write's
        temporary file is removed)."""
        link = self._links.get(sandbox_id)
        if link is not None and link.pending.pop(rid, None) is not None and abandon:
            self._abandon(link, rid)

    async def _one_reply(
        self, sandbox_id: str, request: Callable[[int], Header], blobs: Sequence[Payload] = ()
    ) -> tuple[Reply, list[memoryview]]:
        """A request to the supervisor answered by a single reply; given up on (the
        client cancelled), the supervisor is told to stop it."""
        rid, replies, link = await self._ask(sandbox_id, request, blobs)
        answered = False
        try:
            reply = await replies.get()
            answered = True
            return reply
        finally:
            link.pending.pop(rid, None)
            if not answered:
                self._abandon(link, rid)

    @staticmethod
    def _abandon(link: WorkerLink, rid: int) -> None:
        """Kill an exec's command, or stop a read or write, at once (no waiting: we may
        be cancelled)."""
        if not link.closed and link.framed is not None:
            link.framed.send([_pack(Kill(rid))])

    @staticmethod
    def _gone(sandbox_id: str) -> SandboxNotRunningError:
        return SandboxNotRunningError(
            f"sandbox {sandbox_id} stopped during the request", sandbox_id=sandbox_id
        )

    async def exec_stream(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout_seconds: float | None,
        stdin: Payload | None = None,
    ) -> AsyncIterator[OutputChunk | ExitStatus]:
        request = _exec_request(argv, cwd, env, timeout_seconds, stream=True, stdin=stdin)
        rid, replies, link = await self._ask(sandbox_id, request, _stdin_blobs(stdin))
        finished = False
        try:
            while True:
                reply, blobs = await replies.get()
                if isinstance(reply, Output):
                    yield OutputChunk(reply.fd, bytes(blobs[0]) if blobs else b"")
                elif isinstance(reply, Exit):
                    finished = True
                    yield ExitStatus(reply.code, reply.timed_out)
                    return
                else:
                    raise self._gone(sandbox_id)
        finally:
            link.pending.pop(rid, None)
            if not finished:  # the consumer left early: don't leave the command running
                self._abandon(link, rid)

    async def exec(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        timeout_seconds: float | None,
        stdin: Payload | None = None,
    ) -> ExecOutput:
        request = _exec_request(argv, cwd, env, timeout_seconds, stream=False, stdin=stdin)
        reply, blobs = await self._one_reply(sandbox_id, request, _stdin_blobs(stdin))
        if not isinstance(reply, Exit):
            raise self._gone(sandbox_id)
        out, err = [bytes(b) for b in [*blobs, b"", b""][:2]]
        return ExecOutput(reply.code, out, err, reply.timed_out)

    async def _file_op(
        self,
        sandbox_id: str,
        path: str,
        request: Callable[[int], ReadRequest | WriteRequest],
        blobs: Sequence[Payload] = (),
        max_bytes: int = 0,
    ) -> list[memoryview]:
        reply, data = await self._one_reply(sandbox_id, request, blobs)
        if not isinstance(reply, FileDone):
            raise self._gone(sandbox_id)
        if reply.error is not None:
            shown = path if len(path) <= 80 else path[:77] + "..."  # not a peer's kilobytes
            if reply.too_large:
                raise PayloadTooLargeError(
                    f"{shown} in sandbox {sandbox_id} is larger than the {max_bytes}-"
                    "byte read limit: read less (pass a larger max_bytes, or split the file "
                    "in the sandbox)",
                    sandbox_id=sandbox_id,
                )
            raise SandboxFileError(
                f"{shown}: {reply.error} in sandbox {sandbox_id}",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        return data

    async def read_file(
        self, sandbox_id: str, path: str, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> bytes:
        request = functools.partial(ReadRequest, path=path, max=max_bytes)
        data = await self._file_op(sandbox_id, path, request, max_bytes=max_bytes)
        return bytes(data[0]) if data else b""

    async def write_file(self, sandbox_id: str, path: str, data: Payload, mode: int) -> None:
        request = functools.partial(WriteRequest, path=path, mode=mode)
        await self._file_op(sandbox_id, path, request, [data])

    def run_calls(
        self, identity: bytes, request_id: int, msg: RunCalls, payloads: tuple[Payload, ...]
    ) -> None:
        """Hand a batch to its worker now (no waiting: the agent's receive loop and the
        lane call this inline); a worker that leaves too much unread is refused more."""
        link = self._links.get(msg.sandbox_id)
        if link is None or link.framed is None or link.closed:
            raise SandboxNotRunningError(
                f"sandbox {msg.sandbox_id} has no live function worker on this agent",
                sandbox_id=msg.sandbox_id,
            )
        if msg.buffers < 0:
            raise ValueError(f"RunCalls names {msg.buffers} buffers")
        expected = sum(2 if c.ship_function else 1 for c in msg.calls) + msg.buffers
        if expected != len(payloads):
            raise ValueError(
                f"RunCalls names {expected} payload frames but carries {len(payloads)}"
            )
        if any(not 0 <= i < msg.buffers for c in msg.calls for i in c.buffers):
            raise ValueError(f"a call of RunCalls names a buffer it has not ({msg.buffers})")
        target = link.calls or link.framed
        unread = target.pending
        if unread > MAX_UNREAD_BYTES:
            raise SandboxError(
                f"the function worker in {msg.sandbox_id} has {unread} bytes of calls unread; "
                "send fewer calls at a time",
                sandbox_id=msg.sandbox_id,
            )
        header = marshal.dumps(schema.encode_calls(CallBatch(msg.calls, msg.buffers)))
        if not target.send([header, *payloads]):
            raise SandboxNotRunningError(
                f"sandbox {msg.sandbox_id} has no live function worker on this agent",
                sandbox_id=msg.sandbox_id,
            )
        # After the send: a refused batch is answered by the error alone, not also as
        # lost when the link ends. (No outcome can arrive before we return.)
        route = Route(identity, request_id)
        for call in msg.calls:
            link.routes[call.call_id] = route
        for keep in msg.keep:
            link.routes[keep.call_id] = Route(identity, request_id, keep)

    def _to_supervisor(self, sandbox_id: str, frames: Sequence[Payload]) -> bool:
        """Frames to the supervisor's own link (read by a thread of its own: a call
        waiting on an actor holds the calls link's reader)."""
        link = self._links.get(sandbox_id)
        return bool(link and link.framed and not link.closed and link.framed.send(frames))

    def send_to_worker(self, sandbox_id: str, frames: Sequence[Payload]) -> None:
        """Frames to a function worker, on the link its batches take (objects first)."""
        link = self._links.get(sandbox_id)
        target = None if link is None else link.calls or link.framed
        if target is None or not target.send(frames):
            raise SandboxNotRunningError(f"sandbox {sandbox_id} has no function worker")

    @staticmethod
    async def _write(link: WorkerLink, frames: Sequence[Payload]) -> None:
        """To the supervisor, once written (exec and file requests, detach)."""
        if link.framed is None or not link.framed.send(frames):
            raise SandboxNotRunningError(
                f"sandbox {link.sandbox_id} has no supervisor", sandbox_id=link.sandbox_id
            )
        await link.framed.drain()

    def _on_frames(
        self, link: WorkerLink, holder: list[FramedSocket], frames: list[memoryview]
    ) -> None:
        conn = holder[0]
        known = conn is link.framed or conn is link.calls
        try:
            header = schema.decode(json.loads(bytes(frames[0])))
        except Exception as exc:  # the sandbox is not to be trusted (RecursionError too)
            log.warning("worker %s sent a malformed header: %s", link.sandbox_id, exc)
            self._drop_conn(link, conn)
            return
        if isinstance(header, Hello) and link.framed is None:
            link.framed = conn
            if not header.calls:
                self._stop_listening(link)  # nobody else is to connect
            if not link.hello.done():
                link.hello.set_result(header)
        elif isinstance(header, CallsLink) and link.calls is None and conn is not link.framed:
            hello = link.hello.result() if link.hello.done() else None
            if hello is not None and not hello.calls:
                self._drop_conn(link, conn)  # the worker announced none: not the worker's
            else:
                link.calls = conn
                self._stop_listening(link)
                if shm_wanted() and header.shm:
                    # Large arguments go in shared memory once a descriptor is seen to
                    # get through (a runtime may not pass them): ready at the answer.
                    conn.send([_pack(ShmProbe()), SHM_PROBE], shared_from=0)
                elif not link.calls_ready.done():
                    link.calls_ready.set_result(None)
        elif isinstance(header, ShmProbe) and conn is link.calls and link.calls is not None:
            conn.shm = header.ok
            if not conn.shm:
                why = "descriptors do not get through"
                log.info("worker %s: no shared memory (%s)", link.sandbox_id, why)
            if not link.calls_ready.done():
                link.calls_ready.set_result(None)
        elif isinstance(header, Results) and known:
            if not self._forward(link, header, frames[1:]):
                log.warning("worker %s sent malformed results", link.sandbox_id)
                self._end(link)
        elif isinstance(header, schema.WorkerOutput) and known:
            self.output.relay(link.sandbox_id, header, frames[1:])
        elif isinstance(header, ActorCall) and known:
            self.actors.on_call(link.sandbox_id, header, frames[1:])
        elif conn is link.framed and isinstance(
            header, Output | Exit | FileDone | ProcReply | Chunk | ChunkAck | StreamEnd | Listing
        ):
            deliver = link.pending.get(header.rid)
            if deliver is not None:
                deliver(header, frames[1:])
        elif not known:  # another process in the sandbox: it may not speak for the worker
            self._drop_conn(link, conn)

    def _drop_conn(self, link: WorkerLink, conn: FramedSocket) -> None:
        """A connection misbehaved: the worker's own end the link; another's goes alone."""
        if conn is link.framed or conn is link.calls:
            self._end(link)
        else:
            conn.close()
            if conn in link.conns:
                link.conns.remove(conn)

    def _on_end(
        self, link: WorkerLink, holder: list[FramedSocket], exc: BaseException | None
    ) -> None:
        conn = holder[0]
        if conn is link.framed or conn is link.calls:
            why = f": {exc}" if exc else ""
            log.info("worker %s: connection ended%s", link.sandbox_id, why)
            self._end(link)
        elif conn in link.conns:
            link.conns.remove(conn)

    def _end(self, link: WorkerLink) -> None:
        """The worker's connection is over: whatever waits on it hears so, once."""
        self._stop_listening(link)
        for conn in link.conns:
            conn.close()
        if not link.calls_ready.done():
            link.calls_ready.set_result(None)
        if link.closed and not link.routes and not link.pending:
            return
        if not link.hello.done():
            link.hello.set_result(_failed("the function worker exited before saying hello"))
        link.closed = True
        for deliver in list(link.pending.values()):
            deliver(None, [])
        link.pending.clear()
        if link.routes:
            # Now: close() removes the directory (and the note in it) right after.
            link.culprit = _running_call(link.directory)
            self._spawn(self._fail_routes(link))

    def _forward(self, link: WorkerLink, results: Results, blobs: Sequence[Payload]) -> bool:
        """Relay a worker's outcomes to whoever sent each call; False (and nothing
        relayed) when they are malformed: checked whole before any route is used."""
        outcomes = results.outcomes
        if any(
            o.status not in (CallStatus.OK, CallStatus.ERROR) or o.buffers < 0 or o.detail
            for o in outcomes
        ):
            return False
        if sum(1 + o.buffers for o in outcomes) != len(blobs):
            return False
        by_route: dict[tuple[bytes, int], tuple[list[CallOutcome], list[Payload]]] = {}
        at = 0
        for outcome in outcomes:
            frames = blobs[at : at + 1 + outcome.buffers]  # the result, then its buffers
            at += 1 + outcome.buffers
            route = link.routes.pop(outcome.call_id, None)
            if route is None:
                continue
            if route.keep is not None and self.keep is not None:
                outcome, frames = self.keep(route.keep, outcome, frames)
            out, payloads = by_route.setdefault((route.identity, route.request_id), ([], []))
            out.append(outcome)
            payloads.extend(frames)
        for (identity, request_id), (out, payloads) in by_route.items():
            msg = CallResults(link.sandbox_id, tuple(out))
            self._send(identity, request_id, msg, tuple(payloads))
        return True

    async def _fail_routes(self, link: WorkerLink) -> None:
        """The worker is gone: every call still routed to it is lost. Say how, if the
        runtime tells us within a moment (exit code, OOM)."""
        if not link.routes:
            return
        try:
            async with asyncio.timeout(2.0):
                detail = await asyncio.shield(link.exit_detail)
        except TimeoutError:
            detail = "its connection to the agent closed"
        culprit = link.culprit
        by_route: dict[tuple[bytes, int], list[CallOutcome]] = {}
        for call_id, route in link.routes.items():
            # "crashed": the call it was running (charged an attempt); "lost": the rest.
            status = CallStatus.CRASHED if call_id == culprit else CallStatus.LOST
            by_route.setdefault((route.identity, route.request_id), []).append(
                CallOutcome(call_id, status, detail=f"worker {link.sandbox_id} died: {detail}")
            )
        # One line with the ids the clients' errors carry ("call N ... worker sandbox S").
        log.warning(
            "worker %s died (%s): call %s crashed, calls %s lost",
            link.sandbox_id,
            detail,
            culprit if culprit in link.routes else "-",
            _ids(c for c in link.routes if c != culprit),
        )
        link.routes.clear()
        for (identity, request_id), out in by_route.items():
            self._send(identity, request_id, CallResults(link.sandbox_id, tuple(out)), ())

    def rename(self, old: str, new: str) -> None:
        """A claimed spare's link now answers to the sandbox's id (its directory, bound
        into the container when it was made, stays where it is)."""
        link = self._links.pop(old)
        link.sandbox_id = new
        self._links[new] = link

    async def close(self, sandbox_id: str, detail: str) -> None:
        link = self._links.pop(sandbox_id, None)
        self.output.forget(sandbox_id)
        self.actors.forget(sandbox_id)
        if link is None:
            # Closed already; a runtime that made the directory again after that (a stop
            # that raced its create) must not leave it behind.
            if sandbox_id.strip(".") and "/" not in sandbox_id:
                shutil.rmtree(self.root / sandbox_id, ignore_errors=True)
            return
        if not link.exit_detail.done():
            link.exit_detail.set_result(detail)
        if not link.hello.done():
            link.hello.set_result(
                _failed(f"the sandbox ended before its supervisor started: {detail}")
            )
        self._end(link)
        shutil.rmtree(link.directory, ignore_errors=True)

    async def close_all(self, *, detach: bool = False) -> None:
        """Close every link; ``detach``: tell each supervisor first that its sandbox
        stays (else a sidecar's watchdog stops the container when the link closes)."""
        for sandbox_id in list(self._links):
            link = self._links[sandbox_id]
            if detach and link.framed is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._write(link, [_pack(Detach())]), 5)
            link.routes.clear()  # the agent's tasks are gone: nobody is left to answer
            await self.close(sandbox_id, "the agent is shutting down")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._root_lock is not None:
            os.close(self._root_lock)
            self._root_lock = None

    def remove_root(self) -> None:
        """The directory and all in it, at once (any thread; see close_all)."""
        shutil.rmtree(self.root, ignore_errors=True)


def agent_dir(agent_id: str) -> Path:
    digest = hashlib.sha256(agent_id.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"avw-{digest}"


def remove_dead_agent_dir(agent_id: str) -> bool:
    """Remove the socket directory a dead agent on this host left (killed, never back);
    True if it was there. Its lock says whether it is dead: a live one's stays."""
    root = agent_dir(agent_id)
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        shutil.rmtree(root, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _claim_dir(root: Path, agent_id: str) -> int:
    """Lock the agent's directory (a flock on it, held while we live) and empty it of
    a dead predecessor's leftovers; ``AgentIdInUseError`` if a live agent on this host
    holds it (one with our id, whatever its state directory): its sockets stay put."""
    while True:
        root.mkdir(mode=0o755, exist_ok=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentIdInUseError(
                f"agent id {agent_id!r} is held by a live agent on this host (its socket "
                f"directory {root} is locked); give this agent another --agent-id"
            ) from None
        try:
            same = os.stat(root).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its last holder removed it as we opened it: again
            break
        os.close(fd)
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()
    os.chmod(root, 0o755)
    return fd


def _running_call(directory: Path) -> int:
    """The call the worker in ``directory`` was running when it died (0: none known)."""
    try:
        data = (directory / RUNNING_FILE).read_bytes()[: RUNNING.size]
        return int(RUNNING.unpack(data)[0]) if len(data) == RUNNING.size else 0
    except OSError:
        return 0


def _pack(header: Header) -> bytes:
    """A header to the supervisor: marshal (it trusts us; the fastest to load there)."""
    return marshal.dumps(schema.encode(header))


def _failed(error: str) -> Hello:
    """The hello of a worker that never said one."""
    return Hello(python="", pid=0, error=error)


def _exec_request(
    argv: tuple[str, ...],
    cwd: str | None,
    env: Mapping[str, str] | None,
    timeout: float | None,
    *,
    stream: bool,
    stdin: Payload | None = None,
) -> Callable[[int], ExecRequest]:
    """The supervisor's exec request, given its id; with ``stdin`` its one blob is the
    command's stdin."""
    return functools.partial(
        ExecRequest,
        argv=tuple(argv),
        cwd=cwd,
        env=dict(env or {}),
        timeout=timeout,
        stream=stream,
        stdin=stdin is not None,
    )


def _stdin_blobs(stdin: Payload | None) -> tuple[Payload, ...]:
    return () if stdin is None else (stdin,)


def _ids(ids: Iterable[int], most: int = 20) -> str:
    """Call ids for a log line: the first ``most`` of them, then how many more."""
    shown = sorted(ids)
    if not shown:
        return "none"
    more = f" (+{len(shown) - most} more)" if len(shown) > most else ""
    return ",".join(map(str, shown[:most])) + more
