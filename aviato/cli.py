"""The ``aviato`` command: run the daemons, and look at or act on a cluster.

aviato up                      embedded scheduler + agent in the foreground
aviato keys DIR [--agents N] [--clients M] [--force]   a cluster's CURVE keys
aviato scheduler --bind ...    same as ``python -m scheduler``
aviato agent --scheduler ...   same as ``python -m agent``
aviato status | ps [--tag T] [--all] | stop ID | exec ID -- CMD... | logs ID
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from aviato._connection import connection
from aviato._defaults import SandboxDefaults
from aviato._sandbox import Sandbox
from aviato.exceptions import AviatoError
from aviato.protocol import ClusterStatus, ClusterStatusReply, SandboxStatus

# Piped output (scripts, tests) gets full rows instead of an 80-column squeeze.
console = Console(width=None if sys.stdout.isatty() else 250)


def _defaults(args: argparse.Namespace) -> SandboxDefaults:
    address = args.scheduler or os.environ.get("AVIATO_SCHEDULER")
    if not address:
        raise SystemExit(
            "aviato: no cluster address: pass --scheduler tcp://HOST:PORT or set "
            "AVIATO_SCHEDULER (run `aviato up` to start a local cluster)"
        )
    return SandboxDefaults(
        scheduler=address,
        request_timeout_seconds=args.timeout,
        keys=args.keys,
        client_key=args.client_key,
    )


async def _status(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    conn = connection(
        defaults.scheduler or "", defaults.cluster_token(), defaults.scheduler_curve()
    )
    reply = await conn.request(ClusterStatus(), timeout=defaults.request_timeout_seconds)
    assert isinstance(reply.msg, ClusterStatusReply)
    status = reply.msg
    table = Table(title=f"aviato cluster at {defaults.scheduler}")
    for col in ("agent", "address", "runtime", "slots used", "slots free", "alive", "heartbeat"):
        table.add_column(col)
    for a in status.agents:
        table.add_row(
            a.agent_id,
            a.address,
            a.runtime,  # says "NOT isolated" itself when it is not
            str(a.used),
            str(a.slots - a.used),
            "yes" if a.alive else "DEAD",
            f"{a.seconds_since_heartbeat:.1f}s ago",
        )
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in status.sandbox_counts.items())
    console.print(f"sandboxes: {counts}; sessions: {status.sessions}")
    return 0


async def _ps(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    statuses = list(SandboxStatus) if args.all else None
    sandboxes = await Sandbox.list(tags=args.tag, status=statuses, defaults=defaults)
    table = Table()
    for col in ("sandbox", "status", "image", "command", "agent", "tags", "exit", "reason"):
        table.add_column(col)
    for sb in sandboxes:
        info = sb.info
        assert info is not None
        table.add_row(
            info.sandbox_id,
            info.status.value,
            info.spec.image,
            " ".join((info.spec.command, *info.spec.args)),
            info.agent_id or "-",
            ",".join(info.spec.tags),
            "" if info.exit_code is None else str(info.exit_code),
            info.reason,
        )
    console.print(table)
    return 0


async def _stop(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    for sandbox_id in args.ids:
        sb = await Sandbox.from_id(sandbox_id, defaults=defaults)
        await sb.stop()
        console.print(f"stopped {sandbox_id}")
    return 0


async def _exec(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    sb = await Sandbox.from_id(args.id, defaults=defaults)
    stream = sb.exec_stream(command, timeout_seconds=args.exec_timeout, stdin=_piped_stdin())
    async for chunk in stream:
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    return stream.returncode or 0


def _piped_stdin() -> bytes | None:
    """Our stdin, read to its end, when it is not a terminal (``echo hi | aviato exec ID
    -- cat``): the command gets it, then EOF. From a terminal it gets an empty stdin."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.buffer.read()


async def _logs(args: argparse.Namespace) -> int:
    sb = await Sandbox.from_id(args.id, defaults=_defaults(args))
    for chunk in await sb.log_chunks():  # each stream to its own, as `docker logs` does
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    return 0


def _up(args: argparse.Namespace) -> int:
    from aviato._local import LocalCluster

    cluster = LocalCluster(
        slots=args.slots,
        runtime=args.runtime,
        bind_host=args.host,
        keys=args.keys,
        client_key=args.client_key,
    )
    address = cluster.start()
    # Block the signals so sigwait, not KeyboardInterrupt, receives them; only after the
    # daemons started, since children inherit the mask and must still see SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print(f"aviato cluster up: export AVIATO_SCHEDULER={address}", flush=True)
    if args.keys:
        print(f"it serves only keys from {args.keys}: export AVIATO_KEYS={args.keys}", flush=True)
    print("Ctrl-C stops it (and every sandbox it runs).", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from aviato._auth import create_cluster_keys

    try:
        files = create_cluster_keys(args.dir, args.agents, args.clients, force=args.force)
    except (FileExistsError, ValueError) as exc:
        console.print(f"[red]aviato keys: {exc}[/red]")
        return 1
    for path in files:
        console.print(str(path), highlight=False)
    console.print(
        f"Give every host the public files (*.key) and its own secret only: the scheduler "
        f"{args.dir}/scheduler.key_secret, each agent host agents/NAME.key_secret, each "
        "client clients/NAME.key_secret. Then --keys DIR (or AVIATO_KEYS=DIR) everywhere.",
        highlight=False,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aviato", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scheduler", help="cluster address (default $AVIATO_SCHEDULER)")
    p.add_argument("--timeout", type=float, default=10.0, help="request deadline, seconds")
    p.add_argument(
        "--keys",
        default=os.environ.get("AVIATO_KEYS"),
        help="CURVE key directory (default $AVIATO_KEYS); `aviato up` serves only its keys",
    )
    p.add_argument(
        "--client-key",
        default=os.environ.get("AVIATO_CLIENT_KEY"),
        help="this client's key name in KEYS/clients (default $AVIATO_CLIENT_KEY, else the"
        " only one whose secret is there)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("scheduler", help="run a scheduler (python -m scheduler)", add_help=False)
    sub.add_parser("agent", help="run an agent (python -m agent)", add_help=False)
    up = sub.add_parser("up", help="run a local scheduler and agent in the foreground")
    up.add_argument("--slots", type=int)
    up.add_argument("--runtime", default=None)
    up.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for others)")
    keys = sub.add_parser("keys", help="generate a cluster's CURVE keys in DIR")
    keys.add_argument("dir")
    keys.add_argument("--agents", type=int, default=1, help="agent keypairs (agent-1...)")
    keys.add_argument("--clients", type=int, default=1, help="client keypairs (client-1...)")
    keys.add_argument("--force", action="store_true", help="replace the keys already in DIR")
    sub.add_parser("status", help="agents, slots and sandbox counts")
    ps = sub.add_parser("ps", help="list sandboxes")
    ps.add_argument("--tag", action="append", default=[], help="only sandboxes with this tag")
    ps.add_argument("--all", action="store_true", help="include ended sandboxes")
    stop = sub.add_parser("stop", help="stop sandboxes")
    stop.add_argument("ids", nargs="+")
    ex = sub.add_parser("exec", help="run a command in a sandbox: aviato exec ID -- CMD...")
    ex.add_argument("id")
    ex.add_argument("--exec-timeout", type=float, default=None)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    logs = sub.add_parser("logs", help="a sandbox's output")
    logs.add_argument("id")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The daemons own their flags: hand everything after the word to them.
    for daemon in ("scheduler", "agent"):
        if daemon in argv and all(a.startswith("-") for a in argv[: argv.index(daemon)]):
            rest = argv[argv.index(daemon) + 1 :]
            if daemon == "scheduler":
                from scheduler.__main__ import main as daemon_main
            else:
                from agent.__main__ import main as daemon_main
            daemon_main(rest)
            return
    args = build_parser().parse_args(argv)
    if args.cmd == "up":
        raise SystemExit(_up(args))
    if args.cmd == "keys":
        raise SystemExit(_keys(args))
    if args.cmd == "exec" and not [c for c in args.command if c != "--"]:
        raise SystemExit("aviato exec: give a command after the id: aviato exec ID -- echo hi")
    handlers = {"status": _status, "ps": _ps, "stop": _stop, "exec": _exec, "logs": _logs}
    try:
        code = asyncio.run(handlers[args.cmd](args))
    except AviatoError as exc:
        console.print(f"[red]aviato: {type(exc).__name__}: {exc}[/red]")
        code = 1
    raise SystemExit(code)


if __name__ == "__main__":
    main()
