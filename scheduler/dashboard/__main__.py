"""``python -m scheduler.dashboard --scheduler tcp://HOST:PORT [--listen HOST:PORT]``
(what ``aviato dashboard`` runs): the scheduler's web dashboard served by this process
for a running cluster, from the view it asks the scheduler for twice a second. Until
Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import zmq.asyncio

from aviato._flags import add_keys, add_token, endpoint, metrics_address
from scheduler.dashboard import Dashboard
from scheduler.dashboard.views import RemoteView


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scheduler.dashboard", description=__doc__)
    p.add_argument(
        "--scheduler", type=endpoint(bind=False), required=True, help="the cluster's address"
    )
    p.add_argument(
        "--listen",
        type=metrics_address,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where to serve the page (default: loopback, any free port)",
    )
    add_token(p)
    add_keys(p, help="the cluster's CURVE keys (not supported here: see below)")
    return p


async def serve(args: argparse.Namespace) -> None:
    ctx = zmq.asyncio.Context()
    view = RemoteView(ctx, args.scheduler, args.token)
    dashboard = Dashboard(token=args.token, curve=False, view=view, who="dashboard")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await dashboard.start(*args.listen)
        print(f"aviato dashboard: showing the cluster at {args.scheduler}", file=sys.stderr)
        await stop.wait()
    finally:
        await dashboard.close()
        ctx.destroy(linger=0)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.listen is None:
        raise SystemExit("aviato dashboard: --listen none leaves nothing to serve")
    if args.keys:
        raise SystemExit(
            "aviato dashboard: a cluster with CURVE keys is not served from here yet; start "
            "its scheduler with --dashboard 127.0.0.1:8265 and tunnel to it (ssh -L)"
        )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
