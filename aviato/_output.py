"""Output forwarding, the client's side (issue 14 part 1): what a function or actor
prints in its worker sandbox, shown here as it comes, each line prefixed with the
function's name and the worker's short sandbox id::

    (work sb-3f2a) step 1

stdout to this process's ``sys.stdout``, stderr to its ``sys.stderr``, in order per
worker and stream. ``SandboxDefaults(forward_output=False)`` turns it off.

A session's pools ask each worker's agent for its output (``WatchOutput``, on the
channel its calls use) and hand the chunks that come to the session's
:class:`OutputPrinter`. The event loop only queues them: a thread of the printer's
own splits them into lines and writes them, so that a slow terminal (or a flood)
never holds up calls. The queue is bounded; what does not fit is dropped, and a line
on stderr says how much, as it does for what the worker or agent dropped. A line
left unfinished is shown after ``PARTIAL_SECONDS`` as it is.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from aviato.protocol import Decoded, FunctionOutput, WatchOutput

if TYPE_CHECKING:
    from aviato._connection import Channel

__all__ = ["OutputPrinter", "prefix"]

#: Bytes queued for the printer at most; past it, chunks are dropped (and counted).
MAX_QUEUED = 8 << 20
#: An unfinished line is shown after this long (a progress dot, a prompt).
PARTIAL_SECONDS = 0.2
#: A line longer than this is shown in pieces.
MAX_LINE = 64 << 10
#: A worker's drops are said at most this often (a flood drops a little every read).
NOTICE_SECONDS = 1.0


def prefix(name: str, sandbox_id: str) -> str:
    """``(work sb-3f2a) ``: the function, and the worker's id cut to four digits."""
    short = sandbox_id[:7] if sandbox_id.startswith("sb-") else sandbox_id[:8]
    return f"({name or 'worker'} {short}) "


@dataclass(slots=True)
class _Item:
    sandbox_id: str
    fd: int
    name: str
    data: bytes
    dropped: int


@dataclass(slots=True)
class _Partial:
    data: bytes
    name: str
    due: float


class OutputPrinter:
    """A session's forwarded output: chunks in from the event loop, lines out on a
    thread. ``close`` writes what is left and ends the thread."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        # None: sys.stdout / sys.stderr as they are at each write (pytest swaps them).
        self._streams = {1: stdout, 2: stderr}
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._partial: dict[tuple[str, int], _Partial] = {}
        #: Drops not said yet, and when the last notice was, by (sandbox, fd).
        self._drops: dict[tuple[str, int], tuple[int, str]] = {}
        self._noticed: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------------ event loop side

    def watch(self, conn: Channel, sandbox_id: str) -> int:
        """Ask the worker's agent for its output; the request's id (to ``forget``)."""
        return conn.send_nowait(
            WatchOutput(sandbox_id), (), functools.partial(self._on_reply, sandbox_id)
        )

    def _on_reply(self, sandbox_id: str, decoded: Decoded) -> None:
        msg = decoded.msg
        if not isinstance(msg, FunctionOutput):  # an error: the worker is gone already
            return
        data = bytes(decoded.payloads[0]) if decoded.payloads else b""
        self.put(sandbox_id, msg.fd, msg.name, data, msg.dropped)

    def put(self, sandbox_id: str, fd: int, name: str, data: bytes, dropped: int = 0) -> None:
        """Queue a chunk (or drop it, counted, when too much waits already)."""
        if self._closed or fd not in (1, 2):
            return
        with self._lock:
            if self._queued + len(data) > MAX_QUEUED:
                dropped += len(data)
                data = b""
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="aviato-output", daemon=True)
                self._thread.start()
        self._queue.put(_Item(sandbox_id, fd, name, data, dropped))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and unfinished, then end the thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            dues = [p.due for p in self._partial.values()]
            dues += [self._noticed[k] + NOTICE_SECONDS for k in self._drops]
            try:
                wait = max(min(dues) - time.monotonic(), 0.0) if dues else None
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                self._flush_partials(time.monotonic())
                self._notices(time.monotonic())
                continue
            if item is None:
                self._flush_partials(None)
                self._notices(None)
                return
            with self._lock:
                self._queued -= len(item.data)
            try:
                self._show(item)
            except Exception:  # a closed or broken stream: the output is lost, not us
                pass

    def _stream(self, fd: int) -> TextIO:
        return self._streams[fd] or (sys.stdout if fd == 1 else sys.stderr)

    def _show(self, item: _Item) -> None:
        key = (item.sandbox_id, item.fd)
        if item.dropped:
            self._flush(key)  # the line before the gap ends there
            before = self._drops.get(key, (0, ""))[0]
            self._drops[key] = (before + item.dropped, item.name)
            self._noticed.setdefault(key, 0.0)
            self._notices(time.monotonic())
        if not item.data:
            return
        held = self._partial.pop(key, None)
        data = held.data + item.data if held is not None else item.data
        name = held.name if held is not None else item.name
        lines = data.split(b"\n")
        rest = lines.pop()
        head = prefix(name, item.sandbox_id)
        if lines:
            text = "".join(head + _text(line) + "\n" for line in lines)
            self._write(item.fd, text)
            head = prefix(item.name, item.sandbox_id)
            name = item.name
        if len(rest) > MAX_LINE:
            self._write(item.fd, head + _text(rest) + "\n")
        elif rest:
            due = held.due if held is not None and not lines else time.monotonic() + PARTIAL_SECONDS
            self._partial[key] = _Partial(rest, name, due)

    def _notices(self, now: float | None) -> None:
        """Say what was dropped, per worker and stream at most every NOTICE_SECONDS
        (``now`` None: all of it, now)."""
        for key, (dropped, name) in list(self._drops.items()):
            if now is not None and now - self._noticed[key] < NOTICE_SECONDS:
                continue
            del self._drops[key]
            self._noticed[key] = now or 0.0
            what = "stdout" if key[1] == 1 else "stderr"
            note = (
                f"[aviato: {dropped} bytes of {what} dropped: the worker wrote faster than "
                "its output is forwarded]\n"
            )
            try:
                self._write(2, prefix(name, key[0]) + note)
            except Exception:
                pass

    def _flush(self, key: tuple[str, int]) -> None:
        held = self._partial.pop(key, None)
        if held is not None:
            self._write(key[1], prefix(held.name, key[0]) + _text(held.data) + "\n")

    def _flush_partials(self, now: float | None) -> None:
        for key, held in list(self._partial.items()):
            if now is None or held.due <= now:
                try:
                    self._flush(key)
                except Exception:
                    self._partial.pop(key, None)

    def _write(self, fd: int, text: str) -> None:
        stream = self._stream(fd)
        stream.write(text)
        stream.flush()


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")
