"""A function worker's own output, forwarded to its client (issue 14 part 1). Runs
INSIDE a sandbox beside agent/supervisor.py (copied with it to /run/aviato-lib as
``aviato_supervisor_output``): builtin modules only.

With ``AVIATO_FORWARD_OUTPUT=1`` (set by a client whose ``SandboxDefaults`` has
``forward_output``) the worker's descriptors 1 and 2 become pipes, so that ``print``,
``sys.stderr``, ``logging`` and any subprocess's output alike are caught. One thread
polls both and sends what it reads to the agent as ``WorkerOutput`` messages of their
own, on the calls connection between outcomes (so a call's output is ahead of its
outcome all the way to the client; a worker that prints nothing sends nothing more);
the agent relays them to the client that watches the worker. Without it, nothing here
runs and the output goes where it always did: the sandbox's log.

Bounded: at most ``RATE`` bytes a second (after a ``BURST``) go out; the rest is read
and dropped (so a flooding function never blocks on its pipe), and how much was
dropped is said with the next chunk sent (or alone, once the flood is over).
"""

from __future__ import annotations

import _thread
import os
import time

if __package__:
    from agent.supervisor_link import to_json
else:  # inside a sandbox, copied beside it
    from aviato_supervisor_link import to_json  # type: ignore[import-not-found,no-redef]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Bytes a second a worker may send, and how many it may send at once beyond that.
RATE = 1 << 20
BURST = 4 << 20
CHUNK = 65536
#: Drops not said with a chunk are said alone once no output came for this long.
REPORT_SECONDS = 0.1
FORWARD_ENV = "AVIATO_FORWARD_OUTPUT"


class Budget:
    """A token bucket: ``take(n, now)`` says whether ``n`` more bytes may go now."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


def function_name(fn: Any) -> str:
    """The name a line is prefixed with: an actor's class, else the function's."""
    qual = getattr(fn, "__qualname__", "") or ""
    if qual.endswith(".<actor>"):  # aviato/_actor.py's dispatcher
        return str(qual[: -len(".<actor>")].rsplit(".", 1)[-1])
    return str(getattr(fn, "__name__", "") or "worker")


class Forwarder:
    """Descriptors 1 and 2 as pipes, and the thread that sends what comes out."""

    def __init__(self, supervisor: Any, schema: Any) -> None:
        import select  # builtin in the sandbox's Python

        self.supervisor = supervisor
        self.schema = schema
        self.digest = ""  # of the function running now (or last)
        self.names: dict[str, str] = {}
        # The outbox's: a read and its send, in order with the outcomes.
        self.outbox = supervisor.outbox
        self.lock = supervisor.outbox.lock
        self.pipes: dict[int, int] = {}  # read end -> 1 or 2
        for fd in (1, 2):
            r, w = os.pipe()
            os.set_blocking(r, False)  # read by the pump, or by ``sync`` after a call
            os.dup2(w, fd)
            os.close(w)
            self.pipes[r] = fd
        self.poller = select.poll()
        for r in self.pipes:
            self.poller.register(r, select.POLLIN)
        self.idle = select.poll()  # another: ``sync`` polls while the pump waits
        for r in self.pipes:
            self.idle.register(r, select.POLLIN)
        self.budget = Budget(RATE, BURST, time.monotonic())
        self.dropped = {1: 0, 2: 0}

    def name(self) -> str:
        found = self.names.get(self.digest)
        if found is None:
            fn = self.supervisor.functions.get(self.digest)
            if fn is None:
                return "worker"
            found = self.names[self.digest] = function_name(fn)
        return found

    def pump(self) -> None:
        try:
            while self.pipes:
                # Drops ride on the next chunk sent; with none coming, they are said alone.
                pending = self.dropped[1] or self.dropped[2]
                events = self.poller.poll(int(REPORT_SECONDS * 1000) if pending else -1)
                with self.lock:
                    for r, _ in events:
                        self.read(r)
                    if not events:
                        self.report()
        except OSError:  # the agent is gone: the supervisor's reader ends the process
            pass

    def read(self, r: int) -> None:
        """One read of pipe ``r``, sent or dropped (under the lock)."""
        try:
            data = os.read(r, CHUNK)
        except BlockingIOError:  # ``sync`` read it first
            return
        fd = self.pipes.get(r, 0)
        if not data:  # every writer closed it
            self.poller.unregister(r)
            self.idle.unregister(r)
            os.close(r)
            del self.pipes[r]
            return
        if not self.budget.take(len(data), time.monotonic()):
            self.dropped[fd] += len(data)
            return
        dropped, self.dropped[fd] = self.dropped[fd], 0
        self.send(fd, data, dropped)

    def report(self) -> None:
        """What was dropped and not said yet, said now (under the lock)."""
        for fd in (1, 2):
            dropped, self.dropped[fd] = self.dropped[fd], 0
            if dropped:
                self.send(fd, b"", dropped)

    def send(self, fd: int, data: bytes, dropped: int) -> None:
        """On the calls connection, in order with the outcomes (under their lock)."""
        header = self.schema.encode(self.schema.WorkerOutput(fd, self.name(), dropped))
        self.outbox.send_locked(to_json(header), [data])

    def sync(self) -> None:
        """Before outcomes go (under their lock): what the calls wrote and the pump has
        not read yet goes first (one poll of nothing, when they wrote nothing)."""
        for _ in range(16):  # a writer still running may keep it busy: not for ever
            ready = [r for r, _ in self.idle.poll(0) if r in self.pipes]
            if not ready:
                return
            for r in ready:
                self.read(r)


def forward(supervisor: Any, schema: Any) -> Forwarder | None:
    """Forward a function worker's output if its client asked (None: it did not)."""
    if os.environ.get(FORWARD_ENV) != "1":
        return None
    supervisor.base_env.pop(FORWARD_ENV, None)  # not for the commands it runs
    forwarder = Forwarder(supervisor, schema)
    run_one = supervisor.run_one

    def run_named(call: Any, *args: Any) -> Any:
        forwarder.digest = call.digest  # whose lines these are
        return run_one(call, *args)

    # This worker's own (instance attributes). A poll a message of outcomes, not a
    # call: a syscall lets another thread take the GIL, which cost no-op calls ~5%.
    supervisor.run_one = run_named
    supervisor.outbox.before = forwarder.sync
    _thread.start_new_thread(forwarder.pump, ())
    return forwarder
