"""The soak's load: a steady window of remote calls, each with a unique id, and the ledger
that counts exactly what became of each one."""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aviato import FunctionResult, RemoteFunction
from aviato.exceptions import AviatoError

from ._stats import Stats

log = logging.getLogger("soak.load")


def checksum(call_id: int, data: bytes, sleep_s: float) -> tuple[int, str]:
    """The remote function: its call id back, and a digest of its input."""
    import hashlib
    import time

    time.sleep(sleep_s)
    return call_id, hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class LoadConfig:
    concurrency: int = 256  # calls outstanding at once
    sleep_min: float = 0.005
    sleep_max: float = 0.1
    size_min: int = 16
    size_max: int = 4096
    #: A call unresolved this long after its (re)submission counts as hung.
    hang_after: float = 120.0


@dataclass(eq=False)
class Pending:
    call_id: int
    data: bytes
    expected: str
    sleep_s: float
    first_submitted: float
    submitted: float = 0.0
    submissions: int = 0
    failures: int = 0
    hung: bool = False


@dataclass
class Ledger:
    submitted: int = 0  # distinct call ids
    completed: int = 0  # resolved once with the right value
    retried: int = 0  # completed calls whose result says attempts > 1
    extra_attempts: int = 0
    duplicates: int = 0  # a second result for an id already completed
    wrong: int = 0  # a result with another id or a wrong digest
    resubmitted: int = 0  # after a typed failure
    failed_typed: Counter[str] = field(default_factory=Counter)
    failed_untyped: Counter[str] = field(default_factory=Counter)
    failure_samples: dict[str, str] = field(default_factory=dict)
    hung: int = 0  # calls that stayed unresolved past hang_after (each counted once)
    never_resolved: int = 0  # still unresolved when the soak gave up waiting
    latency: Stats = field(default_factory=lambda: Stats("call"))
    #: Monotonic completion times, in order (to find "calls flowing again").
    completions: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Submitted, but never resolved or resolved with a wrong value."""
        return self.never_resolved + self.wrong


class Load:
    """Keeps ``concurrency`` calls of ``fn`` outstanding until stopped."""

    def __init__(
        self,
        fn: RemoteFunction[tuple[int, str]],
        config: LoadConfig,
        rng: random.Random,
    ) -> None:
        self.fn = fn
        self.config = config
        self.rng = rng
        self.ledger = Ledger()
        self.outstanding: dict[int, Pending] = {}
        self._done_ids: set[int] = set()
        self._next_id = 1
        self._wake = asyncio.Event()
        self.feeding = False
        self.closing = False  # the session is closing: failures then are not resubmitted

    # ------------------------------------------------------------------ submitting

    def _new_call(self) -> Pending:
        cfg = self.config
        data = self.rng.randbytes(self.rng.randint(cfg.size_min, cfg.size_max))
        pending = Pending(
            call_id=self._next_id,
            data=data,
            expected=hashlib.sha256(data).hexdigest(),
            sleep_s=self.rng.uniform(cfg.sleep_min, cfg.sleep_max),
            first_submitted=time.monotonic(),
        )
        self._next_id += 1
        self.ledger.submitted += 1
        return pending

    def _submit(self, pending: Pending) -> None:
        pending.submitted = time.monotonic()
        pending.submissions += 1
        pending.hung = False
        self.outstanding[pending.call_id] = pending
        try:
            future = self.fn(pending.call_id, pending.data, pending.sleep_s)
        except AviatoError as exc:  # refused at submission: counted like a failed call
            self._failed(pending, exc)
            return
        future.add_done_callback(functools.partial(self._on_done, pending))

    def _failed(self, pending: Pending, exc: BaseException) -> None:
        if self.closing:  # already counted as never resolved; the session is closing
            self.outstanding.pop(pending.call_id, None)
            return
        name = type(exc).__name__
        typed = isinstance(exc, AviatoError)
        (self.ledger.failed_typed if typed else self.ledger.failed_untyped)[name] += 1
        self.ledger.failure_samples.setdefault(name, str(exc).splitlines()[0][:300])
        log.warning("call %d failed (%s): %s", pending.call_id, name, exc)
        if typed:
            self.ledger.resubmitted += 1
            pending.failures += 1
            # Back off, as a client should: a pool with no worker fails calls at once.
            delay = min(2.0, 0.05 * 2 ** min(pending.failures, 10))
            asyncio.get_running_loop().call_later(delay, self._submit, pending)
        else:
            self.outstanding.pop(pending.call_id, None)
            self._wake.set()

    def _on_done(self, pending: Pending, future: asyncio.Future[FunctionResult[Any]]) -> None:
        if future.cancelled():
            self._failed(pending, asyncio.CancelledError("the call's future was cancelled"))
            return
        exc = future.exception()
        if exc is not None:
            self._failed(pending, exc)
            return
        result = future.result()
        now = time.monotonic()
        ledger = self.ledger
        value = result.value
        rid = value[0] if isinstance(value, tuple) and len(value) == 2 else None
        if rid in self._done_ids:
            ledger.duplicates += 1
            log.error("duplicate result for call %s (delivered to call %d)", rid, pending.call_id)
            return
        if self.outstanding.get(pending.call_id) is not pending:
            ledger.duplicates += 1
            log.error("a second result for call %d", pending.call_id)
            return
        del self.outstanding[pending.call_id]
        self._wake.set()
        self._done_ids.add(pending.call_id)
        if value != (pending.call_id, pending.expected):
            ledger.wrong += 1
            log.error("call %d: wrong value %r", pending.call_id, value)
            return
        ledger.completed += 1
        ledger.completions.append(now)
        ledger.latency.add(now - pending.first_submitted)
        if result.attempts > 1:
            ledger.retried += 1
            ledger.extra_attempts += result.attempts - 1

    # ------------------------------------------------------------------ running

    async def feed(self, stop: asyncio.Event) -> None:
        """Keep the window full until ``stop`` is set."""
        self.feeding = True
        try:
            while not stop.is_set():
                while len(self.outstanding) < self.config.concurrency:
                    self._submit(self._new_call())
                self._check_hung()
                self._wake.clear()
                stop_wait = asyncio.ensure_future(stop.wait())
                wake_wait = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        {stop_wait, wake_wait}, timeout=0.5, return_when="FIRST_COMPLETED"
                    )
                finally:
                    stop_wait.cancel()
                    wake_wait.cancel()
        finally:
            self.feeding = False

    def _check_hung(self) -> None:
        now = time.monotonic()
        for pending in self.outstanding.values():
            if not pending.hung and now - pending.submitted > self.config.hang_after:
                pending.hung = True
                self.ledger.hung += 1
                log.error(
                    "call %d unresolved %.0f s after its submission #%d",
                    pending.call_id,
                    now - pending.submitted,
                    pending.submissions,
                )

    async def drain(self, timeout: float) -> None:
        """Wait for the outstanding calls (resubmissions included); count the rest lost."""
        deadline = time.monotonic() + timeout
        while self.outstanding and time.monotonic() < deadline:
            self._check_hung()
            self._wake.clear()
            try:
                async with asyncio.timeout(0.5):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._check_hung()
        self.ledger.never_resolved = len(self.outstanding)
        for pending in self.outstanding.values():
            log.error(
                "call %d never resolved (%d submissions)", pending.call_id, pending.submissions
            )
        self.closing = True

    def first_completion_after(self, t: float) -> float | None:
        times = self.ledger.completions
        i = bisect.bisect_right(times, t)
        return times[i] if i < len(times) else None

    def slowest_window(self, start: float, end: float, window: float = 10.0) -> float:
        """The lowest completion rate (calls/s) over any ``window`` seconds in [start, end]."""
        times = self.ledger.completions
        if end - start < window:
            return float("nan")
        lowest = float("inf")
        t = start
        while t + window <= end:
            n = bisect.bisect_left(times, t + window) - bisect.bisect_left(times, t)
            lowest = min(lowest, n / window)
            t += 1.0
        return lowest
