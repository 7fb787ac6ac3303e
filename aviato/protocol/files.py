"""Streamed files and logs (client <-> agent): uploads and downloads of any size in
constant memory, listings, removals, and logs as they are written.

A transfer is one request id carrying many messages both ways, with credit-based flow
control: the side that sends chunks keeps at most ``window`` of them unacknowledged,
and the side that takes them acknowledges each (``StreamAck``) once it has passed it
on (written it, or handed it to the user). So no hop (client, agent, supervisor)
ever holds more than ``window`` chunks of one transfer, however fast the sender.

- download (``DownloadFile``): the agent sends ``FileChunk`` 1, 2, ... (payload: the
  bytes), the client acks them, and ``TransferDone`` ends it;
- upload (``UploadFile``): the agent acks 0 once the file is open (its temporary
  name, beside the final one), the client sends ``FileChunk`` 1, 2, ..., the last with
  ``last=True``; the agent acks each as the sandbox wrote it, and ``TransferDone``
  says the file was renamed into place. Given up on (``Cancel``), or broken, the
  temporary file is removed: no half-written file appears under the final name;
- logs (``StreamLogs``): ``LogChunk`` 1, 2, ... (payload: the bytes, ``fd`` its
  stream), acked like a download's, then ``TransferDone`` when the sandbox ended (or,
  without ``follow``, at the end of what is there now).

Paths are absolute, without ``..`` components (:func:`path_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass

from aviato._types import FileInfo
from aviato.protocol.records import Message, MsgType

#: Bytes in one chunk of a transfer.
CHUNK_BYTES = 1 << 20
#: Chunks a transfer keeps in flight by default, and at most.
DEFAULT_WINDOW = 8
MAX_WINDOW = 64


def path_problem(path: str, *, allow_root: bool = True) -> str:
    """Why ``path`` is not a usable sandbox path ("" when it is): it must be absolute,
    without a NUL byte or a ``..`` component (the sandbox resolves symlinks itself)."""
    shown = path if len(path) <= 60 else path[:57] + "..."
    if not path.startswith("/"):
        return f"sandbox path {shown!r} is not absolute: give it from '/', e.g. '/data/x.bin'"
    if "\x00" in path:
        return f"sandbox path {shown!r} holds a NUL byte"
    if ".." in path.split("/"):
        return f"sandbox path {shown!r} has a '..' component: give the path it means"
    if not allow_root and path.strip("/") == "":
        return "sandbox path '/' is the root directory, not a file"
    return ""


@dataclass(frozen=True, slots=True)
class DownloadFile(Message):
    """Client -> agent: stream the regular file at ``path`` (symlinks followed)."""

    TYPE = MsgType.DOWNLOAD_FILE
    sandbox_id: str
    path: str
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True, slots=True)
class UploadFile(Message):
    """Client -> agent: write ``size`` bytes, sent as ``FileChunk``s, at ``path`` (its
    parent directory must exist; any file there is replaced, a directory is not)."""

    TYPE = MsgType.UPLOAD_FILE
    sandbox_id: str
    path: str
    size: int
    mode: int = 0o644
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True, slots=True)
class FileChunk(Message):
    """A piece of a transfer, either way; payload ``[data]``. ``seq`` counts from 1."""

    TYPE = MsgType.FILE_CHUNK
    seq: int
    last: bool = False


@dataclass(frozen=True, slots=True)
class StreamAck(Message):
    """Credit, either way: every chunk up to ``seq`` was passed on (0: ready)."""

    TYPE = MsgType.STREAM_ACK
    seq: int


@dataclass(frozen=True, slots=True)
class TransferDone(Message):
    """The last reply of a transfer: ``size`` bytes went through."""

    TYPE = MsgType.TRANSFER_DONE
    size: int = 0


@dataclass(frozen=True, slots=True)
class ListFiles(Message):
    TYPE = MsgType.LIST_FILES
    sandbox_id: str
    path: str


@dataclass(frozen=True, slots=True)
class FileListReply(Message):
    TYPE = MsgType.FILE_LIST_REPLY
    entries: tuple[FileInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveFile(Message):
    """Remove a file (or an empty directory; with ``recursive``, a directory and all in
    it). Answered by an ``OkReply``."""

    TYPE = MsgType.REMOVE_FILE
    sandbox_id: str
    path: str
    recursive: bool = False


@dataclass(frozen=True, slots=True)
class StreamLogs(Message):
    """Client -> agent: the sandbox's output as ``LogChunk``s in the order written;
    ``follow``: then as it is written, until the sandbox ends."""

    TYPE = MsgType.STREAM_LOGS
    sandbox_id: str
    follow: bool = False
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True, slots=True)
class LogChunk(Message):
    """Agent -> client: output of stream ``fd`` (1 stdout, 2 stderr); payload ``[data]``."""

    TYPE = MsgType.LOG_CHUNK
    seq: int
    fd: int
