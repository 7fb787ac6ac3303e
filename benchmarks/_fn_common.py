"""What every part of the functions benchmark shares: the run's constants, the two
functions it ships (``noop`` and ``sleep10``), the sample plan and the result records,
the console, and small timing / process / memory helpers."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import cloudpickle
import psutil
from rich.console import Console

IMAGE = "python:3.11"
LABELS = {
    "aviato": "aviato",
    "aviato-uvloop": "aviato (uvloop)",
    "aviato-zmq": "aviato (ZeroMQ, as from another host)",
    "ray": "Ray",
    "dask": "Dask",
    "ppe": "ProcessPoolExecutor",
}
SLEEP_SECONDS = 0.010
SLEEP_WORKERS = (2, 4, 8)
SETTLE_SECONDS = 2.0  # after a start, before "idle" memory is read
TIMEOUT = 600.0  # for any one measurement: a hang fails the run instead of blocking it

console = Console(width=None if sys.stdout.isatty() else 150)


# ---------------------------------------------------------------------- the workloads


def noop(i: int) -> int:
    return i


def sleep10(i: int) -> str:
    """Sleep 10 ms; say which worker ran it (hostname:pid, distinct across containers)."""
    time.sleep(SLEEP_SECONDS)
    return f"{socket.gethostname()}:{os.getpid()}"


# Ship noop and sleep10 by value, as when they lived in the script's __main__: aviato's
# sandboxes (which do this for any module outside site-packages anyway) and Dask's
# workers get them with cloudpickle, without importing this checkout; run_ray does the
# same for Ray's own copy of cloudpickle. ProcessPoolExecutor pickles them by reference
# (benchmarks._fn_common.noop): its children are forked from this process, which has the
# module, or spawned with this process's sys.path, which finds it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- plan and results


@dataclass(frozen=True)
class Plan:
    noop_calls: int  # calls per no-op throughput run
    noop_reps: int  # runs; the median is reported
    seq_n: int  # sequential round trips
    warm_calls: int  # the small gather that warms a 2-worker pool
    sleep_per_worker: int  # sleep calls per worker (at least sleep_min in all)
    sleep_min: int

    def sleep_calls(self, k: int) -> int:
        return max(self.sleep_min, self.sleep_per_worker * k)


FULL = Plan(
    noop_calls=10_000,
    noop_reps=3,
    seq_n=1_000,
    warm_calls=200,
    sleep_per_worker=125,
    sleep_min=400,
)
QUICK = Plan(
    noop_calls=2_000, noop_reps=1, seq_n=200, warm_calls=100, sleep_per_worker=50, sleep_min=100
)


@dataclass
class Memory:
    mib: float
    procs: int


@dataclass
class SleepRun:
    calls: int
    seconds: float
    workers_seen: int  # distinct workers that ran the timed calls

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


@dataclass
class Result:
    system: str
    start_s: float | None = None  # cluster start (ray.init, LocalCluster, ...)
    start_note: str = ""
    #: aviato only: the start above, then its first gather's worker containers started
    #: (as Ray's, Dask's and ProcessPoolExecutor's start include their workers).
    start_with_workers_s: float | None = None
    version: str = ""  # read from the package the run imported, e.g. "ray 2.60.0"
    first_s: float | None = None  # the first (warming) gather, pool start included
    idle: Memory | None = None
    warm: Memory | None = None
    memory_note: str = ""
    noop_calls: int = 0
    noop_rates: list[float] = field(default_factory=list)
    noop_workers: int = 0
    seq: list[float] = field(default_factory=list)  # seconds
    sleep: dict[int, SleepRun] = field(default_factory=dict)
    skipped: str = ""
    error: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.system]

    @property
    def heading(self) -> str:
        """The label with the version that ran (for the markdown table's header)."""
        return f"{self.label} ({self.version})" if self.version else self.label

    @property
    def noop_rate(self) -> float:
        return statistics.median(self.noop_rates) if self.noop_rates else math.nan

    def seq_q(self, p: int) -> float:
        xs = self.seq
        if len(xs) < 2:
            return xs[0] if xs else math.nan
        return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


# ---------------------------------------------------------------------- helpers


def memory_of(procs: Iterable[psutil.Process]) -> Memory:
    """RSS summed over ``procs`` (each counted once; vanished ones skipped)."""
    total, count, seen = 0, 0, set()
    for proc in procs:
        if proc.pid in seen:
            continue
        seen.add(proc.pid)
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
            count += 1
    return Memory(total / 2**20, count)


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def is_resource_tracker(proc: psutil.Process) -> bool:
    """multiprocessing's per-interpreter helper (Dask's spawn starts it): it lives until
    this interpreter exits, by design, so it is not a leftover."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def wait_no_children(timeout: float) -> list[psutil.Process]:
    """Wait for this process's children to exit; those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in descendants() if _running(p) and not is_resource_tracker(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def timed_rate(run: Callable[[], object], calls: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    run()
    return calls / (time.perf_counter() - t0)


def sequential(call: Callable[[int], object], n: int) -> list[float]:
    gc.collect()
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
    return samples


def warm_to(run: Callable[[int], list[str]], k: int, what: str, tries: int = 15) -> None:
    """Run warming gathers (``run(n)`` returns which worker ran each call) until k
    distinct workers answer: pools that start workers lazily then have all k."""
    seen: set[str] = set()
    for _ in range(tries):
        seen = set(run(max(40 * k, 100)))
        if len(seen) >= k:
            return
    console.print(f"[yellow]{what}: only {len(seen)} of {k} workers answered while warming[/]")


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None
