"""Streamed files and logs, the client's side (``Sandbox`` takes these methods from
:class:`SandboxFiles`): uploads and downloads of any size in constant memory, a file
read as it streams, listings, removals, and logs as they are written.

Each transfer is one request id carrying many messages both ways, with credit-based
flow control (aviato/protocol/files.py): at most a window of chunks is in flight, and
a chunk is acked only once the user's code (or the local file) has taken it, so a slow
consumer slows the sandbox's reading instead of filling anyone's memory.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import IO, TYPE_CHECKING

from aviato._connection import Channel, agent_connection
from aviato._connection import _ids as request_ids
from aviato._errors import to_exception
from aviato._types import FileInfo, OutputChunk
from aviato.exceptions import SandboxFileError, SandboxPathError
from aviato.protocol import (
    CHUNK_BYTES,
    DEFAULT_WINDOW,
    Decoded,
    DownloadFile,
    ErrorReply,
    FileChunk,
    FileListReply,
    ListFiles,
    LogChunk,
    Message,
    Payload,
    Ping,
    RemoveFile,
    StreamAck,
    StreamLogs,
    TransferDone,
    UploadFile,
    path_problem,
)

if TYPE_CHECKING:
    from aviato._connection import Connections
    from aviato._defaults import SandboxDefaults
    from aviato.protocol import SandboxInfo

__all__ = ["SandboxFiles"]

#: A followed log stream checks that its agent still answers after this much quiet.
_QUIET_PROBE_SECONDS = 30.0


def _checked(path: str, *, allow_root: bool = True) -> str:
    if not isinstance(path, str):
        raise SandboxPathError(f"a sandbox path is a str, not {type(path).__name__}", filepath="")
    problem = path_problem(path, allow_root=allow_root)
    if problem:
        raise SandboxPathError(problem, filepath=path)
    return path


def _temp_beside(local: str) -> str:
    directory = os.path.dirname(os.path.abspath(local))
    return os.path.join(directory, f".{os.path.basename(local)}.aviato-{os.getpid()}.part")


class _Stream:
    """One request's messages both ways on a channel: ``send`` more, ``next`` reply."""

    def __init__(self, conn: Channel, idle: float | None) -> None:
        conn._check_reachable()
        self.conn = conn
        self.idle = idle
        self.id = next(request_ids)
        self.replies: asyncio.Queue[Decoded] = asyncio.Queue()
        conn._waiting[self.id] = self.replies.put_nowait
        self.sent = False
        self.ended = False

    async def send(self, msg: Message, payloads: Sequence[Payload] = ()) -> None:
        frames, size = self.conn._frames(self.id, msg, payloads, "")
        await self.conn._transmit(frames, size)
        self.sent = True

    async def next(self) -> Decoded:
        while True:
            try:
                async with asyncio.timeout(self.idle or _QUIET_PROBE_SECONDS):
                    reply = await self.replies.get()
                break
            except TimeoutError:
                if self.idle is not None:
                    raise self.conn._no_answer(
                        f"{self.conn.address} went silent for {self.idle:g}s during a transfer"
                    ) from None
                # Quiet logs: fine, if the agent still answers (else this raises).
                await self.conn.request(Ping(), timeout=_QUIET_PROBE_SECONDS)
        if isinstance(reply.msg, ErrorReply):
            self.ended = True
            raise to_exception(reply.msg)
        if isinstance(reply.msg, TransferDone):
            self.ended = True
        return reply

    def close(self) -> None:
        self.conn._waiting.pop(self.id, None)
        if self.sent and not self.ended:
            self.conn._abandon(self.id)  # the agent stops it (an upload's temp file goes)


class SandboxFiles:
    """Streamed files and logs; mixed into :class:`aviato.Sandbox`."""

    _defaults: SandboxDefaults

    if TYPE_CHECKING:

        def _agent(self) -> tuple[SandboxInfo, Channel]: ...
        def _require_started(self) -> SandboxInfo: ...
        def _connections(self) -> Connections: ...

    def _stream(self, idle: bool = True) -> tuple[SandboxInfo, _Stream]:
        info, conn = self._agent()
        return info, _Stream(conn, self._defaults.request_timeout_seconds if idle else None)

    async def read_file_stream(
        self, path: str, *, window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[bytes]:
        """The regular file at ``path`` (absolute) as it streams, a chunk (at most a MiB)
        at a time: ``async for chunk in sb.read_file_stream("/var/log/app.log")``. Any
        size, in constant memory: the sandbox reads ahead at most ``window`` chunks of
        what you have taken. A missing file raises ``SandboxFileNotFoundError``, a
        directory ``SandboxIsADirectoryError``, a relative path ``SandboxPathError``."""
        _checked(path, allow_root=False)
        info, stream = self._stream()
        try:
            await stream.send(DownloadFile(info.sandbox_id, path, window))
            while True:
                reply = await stream.next()
                if isinstance(reply.msg, TransferDone):
                    return
                if isinstance(reply.msg, FileChunk) and reply.payloads:
                    yield bytes(reply.payloads[0])
                    await stream.send(StreamAck(reply.msg.seq))  # taken: one more may come
        finally:
            stream.close()

    async def download(self, path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy the sandbox's file at ``path`` to ``local_path``; returns its size. Any
        size, in constant memory. Written to a temporary name beside ``local_path`` and
        renamed at the end: a failed download leaves no partial file there."""
        local = os.fspath(local_path)
        temp = _temp_beside(local)
        size = 0
        out = await asyncio.to_thread(open, temp, "wb")
        try:
            with out:
                async for chunk in self.read_file_stream(path):
                    await asyncio.to_thread(out.write, chunk)
                    size += len(chunk)
            await asyncio.to_thread(os.replace, temp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return size

    async def upload(
        self,
        local_path: str | os.PathLike[str],
        path: str,
        *,
        mode: int | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> int:
        """Copy the local file ``local_path`` to ``path`` (absolute) in the sandbox;
        returns its size. Any size, in constant memory. Its directory must exist
        (``SandboxFileNotFoundError`` else); a file there is replaced, atomically: the
        bytes go to a temporary name beside it, renamed into place at the end, and
        removed if the upload fails or is cancelled. ``mode``: the local file's by
        default."""
        _checked(path, allow_root=False)
        if mode is not None and not 0 <= mode <= 0o7777:
            raise ValueError(f"mode must be a file mode from 0 to 0o7777, not {mode!r}")
        source = await asyncio.to_thread(open, os.fspath(local_path), "rb")
        with source:
            st = os.fstat(source.fileno())
            return await self._upload(
                source, st.st_size, path, mode if mode is not None else st.st_mode & 0o7777, window
            )

    async def _upload(self, source: IO[bytes], size: int, path: str, mode: int, window: int) -> int:
        info, stream = self._stream()
        try:
            await stream.send(UploadFile(info.sandbox_id, path, size, mode, window))
            reply = await stream.next()  # ack 0: open (or the error: no such directory)
            acked = reply.msg.seq if isinstance(reply.msg, StreamAck) else 0
            seq = sent = 0
            while True:
                while sent < size or seq == 0:
                    if seq - acked >= window:
                        break
                    data = await asyncio.to_thread(source.read, min(CHUNK_BYTES, size - sent))
                    if len(data) < min(CHUNK_BYTES, size - sent):
                        raise SandboxFileError(
                            f"the local file shrank while it was uploaded to {path}",
                            filepath=path,
                            sandbox_id=info.sandbox_id,
                        )
                    seq += 1
                    sent += len(data)
                    await stream.send(FileChunk(seq, last=sent == size), (data,))
                reply = await stream.next()
                if isinstance(reply.msg, StreamAck):
                    acked = max(acked, reply.msg.seq)
                elif isinstance(reply.msg, TransferDone):
                    return sent
        finally:
            stream.close()

    async def list_files(self, path: str) -> builtins.list[FileInfo]:
        """The entries of the directory ``path`` (absolute), sorted by name, each a
        ``FileInfo(name, size, is_dir, mtime)`` (symlinks followed; a directory's size
        is 0). ``SandboxNotADirectoryError`` for a file."""
        _checked(path)
        info, conn = self._agent()
        reply = await conn.request(
            ListFiles(info.sandbox_id, path), timeout=self._defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, FileListReply)
        return list(reply.msg.entries)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove the file (or symlink, or empty directory) at ``path`` (absolute); with
        ``recursive``, a directory and everything in it. ``SandboxFileNotFoundError`` if
        there is none; ``SandboxIsADirectoryError`` for a non-empty directory without
        ``recursive``."""
        _checked(path, allow_root=False)
        info, conn = self._agent()
        await conn.request(
            RemoveFile(info.sandbox_id, path, recursive),
            timeout=self._defaults.request_timeout_seconds + (600.0 if recursive else 0.0),
        )

    async def stream_logs(
        self, *, follow: bool = False, window: int = DEFAULT_WINDOW
    ) -> AsyncIterator[OutputChunk]:
        """The main command's output as ``OutputChunk``s, stdout and stderr interleaved
        in the order written; with ``follow``, then as it is written, ending when the
        sandbox ends (``aviato logs -f``). Without, what is there now (as ``logs``)."""
        info = self._require_started()
        conn = agent_connection(info, self._defaults, self._connections())
        stream = _Stream(conn, None if follow else self._defaults.request_timeout_seconds)
        try:
            await stream.send(StreamLogs(info.sandbox_id, follow, window))
            while True:
                reply = await stream.next()
                if isinstance(reply.msg, TransferDone):
                    return
                if isinstance(reply.msg, LogChunk) and reply.payloads:
                    yield OutputChunk(2 if reply.msg.fd == 2 else 1, bytes(reply.payloads[0]))
                    await stream.send(StreamAck(reply.msg.seq))
        finally:
            stream.close()
