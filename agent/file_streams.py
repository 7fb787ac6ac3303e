"""The agent's side of streamed files and logs (aviato/protocol/files.py): uploads,
downloads, listings and removals through the sandbox's supervisor, or through the
runtime's ``streams`` where there is none (Docker images without Python), and logs as
they are written.

The agent relays, it does not buffer: a download's chunks go on to the client as the
supervisor sends them, and the client's acks go back to the supervisor, so the window
bounds every hop at once (an upload the same way round). A client that sends past its
window is refused; one that goes silent mid-transfer for ``IDLE_SECONDS`` is given up
on, and so is its transfer (an upload's temporary file removed).
"""

from __future__ import annotations

import asyncio
import functools
import queue
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.runtime.base import OutputChunk
from aviato import link
from aviato._types import FileInfo
from aviato.exceptions import (
    FILE_ERROR_KINDS,
    SandboxError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxPathError,
    SandboxTimeoutError,
)
from aviato.protocol import (
    MAX_WINDOW,
    Decoded,
    DownloadFile,
    FileChunk,
    FileListReply,
    ListFiles,
    LogChunk,
    Message,
    OkReply,
    Payload,
    RemoveFile,
    StreamAck,
    StreamLogs,
    TransferDone,
    UploadFile,
    path_problem,
)

if TYPE_CHECKING:
    from agent.data_plane import DataPlane

__all__ = ["IDLE_SECONDS", "FileStreams", "file_error"]

#: A transfer whose client sends nothing (no chunk, no ack) this long is given up on:
#: long, since a client may rightly hold a chunk a while (``aviato cp ID:/f - | less``);
#: a local client that goes away is noticed at once (its lane closes), a ZeroMQ one only
#: so. Meanwhile the transfer holds a window of chunks, and an upload its temp file.
IDLE_SECONDS = 600.0
_Key = tuple[bytes, int]


def file_error(sandbox_id: str, path: str, error: str, kind: str = "") -> SandboxFileError:
    """The typed error for what the sandbox side reported about ``path``."""
    cls = FILE_ERROR_KINDS.get(kind, SandboxFileError)
    shown = path if len(path) <= 80 else path[:77] + "..."
    return cls(f"{shown}: {error} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id)


def _window(asked: int) -> int:
    return max(1, min(asked, MAX_WINDOW))


class _Transfer:
    """One transfer's state on the agent: what the client sent last, and the credit."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.acked = 0  # by the client (a download, logs)
        self.last_heard = time.monotonic()
        self.changed = asyncio.Event()
        self.failed: BaseException | None = None
        self.on_chunk: Callable[[FileChunk, Payload], None] | None = None

    def heard(self) -> None:
        self.last_heard = time.monotonic()
        self.changed.set()

    def fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
        self.changed.set()

    async def wait(self, until: Callable[[], bool], what: str) -> None:
        """Until ``until()``; raises what failed the transfer, or a timeout once the
        client has been silent for IDLE_SECONDS."""
        started = time.monotonic()
        while True:
            if self.failed is not None:
                raise self.failed
            if until():
                return
            self.changed.clear()
            left = max(self.last_heard, started) + IDLE_SECONDS - time.monotonic()
            if left <= 0:
                raise SandboxTimeoutError(
                    f"the client sent nothing for {IDLE_SECONDS:g}s during {what}: given up"
                )
            try:
                async with asyncio.timeout(left):
                    await self.changed.wait()
            except TimeoutError:
                pass


class FileStreams:
    """Serves the data plane's streamed-file and log requests; ``on_client`` takes a
    transfer's later messages (chunks, acks), which carry its request id."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._transfers: dict[_Key, _Transfer] = {}

    def handlers(self) -> dict[type[Message], Callable[[bytes, Decoded], Awaitable[None]]]:
        return {
            DownloadFile: self._on_download,
            UploadFile: self._on_upload,
            ListFiles: self._on_list,
            RemoveFile: self._on_remove,
            StreamLogs: self._on_logs,
        }

    def on_client(self, identity: bytes, d: Decoded) -> None:
        """A chunk or ack of a transfer under way (one that ended: dropped)."""
        transfer = self._transfers.get((identity, d.request_id))
        if transfer is None:
            return
        msg = d.msg
        if isinstance(msg, StreamAck):
            transfer.acked = max(transfer.acked, msg.seq)
        elif isinstance(msg, FileChunk) and transfer.on_chunk is not None:
            if len(d.payloads) != 1:
                transfer.fail(ValueError("a FileChunk carries exactly one payload frame"))
            else:
                transfer.on_chunk(msg, d.payloads[0])
        transfer.heard()

    def _open(self, identity: bytes, request_id: int, window: int) -> _Transfer:
        transfer = _Transfer(_window(window))
        self._transfers[(identity, request_id)] = transfer
        return transfer

    def _send(self, identity: bytes, request_id: int, msg: Message, *payloads: Payload) -> None:
        self.plane.send_now(identity, request_id, msg, payloads)

    def _supervised(self, sandbox_id: str) -> bool:
        hub = self.plane.hub
        return hub is not None and hub.supervised(sandbox_id)

    def _runtime_streams(self, sandbox_id: str) -> Any:
        streams = self.plane.runtime.streams
        if streams is None:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} has no supervisor (the {self.plane.runtime.name} "
                "runtime streams files only through it)",
                sandbox_id=sandbox_id,
            )
        return streams

    @staticmethod
    def _check_path(path: str, *, allow_root: bool = True) -> None:
        problem = path_problem(path, allow_root=allow_root)
        if problem:
            raise SandboxPathError(problem, filepath=path[:200])

    # ------------------------------------------------------------------ download

    async def _on_download(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, DownloadFile)
        self.plane._check_running(msg.sandbox_id)
        self._check_path(msg.path, allow_root=False)
        transfer = self._open(identity, d.request_id, msg.window)
        try:
            if self._supervised(msg.sandbox_id):
                size = await self._download_supervised(identity, d.request_id, msg, transfer)
            else:
                streams = self._runtime_streams(msg.sandbox_id)
                chunks = streams.read_stream(msg.sandbox_id, msg.path)
                size = await self._send_chunks(
                    identity, d.request_id, transfer, chunks, "a download"
                )
            if msg.sandbox_id not in self.plane.sandboxes:  # (an engine may not notice)
                raise _stopped(msg.sandbox_id)
            self._send(identity, d.request_id, TransferDone(size))
        finally:
            self._transfers.pop((identity, d.request_id), None)

    async def _download_supervised(
        self, identity: bytes, request_id: int, msg: DownloadFile, transfer: _Transfer
    ) -> int:
        hub = self.plane.hub
        assert hub is not None
        end: list[link.StreamEnd] = []

        def deliver(reply: Any, blobs: list[memoryview]) -> None:
            if isinstance(reply, link.Chunk) and blobs:
                self._send(identity, request_id, FileChunk(reply.seq), blobs[0])
            elif isinstance(reply, link.StreamEnd):
                end.append(reply)
                transfer.changed.set()
            elif reply is None:
                transfer.fail(_stopped(msg.sandbox_id))

        request = functools.partial(link.ReadStream, path=msg.path, window=transfer.window)
        rid, send = hub.open_stream(msg.sandbox_id, request, deliver)
        forwarded = 0
        finished = False
        try:
            while True:
                await transfer.wait(
                    lambda: bool(end) or transfer.acked > forwarded,  # noqa: B023 (now)
                    "a download",
                )
                if transfer.acked > forwarded:  # the client's credit, on to the supervisor
                    forwarded = transfer.acked
                    send(link.ChunkAck(rid, forwarded))
                if end:
                    finished = True
                    if end[0].error is not None:
                        raise file_error(msg.sandbox_id, msg.path, end[0].error, end[0].kind)
                    return end[0].size
        finally:
            hub.close_stream(msg.sandbox_id, rid, abandon=not finished)

    async def _send_chunks(
        self,
        identity: bytes,
        request_id: int,
        transfer: _Transfer,
        chunks: AsyncIterator[Any],
        what: str,
    ) -> int:
        """Send what ``chunks`` yields (bytes: FileChunks; OutputChunks: LogChunks), at
        most a window ahead of the client's acks; returns the bytes sent."""
        seq = size = 0
        try:
            async for chunk in chunks:
                await transfer.wait(lambda: seq - transfer.acked < transfer.window, what)  # noqa: B023
                seq += 1
                if isinstance(chunk, OutputChunk):
                    self._send(identity, request_id, LogChunk(seq, chunk.fd), chunk.data)
                    size += len(chunk.data)
                else:
                    self._send(identity, request_id, FileChunk(seq), chunk)
                    size += len(chunk)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return size

    # ------------------------------------------------------------------ upload

    async def _on_upload(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, UploadFile)
        self.plane._check_running(msg.sandbox_id)
        self._check_path(msg.path, allow_root=False)
        if msg.size < 0:
            raise ValueError(f"an upload of {msg.size} bytes")
        if not 0 <= msg.mode <= 0o7777:
            raise ValueError(f"mode {msg.mode} is not a file mode (0 to 0o7777)")
        transfer = self._open(identity, d.request_id, msg.window)
        try:
            if self._supervised(msg.sandbox_id):
                await self._upload_supervised(identity, d.request_id, msg, transfer)
            else:
                await self._upload_runtime(identity, d.request_id, msg, transfer)
            if msg.sandbox_id not in self.plane.sandboxes:  # (an engine may not notice)
                raise _stopped(msg.sandbox_id)
            self._send(identity, d.request_id, TransferDone(msg.size))
        finally:
            self._transfers.pop((identity, d.request_id), None)

    @staticmethod
    def _checked_chunk(
        msg: UploadFile, transfer: _Transfer, got: FileChunk, data: Payload, state: list[int]
    ) -> bool:
        """Whether ``got`` is the next chunk in order, within the window and the size
        (else the transfer fails). ``state``: [last seq, bytes so far]."""
        size = len(data) if isinstance(data, bytes) else data.nbytes
        if got.seq != state[0] + 1:
            transfer.fail(ValueError(f"upload chunk {got.seq} came after {state[0]}"))
        elif got.seq - transfer.acked > transfer.window:
            transfer.fail(ValueError(f"upload chunk {got.seq} is past the window"))
        elif state[1] + size > msg.size or (got.last and state[1] + size != msg.size):
            transfer.fail(
                SandboxFileError(
                    f"the upload to {msg.path} sent {state[1] + size} bytes, not the "
                    f"{msg.size} it announced (did the local file change?)",
                    filepath=msg.path,
                    sandbox_id=msg.sandbox_id,
                )
            )
        else:
            state[0], state[1] = got.seq, state[1] + size
            return True
        return False

    async def _upload_supervised(
        self, identity: bytes, request_id: int, msg: UploadFile, transfer: _Transfer
    ) -> None:
        hub = self.plane.hub
        assert hub is not None
        end: list[link.StreamEnd] = []

        def deliver(reply: Any, blobs: list[memoryview]) -> None:
            if isinstance(reply, link.ChunkAck):
                transfer.acked = max(transfer.acked, reply.seq)
                self._send(identity, request_id, StreamAck(reply.seq))
            elif isinstance(reply, link.StreamEnd):
                end.append(reply)
                transfer.changed.set()
            elif reply is None:
                transfer.fail(_stopped(msg.sandbox_id))

        request = functools.partial(link.WriteOpen, path=msg.path, mode=msg.mode)
        rid, send = hub.open_stream(msg.sandbox_id, request, deliver)
        state = [0, 0]

        def on_chunk(got: FileChunk, data: Payload) -> None:
            if self._checked_chunk(msg, transfer, got, data, state):
                if not send(link.WriteChunk(rid, got.seq, got.last), (data,)):
                    transfer.fail(_stopped(msg.sandbox_id))

        transfer.on_chunk = on_chunk
        finished = False
        try:
            await transfer.wait(lambda: bool(end), "an upload")
            finished = True
            if end[0].error is not None:
                raise file_error(msg.sandbox_id, msg.path, end[0].error, end[0].kind)
        finally:
            transfer.on_chunk = None
            hub.close_stream(msg.sandbox_id, rid, abandon=not finished)

    async def _upload_runtime(
        self, identity: bytes, request_id: int, msg: UploadFile, transfer: _Transfer
    ) -> None:
        streams = self._runtime_streams(msg.sandbox_id)
        loop = asyncio.get_running_loop()
        # Thread-safe: the runtime takes the chunks on its own thread. Bounded by the
        # window, which _checked_chunk enforces.
        chunks: queue.Queue[tuple[int, Payload]] = queue.Queue()
        state = [0, 0]

        def on_chunk(got: FileChunk, data: Payload) -> None:
            if self._checked_chunk(msg, transfer, got, data, state):
                chunks.put((got.seq, data))

        def acked(seq: int) -> None:
            transfer.acked = max(transfer.acked, seq)
            self._send(identity, request_id, StreamAck(seq))

        def take(timeout: float) -> Payload | None:
            """On the runtime's thread: the next chunk (None: none yet)."""
            if transfer.failed is not None:
                raise transfer.failed
            if msg.sandbox_id not in self.plane.sandboxes:
                raise _stopped(msg.sandbox_id)
            if time.monotonic() - transfer.last_heard > IDLE_SECONDS:
                raise SandboxTimeoutError(
                    f"the client sent nothing for {IDLE_SECONDS:g}s during an upload: given up"
                )
            try:
                seq, data = chunks.get(timeout=timeout)
            except queue.Empty:
                return None
            loop.call_soon_threadsafe(acked, seq)  # taken: the client may send another
            return data

        transfer.on_chunk = on_chunk
        try:
            await streams.write_stream(
                msg.sandbox_id,
                msg.path,
                msg.size,
                msg.mode,
                take,
                ready=lambda: self._send(identity, request_id, StreamAck(0)),
            )
        finally:
            transfer.on_chunk = None
            transfer.fail(SandboxError("the upload ended"))  # a take still waiting stops

    # ------------------------------------------------------------------ list, remove

    async def _on_list(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, ListFiles)
        self.plane._check_running(msg.sandbox_id)
        self._check_path(msg.path)
        if self._supervised(msg.sandbox_id):
            reply = await self._ask(
                msg.sandbox_id, msg.path, functools.partial(link.ListRequest, path=msg.path)
            )
            assert isinstance(reply, link.Listing)
            entries = tuple(FileInfo(e.name, e.size, e.is_dir, e.mtime) for e in reply.entries)
        else:
            entries = tuple(
                await self._runtime_streams(msg.sandbox_id).list_files(msg.sandbox_id, msg.path)
            )
        self._send(identity, d.request_id, FileListReply(entries))

    async def _on_remove(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, RemoveFile)
        self.plane._check_running(msg.sandbox_id)
        self._check_path(msg.path, allow_root=False)
        if self._supervised(msg.sandbox_id):
            request = functools.partial(link.RemoveRequest, path=msg.path, recursive=msg.recursive)
            await self._ask(msg.sandbox_id, msg.path, request)
        else:
            streams = self._runtime_streams(msg.sandbox_id)
            await streams.remove(msg.sandbox_id, msg.path, msg.recursive)
        self._send(identity, d.request_id, OkReply())

    async def _ask(self, sandbox_id: str, path: str, request: Callable[[int], link.Header]) -> Any:
        """A one-reply request to the supervisor: a Listing, or a StreamEnd."""
        hub = self.plane.hub
        assert hub is not None
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def deliver(reply: Any, blobs: list[memoryview]) -> None:
            if not answer.done():
                answer.set_result(reply)

        rid, _ = hub.open_stream(sandbox_id, request, deliver)
        try:
            reply = await answer
        finally:
            hub.close_stream(sandbox_id, rid, abandon=not answer.done())
        if reply is None:
            raise _stopped(sandbox_id)
        if isinstance(reply, link.StreamEnd) and reply.error is not None:
            raise file_error(sandbox_id, path, reply.error, reply.kind)
        return reply

    # ------------------------------------------------------------------ logs

    async def _on_logs(self, identity: bytes, d: Decoded) -> None:
        msg = d.msg
        assert isinstance(msg, StreamLogs)
        plane = self.plane
        sid = msg.sandbox_id
        transfer = self._open(identity, d.request_id, msg.window)
        try:
            chunks: AsyncIterator[OutputChunk]
            streams = plane.runtime.streams
            if msg.follow and sid in plane.sandboxes and streams is not None:
                chunks = streams.follow_logs(sid, lambda: sid in plane.sandboxes)
            else:
                kept = plane.kept_logs.get(sid)
                if kept is None:
                    if sid not in plane.sandboxes and sid not in plane.ended:
                        plane._check_running(sid)
                    kept = await plane.runtime.logs(sid)
                chunks = _iterate(kept)
            await self._send_chunks(identity, d.request_id, transfer, chunks, "a log stream")
            self._send(identity, d.request_id, TransferDone())
        finally:
            self._transfers.pop((identity, d.request_id), None)


async def _iterate(chunks: Sequence[OutputChunk]) -> AsyncIterator[OutputChunk]:
    for chunk in chunks:
        yield chunk


def _stopped(sandbox_id: str) -> SandboxError:
    return SandboxNotRunningError(
        f"sandbox {sandbox_id} stopped during the transfer", sandbox_id=sandbox_id
    )
