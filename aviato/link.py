"""The agent <-> worker link's schema: every op on it, every header as a typed record,
and the framing. One definition, imported by both ends and by the local lane:

- the agent's hub (agent/supervisor_hub.py) and the lane (aviato/_lane.py, agent/lane_server.py) on
  the host, where it is ``aviato.link``;
- the supervisor and function worker (agent/supervisor.py) inside a sandbox, where the hub
  copies it beside them as ``aviato_link``. There it must cost nothing at start-up:
  builtin modules only (no enum, dataclasses, typing: ~50 ms together).

Framing: ``u32 frame count``, the frames' ``u64`` lengths, then the frames. A length
with :data:`SHM_FLAG` set is a frame in a sealed memfd whose descriptor came over the
socket with (or before) the message's bytes (see aviato/_lane.py).

Messages: frame 0 is a header, the rest opaque blobs. A header is one of the records
below, sent as ``{"op": its Op, **its fields}``: marshal from the agent (the worker
trusts it), JSON from the worker (the agent parses what a sandbox sends with a safe
parser and checks every field with :func:`decode`). Field names are the records':
a call's header is :class:`CallHeader` from the client's RunCalls to the worker, and
its outcome :class:`CallOutcome` from the worker to the client's CallResults.

On the host the records are frozen dataclasses and the enums ``enum.StrEnum`` (so
aviato.protocol's codec encodes and checks them); in a sandbox, small stand-ins that
behave the same but for freezing (built below, tested against the real ones in
tests/test_link.py). mypy sees the host build: a misspelt field or op is its error.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from enum import StrEnum
    from typing import Any, ClassVar, TypeVar, dataclass_transform

    from aviato.exceptions import ProtocolError as ProtocolError

    _T = TypeVar("_T")

    @dataclass_transform(frozen_default=True)
    def record(cls: type[_T]) -> type[_T]:
        """A frozen record (below: a slotted frozen dataclass on the host)."""
        return cls

elif __package__:  # on the host
    import dataclasses
    from enum import StrEnum
    from typing import Any, ClassVar  # for the codec's type hints of the records

    from aviato.exceptions import ProtocolError

    def record(cls):
        out = dataclasses.dataclass(frozen=True, slots=True)(cls)
        out.FIELDS = tuple(f.name for f in dataclasses.fields(out))
        return out

else:  # inside a sandbox: builtin modules only

    class ProtocolError(Exception):
        """As aviato.exceptions.ProtocolError: a message that is not the link's."""

    class StrEnum(str):
        """What the link uses of ``enum.StrEnum``: members are ``str`` instances, looked
        up by value (``Op("calls")``; a ValueError for any other value)."""

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            cls._by_value_ = {}
            for name, value in list(vars(cls).items()):
                if not name.startswith("_") and type(value) is str:
                    member = str.__new__(cls, value)
                    member._name_ = name
                    setattr(cls, name, member)
                    cls._by_value_[value] = member

        def __new__(cls, value):
            try:
                return cls._by_value_[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

        @property
        def value(self):
            return str.__str__(self)

        @property
        def name(self):
            return self._name_

        def __str__(self):
            return str.__str__(self)

        def __format__(self, spec):
            return str.__format__(str.__str__(self), spec)

        def __repr__(self):
            return f"<{type(self).__name__}.{self._name_}: {str.__repr__(self)}>"

        def __reduce_ex__(self, protocol):
            return type(self), (str.__str__(self),)

    def record(cls):
        """A record as ``dataclass`` makes: init, eq, hash, repr. Its ``__init__`` is
        compiled at its first use: records a process never makes cost it nothing at
        start-up. Not frozen at run time (that would double the cost of making one, on
        every call's path): mypy checks the worker against the frozen host build."""
        names = tuple(
            name
            for name, kind in vars(cls).get("__annotations__", {}).items()
            if not kind.startswith("ClassVar")
        )
        defaults = {name: vars(cls)[name] for name in names if name in vars(cls)}

        def first_init(self, *args, **kwargs):
            params = ", ".join(
                f"{name}=_defaults[{name!r}]" if name in defaults else name for name in names
            )
            body = "".join(f"    self.{name} = {name}\n" for name in names)
            source = f"def __init__(self, {params}):\n{body or '    pass'}\n"
            scope = {"_defaults": defaults}
            exec(compile(source, f"<record {cls.__name__}>", "exec"), scope)
            scope["__init__"].__qualname__ = f"{cls.__name__}.__init__"
            cls.__init__ = scope["__init__"]
            cls.__init__(self, *args, **kwargs)

        def astuple(self):
            return tuple(getattr(self, name) for name in names)

        def __eq__(self, other):
            if other.__class__ is not self.__class__:
                return NotImplemented
            return astuple(self) == astuple(other)

        def __repr__(self):
            inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
            return f"{cls.__name__}({inner})"

        cls.__init__ = first_init
        cls.__eq__ = __eq__
        cls.__hash__ = lambda self: hash(astuple(self))
        cls.__repr__ = __repr__
        cls.FIELDS = names
        return cls


# --------------------------------------------------------------------------- the ops


class Op(StrEnum):
    """Every op on the link; its value is the header's ``"op"``."""

    # agent -> worker
    CALLS = "calls"  # a batch of function calls (CallBatch)
    EXEC = "exec"
    READ = "read"
    WRITE = "write"
    KILL = "kill"
    DETACH = "detach"
    # processes (issue 13): spawned, fed, read, signalled, resized, listed
    PROC_SPAWN = "proc-spawn"
    PROC_WRITE = "proc-write"
    PROC_READ = "proc-read"
    PROC_SIGNAL = "proc-signal"
    PROC_RESIZE = "proc-resize"
    PROC_LIST = "proc-list"
    # agent -> supervisor: streamed files (agent/supervisor_files.py)
    READ_STREAM = "read-stream"
    WRITE_OPEN = "write-open"
    WRITE_CHUNK = "write-chunk"
    LIST = "list"
    REMOVE = "remove"
    # agent -> worker: objects for calls' arguments (issue 14 part 3, agent/objects.py)
    OBJECT = "object"
    OBJECT_DROP = "object-drop"
    # both ways: the agent's memfd probe, and the worker's answer
    SHM_PROBE = "shm-probe"
    # both ways: a streamed file's credit
    CHUNK_ACK = "chunk-ack"
    # worker -> agent
    HELLO = "hello"
    CALLS_LINK = "calls-link"
    RESULTS = "results"
    OUT = "out"
    EXIT = "exit"
    FILE = "file"
    PROC = "proc"
    CHUNK = "chunk"
    STREAM_END = "stream-end"
    LISTING = "listing"
    # worker -> agent: a function worker's own stdout/stderr (agent/supervisor_output.py)
    WORKER_OUT = "worker-out"


class Serialization(StrEnum):
    """How a call's arguments and result travel (its function is always cloudpickled)."""

    PICKLE = "pickle"
    JSON = "json"


class CallStatus(StrEnum):
    """A call's outcome: "ok" (payload: the result), "error" (payload: the error
    record), "crashed" (its worker died running it) or "lost" (its worker died with it
    queued or unsent): the last two are the agent's, never a worker's."""

    OK = "ok"
    ERROR = "error"
    CRASHED = "crashed"
    LOST = "lost"


class Record:
    """A record of the link: ``FIELDS`` are its fields' names, in order."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]]


class Header(Record):
    """A message's header: frame 0. ``OP`` names it on the wire."""

    __slots__ = ()
    OP: ClassVar[Op]


# --------------------------------------------------------------------------- calls


@record
class CallHeader(Record):
    """One function call in a batch (aviato.protocol.RunCalls, CallBatch). Its payload
    frames, in order: the pickled function when ``ship_function`` (once per worker and
    digest), then the arguments. The arguments' out-of-band buffers are among the
    frames after the last call's: ``buffers`` are their indices there, in the order the
    pickle asks for them."""

    call_id: int
    digest: str
    ship_function: bool
    serialization: Serialization
    #: The worker refuses a result larger than this (0: no limit).
    max_result_bytes: int = 0
    buffers: tuple[int, ...] = ()


@record
class CallOutcome(Record):
    """How one call ended (aviato.protocol.CallResults, Results). A worker's outcome is
    "ok" or "error" with one payload frame (the result or the error record), an "ok"
    result's followed by its ``buffers`` out-of-band buffer frames; "crashed" and
    "lost" (the agent's) have none, and ``detail`` says how."""

    call_id: int
    status: CallStatus
    seconds: float = 0.0
    detail: str = ""
    buffers: int = 0


@record
class CallBatch(Header):
    """Agent -> worker: run these calls in order. Payloads: each call's frames, then
    ``buffers`` out-of-band buffer frames that the calls share."""

    OP = Op.CALLS
    calls: tuple[CallHeader, ...]
    buffers: int = 0


@record
class Results(Header):
    """Worker -> agent: outcomes, in the order their payload frames follow."""

    OP = Op.RESULTS
    outcomes: tuple[CallOutcome, ...]


# --------------------------------------------------------------------------- supervisor


@record
class ExecRequest(Header):
    """Agent -> supervisor: run ``argv``; with ``stdin`` its one blob is the command's
    stdin (then EOF), else stdin is empty. Answered by Output chunks (``stream``) and
    an Exit, or by an Exit with the collected stdout and stderr as two blobs."""

    OP = Op.EXEC
    rid: int
    argv: tuple[str, ...]
    cwd: str | None
    env: dict[str, str]
    timeout: float | None
    stream: bool
    stdin: bool


@record
class ReadRequest(Header):
    """Agent -> supervisor: a file's bytes (at most ``max``; 0: no limit). Answered by
    a FileDone with the bytes as its blob."""

    OP = Op.READ
    rid: int
    path: str
    max: int = 0


@record
class WriteRequest(Header):
    """Agent -> supervisor: write the one blob to ``path``. Answered by a FileDone."""

    OP = Op.WRITE
    rid: int
    path: str
    mode: int = 0o644


@record
class Kill(Header):
    """Agent -> supervisor: the request ``rid`` is given up (kill its command, stop its
    read or write)."""

    OP = Op.KILL
    rid: int


@record
class Detach(Header):
    """Agent -> supervisor: the agent exits but its sandboxes stay; leave them running."""

    OP = Op.DETACH


@record
class ObjectFrames(Header):
    """Agent -> worker, before the calls that use it: object ``object_id``'s frames (a
    pickle and its out-of-band buffers), for its refs among their arguments. The
    worker holds it until an ObjectDrop."""

    OP = Op.OBJECT
    object_id: str


@record
class ObjectDrop(Header):
    """Agent -> worker: forget these objects (released, or past its share)."""

    OP = Op.OBJECT_DROP
    object_ids: tuple[str, ...]


@record
class ShmProbe(Header):
    """Agent -> worker on the calls link: a frame in a memfd (the blob SHM_PROBE) to see
    whether descriptors get through; the worker answers with ``ok``."""

    OP = Op.SHM_PROBE
    ok: bool = False


@record
class Hello(Header):
    """Worker -> agent, first on its connection: who it is, or why it cannot serve.
    ``calls``: a function worker, whose calls link is connected already."""

    OP = Op.HELLO
    python: str
    pid: int
    error: str | None = None
    calls: bool = False


@record
class CallsLink(Header):
    """Worker -> agent, first on its second connection: this one is for calls.
    ``shm``: it takes frames in shared memory (the agent probes that it works)."""

    OP = Op.CALLS_LINK
    shm: bool = False


@record
class Output(Header):
    """Supervisor -> agent: a chunk of a streamed exec's output (the blob); ``fd`` 1 or 2."""

    OP = Op.OUT
    rid: int
    fd: int


@record
class WorkerOutput(Header):
    """Function worker -> agent: a piece of its own stdout (``fd`` 1) or stderr (2), the
    blob, read while it ran the function ``name``; ``dropped`` bytes of that stream were
    dropped before it (over its rate limit), the blob then possibly empty. The agent
    relays it to the client that watches the worker (aviato/protocol/output.py)."""

    OP = Op.WORKER_OUT
    fd: int
    name: str = ""
    dropped: int = 0


@record
class Exit(Header):
    """Supervisor -> agent: an exec's end."""

    OP = Op.EXIT
    rid: int
    code: int
    timed_out: bool = False


@record
class FileDone(Header):
    """Supervisor -> agent: a read (its bytes the blob) or write done, or its error."""

    OP = Op.FILE
    rid: int
    error: str | None = None
    too_large: bool = False


# --------------------------------------------------------------------------- processes


@record
class ProcState(Record):
    """A spawned process as the supervisor's table knows it: ``exit_code`` once it
    ended (128+N for signal N, as a shell says), ``signal`` then naming N."""

    id: str
    argv: tuple[str, ...]
    running: bool
    exit_code: int | None = None
    signal: int | None = None
    pty: bool = False


@record
class ProcSpawn(Header):
    """Agent -> supervisor: start ``argv`` with a stdin to feed (a pipe, or with
    ``pty`` a terminal of ``rows`` x ``cols`` on all three). Answered by a ProcReply
    with its state."""

    OP = Op.PROC_SPAWN
    rid: int
    argv: tuple[str, ...]
    cwd: str | None
    env: dict[str, str]
    pty: bool = False
    rows: int = 24
    cols: int = 80


@record
class ProcWrite(Header):
    """Agent -> supervisor: write the one blob to the process's stdin (answered once it
    is all in the pipe: the writer waits for a slow reader); ``eof`` then closes it."""

    OP = Op.PROC_WRITE
    rid: int
    proc: str
    eof: bool = False


@record
class ProcRead(Header):
    """Agent -> supervisor: the output from ``offset`` (-1: the oldest kept), at most
    ``max`` bytes, waiting up to ``wait`` seconds for some. Answered by a ProcReply with
    one blob per chunk (``fds`` their streams)."""

    OP = Op.PROC_READ
    rid: int
    proc: str
    offset: int
    wait: float
    max: int


@record
class ProcSignal(Header):
    OP = Op.PROC_SIGNAL
    rid: int
    proc: str
    signal: int


@record
class ProcResize(Header):
    OP = Op.PROC_RESIZE
    rid: int
    proc: str
    rows: int
    cols: int


@record
class ProcList(Header):
    """Agent -> supervisor: every process's state, or (``proc``) one's, waiting up to
    ``wait`` seconds for it to end."""

    OP = Op.PROC_LIST
    rid: int
    proc: str = ""
    wait: float = 0.0


@record
class ProcReply(Header):
    """Supervisor -> agent: a process request's answer. ``missing``: no such process;
    ``error``: why it failed. A read's chunks start at ``offset`` (after ``skipped``
    bytes the backlog no longer held); ``eof``: no output comes after them."""

    OP = Op.PROC
    rid: int
    error: str | None = None
    missing: bool = False
    procs: tuple[ProcState, ...] = ()
    offset: int = 0
    skipped: int = 0
    eof: bool = False
    fds: tuple[int, ...] = ()


# --------------------------------------------------------------------------- streamed files
# One request id (``rid``) per transfer; the side that sends chunks keeps at most
# ``window`` unacknowledged (aviato/protocol/files.py says the same of the client hop).


@record
class ReadStream(Header):
    """Agent -> supervisor: send the regular file at ``path`` as Chunks 1, 2, ... (at
    most ``window`` unacked), then a StreamEnd (or a StreamEnd with the error)."""

    OP = Op.READ_STREAM
    rid: int
    path: str
    window: int


@record
class WriteOpen(Header):
    """Agent -> supervisor: open a temporary file beside ``path`` for WriteChunks;
    answered by ChunkAck 0 (open) or a StreamEnd with the error."""

    OP = Op.WRITE_OPEN
    rid: int
    path: str
    mode: int = 0o644


@record
class WriteChunk(Header):
    """Agent -> supervisor: the next piece (the blob) of an open write, acked once
    written; after the ``last``, the file is renamed into place and a StreamEnd says so."""

    OP = Op.WRITE_CHUNK
    rid: int
    seq: int
    last: bool = False


@record
class ChunkAck(Header):
    """Either way: every chunk of ``rid`` up to ``seq`` was passed on (0: open)."""

    OP = Op.CHUNK_ACK
    rid: int
    seq: int


@record
class Chunk(Header):
    """Supervisor -> agent: the next piece (the blob) of a ReadStream."""

    OP = Op.CHUNK
    rid: int
    seq: int


@record
class StreamEnd(Header):
    """Supervisor -> agent: a streamed read, write or remove is over: ``size`` bytes,
    or ``error`` (``kind``: a SandboxFileError kind, see aviato/exceptions.py)."""

    OP = Op.STREAM_END
    rid: int
    size: int = 0
    error: str | None = None
    kind: str = ""


@record
class ListRequest(Header):
    """Agent -> supervisor: the entries of the directory ``path``: a Listing, or a
    StreamEnd with the error."""

    OP = Op.LIST
    rid: int
    path: str


@record
class RemoveRequest(Header):
    """Agent -> supervisor: remove ``path`` (a directory only ``recursive``, or empty);
    answered by a StreamEnd."""

    OP = Op.REMOVE
    rid: int
    path: str
    recursive: bool = False


@record
class Entry(Record):
    """One entry of a Listing (aviato.FileInfo on the client)."""

    name: str
    size: int
    is_dir: bool
    mtime: float


@record
class Listing(Header):
    """Supervisor -> agent: a directory's entries."""

    OP = Op.LISTING
    rid: int
    entries: tuple[Entry, ...]


HEADERS: dict[Op, type[Header]] = {
    cls.OP: cls
    for cls in (
        CallBatch,
        Results,
        ExecRequest,
        ReadRequest,
        WriteRequest,
        Kill,
        Detach,
        ObjectFrames,
        ObjectDrop,
        ShmProbe,
        Hello,
        CallsLink,
        Output,
        WorkerOutput,
        Exit,
        FileDone,
        ProcSpawn,
        ProcWrite,
        ProcRead,
        ProcSignal,
        ProcResize,
        ProcList,
        ProcReply,
        ReadStream,
        WriteOpen,
        WriteChunk,
        ChunkAck,
        Chunk,
        StreamEnd,
        ListRequest,
        RemoveRequest,
        Listing,
    )
}

#: HEADERS by the op's text (an Op hashes and compares as its value).
_BY_OP: dict[Any, type[Header]] = dict(HEADERS)  # and aviato/link_actors.py's

#: What the agent's probe of a worker's calls link carries, in a memfd.
SHM_PROBE = b"aviato shared memory probe"
#: Beside the worker's socket, the agent makes this file; the worker writes in it the
#: id of the call it runs (RUNNING, 0: none): if it dies, that call is charged.
RUNNING_FILE = "running"
RUNNING = struct.Struct("!q")


# --------------------------------------------------------------------------- headers


_SCALARS = frozenset({int, float, bool, str, type(None)})


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if isinstance(value, Record):
        out = {}
        for name in value.FIELDS:
            field = getattr(value, name)
            out[name] = field if type(field) in _SCALARS else _plain(field)
        return out
    if kind is tuple or kind is list:
        return [v if type(v) in _SCALARS else _plain(v) for v in value]
    if isinstance(value, str):
        return str.__str__(value)  # an enum member: its value
    return value


def encode(header: Header) -> dict[str, Any]:
    """``header`` as plain values (marshal and JSON take them): ``{"op": ..., **fields}``."""
    out: dict[str, Any] = {"op": header.OP.value}
    out.update(_plain(header))
    return out


def encode_calls(batch: CallBatch) -> dict[str, Any]:
    """``encode(batch)``, made directly: a batch goes out on every call's path, and the
    generic walk cost the agent a few microseconds a call (tests/test_link.py checks
    that both agree)."""
    return {
        "op": "calls",
        "calls": [
            {
                "call_id": c.call_id,
                "digest": c.digest,
                "ship_function": c.ship_function,
                "serialization": str.__str__(c.serialization),
                "max_result_bytes": c.max_result_bytes,
                "buffers": list(c.buffers),
            }
            for c in batch.calls
        ],
        "buffers": batch.buffers,
    }


def decode(value: Any) -> Header:
    """The record of a header as :func:`encode` made it; ProtocolError if it is not one.
    On the host every field is checked (the agent reads what a sandbox sends)."""
    if type(value) is not dict:
        raise ProtocolError(f"a link header is a map, not {type(value).__name__}")
    try:
        cls = _BY_OP.get(value.get("op"))
    except TypeError:  # an unhashable op
        cls = None
    if cls is None:
        raise ProtocolError(f"unknown op {str(value.get('op'))[:40]!r} on the link")
    fast = _FAST.get(cls)
    if fast is not None:
        found = fast(value)
        if found is not None:
            return found  # type: ignore[no-any-return]
    fields = dict(value)
    del fields["op"]
    return _decoder(cls)(fields)  # type: ignore[no-any-return]


_DECODERS: dict[type[Record], Callable[[dict[str, Any]], Any]] = {}


def _decoder(cls: type[Record]) -> Callable[[dict[str, Any]], Any]:
    found = _DECODERS.get(cls)
    if found is None:
        found = _DECODERS[cls] = _build_decoder(cls)
    return found


# The headers on every call's path have a fast path each (``_FAST``): the one shape
# their sender makes (the whole header, ``"op"`` included), read without the generic
# walk; None for any other shape, which the generic decoder then accepts or refuses.
# tests/test_link_fast_paths.py checks that both give the same answer for any value.

if TYPE_CHECKING or __package__:

    def _build_decoder(cls: type[Record]) -> Callable[[dict[str, Any]], Any]:
        """On the host: every field checked against its type (aviato/_codec.py)."""
        from aviato._codec import CodecError, decoder

        check = decoder(cls)

        def decode_checked(fields: dict[str, Any]) -> Any:
            try:
                return check(fields)
            except CodecError as exc:
                raise ProtocolError(f"{cls.__name__}: {exc}") from None

        return decode_checked

    #: Filled by aviato/_link_fast.py (imported at the end: it reads the records).
    _FAST: dict[type[Record], Callable[[dict[str, Any]], Any]] = {}

else:

    def _build_decoder(cls):
        """Inside a sandbox the agent is trusted: values are only converted by their
        fields' annotations (lists to tuples, enums and records rebuilt)."""
        annotations = vars(cls).get("__annotations__", {})
        converters = []
        for name in cls.FIELDS:
            kind = annotations[name]
            if kind.startswith("tuple["):
                item = _converter(kind[len("tuple[") : -len(", ...]")])
                converters.append(
                    (name, (lambda v, item=item: tuple(map(item, v))) if item else tuple)
                )
            elif _converter(kind) is not None:
                converters.append((name, _converter(kind)))

        def decode_trusted(fields):
            try:
                for name, convert in converters:
                    if name in fields:
                        fields[name] = convert(fields[name])
                return cls(**fields)
            except (TypeError, KeyError, ValueError) as exc:
                raise ProtocolError(f"{cls.__name__}: {exc!r}") from None

        return decode_trusted

    def _converter(kind):
        target = globals().get(kind)
        if isinstance(target, type) and issubclass(target, Record):
            return _decoder(target)  # each value a dict of its own, from marshal
        if isinstance(target, type) and issubclass(target, StrEnum):
            return target._by_value_.__getitem__  # KeyError: caught as malformed
        return None

    def _fast_calls(value):
        """A batch as :func:`encode_calls` made it (the agent's, trusted): each call
        built in one step, not through the per-field converters."""
        try:
            if len(value) != 3:
                return None
            calls = []
            for c in value["calls"]:
                if len(c) != 6:
                    return None
                calls.append(
                    CallHeader(
                        c["call_id"],
                        c["digest"],
                        c["ship_function"],
                        _SERIALIZATIONS[c["serialization"]],
                        c["max_result_bytes"],
                        tuple(c["buffers"]),
                    )
                )
            return CallBatch(tuple(calls), value["buffers"])
        except (TypeError, KeyError):  # not that shape: the generic path says why
            return None

    _FAST = {CallBatch: _fast_calls}


_STATUSES = {
    status.value: status
    for status in (CallStatus.OK, CallStatus.ERROR, CallStatus.CRASHED, CallStatus.LOST)
}
_SERIALIZATIONS = {s.value: s for s in (Serialization.PICKLE, Serialization.JSON)}


# --------------------------------------------------------------------------- framing

COUNT = struct.Struct("!I")
LENGTH = struct.Struct("!Q")
#: A frame's length with this bit set: the frame is in a memfd, not in the stream.
SHM_FLAG = 1 << 63
#: Frames in one message at most: a RunCalls batch carries at most two per call.
MAX_FRAMES = 1 << 16
#: A frame this large is read straight into a buffer of its own by :func:`read`.
OWN_BUFFER = 64 * 1024


class FramingError(ProtocolError):
    """The peer sent something that is not our framing (or breaks its limits)."""


#: The heads of messages of few frames (most: a header and a payload or two), compiled
#: once rather than looked up by their format string on every message.
_HEADS = {count: struct.Struct(f"!I{count}Q") for count in range(1, 9)}
_LENGTHS = {count: struct.Struct(f"!{count}Q") for count in range(1, 9)}


def _lengths(count: int) -> struct.Struct:
    return _LENGTHS.get(count) or struct.Struct(f"!{count}Q")


def pack_head(lengths: Sequence[int]) -> bytes:
    """A message's head: the count, then the lengths (SHM_FLAG set on shared frames)."""
    head = _HEADS.get(len(lengths))
    if head is None:
        return struct.pack(f"!I{len(lengths)}Q", len(lengths), *lengths)
    return head.pack(len(lengths), *lengths)


def pack(frames: Sequence[Any]) -> list[Any]:
    """A message's head, then its frames, all in the stream: one sendall."""
    lengths = [len(f) if type(f) is bytes else memoryview(f).nbytes for f in frames]
    return [pack_head(lengths), *frames]


def parse_head(buf: Any, offset: int = 0) -> tuple[int, tuple[int, ...]] | None:
    """(the head's size, the frames' lengths) once ``buf[offset:]`` holds a whole head,
    else None. Raises FramingError for a count out of bounds."""
    if len(buf) - offset < COUNT.size:
        return None
    (count,) = COUNT.unpack_from(buf, offset)
    if not 0 < count <= MAX_FRAMES:
        raise FramingError(f"a message of {count} frames (at most {MAX_FRAMES})")
    size = COUNT.size + LENGTH.size * count
    if len(buf) - offset < size:
        return None
    return size, _lengths(count).unpack_from(buf, offset + COUNT.size)


def read(stream: Any) -> list[Any] | None:
    """One message's frames from a blocking ``stream`` (``read`` and ``readinto``, as a
    BufferedReader): bytes, a bytearray for a large one, a private mapping for a shared
    one whose descriptor ``stream.fds`` holds (None when it did not get through). None
    at a clean end of stream; FramingError for a truncated or malformed message."""
    head = stream.read(COUNT.size)
    if not head:
        return None
    if len(head) < COUNT.size:
        raise FramingError("the stream ended inside a message's head")
    (count,) = COUNT.unpack(head)
    if not 0 < count <= MAX_FRAMES:
        raise FramingError(f"a message of {count} frames (at most {MAX_FRAMES})")
    raw = stream.read(LENGTH.size * count)
    if len(raw) < LENGTH.size * count:
        raise FramingError("the stream ended inside a message's head")
    frames: list[Any] = []
    fds = getattr(stream, "fds", None)
    for length in _lengths(count).unpack(raw):
        frame: Any
        if length & SHM_FLAG:
            # None when its descriptor did not get through (only the agent's probe
            # comes so, before the answer that says whether they do).
            frame = map_private(fds.pop(0), length & ~SHM_FLAG) if fds else None
        elif length < OWN_BUFFER:
            frame = stream.read(length)
            if len(frame) < length:
                raise FramingError("the stream ended inside a message")
        else:
            frame = bytearray(length)
            view = memoryview(frame)
            while view:
                got = stream.readinto(view)
                if not got:
                    raise FramingError("the stream ended inside a message")
                view = view[got:]
        frames.append(frame)
    return frames


def map_private(fd: int, length: int) -> memoryview:
    """A shared frame from the agent (trusted), mapped copy-on-write: writable, ours.
    Closes ``fd``."""
    import mmap  # not builtin: only once a shared frame comes

    try:
        region = mmap.mmap(
            fd,
            length,
            flags=mmap.MAP_PRIVATE,  # faulted in as read: MAP_POPULATE measured slower
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    finally:
        import os

        os.close(fd)
    return memoryview(region)


if TYPE_CHECKING or __package__:
    from aviato import _link_fast  # the host's fast paths: last, as they read the records

    _FAST[Results] = _link_fast.results
