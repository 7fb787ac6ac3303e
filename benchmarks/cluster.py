#!/usr/bin/env python
"""aviato against raw Docker, and the scheduler's control-plane throughput.

    python benchmarks/cluster.py [--quick] [--only start,create,exec,sched,auth]
        [--markdown FILE]
    python -m benchmarks.cluster ...  (the same, from the repo root)

One run, one image (python:3.11, never pulled), measures:

1. create-to-first-exec latency: ``Sandbox.create("sleep", "infinity")`` + ``exec(["true"])``
   against ``docker run -d`` + ``docker exec`` (CLI) and ``containers.run`` + ``exec_run``
   (Docker SDK), and against the SDK making the same Docker calls aviato's runtime makes
   (to split aviato's time into Docker's and its own). The methods are interleaved; each
   stop/removal is outside the timing and finished before the next sample starts.
2. ``exec(["true"])`` round trip on one warm sandbox (the same container for all), plus
   where aviato's time goes: a protocol Ping to the agent, the SDK calls it makes.
3. scheduler throughput: a real ``python -m scheduler`` and 50 fake agents (DEALER
   sockets in this process speaking aviato.protocol, no containers) serving pipelined
   CreateSandbox / StopSandbox from a few client sockets: all creates then all stops
   (creates/s, stops/s), then create-and-stop-each-at-once (mixed requests/s). The
   scheduler's and the host's CPU use are shown: on a busy host they bound the result.

plus the embedded cluster's start time and idle memory, and ("auth") how long a client
waits for its UnauthorizedError from a cluster with CURVE keys, with no keys and with
another cluster's. Prints rich tables, then a plain markdown table for the README with
each target's verdict (``--markdown FILE`` writes it to FILE too). Every container it
creates carries the label ``aviato-bench.run=<run id>`` (aviato's carry the agent ids
it started) and is removed at exit, Ctrl-C and SIGTERM included; so is every process it started.
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
import os
import signal
import time

import docker.errors
import uvloop

from aviato import _local
from aviato._connection import close_all
from benchmarks._cleanup import Cleanup
from benchmarks._common import (
    FULL,
    IMAGE,
    QUICK,
    Plan,
    add_markdown_option,
    console,
    write_markdown,
)
from benchmarks._control_plane import bench_scheduler
from benchmarks._docker_peers import DockerPeers
from benchmarks._embedded import bench_cluster_start, cluster_procs, rss_mib
from benchmarks._latency import aviato_create_exec, bench_create, bench_exec
from benchmarks._refusals import bench_refusals
from benchmarks._report import Results, print_report

PARTS = ("start", "create", "exec", "sched", "auth")


async def amain(plan: Plan, cleanup: Cleanup, only: set[str], profile: str | None) -> Results:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = Results(plan)
    peers = DockerPeers()
    try:
        peers.client.ping()
        try:
            peers.client.images.get(IMAGE)
        except docker.errors.ImageNotFound:
            raise SystemExit(
                f"image {IMAGE} is not on this host: build it with scripts/build-image.sh"
            ) from None

        if "start" in only:
            with console.status("embedded cluster start"):
                results.start = bench_cluster_start(cleanup)
        if "auth" in only:
            with console.status("refused clients (a cluster with CURVE keys)"):
                results.auth = await bench_refusals(cleanup, plan.refusals_n)
        if only & {"create", "exec"}:
            with console.status("first sandbox (starts the embedded cluster)"):
                results.first_create = await aviato_create_exec(peers)
        if "create" in only:
            results.create = await bench_create(plan.create_n, peers)
        if "exec" in only:
            results.exec = await bench_exec(plan.exec_n, peers)
        if only & {"create", "exec"}:
            address = await _local.ensure_cluster()
            results.loaded_rss = rss_mib(cluster_procs(address, f"embedded-{os.getpid()}"))
            close_all()
            with console.status("stopping the embedded cluster"):
                _local.shutdown()
        if "sched" in only:
            with console.status("scheduler throughput"):
                results.sched = await bench_scheduler(plan, cleanup, profile)
    finally:
        peers.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated subset of: {','.join(PARTS)}",
    )
    parser.add_argument(
        "--profile-scheduler",
        metavar="FILE",
        help="run benchmark 3's scheduler under cProfile, writing its stats to FILE",
    )
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(PARTS):
        parser.error(f"--only: unknown part(s) {sorted(only - set(PARTS))}")
    if os.environ.pop("AVIATO_SCHEDULER", None):
        console.print("[yellow]ignoring $AVIATO_SCHEDULER: this measures the embedded cluster[/]")
    plan = QUICK if args.quick else FULL
    cleanup = Cleanup()
    t0 = time.perf_counter()
    try:
        results = uvloop.run(amain(plan, cleanup, only, args.profile_scheduler))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        with console.status("cleaning up"):
            cleanup.sweep()
    text = print_report(results)
    if args.markdown is not None:
        write_markdown(args.markdown, text)
    console.print(f"[dim]total {time.perf_counter() - t0:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
