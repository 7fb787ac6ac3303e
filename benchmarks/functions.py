#!/usr/bin/env python
"""aviato's remote functions against Ray tasks, Dask distributed and ProcessPoolExecutor.

    python benchmarks/functions.py [--quick] [--only aviato,aviato-uvloop,aviato-zmq,ray,dask,ppe]
        [--markdown FILE]
    python -m benchmarks.functions ...  (the same, from the repo root)

One run, one machine, each system alone in turn (the previous one shut down first):

1. no-op throughput: submit 10,000 calls of ``noop(i) -> i`` at once, then gather them
   (calls/s; the median of a few repetitions), on a warm pool of 2 workers;
2. sequential round trip of one no-op call on that warm pool (p50/p99 of 1,000 awaits);
3. throughput of a function that sleeps 10 ms with the pool at 2, 4 and 8 workers
   (ideal: k / 10 ms), with the distinct workers that ran the timed calls counted;
4. start time and memory: aviato's embedded cluster (scheduler + agent), ``ray.init``
   and Dask's ``LocalCluster``, as RSS summed over their processes after a short settle
   ("idle"), and again with the 2-worker pool warm ("warm"; for aviato that adds the
   worker processes inside the 2 containers and their containerd shims).

aviato runs with the example's defaults: the embedded cluster (``$AVIATO_SCHEDULER`` is
ignored), ``SandboxDefaults(container_image="python:3.11")`` and ``@session.function(
max_workers=k)``; every call runs in a worker process inside a Docker container. It is
measured on asyncio's default loop (as ``asyncio.run`` gives) and again on uvloop; the
client reaches the agent over its local lane (a Unix socket: the client is on the
agent's host). "aviato-zmq" turns the lane off (``local_lane=False``): ZeroMQ over TCP,
as a client on another host talks to an agent.
Ray uses ``ray.init(num_cpus=2)`` and ``@ray.remote`` tasks (fractional ``num_cpus=2/k``
for k sleeping workers); Dask ``LocalCluster(n_workers=2, threads_per_worker=1,
processes=True)``, ``client.map``/``client.submit`` (scaled to k workers for the sleep
test); ``ProcessPoolExecutor(2)`` (``k`` for the sleep test) with ``submit``. A peer whose
package is missing is skipped with a note. Everything started is shut down at the end
(Ctrl-C and SIGTERM included), and the run checks that no container or child process is
left. Prints rich tables, then a markdown table with aviato's ratio to each peer and the
targets' verdicts (``--markdown FILE`` writes it to FILE too). The table's header names
each system's version as the run imported it (``ray.__version__``, ...). aviato's start
is given twice: the scheduler and agent alone, and with its two worker containers up (the
peers' starts include their workers).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a script: import this checkout (aviato, and the agent and scheduler packages
    # the embedded cluster runs) rather than the script's directory.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import signal
import time
import traceback
from collections.abc import Iterable
from typing import Any

import psutil
from rich.markup import escape

from benchmarks import _plots as plots
from benchmarks._common import add_markdown_option, daemon_module, write_markdown
from benchmarks._fn_common import (
    FULL,
    IMAGE,
    QUICK,
    SETTLE_SECONDS,
    SLEEP_WORKERS,
    TIMEOUT,
    Plan,
    Result,
    SleepRun,
    console,
    descendants,
    is_resource_tracker,
    memory_of,
    missing,
    noop,
    sleep10,
    wait_no_children,
)
from benchmarks._fn_peers import run_dask, run_ppe, run_ray
from benchmarks._fn_report import markdown, print_tables, verdicts

SYSTEMS = ("aviato", "aviato-uvloop", "aviato-zmq", "ray", "dask", "ppe")
#: ProcessPoolExecutor first, so that it forks a small client (no Ray or Dask imported);
#: aviato's two loops next to each other, as they share one embedded cluster.
RUN_ORDER = ("ppe", "aviato", "aviato-uvloop", "aviato-zmq", "ray", "dask")


# ---------------------------------------------------------------------- aviato


def aviato_daemons() -> list[psutil.Process]:
    """The embedded cluster's scheduler and agent (children of this process)."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if daemon_module(child.cmdline()) in ("scheduler", "agent"):
                found.append(child)
    return found


def container_procs(sandbox_ids: Iterable[str]) -> list[psutil.Process]:
    """Host processes of aviato's worker containers, with each container's shim (none
    for a sandbox that is not a Docker container)."""
    import docker

    client = docker.from_env()
    procs: list[psutil.Process] = []
    try:
        for sid in sandbox_ids:
            try:
                top = client.containers.get(f"aviato-{sid}").top()
            except docker.errors.DockerException as exc:
                console.print(f"[yellow]no container for {sid}: {escape(str(exc))}[/]")
                continue
            col = top["Titles"].index("PID")
            for row in top["Processes"]:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(int(row[col]))
                    procs.append(proc)
                    parent = proc.parent()
                    if parent is not None and parent.name().startswith("containerd-shim"):
                        procs.append(parent)
    finally:
        client.close()
    return procs


async def bench_aviato(res: Result, plan: Plan, measure_start: bool, lane: bool = True) -> None:
    import aviato
    from aviato import Sandbox, SandboxDefaults, _local

    res.version = f"aviato {aviato.__version__}, Python {platform.python_version()}"
    if measure_start:
        t_start = time.perf_counter()
        await _local.ensure_cluster()
        res.start_s = time.perf_counter() - t_start
        res.start_note = "embedded scheduler + agent"
        await asyncio.sleep(SETTLE_SECONDS)
        res.idle = memory_of(aviato_daemons())
    else:
        res.start_note = "cluster already up"
    t_session = time.perf_counter()
    async with (
        asyncio.timeout(TIMEOUT),
        Sandbox.session(SandboxDefaults(container_image=IMAGE, local_lane=lane)) as session,
    ):
        fn = session.function(max_workers=2)(noop)

        # Warm from cold with a small gather: it starts both workers (a single first call
        # would start one, and tiny calls never make the backlog that grows the pool).
        t0 = time.perf_counter()
        await asyncio.gather(*(fn(i) for i in range(plan.warm_calls)))
        res.first_s = time.perf_counter() - t0
        if res.start_s is not None and measure_start:
            # Like with like: Ray's, Dask's and ProcessPoolExecutor's start include their
            # workers. This adds the session and the first gather (both workers started),
            # not the settle before "idle" memory.
            res.start_with_workers_s = res.start_s + (time.perf_counter() - t_session)
        await asyncio.gather(*(fn(i) for i in range(plan.warm_calls)))
        pool_ids: set[str] = set()

        for _ in range(plan.noop_reps):
            gc.collect()
            t0 = time.perf_counter()
            out = await asyncio.gather(*(fn(i) for i in range(plan.noop_calls)))
            res.noop_rates.append(plan.noop_calls / (time.perf_counter() - t0))
            assert out[-1].value == plan.noop_calls - 1
            pool_ids = {r.sandbox_id for r in out}
            res.noop_workers = len(pool_ids)
            del out

        gc.collect()
        for i in range(plan.seq_n):
            t0 = time.perf_counter()
            await fn(i)
            res.seq.append(time.perf_counter() - t0)

        if measure_start:
            res.warm = memory_of([*aviato_daemons(), *container_procs(pool_ids)])
            res.memory_note = (
                "scheduler + agent; warm adds the worker containers' processes and shims"
            )

        for k in SLEEP_WORKERS:
            # Same pool (same image and env): max_workers=k raises its bound to k.
            sleeper = session.function(max_workers=k)(sleep10)

            async def run(n: int, sleeper: Any = sleeper) -> list[str]:
                out = await asyncio.gather(*(sleeper(i) for i in range(n)))
                return [r.sandbox_id for r in out]

            for _ in range(15):
                if len(set(await run(max(40 * k, 100)))) >= k:
                    break
            else:
                console.print(f"[yellow]aviato: fewer than {k} workers answered while warming[/]")
            n = plan.sleep_calls(k)
            t0 = time.perf_counter()
            ids = await run(n)
            res.sleep[k] = SleepRun(n, time.perf_counter() - t0, len(set(ids)))


def run_aviato(res: Result, plan: Plan, loop: str, measure_start: bool, lane: bool = True) -> None:
    coro = bench_aviato(res, plan, measure_start, lane)
    if loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


def stop_aviato() -> None:
    from aviato import _local

    _local.shutdown()  # the agent stops its sandboxes as it exits


def stop_aviato_checked() -> list[str]:
    """Stop the embedded cluster; then check that it took its containers with it."""
    with console.status("stopping aviato's embedded cluster"):
        t0 = time.perf_counter()
        stop_aviato()
        took = time.perf_counter() - t0
        try:
            left = our_containers()
        except Exception as exc:
            return [f"cannot list containers after the embedded cluster stopped: {exc}"]
    console.print(f"[dim]embedded cluster stopped in {took:.2f} s[/]")
    if not left:
        return []
    states = []
    with contextlib.suppress(Exception):
        import docker

        client = docker.from_env()
        states = sorted({client.containers.get(n).status for n in left})
        client.close()
    remove_containers(left)
    note = (
        f"aviato bug: the embedded cluster stopped (after the session closed) leaving "
        f"{len(left)} of its worker containers ({'/'.join(states) or '?'}); this run removed "
        "them"
    )
    console.print(f"[yellow]{escape(note)}[/]")
    return [note]


# ---------------------------------------------------------------------- leftovers


def our_containers() -> list[str]:
    """Containers of the embedded cluster this process ran (by its agent label)."""
    import docker

    from agent.runtime.base import LABEL_AGENT

    client = docker.from_env()
    try:
        found = client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}=embedded-{os.getpid()}"}
        )
        return [c.name for c in found]
    finally:
        client.close()


def remove_containers(names: list[str]) -> None:
    import docker

    client = docker.from_env()
    try:
        for name in names:
            with contextlib.suppress(Exception):
                client.containers.get(name).remove(force=True)
    finally:
        client.close()


def all_containers() -> set[str]:
    import docker

    client = docker.from_env()
    try:
        return {c.name for c in client.containers.list(all=True)}
    finally:
        client.close()


def sweep() -> list[str]:
    """Stop whatever is left; say what was."""
    notes: list[str] = []
    with contextlib.suppress(Exception):
        stop_aviato()
    if "ray" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["ray"].shutdown()
    try:
        left = our_containers()
    except Exception as exc:
        notes.append(f"cannot list containers: {exc}")
        left = []
    if left:
        remove_containers(left)
        notes.append(f"removed {len(left)} leftover aviato container(s): {', '.join(left)}")
    alive = wait_no_children(15.0)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            notes.append(f"killed leftover child {proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()
    return notes


def ray_or_dask_processes() -> list[str]:
    """Ray or Dask processes anywhere on the host (there should be none after a run)."""
    names = ("raylet", "gcs_server", "ray::")
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        name = proc.info["name"] or ""
        cmd = " ".join(proc.info["cmdline"] or [])
        if name.startswith(names) or "distributed.cli" in cmd or "dask-worker" in cmd:
            found.append(f"{proc.info['pid']} {name}")
    return found


# ---------------------------------------------------------------------- main


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_one(system: str, plan: Plan, results: list[Result], started: bool) -> bool:
    """Run one system's benchmarks into ``results``; whether aviato's cluster is up."""
    res = Result(system, noop_calls=plan.noop_calls)
    results.append(res)
    module = {"ray": "ray", "dask": "distributed"}.get(system)
    if module is not None and missing(module):
        res.skipped = f"{module} is not installed (pip install -e '.[bench]')"
        console.print(f"[yellow]{res.label}: skipped: {escape(res.skipped)}[/]")
        return started
    t0 = time.perf_counter()
    try:
        with console.status(f"{res.label}"):
            if system.startswith("aviato"):
                loop = "uvloop" if system == "aviato-uvloop" else "asyncio"
                lane = system != "aviato-zmq"
                run_aviato(res, plan, loop, measure_start=not started, lane=lane)
            else:
                {"ray": run_ray, "dask": run_dask, "ppe": run_ppe}[system](res, plan)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        console.print(f"[red]{res.label} failed: {escape(res.error)}[/]")
        traceback.print_exc()
    console.print(f"[dim]{res.label}: {time.perf_counter() - t0:.0f} s[/]")
    return started or system.startswith("aviato")


def report_markdown(
    results: list[Result], base: Result | None, notes: list[str], plan: Plan
) -> str:
    """The markdown table, the targets' verdicts and the run's notes (for the README)."""
    lines = [
        f"{os.cpu_count()} cores, plan {'quick' if plan == QUICK else 'full'}.",
        "",
        markdown(results, base),
        "",
        "Issue's reference figures: Ray 2.60 tasks about 1,500/s with 1.8 ms; Dask about 570/s "
        "with 10 ms; ProcessPoolExecutor(2) about 11,000/s with 0.21 ms. Targets: aviato "
        "throughput >= 10x Ray's and >= ProcessPoolExecutor's; sequential round trip p50 "
        "< 0.5 ms. aviato's functions run in worker processes inside Docker containers; "
        "ratios are aviato (asyncio loop) / peer.",
        "",
        *verdicts(results, base),
        *(f"- {note}" for note in notes),
    ]
    for r in results:
        if r.skipped:
            lines.append(f"- {r.label} skipped: {r.skipped}")
        if r.error:
            lines.append(f"- {r.label} failed: {r.error}")
    return "\n".join(lines) + "\n"


def write_plots(results: list[Result], markdown: Path, note: str) -> None:
    """Throughput against the peers, the round trip's distribution, and throughput
    against workers, from this run's figures, beside its table."""
    ran = [r for r in results if not r.error and not r.skipped]
    plots.bars(
        plots.beside(markdown, "throughput"),
        {r.label: r.noop_rate for r in ran},
        "no-op calls per second (median of runs)",
        "calls / s",
        note,
    )
    plots.latency_cdf(
        plots.beside(markdown, "latency"),
        {r.label: r.seq for r in ran},
        "one call's round trip, sequential calls",
        note,
    )
    plots.lines(
        plots.beside(markdown, "workers"),
        {r.label: [(k, run.rate) for k, run in r.sleep.items()] for r in ran},
        "throughput against workers (sleep calls)",
        "workers",
        "calls / s",
        note,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument(
        "--only", default=",".join(SYSTEMS), help=f"comma-separated subset of: {','.join(SYSTEMS)}"
    )
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SYSTEMS)
    if unknown:
        parser.error(f"--only: unknown system(s) {sorted(unknown)}")
    if os.environ.pop("AVIATO_SCHEDULER", None):
        console.print("[yellow]ignoring $AVIATO_SCHEDULER: this measures the embedded cluster[/]")
    plan = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _on_sigterm)

    load = os.getloadavg()
    try:
        before = all_containers()
    except Exception as exc:
        console.print(f"[red]Docker is not reachable: {escape(str(exc))}[/]")
        return 2
    console.print(
        f"[dim]{os.cpu_count()} cores, load {load[0]:.2f}/{load[1]:.2f}, "
        f"{len(before)} container(s) already present (not ours), plan {plan}[/]"
    )
    results: list[Result] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    started = False
    try:
        for system in RUN_ORDER:
            if system not in only:
                continue
            if started and not system.startswith("aviato"):
                notes += stop_aviato_checked()
                started = False
            started = run_one(system, plan, results, started)
        if started:
            notes += stop_aviato_checked()
    except KeyboardInterrupt:
        console.print("[red]interrupted: cleaning up[/]")
        with console.status("cleaning up"):
            for note in sweep():
                console.print(f"[yellow]{escape(note)}[/]")
        return 130
    with console.status("cleaning up"):
        notes += sweep()
    results.sort(key=lambda r: SYSTEMS.index(r.system))
    base = next(
        (r for r in results if r.system == "aviato" and not r.error and not r.skipped), None
    )
    print_tables(results, base)
    console.print("\n[bold]Markdown[/]\n")
    text = report_markdown(results, base, notes, plan)
    print(text)
    if args.markdown is not None:
        write_markdown(args.markdown, text)
        write_plots(results, args.markdown, f"{os.cpu_count()} cores, load {load[0]:.1f}")
    try:
        ours: list[str] | str = our_containers() or "none"
    except Exception as exc:
        ours = f"cannot tell ({exc})"
    leftovers = ray_or_dask_processes()
    kids = [p.pid for p in descendants() if not is_resource_tracker(p)]
    console.print(
        f"\n[dim]cleanup: aviato containers from "
        f"this run still present: {ours}; ray/dask processes: {leftovers or 'none'}; "
        f"child processes: {kids or 'none'}; total {time.perf_counter() - t0:.0f} s[/]"
    )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
