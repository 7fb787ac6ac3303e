"""Streamed files, inside the sandbox: the supervisor's side of uploads, downloads,
listings and removals (agent/supervisor.py hands it their headers). Runs INSIDE a
sandbox, copied beside the supervisor as ``aviato_supervisor_files``; standard library
only, imported at the first file op (no start-up cost).

Flow control: a read sends at most ``window`` chunks the agent has not acked; a write
acks each chunk once written, and the agent sends no more than its window ahead. So
the supervisor holds a transfer's chunks a window at most, however large the file.

A write goes to a temporary name in the target's directory and is renamed over the
target only after its last chunk: given up on (a Kill), failed, or cut off (the agent
gone), the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import _queue
import _thread
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from aviato import link as schema_t

CHUNK = 1 << 20
_REGULAR = 0o100000
_DIRECTORY = 0o040000
_FORMAT = 0o170000


def error_kind(exc: OSError) -> tuple[str, str]:
    """(a message, a SandboxFileError kind: see aviato/exceptions.py)."""
    message = (exc.strerror or str(exc)).lower()
    if isinstance(exc, FileNotFoundError):
        return message, "not_found"
    if isinstance(exc, IsADirectoryError):
        return message, "is_a_directory"
    if isinstance(exc, NotADirectoryError):
        return message, "not_a_directory"
    return message, ""


class _Credit:
    """A read's acks: the reading thread waits here for room in its window."""

    def __init__(self, window: int) -> None:
        self.window = max(1, window)
        self.acked = 0
        self.cancelled = False
        self.changed = _thread.allocate_lock()  # released on each ack or cancel
        self.changed.acquire()

    def ack(self, seq: int) -> None:
        self.acked = max(self.acked, seq)
        if self.changed.locked():
            self.changed.release()

    def cancel(self) -> None:
        self.cancelled = True
        if self.changed.locked():
            self.changed.release()

    def room_for(self, seq: int) -> bool:
        """Wait until chunk ``seq`` may be sent; False once cancelled."""
        while not self.cancelled and seq - self.acked > self.window:
            self.changed.acquire(timeout=1.0)
        return not self.cancelled


class _Write:
    def __init__(self, rid: int, fd: int, temp: str, path: str, mode: int) -> None:
        self.rid = rid
        self.fd = fd
        self.temp = temp
        self.path = path
        self.mode = mode
        self.queue: _queue.SimpleQueue[tuple[int, Any, bool] | None] = _queue.SimpleQueue()
        self.done = False

    def discard(self) -> None:
        """Remove the temporary file (a write given up on, failed or cut off)."""
        if self.done:
            return
        self.done = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            os.unlink(self.temp)
        except OSError:
            pass


def temp_name(path: str, rid: int) -> str:
    """A hidden name beside ``path`` (a rename within one directory is atomic)."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name[:180]}.aviato-{os.getpid()}-{rid}.part")


class Files:
    """The supervisor's streamed-file ops. ``send(header, blobs)`` is the supervisor's
    (thread-safe); ``schema`` the link's module."""

    def __init__(self, send: Callable[..., None], schema: Any) -> None:
        self.send = send
        self.schema: Any = schema
        self.reads: dict[int, _Credit] = {}
        self.writes: dict[int, _Write] = {}

    # ------------------------------------------------------------------ dispatch

    def on_header(self, header: Any, blobs: Sequence[Any]) -> None:
        """Called on the supervisor's reader thread: nothing here may block."""
        s = self.schema
        if isinstance(header, s.ChunkAck):
            credit = self.reads.get(header.rid)
            if credit is not None:
                credit.ack(header.seq)
        elif isinstance(header, s.WriteChunk):
            write = self.writes.get(header.rid)
            if write is not None:
                write.queue.put((header.seq, blobs[0] if blobs else b"", header.last))
        elif isinstance(header, s.ReadStream):
            self.reads[header.rid] = _Credit(header.window)
            _thread.start_new_thread(self._read, (header,))
        elif isinstance(header, s.WriteOpen):
            self._open(header)
        elif isinstance(header, s.ListRequest | s.RemoveRequest):
            _thread.start_new_thread(self._list_or_remove, (header,))

    def kill(self, rid: int) -> None:
        credit = self.reads.get(rid)
        if credit is not None:
            credit.cancel()
        write = self.writes.get(rid)
        if write is not None:
            write.queue.put(None)

    def abandon_all(self) -> None:
        """The agent is gone: no write can finish; remove their temporary files."""
        for write in list(self.writes.values()):
            write.discard()

    def _fail(self, rid: int, exc: OSError, path: str = "") -> None:
        message, kind = error_kind(exc)
        self.send(
            self.schema.StreamEnd(rid, error=f"{message}: {path}" if path else message, kind=kind)
        )

    # ------------------------------------------------------------------ read

    def _read(self, request: schema_t.ReadStream) -> None:
        s, rid = self.schema, request.rid
        credit = self.reads[rid]
        try:
            try:
                fd = os.open(request.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self._fail(rid, exc, request.path)
                return
            try:
                kind = os.fstat(fd).st_mode & _FORMAT
                if kind == _DIRECTORY:
                    self.send(s.StreamEnd(rid, error="is a directory", kind="is_a_directory"))
                    return
                if kind != _REGULAR:  # a FIFO or device could block, or never end
                    self.send(s.StreamEnd(rid, error="not a regular file"))
                    return
                os.set_blocking(fd, True)
                seq = size = 0
                while credit.room_for(seq + 1):
                    data = os.read(fd, CHUNK)
                    if not data:
                        self.send(s.StreamEnd(rid, size))
                        return
                    seq += 1
                    size += len(data)
                    self.send(s.Chunk(rid, seq), [data])
            except OSError as exc:
                self._fail(rid, exc, request.path)
            finally:
                os.close(fd)
        finally:
            self.reads.pop(rid, None)

    # ------------------------------------------------------------------ write

    def _open(self, request: schema_t.WriteOpen) -> None:
        s, rid, path = self.schema, request.rid, request.path
        parent = os.path.dirname(path) or "/"
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            self.send(s.StreamEnd(rid, error=f"no such directory: {parent}", kind="not_found"))
            return
        except OSError as exc:
            self._fail(rid, exc, parent)
            return
        if st.st_mode & _FORMAT != _DIRECTORY:
            self.send(s.StreamEnd(rid, error=f"not a directory: {parent}", kind="not_a_directory"))
            return
        if os.path.isdir(path):
            self.send(s.StreamEnd(rid, error="is a directory", kind="is_a_directory"))
            return
        temp = temp_name(path, rid)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._fail(rid, exc, parent)
            return
        write = self.writes[rid] = _Write(rid, fd, temp, path, request.mode)
        _thread.start_new_thread(self._write, (write,))
        self.send(s.ChunkAck(rid, 0))

    def _write(self, write: _Write) -> None:
        s, rid = self.schema, write.rid
        size = 0
        try:
            while True:
                item = write.queue.get()
                if item is None:  # given up on
                    return
                seq, blob, last = item
                view = memoryview(blob)
                while view:
                    view = view[os.write(write.fd, view) :]
                size += len(blob)
                if last:
                    os.fchmod(write.fd, write.mode)
                    os.close(write.fd)
                    write.done = True  # from here on the rename decides
                    os.rename(write.temp, write.path)
                    self.send(s.StreamEnd(rid, size))
                    return
                self.send(s.ChunkAck(rid, seq))
        except OSError as exc:
            if write.done:  # the rename failed: the temporary file must still go
                write.done = False
                write.fd = -1
            self._fail(rid, exc, write.path)
        finally:
            write.discard()
            self.writes.pop(rid, None)

    # ------------------------------------------------------------------ list, remove

    def _list_or_remove(self, request: Any) -> None:
        s = self.schema
        try:
            if isinstance(request, s.ListRequest):
                self.send(s.Listing(request.rid, tuple(listing(s, request.path))))
            else:
                remove(request.path, request.recursive)
                self.send(s.StreamEnd(request.rid))
        except OSError as exc:
            self._fail(request.rid, exc, request.path)


def listing(schema: Any, path: str) -> list[Any]:
    """The entries of the directory ``path`` (symlinks followed for size and kind; a
    dangling one is listed as itself)."""
    entries = []
    with os.scandir(path) as found:
        for entry in found:
            try:
                st = entry.stat()
            except OSError:
                st = entry.stat(follow_symlinks=False)
            is_dir = st.st_mode & _FORMAT == _DIRECTORY
            entries.append(
                schema.Entry(entry.name, 0 if is_dir else st.st_size, is_dir, st.st_mtime)
            )
    entries.sort(key=lambda e: e.name)
    return entries


def remove(path: str, recursive: bool) -> None:
    """Remove a file or symlink; a directory if empty, or with all in it if
    ``recursive`` (its symlinks removed, never followed)."""
    st = os.lstat(path)
    if st.st_mode & _FORMAT != _DIRECTORY:
        os.unlink(path)
    elif recursive:
        import shutil

        shutil.rmtree(path)
    else:
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno == 39:  # ENOTEMPTY
                raise IsADirectoryError(39, "directory not empty (pass recursive=True)") from None
            raise
