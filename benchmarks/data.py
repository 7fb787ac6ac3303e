#!/usr/bin/env python
"""Big data through remote functions: aviato against Ray and ProcessPoolExecutor.

    python benchmarks/data.py [--quick] [--only aviato,aviato-zmq,aviato-copy,ray,ppe]

One run, one machine, each system alone in turn, two workers each. Rows:

1. 10 MB echo: ``echo(a) -> a`` of a 10 MB float64 numpy array, the median round trip
   of sequential calls on a warm pool;
2. 100 MB echo: the same with 100 MB, as MB/s (array size / median round trip);
3. 100 calls sharing one 10 MB array: ``nbytes(a)`` called 100 times at once with the
   same array, until all have answered; Ray with ``ray.put`` once and the ref passed
   (the figure the target names), and by value too;
4. the client's memory: the peak growth of this process's RSS (sampled every 2 ms)
   over each of the rows above, against the size of the objects made (one echo result;
   nothing for row 3). Over the lane, large frames travel in memfds: an argument's is
   shared memory outside the client's RSS (freed once the worker and agent are done
   with it), and a result's pages count only once read.

aviato runs its embedded cluster on Docker with an image holding numpy, built here
offline (``aviato-bench-numpy:3.11``: ``python:3.11`` plus this host's numpy, copied
in with ``docker cp`` and ``docker commit``; the host's Python must be 3.11 as the
image's); "aviato-zmq" turns the local lane off (ZeroMQ over TCP, as from another
host); "aviato-copy" is the lane with shared memory off (``AVIATO_LANE_SHM=0``, on a
cluster of its own): every frame through the sockets, to show what the memfds buy.
Ray: ``ray.init(num_cpus=2)``, ``@ray.remote`` tasks. ProcessPoolExecutor(2).
Prints a table per row with each target's verdict, then the same in markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import statistics
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import psutil
from rich.markup import escape
from rich.table import Table

from benchmarks._common import add_markdown_option, write_markdown
from benchmarks._fn_common import TIMEOUT, console, missing
from benchmarks._ray import ray_started
from benchmarks.functions import (
    our_containers,
    ray_or_dask_processes,
    stop_aviato_checked,
    sweep,
)

IMAGE = "aviato-bench-numpy:3.11"
SYSTEMS = ("aviato", "aviato-zmq", "aviato-copy", "ray", "ppe")
LABELS = {
    "aviato": "aviato (local lane)",
    "aviato-zmq": "aviato (ZeroMQ)",
    "aviato-copy": "aviato (lane, no shared memory)",
    "ray": "Ray",
    "ppe": "ProcessPoolExecutor",
}
MB = 1_000_000
SHARED_CALLS = 100


def echo(a: Any) -> Any:
    return a


def nbytes(a: Any) -> int:
    return int(a.nbytes)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Plan:
    echo10_n: int
    echo100_n: int
    shared_reps: int


FULL = Plan(echo10_n=30, echo100_n=7, shared_reps=5)
QUICK = Plan(echo10_n=8, echo100_n=3, shared_reps=2)


@dataclass
class Result:
    system: str
    echo10: list[float] = field(default_factory=list)
    echo100: list[float] = field(default_factory=list)
    shared: list[float] = field(default_factory=list)
    shared_value: list[float] = field(default_factory=list)  # Ray by value
    growth: dict[str, float] = field(default_factory=dict)  # row -> peak RSS growth, MB
    error: str = ""
    skipped: str = ""

    @property
    def label(self) -> str:
        return LABELS[self.system]


# ---------------------------------------------------------------------- the numpy image


def docker_ping() -> None:
    import docker

    client = docker.from_env()
    try:
        client.ping()
    finally:
        client.close()


def ensure_image() -> None:
    """``IMAGE``: python:3.11 plus this host's numpy (no registry, no PyPI)."""
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    import numpy

    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"the image's Python is 3.11; this one is {sys.version.split()[0]}")
    site = Path(numpy.__file__).resolve().parent.parent
    parts = [site / "numpy", *([site / "numpy.libs"] if (site / "numpy.libs").exists() else [])]
    target = "/usr/local/lib/python3.11/dist-packages/"
    cid = subprocess.run(
        ["docker", "create", "python:3.11", "true"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        for part in parts:
            subprocess.run(["docker", "cp", str(part), cid + ":" + target], check=True)
        subprocess.run(["docker", "commit", cid, IMAGE], capture_output=True, check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)
    check = subprocess.run(
        ["docker", "run", "--rm", IMAGE, "python", "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(f"the numpy image does not import numpy: {check.stderr.strip()}")
    console.print(f"[dim]built {IMAGE} (numpy {check.stdout.strip()})[/]")


# ---------------------------------------------------------------------- measuring


class PeakRss:
    """The peak growth of this process's RSS while the block runs (MB)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.growth = 0.0

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        gc.collect()
        base = self.proc.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], self.proc.memory_info().rss)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            peak[0] = max(peak[0], self.proc.memory_info().rss)
            self.growth = (peak[0] - base) / MB


def arrays() -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(7)
    return rng.random(10 * MB // 8), rng.random(100 * MB // 8)


def check_echo(sent: Any, got: Any) -> None:
    import numpy as np

    if not (got.dtype == sent.dtype and got.shape == sent.shape and np.array_equal(got, sent)):
        raise AssertionError("an echo came back different")


Echo = Callable[[Any], Any]


def measure_sync(res: Result, plan: Plan, call: Echo, shared: Callable[[Any], None]) -> None:
    """The rows for a blocking peer: ``call(a)`` echoes, ``shared(a)`` runs row 3."""
    small, big = arrays()
    for _ in range(3):
        check_echo(small, call(small))
    check_echo(big, call(big))
    rss = PeakRss()
    with rss.watch():
        for _ in range(plan.echo10_n):
            t0 = time.perf_counter()
            out = call(small)
            res.echo10.append(time.perf_counter() - t0)
            del out
    res.growth["echo10"] = rss.growth
    with rss.watch():
        for _ in range(plan.echo100_n):
            t0 = time.perf_counter()
            out = call(big)
            res.echo100.append(time.perf_counter() - t0)
            del out
    res.growth["echo100"] = rss.growth
    shared(small)  # warm
    with rss.watch():
        for _ in range(plan.shared_reps):
            t0 = time.perf_counter()
            shared(small)
            res.shared.append(time.perf_counter() - t0)
    res.growth["shared"] = rss.growth


def run_ray(res: Result, plan: Plan) -> None:
    with ray_started() as ray:
        recho = ray.remote(echo)
        rnbytes = ray.remote(nbytes)

        def call(a: Any) -> Any:
            return ray.get(recho.remote(a), timeout=TIMEOUT)

        def shared(a: Any) -> None:
            ref = ray.put(a)
            out = ray.get([rnbytes.remote(ref) for _ in range(SHARED_CALLS)], timeout=TIMEOUT)
            assert out == [a.nbytes] * SHARED_CALLS

        measure_sync(res, plan, call, shared)
        small, _ = arrays()
        for _ in range(plan.shared_reps):
            t0 = time.perf_counter()
            ray.get([rnbytes.remote(small) for _ in range(SHARED_CALLS)], timeout=TIMEOUT)
            res.shared_value.append(time.perf_counter() - t0)


def run_ppe(res: Result, plan: Plan) -> None:
    with ProcessPoolExecutor(2) as ex:

        def call(a: Any) -> Any:
            return ex.submit(echo, a).result(timeout=TIMEOUT)

        def shared(a: Any) -> None:
            futures = [ex.submit(nbytes, a) for _ in range(SHARED_CALLS)]
            assert [f.result(timeout=TIMEOUT) for f in futures] == [a.nbytes] * SHARED_CALLS

        measure_sync(res, plan, call, shared)


async def bench_aviato(res: Result, plan: Plan, lane: bool) -> None:
    from aviato import Sandbox, SandboxDefaults

    small, big = arrays()
    async with (
        asyncio.timeout(TIMEOUT),
        Sandbox.session(SandboxDefaults(container_image=IMAGE, local_lane=lane)) as session,
    ):
        fecho = session.function(max_workers=2)(echo)
        fnbytes = session.function(max_workers=2)(nbytes)
        for _ in range(3):
            check_echo(small, (await fecho(small)).value)
        check_echo(big, (await fecho(big)).value)

        async def shared() -> None:
            out = await asyncio.gather(*(fnbytes(small) for _ in range(SHARED_CALLS)))
            assert [r.value for r in out] == [small.nbytes] * SHARED_CALLS

        await shared()  # warm: both workers, and the function's speed is known
        await shared()
        rss = PeakRss()
        with rss.watch():
            for _ in range(plan.echo10_n):
                t0 = time.perf_counter()
                out = await fecho(small)
                res.echo10.append(time.perf_counter() - t0)
                del out
        res.growth["echo10"] = rss.growth
        with rss.watch():
            for _ in range(plan.echo100_n):
                t0 = time.perf_counter()
                out = await fecho(big)
                res.echo100.append(time.perf_counter() - t0)
                del out
        res.growth["echo100"] = rss.growth
        with rss.watch():
            for _ in range(plan.shared_reps):
                t0 = time.perf_counter()
                await shared()
                res.shared.append(time.perf_counter() - t0)
        res.growth["shared"] = rss.growth


# ---------------------------------------------------------------------- report


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Row:
    what: str
    unit: str
    values: dict[str, float]
    target: str
    verdict: str


def rows(results: list[Result]) -> list[Row]:
    by = {r.system: r for r in results if not r.error and not r.skipped}
    ours = by.get("aviato")
    ray = by.get("ray")
    out: list[Row] = []

    def verdict(ok: bool | None, why: str = "") -> str:
        if ok is None:
            return f"not measured{': ' + why if why else ''}"
        return "met" if ok else "NOT met"

    vals = {s: med(r.echo10) * 1000 for s, r in by.items()}
    ok = None if ours is None or ray is None else vals["aviato"] <= vals["ray"]
    out.append(Row("10 MB numpy echo, p50 round trip", "ms", vals, "≤ Ray's", verdict(ok)))
    vals = {s: 100 / med(r.echo100) for s, r in by.items()}
    ok = None if ours is None or ray is None else vals["aviato"] >= vals["ray"]
    out.append(Row("100 MB numpy echo throughput", "MB/s", vals, "≥ Ray's", verdict(ok)))
    vals = {s: med(r.shared) for s, r in by.items()}
    if ray is not None:
        vals["ray (by value, no put)"] = med(ray.shared_value)
    ok = None if ours is None or ray is None else vals["aviato"] <= 1.5 * vals["ray"]
    out.append(
        Row(
            f"{SHARED_CALLS} calls sharing one 10 MB array (Ray: ray.put once)",
            "s",
            vals,
            "≤ 1.5x Ray's ray.put time",
            verdict(ok),
        )
    )
    for key, size, name in (
        ("echo10", 10, "10 MB echo"),
        ("echo100", 100, "100 MB echo"),
        ("shared", 0, f"{SHARED_CALLS} shared calls"),
    ):
        vals = {s: r.growth.get(key, float("nan")) for s, r in by.items()}
        # One copy of each object made (the echo's result), and 10% + 8 MB for the rest.
        allowed = size * 1.1 + 8
        ok = None if ours is None else vals["aviato"] <= allowed
        out.append(
            Row(
                f"client peak RSS growth, {name}",
                "MB",
                vals,
                f"≤ {allowed:.0f} MB (one copy of the result)",
                verdict(ok),
            )
        )
    return out


def fmt(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def print_report(results: list[Result]) -> str:
    table_rows = rows(results)
    systems = sorted(
        {s for row in table_rows for s in row.values},
        key=lambda s: (list(LABELS).index(s) if s in LABELS else 99, s),
    )
    table = Table(title="Big data through remote functions (median of runs)")
    table.add_column("row")
    table.add_column("unit")
    for s in systems:
        table.add_column(LABELS.get(s, s), justify="right")
    table.add_column("target")
    table.add_column("verdict")
    for row in table_rows:
        cells = [fmt(row.values.get(s, float("nan"))) for s in systems]
        color = "green" if row.verdict == "met" else "red"
        table.add_row(row.what, row.unit, *cells, row.target, f"[{color}]{escape(row.verdict)}[/]")
    console.print(table)
    console.print("\n[bold]Markdown[/]\n")
    head = ["row", "unit", *(LABELS.get(s, s) for s in systems), "target", "verdict"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows:
        cells = [fmt(row.values.get(s, float("nan"))) for s in systems]
        md.append("| " + " | ".join([row.what, row.unit, *cells, row.target, row.verdict]) + " |")
    for r in results:
        if r.skipped:
            md.append(f"- {r.label} skipped: {r.skipped}")
        if r.error:
            md.append(f"- {r.label} failed: {r.error}")
    print("\n".join(md))
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------- main


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_one(system: str, plan: Plan) -> Result:
    res = Result(system)
    if system == "ray" and missing("ray"):
        res.skipped = "ray is not installed (pip install -e '.[bench]')"
        return res
    t0 = time.perf_counter()
    try:
        with console.status(res.label):
            if system.startswith("aviato"):
                asyncio.run(bench_aviato(res, plan, lane=system != "aviato-zmq"))
            elif system == "ray":
                run_ray(res, plan)
            else:
                run_ppe(res, plan)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{res.label} failed: {escape(res.error)}[/]")
        traceback.print_exc()
    console.print(f"[dim]{res.label}: {time.perf_counter() - t0:.0f} s[/]")
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems")
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(only) - set(SYSTEMS):
        parser.error(f"--only: unknown system(s) {sorted(set(only) - set(SYSTEMS))}")
    os.environ.pop("AVIATO_SCHEDULER", None)
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        docker_ping()
    except Exception as exc:
        console.print(f"[red]Docker is not reachable: {escape(str(exc))}[/]")
        return 2
    ensure_image()
    load = os.getloadavg()
    console.print(f"[dim]{os.cpu_count()} cores, load {load[0]:.2f}/{load[1]:.2f}, {plan}[/]")
    results: list[Result] = []
    notes: list[str] = []
    started = False
    try:
        # ProcessPoolExecutor first: it forks a client with nothing else loaded.
        for system in ("ppe", "aviato", "aviato-zmq", "aviato-copy", "ray"):
            if system not in only:
                continue
            if started and (system == "aviato-copy" or not system.startswith("aviato")):
                notes += stop_aviato_checked()  # a cluster of its own, or none
                started = False
            if system == "aviato-copy":
                os.environ["AVIATO_LANE_SHM"] = "0"  # the cluster it starts inherits it
            try:
                results.append(run_one(system, plan))
            finally:
                os.environ.pop("AVIATO_LANE_SHM", None)
            started = started or system.startswith("aviato")
        if started:
            notes += stop_aviato_checked()
    except KeyboardInterrupt:
        console.print("[red]interrupted: cleaning up[/]")
        sweep()
        return 130
    notes += sweep()
    markdown = print_report(results)
    for note in notes:
        print(f"- {note}")
    if args.markdown:
        write_markdown(args.markdown, markdown + "".join(f"- {note}\n" for note in notes))
    try:
        ours: list[str] | str = our_containers() or "none"
    except Exception as exc:
        ours = f"cannot tell ({exc})"
    console.print(
        f"\n[dim]cleanup: aviato containers still present: {ours}; "
        f"ray processes: {ray_or_dask_processes() or 'none'}[/]"
    )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
