#!/usr/bin/env python
"""Soak: continuous remote-function calls on a real cluster while chaos kills its parts.

    python benchmarks/soak.py [--minutes 3] [--interval 20] [--seed N] [--markdown FILE]
    python -m benchmarks.soak ...  (the same, from the repo root)

Starts one scheduler (``--dead-after 3 --heartbeat-interval 1``) and 3 Docker agents
(image python:3.11, 3 slots each) as processes of this run, logging into a temp dir.
A client session keeps a window of ``checksum(call_id, data, sleep)`` calls in flight
on a pool as big as the cluster, each with a unique id, and checks every result. About
every ``--interval`` seconds (at most two faults outstanding), a chaos task kills a
random worker container (``docker kill``), a random agent (``kill -9``, restarted with
the same id after a few seconds: it reaps its orphans at start) or the scheduler
(``kill -9``, restarted on its port), and times the recovery: every agent alive in
ClusterStatus and calls completing again, then the pool back to full size.

At the end: stop feeding, wait for every call, close the session, count the containers
still there, stop the daemons (SIGTERM), count again, and look for leftover processes.
Prints the tables; exits 1 on any duplicate, lost or wrong result, hung call, typed or
untyped failure, leak, or when the workers the pool lost differ from the workers the
faults killed (the "must be" column). A call that fails with a typed aviato error
(WorkerLostError after its retries, a timeout, ...) is counted as such and resubmitted.
Logs (client and daemons) are kept when the soak fails, or with ``--keep-logs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a script: import this checkout (its benchmarks package and the aviato, agent and
    # scheduler packages the subprocesses run) rather than the script's directory.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable

import docker
import docker.errors
import uvloop

from aviato import Sandbox, SandboxDefaults
from aviato._connection import close_all
from benchmarks import _plots as plots
from benchmarks._cleanup import Cleanup
from benchmarks._common import IMAGE, RUN_ID, add_markdown_option, console, write_markdown
from benchmarks._soak_chaos import KINDS, Chaos, ChaosConfig
from benchmarks._soak_cluster import ClusterConfig, SoakCluster
from benchmarks._soak_load import Load, LoadConfig, checksum
from benchmarks._soak_report import Outcome, markdown, print_report


def check_docker() -> None:
    client = docker.from_env(timeout=10)
    try:
        client.ping()
        try:
            client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            raise SystemExit(
                f"image {IMAGE} is not on this host: build it with scripts/build-image.sh"
            ) from None
    finally:
        client.close()


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace, cleanup: Cleanup, logdir: Path) -> tuple[Outcome, float]:
    # Separate streams: the faults chosen do not depend on how many calls were made.
    load_rng, chaos_rng = random.Random(f"{args.seed}-load"), random.Random(f"{args.seed}-chaos")
    cluster = SoakCluster(
        ClusterConfig(agents=args.agents, slots=args.slots, log_level=args.daemon_log_level),
        cleanup,
        logdir,
    )
    with console.status("starting the cluster"):
        await cluster.start()
    target = args.agents * args.slots
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=cluster.address)
    stop_feeding = asyncio.Event()
    stop_chaos = asyncio.Event()
    outcome: Outcome | None = None
    session = Sandbox.session(defaults)
    await session.__aenter__()
    try:
        fn = session.function(
            max_workers=target, retries=args.retries, timeout_seconds=args.call_timeout
        )(checksum)
        load = Load(
            fn,
            LoadConfig(
                concurrency=args.concurrency,
                sleep_min=args.sleep_ms[0] / 1000,
                sleep_max=args.sleep_ms[1] / 1000,
                hang_after=args.hang_after,
            ),
            load_rng,
        )
        chaos = Chaos(
            cluster,
            load,
            fn,
            target,
            ChaosConfig(
                interval=args.interval,
                kinds=tuple(args.kinds),
                agent_down=args.agent_down,
                scheduler_down=args.scheduler_down,
                recovery_timeout=args.recovery_timeout,
            ),
            chaos_rng,
        )
        async with asyncio.TaskGroup() as tg:
            feeder = tg.create_task(load.feed(stop_feeding))
            with console.status(f"warming the pool to {target} workers"):
                await wait_for(lambda: fn.statistics().workers >= target, 180, "the warm pool")
            t0 = time.monotonic()
            chaos_task = tg.create_task(chaos.run(stop_chaos))
            end = t0 + args.minutes * 60
            with console.status("soaking") as live:
                while time.monotonic() < end:
                    await asyncio.sleep(1)
                    s = fn.statistics()
                    live.update(
                        f"soaking: {time.monotonic() - t0:.0f}/{end - t0:.0f} s, "
                        f"{load.ledger.completed} calls, {len(chaos.faults)} faults "
                        f"({len(chaos.outstanding())} outstanding), workers {s.workers}"
                        f"+{s.starting}, queued {s.queued}"
                    )
                stop_chaos.set()
                live.update("waiting for the outstanding faults to recover")
                await chaos_task
                duration = time.monotonic() - t0
                stop_feeding.set()
                await feeder
                live.update(f"draining {len(load.outstanding)} outstanding calls")
                await load.drain(args.hang_after)
        stats = fn.statistics()
        # The pool drops a second outcome for a call it already settled before any
        # future could deliver it: the ledger alone would never see that duplicate.
        load.ledger.duplicates += stats.duplicate_results
        outcome = Outcome(
            duration=duration,
            target_workers=target,
            ledger=load.ledger,
            faults=chaos.faults,
            slowest_10s=load.slowest_window(t0, t0 + duration),
            workers_lost=stats.workers_lost,
            workers_killed=chaos.workers_killed,
            pool_retried=stats.calls_retried,
            late_replies_dropped=int(getattr(stats, "late_replies_dropped", 0)),
        )
        outcome.notes += chaos.notes
        if stats.workers_lost > chaos.workers_killed:
            outcome.notes.append(
                f"the pool lost {stats.workers_lost - chaos.workers_killed} more worker(s) than "
                "the faults killed (declared lost while alive: their calls re-ran elsewhere)"
            )
    finally:
        with console.status("closing the session"):
            try:
                async with asyncio.timeout(90):
                    await session.__aexit__(None, None, None)
            except TimeoutError:
                if outcome is not None:
                    outcome.notes.append("closing the session took more than 90 s")
    assert outcome is not None
    with console.status("waiting for the session's containers to go"):
        deadline = time.monotonic() + args.leak_grace
        while (left := await cluster.containers()) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        outcome.left_after_session = left
    with console.status("stopping the cluster"):
        await asyncio.to_thread(cluster.stop)
        outcome.needed_sigkill = cluster.needed_sigkill
        outcome.leaked_containers = await cluster.containers()
        await asyncio.sleep(1)  # the daemons' children, if any, to exit
        outcome.leftover_processes = cluster.leftover_processes()
        outcome.leftover_dirs = cluster.leftover_socket_dirs()
    return outcome, t0


async def amain(args: argparse.Namespace, cleanup: Cleanup, logdir: Path) -> tuple[Outcome, float]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await soak(args, cleanup, logdir)
    finally:
        close_all()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="soak duration after warm-up")
    p.add_argument("--interval", type=float, default=20.0, help="mean seconds between faults")
    p.add_argument(
        "--kinds",
        type=lambda s: s.split(","),
        default=list(KINDS),
        help=f"comma-separated fault kinds, from: {','.join(KINDS)}",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--slots", type=int, default=3, help="slots per agent")
    p.add_argument(
        "--concurrency",
        type=int,
        default=256,
        # Enough backlog that the pool grows back to full size after losing workers.
        help="calls kept in flight",
    )
    p.add_argument(
        "--sleep-ms",
        type=lambda s: tuple(float(x) for x in s.split(",")),
        default=(5.0, 100.0),
        help="MIN,MAX of each call's random sleep, in ms",
    )
    p.add_argument("--retries", type=int, default=3, help="the function's retries")
    p.add_argument("--call-timeout", type=float, default=30.0, help="each call's timeout_seconds")
    p.add_argument(
        "--hang-after",
        type=float,
        default=120.0,
        help="a call unresolved this long after its submission counts as hung",
    )
    p.add_argument("--agent-down", type=float, default=4.0, help="seconds before an agent restart")
    p.add_argument(
        "--scheduler-down", type=float, default=1.0, help="seconds before a scheduler restart"
    )
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=90.0,
        help="a fault not recovered within this long is reported as such",
    )
    p.add_argument(
        "--leak-grace",
        type=float,
        default=30.0,
        help="seconds the session's containers get to go after it closed",
    )
    p.add_argument("--daemon-log-level", default="INFO")
    p.add_argument("--keep-logs", action="store_true", help="keep the log dir even on success")
    add_markdown_option(p)
    args = p.parse_args(argv)
    if unknown := set(args.kinds) - set(KINDS):
        p.error(f"--kinds: unknown kind(s) {sorted(unknown)}")
    if len(args.sleep_ms) != 2 or args.sleep_ms[0] > args.sleep_ms[1]:
        p.error("--sleep-ms takes MIN,MAX")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("AVIATO_SCHEDULER", None):
        console.print("[yellow]ignoring $AVIATO_SCHEDULER: the soak starts its own cluster[/]")
    check_docker()
    logdir = Path(tempfile.mkdtemp(prefix=f"aviato-soak-{RUN_ID}-"))
    handler = logging.FileHandler(logdir / "client.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cleanup = Cleanup()
    header = (
        f"{args.agents} agents x {args.slots} slots (Docker, {IMAGE}), scheduler dead-after 3 s"
        f" / heartbeat 1 s; {args.concurrency} calls in flight, sleep {args.sleep_ms[0]:g}-"
        f"{args.sleep_ms[1]:g} ms, retries {args.retries}, call timeout {args.call_timeout:g} s;"
        f" a fault every ~{args.interval:g} s ({','.join(args.kinds)}), seed {args.seed}, "
        f"{os.cpu_count()} CPUs"
    )
    ok = False
    try:
        outcome, t0 = uvloop.run(amain(args, cleanup, logdir))
        print_report(outcome, t0, header)
        if args.markdown:
            write_markdown(args.markdown, markdown(outcome, header))
            plots.timeline(
                plots.beside(args.markdown, "timeline"),
                outcome.ledger.completions,
                t0,
                [(f.at, f"{f.kind} {f.victim}"[:28]) for f in outcome.faults],
                f"calls completed per second, faults marked ({args.agents} agents)",
            )
        ok = not outcome.problems()
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        with console.status("cleaning up"):
            cleanup.sweep()
        logging.shutdown()
        if ok and not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            console.print(f"logs (client and daemons): {logdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
