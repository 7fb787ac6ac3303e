"""Pre-started spare sandboxes: a create that matches one is ready in milliseconds.

A spare is a sandbox started ahead of need, per image and resource shape (``Shape``):
its container runs, its supervisor is up and connected, and its main process (the
*parker*, below) waits on a FIFO in the sandbox's socket directory. A create whose spec
has that shape claims a spare: the claim is recorded (agent/runtime/spare_claims.py),
the supervisor link and the runtime take the sandbox's id, and the parker is sent the
sandbox's command and environment and ``exec``s it, as the same pid, so the sandbox's
exit, logs and signals are the command's as in a fresh one. Anything else (another
shape, a function worker, no spare ready) is created as usual. On the local runtime a
spare is a bubblewrap sandbox whose supervisor runs the parker as its command; the same
FIFO, the same claim (agent/runtime/local.py renames its directory and labels).

Spares live in free slots only (spares + sandboxes <= slots: a create that finds no
room drops one), are never shared (one claim each, then it is that sandbox's alone) and
never reused (they end with their sandbox). How many: ``--warm IMAGE=N`` per image, plus
up to ``--warm-learn N`` more spread over the shapes created in the last minute.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import marshal
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.runtime.base import (
    LABEL_AGENT,
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    LABEL_SPARE,
    Runtime,
)
from agent.supervisor_hub import WorkerHub
from agent.supervisor_launch import SOCKET_DIR
from aviato.exceptions import AviatoError, SandboxFailedError, SandboxNotRunningError
from aviato.protocol import SandboxSpec, SpareShape, spare_key

log = logging.getLogger("aviato.agent.spares")

CLAIM_FIFO = "claim"
#: How long a new spare's parker may take to say it is parked.
PARK_SECONDS = 30.0
#: Spares being started at once: a burst of claims is not slowed by their refill.
CONCURRENCY = 2
#: After a claim, how long refilling waits (a burst of creates goes first).
REFILL_DELAY = 0.5
#: The demand window for learned spares, and how long a shape that could not be
#: started is left alone.
WINDOW_SECONDS = 60.0
FAILED_BACKOFF = 60.0
_LEN = struct.Struct("!I")

#: The spare's main process: wait for (argv, env) on the claim FIFO (opened read-write,
#: so no EOF while no writer is there), then become that command, as the same pid.
PARKER = f"""\
import marshal, os, struct, sys
fd = os.open({SOCKET_DIR + "/" + CLAIM_FIFO!r}, os.O_RDWR)
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            os._exit(0)
        buf += chunk
    return buf
argv, env = marshal.loads(read(struct.unpack("!I", read(4))[0]))
os.close(fd)
env = {{**os.environ, **env}}
try:
    os.execvpe(argv[0], argv, env)
except OSError as exc:
    sys.stderr.write("aviato: cannot run %r: %s\\n" % (argv[0], exc.strerror or exc))
    os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
"""


@dataclass(frozen=True, slots=True)
class Shape:
    """What a spare must share with a spec to serve it: fixed when a container is made."""

    image: str
    cpus: float | None = None
    memory_bytes: int | None = None
    pids_limit: int | None = None
    network: str | None = None
    working_dir: str | None = None

    @classmethod
    def of(cls, spec: SandboxSpec) -> Shape:
        return cls(
            spec.image,
            spec.cpus,
            spec.memory_bytes,
            spec.pids_limit,
            spec.network,
            spec.working_dir,
        )

    def wire(self, ready: int) -> SpareShape:
        """As the scheduler is told of it (its ``key`` is ``spare_key`` of the specs
        this shape serves)."""
        return SpareShape(
            self.image,
            self.cpus,
            self.memory_bytes,
            self.pids_limit,
            self.network,
            self.working_dir,
            ready,
        )

    def parking_spec(self) -> SandboxSpec:
        return SandboxSpec(
            image=self.image,
            command="python3",
            args=("-S", "-I", "-c", PARKER),
            cpus=self.cpus,
            memory_bytes=self.memory_bytes,
            pids_limit=self.pids_limit,
            network=self.network,
            working_dir=self.working_dir,
        )


def parse_warm(items: list[str]) -> dict[Shape, int]:
    """``["python:3.11=4", ...]`` -> spares wanted per image (default resources)."""
    wanted: dict[Shape, int] = {}
    for item in items:
        image, sep, count = item.rpartition("=")
        if not sep or not image or not count.isdigit():
            raise ValueError(f"--warm takes IMAGE=N (e.g. python:3.11=4), not {item!r}")
        wanted[Shape(image)] = wanted.get(Shape(image), 0) + int(count)
    return wanted


class Demand:
    """Creates seen per shape in the last ``window`` seconds (bounded), and the spares
    they earn: up to ``cap`` in all, shared out by how often each shape was created."""

    def __init__(self, cap: int, window: float = WINDOW_SECONDS, memory: int = 1024) -> None:
        self.cap = cap
        self.window = window
        self.seen: collections.deque[tuple[float, Shape]] = collections.deque(maxlen=memory)

    def note(self, shape: Shape, now: float) -> None:
        if self.cap > 0:
            self.seen.append((now, shape))

    def targets(self, now: float) -> dict[Shape, int]:
        while self.seen and self.seen[0][0] < now - self.window:
            self.seen.popleft()
        counts = collections.Counter(shape for _, shape in self.seen)
        out: dict[Shape, int] = {}
        left = self.cap
        for shape, n in counts.most_common():
            if left <= 0:
                break
            out[shape] = min(n, left)
            left -= out[shape]
        return out


def to_start(targets: Mapping[Shape, int], have: Mapping[Shape, int], room: int) -> list[Shape]:
    """Spares to start, at most ``room``: each time the shape furthest below its target."""
    held = dict(have)
    out: list[Shape] = []
    while len(out) < room:
        short = [(targets[s] - held.get(s, 0), s.image, s) for s in targets]
        short = [x for x in short if x[0] > 0]
        if not short:
            break
        shape = max(short, key=lambda x: (x[0], x[1]))[2]
        out.append(shape)
        held[shape] = held.get(shape, 0) + 1
    return out


def merged_targets(warm: Mapping[Shape, int], learned: Mapping[Shape, int]) -> dict[Shape, int]:
    return {s: max(warm.get(s, 0), learned.get(s, 0)) for s in {*warm, *learned}}


class SparePool:
    def __init__(
        self,
        runtime: Runtime,
        hub: WorkerHub,
        agent_id: str,
        *,
        warm: Mapping[Shape, int],
        learn: int,
        room: Callable[[], int],
        start_supervisor: Callable[[str], Awaitable[bool]],
        changed: Callable[[], None],
    ) -> None:
        self.runtime = runtime
        self.hub = hub
        self.agent_id = agent_id
        self.warm = dict(warm)
        self.demand = Demand(learn)
        self._room = room  # free slots: the agent's slots minus its sandboxes
        self._start_supervisor = start_supervisor
        self._changed = changed
        self.ready: dict[Shape, collections.deque[str]] = {}
        self._starting: dict[str, Shape] = {}
        self._failed: dict[Shape, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._refill: asyncio.TimerHandle | None = None
        self.running = False
        self.closed = False

    @property
    def count(self) -> int:
        """Spares held (ready or starting): each takes a slot."""
        return self.ready_count + len(self._starting)

    @property
    def ready_count(self) -> int:
        """Spares a create can take now (what the scheduler is told)."""
        return sum(len(q) for q in self.ready.values())

    def ready_shapes(self) -> tuple[SpareShape, ...]:
        """The shapes of the spares a create can take now, and how many of each."""
        return tuple(shape.wire(len(q)) for shape, q in self.ready.items() if q)

    def start(self) -> None:
        """Begin filling (once registered: what a predecessor left is gone by then)."""
        self.running = True
        self.fill()

    def fill(self) -> None:
        if not self.running or self.closed:
            return
        now = time.monotonic()
        targets = merged_targets(self.warm, self.demand.targets(now))
        for shape, when in list(self._failed.items()):
            if now - when < FAILED_BACKOFF:
                targets.pop(shape, None)
            else:
                del self._failed[shape]
        have = collections.Counter(self._starting.values())
        for shape, queue in self.ready.items():
            have[shape] += len(queue)
        room = min(self._room() - self.count, CONCURRENCY - len(self._starting))
        for shape in to_start(targets, have, room):
            self._track(self._make(shape))

    def _track(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _make(self, shape: Shape) -> None:
        spare_id = f"spare-{uuid.uuid4().hex[:16]}"
        self._starting[spare_id] = shape
        ok = False
        try:
            mounts = await self.hub.prepare(spare_id)
            make_fifo(self._fifo(spare_id))
            labels = {
                LABEL_MANAGED: "1",
                LABEL_SANDBOX: spare_id,
                LABEL_AGENT: self.agent_id,
                LABEL_SPARE: "1",
                LABEL_CREATED: repr(time.time()),
            }
            await self.runtime.create_spare(spare_id, shape.parking_spec(), labels, mounts)
            ok = await self._start_supervisor(spare_id) and await wait_parked(self._fifo(spare_id))
            if not ok:
                log.warning("spare of %s: its supervisor or parker did not start", shape.image)
        except (AviatoError, OSError) as exc:
            log.warning("could not start a spare of %s: %s", shape.image, exc)
        finally:
            del self._starting[spare_id]
        # No room any more (creates filled the slots while it started): it goes.
        if not ok or self.closed or self.count >= self._room():
            if not ok:
                self._failed[shape] = time.monotonic()
            await self._discard(spare_id)
            self._changed()
            return
        self.ready.setdefault(shape, collections.deque()).append(spare_id)
        self._changed()
        self.fill()

    def _fifo(self, spare_id: str) -> Path:
        return self.hub.root / spare_id / CLAIM_FIFO

    async def _discard(self, spare_id: str) -> None:
        await self.hub.close(spare_id, "spare discarded")
        with contextlib.suppress(AviatoError):
            await self.runtime.stop(spare_id)

    async def claim(self, sandbox_id: str, spec: SandboxSpec, created_at: float) -> bool:
        """Make a ready spare of ``spec``'s shape the sandbox ``sandbox_id`` and start
        its command; False when there is none (create it as usual). A command the
        image lacks fails as a fresh create would (the spare stays ready)."""
        if spare_key(spec) is None:  # a function worker, mounts/volumes/ports, an isolation
            return False  # made afresh (spares run the agent's default isolation)
        shape = Shape.of(spec)
        self.demand.note(shape, time.monotonic())
        queue = self.ready.get(shape)
        if self.closed or not queue:
            self._refill_soon(0.0)
            return False
        spare_id = queue.popleft()
        fifo = self._fifo(spare_id)
        try:
            await self.runtime.claim_spare(spare_id, sandbox_id, spec, created_at)
        except SandboxNotRunningError:  # it died while parked
            await self._discard(spare_id)
            self._changed()
            return False
        except SandboxFailedError:
            queue.appendleft(spare_id)
            raise
        except BaseException:  # e.g. the claim record could not be written: it goes
            await self._discard(spare_id)
            self._changed()
            raise
        self.hub.rename(spare_id, sandbox_id)
        try:
            await launch(fifo, spec)
        except OSError as exc:  # its parker is gone: ENXIO, no reader
            log.info("spare %s lost (%s): creating %s afresh", spare_id, exc, sandbox_id)
            await self.hub.close(sandbox_id, "spare lost")
            with contextlib.suppress(AviatoError):
                await self.runtime.stop(sandbox_id)
            self._changed()
            return False
        self._changed()
        self._refill_soon(REFILL_DELAY)
        return True

    def room_freed(self) -> None:
        """A sandbox ended: its slot may take a spare again."""
        if self.running and not self.closed:
            self._refill_soon(REFILL_DELAY)

    def _refill_soon(self, delay: float) -> None:
        if self._refill is not None:
            self._refill.cancel()
        self._refill = asyncio.get_running_loop().call_later(delay, self.fill)

    def on_exit(self, spare_id: str) -> None:
        """A spare's container ended while parked (killed, or out of memory): drop it."""
        for queue in self.ready.values():
            if spare_id in queue:
                queue.remove(spare_id)
                self._track(self.hub.close(spare_id, "spare ended"))
                self._changed()
                self._refill_soon(REFILL_DELAY)
                return

    async def make_room(self) -> None:
        """Spares live in free slots: drop some while they exceed them (a create that
        took no spare is about to fill one)."""
        dropped = []
        while self.count > max(0, self._room()):
            fullest = max(self.ready.values(), key=len, default=None)
            if not fullest:
                break
            dropped.append(fullest.popleft())
        if dropped:
            self._changed()
            await asyncio.gather(*(self._discard(s) for s in dropped))

    async def close(self) -> None:
        """Stop every spare (and those being started) and start no more."""
        self.closed = True
        if self._refill is not None:
            self._refill.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=60)
        spares = [s for queue in self.ready.values() for s in queue]
        self.ready.clear()
        await asyncio.gather(*(self._discard(s) for s in spares), return_exceptions=True)


def make_fifo(path: Path) -> None:
    # Writable by the parker whatever user the image runs as (it opens it read-write:
    # a reader that never sees EOF). Nothing but the parker reads it.
    os.mkfifo(path)
    path.chmod(0o666)


def parked(fifo: Path) -> bool:
    """Whether a parker holds ``fifo`` open: a writer opens it only then (and opening
    and closing one is no EOF to a reader that is itself a writer)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        return False
    return True


async def wait_parked(fifo: Path, timeout: float = PARK_SECONDS) -> bool:
    """True once the spare's parker waits on ``fifo``."""
    deadline = time.monotonic() + timeout
    while not parked(fifo):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def launch(fifo: Path, spec: SandboxSpec) -> None:
    """Send the parker its command: fails at once (ENXIO) when no parker reads."""
    data = marshal.dumps(([spec.command, *spec.args], dict(spec.env)))
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.set_blocking(fd, True)
        message = _LEN.pack(len(data)) + data
        if len(message) <= 4096:  # under PIPE_BUF: one write, never blocks
            os.write(fd, message)
        else:
            await asyncio.to_thread(_write_all, fd, message)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
