#!/usr/bin/env python
"""What gVisor costs: the same sandboxes and calls under runc and under gVisor (runsc).

    python benchmarks/isolation.py [--quick] [--markdown FILE]

One run, image python:3.11 (never pulled). A Docker engine of this run's own carries
the runsc runtimes (tests/_gvisor_engine.py: own data root, socket and bridge; the
host's engine is not touched; needs root and ``runsc``), with python:3.11 copied in.
One scheduler and one agent (``--isolation runc,gvisor``) on loopback: each sample
asks for its isolation with ``SandboxDefaults(isolation=...)``, the two interleaved.

Rows:

1. create → first exec: ``Sandbox.create("sleep", "infinity")`` + ``exec(["true"])``,
   the median (each stop outside the timing, finished before the next sample);
2. exec p50: ``exec(["true"])`` on a warm sandbox (through its supervisor);
3. function round trip p50: one no-op call at a time, warm worker (``max_workers=1``);
4. function throughput: N no-op calls submitted at once, then gathered, on a warm pool
   of two workers (``max_workers=2``), calls/s.

Prints a table (runc, gvisor, gvisor/runc); ``--markdown FILE`` writes it to FILE too.
Everything it starts (engine, daemons, sandboxes) is gone at exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from rich.table import Table

from aviato import Sandbox, SandboxDefaults
from benchmarks._common import (
    IMAGE,
    ROOT,
    RUN_ID,
    add_markdown_option,
    console,
    spawn_daemon,
    stop_process,
    wait_until,
    write_markdown,
)
from tests._gvisor_engine import GvisorEngine, gvisor_problem

LEVELS = ("runc", "gvisor")


@dataclass(frozen=True)
class Sizes:
    creates: int
    execs: int
    calls: int
    burst: int


FULL = Sizes(creates=10, execs=200, calls=200, burst=2000)
QUICK = Sizes(creates=3, execs=40, calls=40, burst=300)


async def _interleaved(
    n: int, block: int, one: Callable[[str], Awaitable[float]]
) -> dict[str, list[float]]:
    """``n`` samples of ``one(level)`` per level, alternating in blocks."""
    out: dict[str, list[float]] = {level: [] for level in LEVELS}
    while len(out[LEVELS[-1]]) < n:
        for level in LEVELS:
            for _ in range(min(block, n - len(out[level]))):
                out[level].append(await one(level))
    return out


async def measure(defaults: SandboxDefaults, sizes: Sizes) -> dict[str, dict[str, float]]:
    by = {level: defaults.replace(isolation=level) for level in LEVELS}
    rows: dict[str, dict[str, float]] = {}

    async def create_then_exec(level: str) -> float:
        t0 = time.perf_counter()
        sb = await Sandbox.create("sleep", "infinity", defaults=by[level])
        await sb.exec(["true"], check=True)
        took = time.perf_counter() - t0
        assert sb.isolation == level, (sb.isolation, level)
        await sb.stop()
        return took

    await create_then_exec("runc")  # warm: the first create of a run pays imports
    samples = await _interleaved(sizes.creates, 1, create_then_exec)
    rows["create → first exec (median, ms)"] = {
        k: statistics.median(v) * 1000 for k, v in samples.items()
    }

    warm = {
        level: await Sandbox.create("sleep", "infinity", defaults=by[level]) for level in LEVELS
    }
    try:

        async def one_exec(level: str) -> float:
            t0 = time.perf_counter()
            await warm[level].exec(["true"], check=True)
            return time.perf_counter() - t0

        samples = await _interleaved(sizes.execs, 10, one_exec)
        rows["exec p50 (ms)"] = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    finally:
        for sb in warm.values():
            await sb.stop()

    for level in LEVELS:
        async with Sandbox.session(by[level]) as session:

            @session.function(max_workers=1)
            def noop(x: int) -> int:
                return x

            await noop(0)  # the worker is up
            trips = []
            for i in range(sizes.calls):
                t0 = time.perf_counter()
                await noop(i)
                trips.append(time.perf_counter() - t0)
            rows.setdefault("function round trip p50 (ms)", {})[level] = (
                statistics.median(trips) * 1000
            )

            @session.function(max_workers=2)
            def noop2(x: int) -> int:
                return x

            await asyncio.gather(noop2(0), noop2(1))  # both workers up
            t0 = time.perf_counter()
            await asyncio.gather(*(noop2(i) for i in range(sizes.burst)))
            rows.setdefault("function throughput (calls/s)", {})[level] = sizes.burst / (
                time.perf_counter() - t0
            )
    return rows


def render(rows: dict[str, dict[str, float]], sizes: Sizes) -> tuple[Table, str]:
    table = Table(title="runc vs gVisor (one agent, one engine, python:3.11)")
    for col in ("", "runc", "gvisor", "gvisor / runc"):
        table.add_column(col, justify="left" if not col else "right")
    md = [
        "| | runc | gvisor | gvisor / runc |",
        "|---|---:|---:|---:|",
    ]
    for name, values in rows.items():
        runc, gvisor = values["runc"], values["gvisor"]
        cells = (f"{runc:,.1f}", f"{gvisor:,.1f}", f"{gvisor / runc:.2f}x")
        table.add_row(name, *cells)
        md.append(f"| {name} | {' | '.join(cells)} |")
    md.append(
        f"\n{sizes.creates} creates, {sizes.execs} execs, {sizes.calls} sequential calls per"
        f" level; {sizes.burst} calls per throughput burst. runsc: Debian's package."
    )
    return table, "\n".join(md)


async def run(sizes: Sizes, markdown: Path | None) -> None:
    problem = gvisor_problem()
    if problem:
        raise SystemExit(f"isolation benchmark: {problem}")
    engine = GvisorEngine()
    tmp = Path(tempfile.mkdtemp(prefix="aviato-bench-iso-"))
    procs = []
    try:
        console.print("[dim]starting a Docker engine with the runsc runtimes...[/]")
        engine.start()
        ready = tmp / "scheduler.addr"
        procs.append(
            spawn_daemon(
                ["-m", "scheduler", "--bind", "tcp://127.0.0.1:0", "--ready-file", str(ready)],
                tmp / "scheduler.log",
                ROOT,
            )
        )
        wait_until(ready.exists, 30, "the scheduler to listen")
        address = ready.read_text().strip()
        procs.append(
            spawn_daemon(
                [
                    "-m", "agent", "--scheduler", address, "--slots", "8",
                    "--agent-id", f"bench-iso-{RUN_ID}", "--runtime", "docker",
                    "--isolation", "runc,gvisor",
                ],
                tmp / "agent.log",
                ROOT,
                extra_env={"DOCKER_HOST": engine.host, "AVIATO_STATE_DIR": str(tmp / "state")},
            )
        )  # fmt: skip
        defaults = SandboxDefaults(container_image=IMAGE, scheduler=address)
        rows = await measure(defaults, sizes)
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        engine.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    table, md = render(rows, sizes)
    console.print(table)
    console.print(md)
    if markdown is not None:
        write_markdown(markdown, md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    add_markdown_option(parser)
    args = parser.parse_args()
    asyncio.run(run(QUICK if args.quick else FULL, args.markdown))


if __name__ == "__main__":
    main()
