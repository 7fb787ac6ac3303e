#!/usr/bin/env python
"""State that outlives idleness, timed (issue 13): snapshot, create from a snapshot,
pause and resume, against a plain create, on Docker and on the local runtime in one run.

    python benchmarks/lifecycle.py [--quick] [--only docker,local] [--markdown FILE]

Per runtime, on a scheduler and an agent of its own on loopback (no spares), N samples
each, sequential:

1. plain create → first exec: ``create(sleep infinity)``, ``start()``, ``exec(true)``
   returns (the baseline every other row is compared with);
2. snapshot: ``sb.snapshot()`` of a sandbox that wrote 4 MiB into ``/tmp`` (Docker:
   ``docker commit``; local: its ``/tmp`` archived, frozen while copied);
3. create from snapshot → first exec: as 1, with ``container_image=`` a snapshot of 2
   (that the files are there is checked once, untimed);
4. pause, 5. resume: the client's call, through the scheduler to the agent and back;
6. resume → exec: ``resume()`` then ``exec(true)`` returns (what a user waits for);
7. exec on a running sandbox: the same ``exec(true)``, for 6 to be read against.

Issue 13 names these figures but sets no target for them, so the verdict states the
comparison: each row's p50 against row 1's. Every sandbox, snapshot (image or archive)
and daemon the run makes is removed at the end, and the end checks that none is left.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from aviato import Sandbox, SandboxDefaults
from aviato._lifecycle import list_snapshots, remove_snapshot
from aviato.exceptions import SandboxError, SandboxNotFoundError
from benchmarks._cleanup import Cleanup
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
from benchmarks._stats import Stats, latency_table, ms, ratio

PAYLOAD = 4 << 20  # bytes written before the snapshots: a little installed state
#: How long a snapshot still in use by a stopping clone may refuse removal.
REMOVE_SECONDS = 60.0

PLAIN = "plain create → first exec"
SNAPSHOT = "snapshot (4 MiB written)"
FROM_SNAPSHOT = "create from snapshot → first exec"
PAUSE = "pause"
RESUME = "resume"
RESUME_EXEC = "resume → exec"
WARM_EXEC = "exec, running sandbox"
ROWS = [PLAIN, SNAPSHOT, FROM_SNAPSHOT, PAUSE, RESUME, RESUME_EXEC, WARM_EXEC]


@dataclass
class RuntimeRun:
    runtime: str
    rows: dict[str, Stats]
    snapshot_bytes: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _first_exec(sb: Sandbox) -> None:
    await sb.start()
    out = await sb.exec(["true"])
    if out.returncode != 0:
        raise RuntimeError(f"exec(true) in {sb.sandbox_id} exited {out.returncode}")


async def _measure(defaults: SandboxDefaults, run: RuntimeRun, n: int) -> list[str]:
    """The samples into ``run.rows``; the snapshots taken (for the caller to remove)."""
    rows = run.rows
    images: list[str] = []
    async with Sandbox.session(defaults) as session:
        # The image's first start (page cache) is not timed.
        warm = session.create(command="sleep", args=["infinity"])
        await _first_exec(warm)
        await warm.stop()
        for _ in range(n):
            sb = session.create(command="sleep", args=["infinity"])
            t0 = time.perf_counter()
            await _first_exec(sb)
            rows[PLAIN].add(time.perf_counter() - t0)
            await sb.stop()

        source = session.create(command="sleep", args=["infinity"])
        await _first_exec(source)
        payload = os.urandom(PAYLOAD)
        await source.write_file("/tmp/state/data.bin", payload)
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                images.append(await source.snapshot())
                rows[SNAPSHOT].add(time.perf_counter() - t0)
            for i, image in enumerate(images):
                clone = session.create(command="sleep", args=["infinity"], container_image=image)
                t0 = time.perf_counter()
                await _first_exec(clone)
                rows[FROM_SNAPSHOT].add(time.perf_counter() - t0)
                if i == 0 and await clone.read_file("/tmp/state/data.bin") != payload:
                    raise RuntimeError(f"a sandbox made from {image} lacks the snapshot's file")
                await clone.stop()

            for _ in range(n):
                t0 = time.perf_counter()
                await source.exec(["true"])
                rows[WARM_EXEC].add(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await source.pause()
                rows[PAUSE].add(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await source.resume()
                t1 = time.perf_counter()
                await source.exec(["true"])
                t2 = time.perf_counter()
                rows[RESUME].add(t1 - t0)
                rows[RESUME_EXEC].add(t2 - t0)
            await source.stop()
        finally:
            run.snapshot_bytes = max(
                (s.size_bytes for s in await list_snapshots(defaults) if s.image in images),
                default=0,
            )
    return images


async def _remove_snapshots(defaults: SandboxDefaults, images: list[str]) -> None:
    """Each snapshot removed (a clone still being stopped may hold it a moment)."""
    for image in images:
        deadline = time.monotonic() + REMOVE_SECONDS
        while True:
            try:
                await remove_snapshot(image, defaults)
                break
            except SandboxNotFoundError:
                break
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def _left(defaults: SandboxDefaults, agent_id: str) -> list[str]:
    return [s.image for s in await list_snapshots(defaults) if s.agent_id == agent_id]


def measure_runtime(runtime: str, n: int, tmp: Path, cleanup: Cleanup) -> RuntimeRun:
    address = f"tcp://127.0.0.1:{_free_port()}"
    agent_id = f"bench-life-{runtime}-{RUN_ID}"
    cleanup.agent_ids.add(agent_id)
    state = tmp / f"{runtime}-state"
    sched = spawn_daemon(["-m", "scheduler", "--bind", address], tmp / f"{runtime}-s.log", ROOT)
    cleanup.procs.append(sched)
    agent_args = ["-m", "agent", "--scheduler", address, "--runtime", runtime]
    agent_args += ["--slots", "4", "--agent-id", agent_id, "--state-dir", str(state)]
    agent = spawn_daemon(agent_args, tmp / f"{runtime}-a.log", ROOT)
    cleanup.procs.append(agent)
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=address)
    run = RuntimeRun(runtime, {name: Stats(f"{runtime}: {name}") for name in ROWS})

    async def go() -> None:
        images: list[str] = []
        try:
            images = await _measure(defaults, run, n)
        finally:
            with contextlib.suppress(Exception):  # what _measure took before failing too
                images += await _left(defaults, agent_id)
            await _remove_snapshots(defaults, sorted(set(images)))
            left = await _left(defaults, agent_id)
            if left:
                raise RuntimeError(f"snapshots left behind: {left}")

    asyncio.run(go())
    _check_no_images(agent_id)
    return run


def _check_no_images(agent_id: str) -> None:
    """Docker: no image labelled as this run's agent's snapshot is left."""
    flt = f"label=aviato.snapshot.agent={agent_id}"
    with contextlib.suppress(OSError):

        def none_left() -> bool:
            out = subprocess.run(
                ["docker", "images", "-q", "--filter", flt], capture_output=True, text=True
            )
            return out.returncode != 0 or not out.stdout.split()

        wait_until(none_left, 30, f"the snapshot images of {agent_id} to be removed", 0.2)


def _compared(p50: float, base: float) -> str:
    if p50 < base * 0.9:
        return "faster"
    if p50 > base * 1.1:
        return "slower"
    return "the same, within 10%"


def verdicts(run: RuntimeRun) -> dict[str, str]:
    """Each row's comparison with the plain create (issue 13 sets no target)."""
    base = run.rows[PLAIN].p50
    out = {PLAIN: "baseline"}
    for name in (SNAPSHOT, FROM_SNAPSHOT, PAUSE, RESUME, RESUME_EXEC):
        p50 = run.rows[name].p50
        out[name] = f"{ratio(p50, base)} of plain create ({_compared(p50, base)})"
    warm = run.rows[WARM_EXEC].p50
    out[WARM_EXEC] = f"resume → exec is {ratio(run.rows[RESUME_EXEC].p50, warm)} of this"
    return out


def markdown(runs: list[RuntimeRun], load: tuple[float, float, float], n: int) -> str:
    lines = [
        f"Lifecycle latencies, n={n} per row (2 cores, load {load[0]:.2f} at start"
        " (other test runs on the machine); issue 13 sets no target: the verdict is"
        " each p50 against a plain create → first exec on the same runtime).",
        "",
        "| runtime | measure | n | p50 ms | p99 ms | verdict |",
        "|---|---|---:|---:|---:|---|",
    ]
    for run in runs:
        said = verdicts(run)
        for name in ROWS:
            s = run.rows[name]
            lines.append(
                f"| {run.runtime} | {name} | {len(s.samples)} | {ms(s.p50)} | {ms(s.p99)}"
                f" | {said[name]} |"
            )
    sizes = ", ".join(f"{r.runtime} {r.snapshot_bytes / 2**20:.1f} MiB" for r in runs)
    lines += ["", f"Snapshot size as listed: {sizes} (Docker's counts the base image's layers)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 samples per row, not 10")
    parser.add_argument("--only", default="docker,local", help="runtimes (comma-separated)")
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    runtimes = [x.strip() for x in args.only.split(",") if x.strip()]
    n = 3 if args.quick else 10
    load = os.getloadavg()
    console.print(f"[dim]{os.cpu_count()} cores, load {load[0]:.2f}/{load[1]:.2f}, n={n}[/]")
    cleanup = Cleanup()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="aviato-bench-life-") as d:
            for runtime in runtimes:
                runs.append(measure_runtime(runtime, n, Path(d), cleanup))
                for proc in cleanup.procs:  # this runtime's daemons end before the next
                    stop_process(proc)
                cleanup.procs.clear()
    finally:
        cleanup.sweep()
    for run in runs:
        rows = [run.rows[name] for name in ROWS]
        console.print(latency_table(f"Lifecycle, {run.runtime}", rows, run.rows[PLAIN]))
    text = markdown(runs, load, n)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
