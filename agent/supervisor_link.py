"""The agent <-> worker link, worker side: sending (large frames in shared memory),
reading with descriptors, the headers it writes by hand, and the pickling of results
(with out-of-band buffers) and of errors. Runs
INSIDE a sandbox beside agent/supervisor.py (copied with it to /run/aviato-lib as
``aviato_supervisor_link``): builtin modules only at import.

The link's schema and framing are aviato/link.py's (``aviato_link`` in a sandbox),
shared with the agent; what is here only the worker does.
"""

from __future__ import annotations

import _socket
import _thread
import io
import os
import struct
import time

if __package__:
    from aviato._spare import Spare
    from aviato.link import SHM_FLAG, pack_head
else:  # inside a sandbox, copied beside it
    from aviato_link import SHM_FLAG, pack_head  # type: ignore[import-not-found,no-redef]
    from aviato_spare import Spare  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from aviato import link as schema

#: Frames at least this large go in shared memory on the calls link (aviato/_lane.py).
SHM_MIN = int(os.environ.get("AVIATO_SHM_MIN_BYTES", 1 << 20))
#: Whether to offer shared memory (the agent's probe then says if it works).
SHM = os.environ.get("AVIATO_WORKER_SHM", "1") != "0"
FDS_PER_SEND = 250


class FdReader:
    """A blocking reader of a Unix socket that keeps the descriptors sent with its
    bytes (the link's ``read`` maps those of shared frames): ``read`` and ``readinto``."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        self.ancillary = _socket.CMSG_SPACE(FDS_PER_SEND * 4)

    def _take(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                self.fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data, ancillary, _, _ = self.sock.recvmsg(
                max(n - len(self.buf), 1 << 16), self.ancillary, _socket.MSG_CMSG_CLOEXEC
            )
            self._take(ancillary)
            if not data:
                break
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def readinto(self, view: memoryview) -> int:
        if self.buf:
            count = min(len(self.buf), len(view))
            view[:count] = self.buf[:count]
            del self.buf[:count]
            return count
        count, ancillary, _, _ = self.sock.recvmsg_into(
            [view], self.ancillary, _socket.MSG_CMSG_CLOEXEC
        )
        self._take(ancillary)
        return int(count)


#: The worker's spare memfd for its next large result (made only while the sandbox's
#: memory limit has room for it twice over).
SPARE = Spare("aviato-result")


def _to_shared(frame: Any) -> int:
    """A sealed memfd holding ``frame`` (the agent refuses unsealed ones)."""
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return SPARE.sealed_copy(view)


def send_shared(sock: _socket.socket, frames: Sequence[Any]) -> None:
    """One message, its large frames in shared memory (their descriptors sent with
    its first bytes)."""
    lengths: list[int] = []
    stream: list[Any] = []
    fds: list[int] = []
    try:
        for frame in frames:
            size = len(frame) if not isinstance(frame, memoryview) else frame.nbytes
            fd = None
            if size >= SHM_MIN:
                try:
                    fd = _to_shared(frame)
                except OSError:  # out of descriptors or memory: in the stream
                    fd = None
            if fd is not None:
                fds.append(fd)
                lengths.append(SHM_FLAG | size)
            else:
                stream.append(frame)
                lengths.append(size)
        head = pack_head(lengths)
        if not fds:
            _send_all(sock, [head, *stream])
            return
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = sock.sendmsg([head], rights)  # blocking: all of the head, with the fds
        _send_all(sock, [memoryview(head)[sent:], *stream])
    finally:
        for fd in fds:
            os.close(fd)


def _send_all(sock: _socket.socket, parts: Sequence[Any]) -> None:
    if sum(len(p) for p in parts) < 1 << 20:
        sock.sendall(b"".join(parts))
        return
    # Large blobs: no joined copy; several buffers per system call.
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            if sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            else:
                views[0] = views[0][sent:]
                sent = 0


# Out-of-band buffers for results: the mirror of aviato/_buffers.py (which rebuilds
# what this makes, from standard-library callables only). Made at the first call.
OOB_MIN_BYTES = 64 * 1024


def make_picklers(pickle: Any, cloudpickle: Any) -> tuple[Any, Any]:
    """(plain pickler, cloudpickle's), each taking memoryviews out of band."""

    class Reduce:
        __slots__ = ("args", "func")

        def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
            self.func = func
            self.args = args

        def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
            return self.func, self.args

    def reduce_memoryview(mv: memoryview) -> Any:
        try:
            memoryview(bytes(mv.itemsize)).cast(mv.format)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return NotImplemented
        flat = mv
        if not mv.c_contiguous:  # a copy, writable if the original was
            flat = memoryview(mv.tobytes() if mv.readonly else bytearray(mv.tobytes()))
        rebuilt: Any = Reduce(memoryview, (pickle.PickleBuffer(flat),))
        if mv.format != "B" or mv.ndim != 1:
            rebuilt = Reduce(memoryview.cast, (rebuilt, mv.format, list(mv.shape or ())))
        if mv.readonly:
            rebuilt = Reduce(memoryview.toreadonly, (rebuilt,))
        return rebuilt.__reduce_ex__(5)

    class Plain(pickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is memoryview:
                return reduce_memoryview(obj)
            return NotImplemented

    class Cloud(cloudpickle.Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is memoryview:
                return reduce_memoryview(obj)
            return super().reducer_override(obj)

    def wrap_top(value: Any) -> Any:
        if type(value) in (bytes, bytearray) and len(value) >= OOB_MIN_BYTES:
            return Reduce(type(value), (pickle.PickleBuffer(value),))
        return value

    def dumps(cls: Any, value: Any) -> tuple[bytes, list[memoryview]]:
        views: list[memoryview] = []

        def take(buffer: Any) -> bool:
            raw = buffer.raw()
            if raw.nbytes < OOB_MIN_BYTES:
                return True
            views.append(raw)
            return False

        out = io.BytesIO()
        cls(out, protocol=5, buffer_callback=take).dump(wrap_top(value))
        return out.getvalue(), views

    return (lambda v: dumps(Plain, v)), (lambda v: dumps(Cloud, v))


# Headers to the agent are JSON (it parses what a sandbox sends with a safe parser);
# written by hand because importing json (and re) costs a sandbox ~10 ms at start.
_ESCAPES = {i: f"\\u{i:04x}" for i in range(32)}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        finite = value == value and abs(value) != float("inf")
        return repr(value) if finite else "null"
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_json(str(k)) + ":" + _json(v) for k, v in value.items()) + "}"
    raise TypeError(f"cannot send a {type(value).__name__} in a header")


def to_json(value: Any) -> bytes:
    # A lone surrogate (an undecodable file name) becomes a valid \\udcXX escape.
    return _json(value).encode("utf-8", "backslashreplace")


def results_header(outcomes: list[schema.CallOutcome]) -> bytes:
    """``to_json(encode(Results(outcomes)))``, made directly: it is on every call's path.
    A worker's outcomes have int ids, statuses "ok" or "error", finite seconds, no
    detail, and how many out-of-band buffer frames follow the result's own."""
    return (
        '{"op":"results","outcomes":['
        + ",".join(
            f'{{"call_id":{o.call_id},"status":"{str.__str__(o.status)}","seconds":{o.seconds!r},'
            f'"detail":"","buffers":{o.buffers}}}'
            for o in outcomes
        )
        + "]}"
    ).encode()


class Outbox:
    """A batch's outcomes not sent yet, and when they go: ``flush`` seconds after the
    first of them finished, after a call that took that long, at the batch's end, or
    (from the flusher thread) while a later call of the batch still runs. The pool
    batches a function's calls when they were quick so far; one that turns out slow
    must not hold its quick neighbours' results back (``aviato.wait`` would see them
    late). ``send(header, frames)`` is only called under the outbox's lock.

    ``before`` (a worker's output forwarder) runs under the lock before each send of
    outcomes, and may ``send_locked`` messages of its own: they go ahead of them."""

    def __init__(self, send: Any, flush: float) -> None:
        self._send = send
        self._flush = flush
        self.lock = self._lock = _thread.allocate_lock()
        self.before: Any = None
        self._outcomes: list[schema.CallOutcome] = []
        self._frames: list[Any] = []
        self._since = 0.0  # when the first unsent outcome came
        self._busy = False  # a batch of several calls runs
        self._wake = _thread.allocate_lock()  # released by the main thread: a batch began
        self._wake.acquire()
        self._flusher = False

    def begin(self, calls: int) -> None:
        if calls < 2:
            return  # its one outcome goes at its end anyway
        with self._lock:
            self._busy = True
        if not self._flusher:
            self._flusher = True
            _thread.start_new_thread(self._flush_loop, ())
        if self._wake.locked():  # only this thread releases it
            self._wake.release()

    def add(self, outcome: schema.CallOutcome, frames: list[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            self._outcomes.append(outcome)
            self._frames.extend(frames)
            if not self._since:
                self._since = now
            if now - self._since >= self._flush or outcome.seconds >= self._flush:
                self._send_held()

    def end(self) -> None:
        with self._lock:
            self._busy = False
            self._send_held()

    def send_now(self, outcome: schema.CallOutcome, frames: list[Any]) -> None:
        """An outcome from another thread (a call run at once with others,
        agent/supervisor_concurrent.py): sent now, with any held before it."""
        with self._lock:
            self._outcomes.append(outcome)
            self._frames.extend(frames)
            self._send_held()

    def send_locked(self, header: bytes, frames: list[Any]) -> None:
        """Another message on the outcomes' way, in order with them: under ``lock``."""
        self._send(header, frames)

    def _send_held(self) -> None:
        if self._outcomes:
            if self.before is not None:
                self.before()
            outcomes, frames = self._outcomes, self._frames
            self._outcomes, self._frames, self._since = [], [], 0.0
            self._send(results_header(outcomes), frames)

    def _flush_loop(self) -> None:
        tick = max(self._flush, 0.005)  # a few wake-ups per second, only while a batch runs
        while True:
            self._wake.acquire()
            busy = True
            while busy:
                time.sleep(tick)
                with self._lock:
                    busy = self._busy
                    if busy and self._since and time.monotonic() - self._since >= self._flush:
                        try:
                            self._send_held()
                        except OSError:
                            return  # the agent is gone: the main thread sees it too


def too_large_record(size: int, limit: int) -> bytes:
    """An aviato error (rebuilt as PayloadTooLargeError by the client), not the result."""
    import pickle

    message = (
        f"the function's result is {size} bytes, above its max_result_bytes of {limit}: "
        "return less (write big data to a file in the sandbox), or raise the limit"
    )
    record = {
        "type": "aviato.exceptions.PayloadTooLargeError",
        "message": message,
        "traceback": "",
        "exception": None,
    }
    return pickle.dumps(record)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _try(dumps: Any, value: Any) -> bytes | None:
    try:
        blob: bytes = dumps(value)
        return blob
    except Exception:
        return None


def error_record(exc: BaseException, dumps: Any) -> bytes:
    """What the client needs to rebuild ``exc``: the pickled exception when possible;
    its class, ``args`` and each attribute pickled apart, for the client to rebuild it
    as pickle does (``cls(*args)``) when the whole does not travel (an attribute that
    does not pickle, say); and always its type name, message and formatted traceback."""
    import pickle
    import traceback  # only when something failed

    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    record: dict[str, Any] = {
        "type": _qualname(type(exc)),
        "message": str(exc),
        "traceback": tb,
        "exception": None,
    }
    if dumps is not None:
        record["exception"] = _try(dumps, exc)
        record["class"] = _try(dumps, type(exc))
        record["args"] = _try(dumps, exc.args)
        record["state"] = {k: _try(dumps, v) for k, v in getattr(exc, "__dict__", {}).items()}
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
