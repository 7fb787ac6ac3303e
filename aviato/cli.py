"""The ``aviato`` command: run the daemons, and look at or act on a cluster.

aviato up [--port 5555] [--keys DIR]   a scheduler + agent in the foreground
aviato keys DIR [--agents N] [--clients M] [--force]   a cluster's CURVE keys
aviato scheduler --bind ...    same as ``python -m scheduler``
aviato agent --scheduler ...   same as ``python -m agent``
aviato status | ps [-q] [--tag T] [--all] | stop ID... | exec [-it] ID -- CMD... | logs [-f] ID
aviato cp LOCAL ID:/path | cp ID:/path LOCAL   files of any size, like docker cp
aviato pause|resume ID... | extend ID SECONDS | snapshot ID | snapshot ls | snapshot rm IMAGE...
aviato volume ls | volume rm NAME... [--agent ID]
The options --scheduler, --timeout, --keys and --client-key go before or after the
command; --format json prints status and ps as JSON. ps draws its first 100 rows;
-q, --format json and --all stream every row, page by page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from aviato import _cli_files, _cli_objects
from aviato._cli_lifecycle import COMMANDS as LIFECYCLE_COMMANDS
from aviato._cli_lifecycle import add_commands as add_lifecycle_commands
from aviato._cli_objects import OBJECT_COLUMNS, objects_record, objects_rows
from aviato._cli_output import (
    AGENT_COLUMNS,
    SANDBOX_COLUMNS,
    VOLUME_COLUMNS,
    JsonArrayWriter,
    PlainLines,
    agent_row,
    print_json,
    print_table,
    sandbox_record,
    sandbox_row,
    status_record,
)
from aviato._defaults import SandboxDefaults
from aviato._flags import RUNTIMES, add_keys, add_log_level
from aviato._sandbox import Sandbox, scheduler_connection
from aviato._storage import Tunnel
from aviato._volumes import list_volumes, remove_volume, tunnels_of
from aviato.exceptions import AviatoError, ConfigurationError
from aviato.protocol import (
    AgentInfo,
    ClusterStatus,
    ClusterStatusReply,
    SandboxInfo,
    SandboxStatus,
)

#: Rows ``aviato ps`` draws as a table (more: -q, --format json or --all stream them).
PS_FIRST_PAGE = 100
#: ``aviato up``'s scheduler port unless --port says otherwise (the README's).
UP_PORT = 5555
#: Options every client command takes, before or after its name; those with a value.
_GLOBAL_VALUE_OPTIONS = ("--scheduler", "--timeout", "--keys", "--client-key")


def _error(message: str) -> None:
    print(f"aviato: {message}", file=sys.stderr, flush=True)


def _defaults(args: argparse.Namespace) -> SandboxDefaults:
    if not (args.scheduler or os.environ.get("AVIATO_SCHEDULER")):
        raise ConfigurationError(
            "no cluster address: pass --scheduler tcp://HOST:PORT or set "
            "AVIATO_SCHEDULER (run `aviato up` to start a local cluster)"
        )
    return SandboxDefaults(
        scheduler=args.scheduler,  # else $AVIATO_SCHEDULER, read (and checked) by it
        request_timeout_seconds=args.timeout,
        keys=args.keys,
        client_key=args.client_key,
    )


async def _status(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    address = defaults.scheduler_address() or ""
    conn = await scheduler_connection(defaults)
    status: ClusterStatusReply | None = None
    agents: list[AgentInfo] = []
    cursor = ""
    while status is None or cursor:  # every page of agents
        reply = await conn.request(
            ClusterStatus(cursor=cursor), timeout=defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, ClusterStatusReply)
        agents += reply.msg.agents
        status, cursor = reply.msg, reply.msg.next_cursor
    status = dataclasses.replace(status, agents=tuple(agents), next_cursor="")
    objects = await _cli_objects.object_stats(status.agents, defaults)
    if args.format == "json":
        print_json({**status_record(address, status), "objects": objects_record(objects)})
        return 0
    rows = [agent_row(a) for a in status.agents]
    print_table(AGENT_COLUMNS, rows, title=f"aviato cluster at {address}")
    counts = ", ".join(f"{k} {v}" for k, v in status.sandbox_counts.items())
    print(f"sandboxes: {counts}; sessions: {status.sessions}")
    print_table(OBJECT_COLUMNS, objects_rows(objects), title="objects held (object refs)")
    return 0


async def _ps(args: argparse.Namespace) -> int:
    """Live sandboxes, the first page as a table (fast at any cluster size); -q and
    --format json list every live one. --all: every sandbox, ended ones too, streamed
    page by page as plain lines (ids with -q, one JSON array with --format json)."""
    defaults = _defaults(args)
    statuses = list(SandboxStatus) if args.all else None
    if not args.all and not args.quiet and args.format != "json":
        page = await Sandbox.page(
            tags=args.tag, status=statuses, limit=args.limit, defaults=defaults
        )
        infos = [sb.info for sb in page.sandboxes if sb.info is not None]
        tunnels = await _tunnels(infos, defaults)
        print_table(SANDBOX_COLUMNS, [sandbox_row(i, tunnels.get(i.sandbox_id)) for i in infos])
        if page.cursor:
            print(
                f"(the first {len(infos)}; `aviato ps -q` or `aviato ps --all` list every one)",
                file=sys.stderr,
            )
        return 0
    stream = Sandbox.iterate(tags=args.tag, status=statuses, defaults=defaults)
    if args.quiet:
        async for sb in stream:
            print(sb.sandbox_id)
    elif args.format == "json":
        out = JsonArrayWriter(sys.stdout)
        async for sb in stream:
            if sb.info is not None:
                tunnels = await _tunnels([sb.info], defaults)
                out.add(sandbox_record(sb.info, tunnels.get(sb.info.sandbox_id)))
        out.close()
    else:
        lines = PlainLines(SANDBOX_COLUMNS, sys.stdout)
        async for sb in stream:
            if sb.info is not None:
                lines.add(sandbox_row(sb.info))
        lines.close()
    return 0


async def _tunnels(
    infos: Sequence[SandboxInfo], defaults: SandboxDefaults
) -> dict[str, dict[int, Tunnel]]:
    """The tunnels of those running sandboxes that publish ports (asked of their agents
    at once; one that cannot say shows its ports as asked for)."""
    wanted = [i for i in infos if i.spec.ports and i.status is SandboxStatus.RUNNING]
    found = await asyncio.gather(*(tunnels_of(i, defaults) for i in wanted), return_exceptions=True)
    return {i.sandbox_id: t for i, t in zip(wanted, found, strict=True) if isinstance(t, dict)}


async def _volume(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    if args.action == "ls":
        rows = [[v.name, v.agent_id, v.agent_address] for v in await list_volumes(defaults)]
        print_table(VOLUME_COLUMNS, rows)
        return 0
    for name in args.names:
        for agent_id in await remove_volume(name, agent_id=args.agent, defaults=defaults):
            print(f"{name} (agent {agent_id})")
    return 0


async def _stop_one(sandbox_id: str, defaults: SandboxDefaults) -> AviatoError | None:
    try:
        sb = await Sandbox.from_id(sandbox_id, defaults=defaults)
        await sb.stop()
    except AviatoError as exc:
        return exc
    return None


async def _stop(args: argparse.Namespace) -> int:
    """Stop every id it can (at once), and name each it cannot, as ``docker stop``."""
    defaults = _defaults(args)
    ids = list(dict.fromkeys(args.ids))
    errors = await asyncio.gather(*(_stop_one(i, defaults) for i in ids))
    for sandbox_id, error in zip(ids, errors, strict=True):
        if error is None:
            print(sandbox_id, flush=True)
        else:
            _error(f"cannot stop {sandbox_id}: {type(error).__name__}: {error}")
    return 1 if any(errors) else 0


def exit_status(returncode: int | None) -> int:
    """The shell's status for a command's return code: one killed by signal N (a
    negative code) is 128+N, as ``docker exec`` and shells report it."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


async def _exec(args: argparse.Namespace) -> int:
    defaults = _defaults(args)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    sb = await Sandbox.from_id(args.id, defaults=defaults)
    if args.interactive or args.tty:
        from aviato._cli_interactive import run_interactive

        return await run_interactive(sb, command, interactive=args.interactive, tty=args.tty)
    stream = sb.exec_stream(command, timeout_seconds=args.exec_timeout, stdin=_piped_stdin())
    async for chunk in stream:
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    return exit_status(stream.returncode)


def _piped_stdin() -> bytes | None:
    """Our stdin, read to its end, when it is not a terminal (``echo hi | aviato exec ID
    -- cat``): the command gets it, then EOF. From a terminal it gets an empty stdin."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.buffer.read()


async def _logs(args: argparse.Namespace) -> int:
    sb = await Sandbox.from_id(args.id, defaults=_defaults(args))
    if args.follow:
        return await _cli_files.follow_logs(sb)
    for chunk in await sb.log_chunks():  # each stream to its own, as `docker logs` does
        out = sys.stdout.buffer if chunk.fd == 1 else sys.stderr.buffer
        out.write(chunk.data)
        out.flush()
    return 0


def _state_dir(port: int) -> Path:
    """Where ``aviato up`` keeps its daemons' logs: they outlive it, for a post-mortem."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "aviato" / f"up-{port}"


def _check_port_free(host: str, port: int) -> None:
    """Say at once, in one line, that the port is taken (by an earlier ``aviato up``?)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ConfigurationError(f"cannot listen on {host}:{port}: {exc}") from None
            raise ConfigurationError(
                f"address already in use: tcp://{host}:{port} (another `aviato up`?); "
                "choose another with --port"
            ) from None


#: ``aviato up``'s metrics: on loopback, any free ports (it prints them); with a port
#: given, the scheduler's is that one and the agent's the next.
UP_METRICS = "127.0.0.1:0"


def _up_metrics(value: str) -> dict[str, list[str]]:
    """The daemons' ``--metrics`` flags for ``aviato up --metrics HOST:PORT|none``."""
    from aviato._flags import parse_listen

    where = parse_listen(value)
    if where is None:
        return {}
    host, port = where
    agent_port = port + 1 if port else 0
    return {
        "scheduler": ["--metrics", f"{host}:{port}"],
        "agent": ["--metrics", f"{host}:{agent_port}"],
    }


def _up(args: argparse.Namespace) -> int:
    from aviato._flags import parse_listen
    from aviato._local import LocalCluster

    if args.scheduler:
        raise ConfigurationError("aviato up runs its own scheduler: drop --scheduler (--port)")
    _check_port_free(args.host, args.port)
    keys = os.path.abspath(args.keys) if args.keys else None
    daemon_args = _up_metrics(args.metrics)
    dashboard = parse_listen(args.dashboard)
    if dashboard is not None:
        host, port = dashboard
        daemon_args.setdefault("scheduler", []).extend(["--dashboard", f"{host}:{port}"])
    cluster = LocalCluster(
        slots=args.slots,
        runtime=args.runtime,
        bind_host=args.host,
        port=args.port,
        keys=keys,
        client_key=args.client_key,
        log_dir=_state_dir(args.port),
        log_level=args.log_level,
        daemon_args=daemon_args,
    )
    address = cluster.start()
    # Block the signals so sigwait, not KeyboardInterrupt, receives them; only after the
    # daemons started, since children inherit the mask and must still see SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    local = address.replace("0.0.0.0", "127.0.0.1")
    lines = [
        f"aviato scheduler listening on {address}; agent {cluster.agent_id} with "
        f"{cluster.slots} slots, runtime {cluster.agent_runtime}",
        f"logs (kept after exit): {cluster.log_path('scheduler')} and {cluster.log_path('agent')}",
        "in another shell:",
        f"  export AVIATO_SCHEDULER={local}",
    ]
    if keys:
        lines.append(f"  export AVIATO_KEYS={keys} AVIATO_CLIENT_KEY={cluster.client_key}")
        lines.append(f"it serves only the keys in {keys}")
    if "agent" in daemon_args:
        urls = [cluster.metrics_url("scheduler"), cluster.metrics_url("agent")]
        lines.append("Prometheus metrics: " + "  ".join(u for u in urls if u))
    if dashboard is not None:
        lines.append(f"dashboard: {cluster.dashboard_url()}")
    lines.append("Ctrl-C stops it (and every sandbox it runs).")
    print("\n".join(lines), flush=True)
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
        _error(f"keys: {exc}")
        return 1
    for path in files:
        print(path)
    print(
        f"Give every host the public files (*.key) and its own secret only: the scheduler "
        f"{args.dir}/scheduler.key_secret, each agent host agents/NAME.key_secret, each "
        "client clients/NAME.key_secret. Then --keys DIR (or AVIATO_KEYS=DIR) everywhere."
    )
    return 0


def _add_global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The options of every client command. On the top-level parser they carry the
    defaults; a command's parser takes them too (``aviato ps --timeout 2``), with
    no default of its own so that it keeps the value given before the command."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "--scheduler", default=default(None), help="cluster address (default $AVIATO_SCHEDULER)"
    )
    p.add_argument("--timeout", type=float, default=default(10.0), help="request deadline, seconds")
    add_keys(
        p,
        help="CURVE key directory (default $AVIATO_KEYS); `aviato up` serves only its keys",
        **({} if top else {"default": argparse.SUPPRESS}),
    )
    p.add_argument(
        "--client-key",
        default=default(os.environ.get("AVIATO_CLIENT_KEY")),
        help="this client's key name in KEYS/clients (default $AVIATO_CLIENT_KEY, else the"
        " only one whose secret is there)",
    )


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table (plain aligned text when piped), or json",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aviato", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_global_options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, **kwargs: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, **kwargs)  # type: ignore[arg-type]
        _add_global_options(parser, top=False)
        return parser

    sub.add_parser("scheduler", help="run a scheduler (python -m scheduler)", add_help=False)
    sub.add_parser("agent", help="run an agent (python -m agent)", add_help=False)
    up = command("up", help="run a local scheduler and agent in the foreground")
    up.add_argument("--port", type=int, default=UP_PORT, help=f"scheduler port ({UP_PORT})")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for others)")
    up.add_argument("--slots", type=int, help="sandboxes at once (max(8, 4 x cores))")
    up.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="sandbox runtime (default $AVIATO_RUNTIME, else auto: Docker if it answers)",
    )
    add_log_level(up, help="the daemons' log level (default $AVIATO_LOG_LEVEL, else INFO)")
    up.add_argument(
        "--metrics",
        default=UP_METRICS,
        metavar="HOST:PORT",
        help="serve Prometheus metrics: the scheduler's at HOST:PORT, the agent's on the next "
        "port (default: loopback, any free ports; none: off)",
    )
    up.add_argument(
        "--dashboard",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="serve the web dashboard (default: loopback, any free port; none: off)",
    )
    keys = sub.add_parser("keys", help="generate a cluster's CURVE keys in DIR")
    keys.add_argument("dir")
    keys.add_argument("--agents", type=int, default=1, help="agent keypairs (agent-1...)")
    keys.add_argument("--clients", type=int, default=1, help="client keypairs (client-1...)")
    keys.add_argument("--force", action="store_true", help="replace the keys already in DIR")
    status = command("status", help="agents, slots and sandbox counts")
    _add_format(status)
    ps = command("ps", help="list sandboxes")
    ps.add_argument("--tag", action="append", default=[], help="only sandboxes with this tag")
    ps.add_argument(
        "-a",
        "--all",
        action="store_true",
        help="every sandbox, ended ones included, streamed as plain lines",
    )
    ps.add_argument("-q", "--quiet", action="store_true", help="sandbox ids only, one a line")
    ps.add_argument(
        "-n",
        "--limit",
        type=int,
        default=PS_FIRST_PAGE,
        help=f"rows of the table at most (default {PS_FIRST_PAGE}; -q, --format json and "
        "--all list every one)",
    )
    _add_format(ps)
    stop = command("stop", help="stop sandboxes (each it can; says which it cannot)")
    stop.add_argument("ids", nargs="+")
    ex = command("exec", help="run a command in a sandbox: aviato exec ID -- CMD...")
    ex.add_argument("id")
    ex.add_argument("--exec-timeout", type=float, default=None)
    ex.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="stream stdin to the command as it comes (a kept process: see Sandbox.spawn)",
    )
    ex.add_argument(
        "-t", "--tty", action="store_true", help="on a terminal: aviato exec -it ID -- bash"
    )
    ex.add_argument("command", nargs=argparse.REMAINDER)
    logs = command("logs", help="a sandbox's output")
    logs.add_argument("id")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="then as it is written, until it ends"
    )
    _cli_files.add_cp(command)
    add_lifecycle_commands(command)
    dash = command(
        "dashboard", help="serve the web dashboard of a running cluster from this machine"
    )
    dash.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to serve it (default: loopback, any free port; it prints the URL)",
    )
    volume = command("volume", help="named volumes: aviato volume ls | rm NAME...")
    volume.add_argument("action", choices=("ls", "rm"))
    volume.add_argument("names", nargs="*", help="rm: the volumes to remove")
    volume.add_argument("--agent", help="rm: from this agent's host only (default: every one)")
    return p


def _command_word(argv: Sequence[str]) -> int | None:
    """Where the command's name is in ``argv``: the first word that is neither an
    option nor an option's value."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_VALUE_OPTIONS:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return i
    return None


def _run_daemon(name: str, before: list[str], rest: list[str]) -> NoReturn:
    """``aviato [options] scheduler|agent ARGS``: this process becomes ``python -m NAME``
    (the client imports no daemon), which owns ARGS. Options given before the word that
    mean something to it are handed on; others are an error."""
    given = argparse.ArgumentParser(prog="aviato", add_help=False)
    for option in _GLOBAL_VALUE_OPTIONS:
        given.add_argument(option)
    options, unknown = given.parse_known_args(before)
    if unknown:
        raise ConfigurationError(f"unknown option(s) before `{name}`: {' '.join(unknown)}")
    passed = {"--keys": options.keys}
    if name == "agent":
        passed["--scheduler"] = options.scheduler
    elif options.scheduler is not None:
        raise ConfigurationError(
            "--scheduler names a cluster to use; a scheduler's own address is --bind: "
            "aviato scheduler --bind tcp://0.0.0.0:5555"
        )
    for option, value in (("--timeout", options.timeout), ("--client-key", options.client_key)):
        if value is not None:
            raise ConfigurationError(
                f"{option} is for client commands (status, ps, exec, ...), not `aviato {name}`"
            )
    forwarded = [arg for option, value in passed.items() if value for arg in (option, value)]
    sys.stdout.flush()
    sys.stderr.flush()
    # After ours, its own flags win. Same process id: signals and exit status are its.
    # -P: a folder named scheduler/ or agent/ where the user runs is not ours.
    os.execv(sys.executable, [sys.executable, "-P", "-m", name, *forwarded, *rest])


def _dashboard(args: argparse.Namespace) -> NoReturn:
    """``aviato dashboard``: this process becomes ``python -m scheduler.dashboard`` for
    the cluster the client options name (the client imports no daemon code)."""
    address = _defaults(args).scheduler_address() or ""
    forwarded = ["--scheduler", address, "--listen", args.listen]
    if args.keys:
        forwarded += ["--keys", args.keys]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-P", "-m", "scheduler.dashboard", *forwarded])


def _run(argv: list[str]) -> int:
    word = _command_word(argv)
    if word is not None and argv[word] in ("scheduler", "agent"):
        _run_daemon(argv[word], argv[:word], argv[word + 1 :])
    args = build_parser().parse_args(argv)
    if args.cmd == "up":
        return _up(args)
    if args.cmd == "keys":
        return _keys(args)
    if args.cmd == "dashboard":
        _dashboard(args)
    if args.cmd == "exec" and not [c for c in args.command if c != "--"]:
        raise ConfigurationError("exec: give a command after the id: aviato exec ID -- echo hi")
    if args.cmd == "volume" and (args.action == "rm") != bool(args.names):
        raise ConfigurationError("volume: `aviato volume ls`, or `aviato volume rm NAME...`")
    handlers = {
        "status": _status,
        "ps": _ps,
        "stop": _stop,
        "exec": _exec,
        "logs": _logs,
        "volume": _volume,
    }
    if args.cmd == "cp":
        return asyncio.run(_cli_files.cp(args, _defaults(args)))
    lifecycle = LIFECYCLE_COMMANDS.get(args.cmd)
    if lifecycle is not None:
        return asyncio.run(lifecycle(args, _defaults(args)))
    return asyncio.run(handlers[args.cmd](args))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command; every aviato error (and OSError) is one line on stderr and exit
    status 1; usage errors are argparse's, status 2."""
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
    except AviatoError as exc:
        _error(f"{type(exc).__name__}: {exc}")
        code = 1
    except OSError as exc:  # this machine's side: a folder we cannot write, ...
        _error(str(exc))
        code = 1
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
