"""Calls that run at once in one worker: an actor's with ``max_concurrency`` N > 1
(``@session.cls(max_concurrency=N)``, aviato/_actor.py). Runs INSIDE a sandbox beside
agent/supervisor.py (copied with it to /run/aviato-lib as
``aviato_supervisor_concurrent``): builtin modules only.

A function says it may run N calls at once by an attribute (the actor's dispatch
function carries it). Its calls then do not run on the main thread one after another:
each goes to a queue that up to N threads of its own take from (started as calls come,
kept after), and each outcome is sent as soon as it is ready. The main thread goes on
reading, so a long call never holds back the next ones. An ``async def`` method runs
on the instance's event loop (the dispatch function's doing): N threads each waiting
on one of its coroutines is N coroutines at once on that loop.
"""

from __future__ import annotations

import _queue
import _thread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: The attribute a function's calls-at-once is read from (aviato/_actor.py sets it).
ATTRIBUTE = "__aviato_max_concurrency__"


def width_of(fn: Any) -> int:
    """How many calls of ``fn`` may run at once (1: on the main thread, in order)."""
    try:
        width = getattr(fn, ATTRIBUTE, 1)
    except Exception:  # a user's object with a __getattr__ of its own
        return 1
    return width if type(width) is int and width > 1 else 1


class Concurrent:
    """Up to ``width`` calls of one function at once. ``run(call, None, args, buffers)``
    gives an outcome and its frames; ``send(outcome, frames)`` sends them (thread-safe)."""

    def __init__(self, width: int, run: Callable[..., Any], send: Callable[..., Any]) -> None:
        self.width = width
        self._run = run
        self._send = send
        self._queue: _queue.SimpleQueue[tuple[Any, bytes, Any]] = _queue.SimpleQueue()
        self._lock = _thread.allocate_lock()
        self.threads = 0
        self._idle = 0  # threads waiting on the queue

    def submit(self, call: Any, args_blob: bytes, buffers: Any) -> None:
        with self._lock:
            spawn = False
            if self._idle:
                self._idle -= 1  # one waiting thread takes it
            elif self.threads < self.width:
                self.threads += 1
                spawn = True
        self._queue.put((call, args_blob, buffers))
        if spawn:
            _thread.start_new_thread(self._serve, ())

    def _serve(self) -> None:
        while True:
            call, args_blob, buffers = self._queue.get()
            outcome, frames = self._run(call, None, args_blob, buffers)
            try:
                self._send(outcome, frames)
            except OSError:  # the agent went away: the reader thread ends the process
                return
            with self._lock:
                self._idle += 1


def load(worker: Any, digest: str, fn_blob: bytes) -> bytes | None:
    """Unpickle a function shipped with a call, into ``worker.functions``, and give it
    a runner in ``worker.runners`` if its calls may run at once. None once loaded; the
    blob back if it does not unpickle (``run_one`` then reports that as the call's
    error, as for any function)."""
    try:
        fn = worker.cloudpickle.loads(fn_blob)
    except BaseException:
        return fn_blob
    worker.functions[digest] = fn
    width = width_of(fn)
    if width > 1 and digest not in worker.runners:
        worker.runners[digest] = Concurrent(width, worker.run_one, worker.outbox.send_now)
    return None
