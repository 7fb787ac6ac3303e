"""``python -m scheduler --bind tcp://127.0.0.1:5555``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop

from aviato._flags import (
    add_keys,
    add_log_format,
    add_log_level,
    add_metrics,
    add_token,
    endpoint,
    metrics_address,
)
from aviato._server.auth import scheduler_keys
from aviato._server.daemon import (
    daemon_setup,
    exit_on_one_line_failure,
    exit_with_parent,
    log_to_stderr,
)
from aviato._server.metrics import MetricsEndpoint
from aviato.exceptions import UnauthorizedError
from scheduler.records import Config
from scheduler.server import SchedulerServer, tune_gc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler", description=__doc__)
    p.add_argument(
        "--bind",
        default="tcp://127.0.0.1:5555",
        type=endpoint(bind=True),
        help="ZeroMQ endpoint to bind",
    )
    p.add_argument(
        "--dead-after",
        type=float,
        default=3.0,
        help="seconds without a heartbeat before an agent is declared dead",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=0.5,
        help="seconds between agent heartbeats (told to each agent)",
    )
    add_token(p)
    add_keys(
        p,
        help="CURVE key directory from `aviato keys` (default $AVIATO_KEYS): serve only the "
        "agent and client keys found there",
    )
    p.add_argument(
        "--reap-orphans-after",
        type=float,
        default=30.0,
        help="seconds after an agent is declared dead before other agents on its engine "
        "remove the sandboxes it left",
    )
    p.add_argument(
        "--forget-dead-after",
        type=float,
        default=600.0,
        help="seconds a dead agent stays listed in `aviato status` (keep it above "
        "--reap-orphans-after)",
    )
    p.add_argument(
        "--startup-grace",
        type=float,
        default=10.0,
        help="seconds after start in which a create waits for agents to register instead of "
        "failing at once with 'no agents registered'",
    )
    p.add_argument(
        "--reserve-after",
        type=float,
        default=10.0,
        help="seconds a queued create that asks for resources (and fits nowhere now) waits "
        "before it reserves an agent: later creates stop being placed there until it is",
    )
    p.add_argument("--ready-file", help="write the bound address here once listening")
    add_metrics(p)
    p.add_argument(
        "--dashboard",
        type=metrics_address,
        default=None,
        help="serve the web dashboard at http://HOST:PORT/ (PORT alone: on loopback; port 0: "
        "any free one; default: none, off); with a token or keys, it prints a login URL",
    )
    add_log_level(p)
    add_log_format(p)
    return p


async def run(args: argparse.Namespace) -> None:
    config = Config(
        dead_after_seconds=args.dead_after,
        heartbeat_interval=args.heartbeat_interval,
        orphan_grace_seconds=args.reap_orphans_after,
        forget_dead_seconds=args.forget_dead_after,
        startup_grace_seconds=args.startup_grace,
        reserve_after_seconds=args.reserve_after,
    )
    keys = None
    if args.keys:
        try:
            keys = scheduler_keys(args.keys)
        except UnauthorizedError as exc:
            raise SystemExit(f"scheduler: {exc}") from None
    server = SchedulerServer(args.bind, config=config, token=args.token, keys=keys)
    endpoint = dashboard = None
    if args.metrics is not None or args.dashboard is not None:
        from scheduler.metrics import SchedulerMetrics

        server.metrics = metrics = SchedulerMetrics(server.state)
    if args.dashboard is not None:
        from scheduler.dashboard import Dashboard

        dashboard = Dashboard(
            server.state,
            token=args.token,
            curve=keys is not None,
            totals=lambda: (metrics.created, metrics.placed),
            pools=server.session_pools,
        )
        await dashboard.start(args.dashboard[0], args.dashboard[1])
    if args.metrics is not None:
        endpoint = MetricsEndpoint(metrics.registry, "scheduler")
        await endpoint.start(
            args.metrics[0], args.metrics[1], logging.getLogger("aviato.scheduler")
        )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    parent = os.environ.get("AVIATO_PARENT_PID")

    async def announce() -> None:
        await server.ready.wait()
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:  # noqa: ASYNC230 (tiny, once)
                f.write(server.address or "")
            os.replace(args.ready_file + ".tmp", args.ready_file)
        print(f"aviato scheduler listening on {server.address}", file=sys.stderr, flush=True)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(announce())
        watcher = tg.create_task(exit_with_parent(int(parent), server.stop)) if parent else None
        try:
            await server.serve()
        finally:
            if endpoint is not None:
                await endpoint.close()
            if dashboard is not None:
                await dashboard.close()
        if watcher is not None:
            watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    daemon_setup()
    tune_gc()
    log_to_stderr(args.log_level, args.log_format, "scheduler")
    try:
        uvloop.run(run(args))
    except BaseException as exc:
        exit_on_one_line_failure("scheduler", exc)
        raise


if __name__ == "__main__":
    main()
