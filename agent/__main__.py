"""``python -m agent --scheduler tcp://HOST:5555 --slots N --runtime docker``"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import uvloop

from agent.identity import Identity, claim, default_agent_id, state_dir
from agent.resources import Capacity, parse_gpus, parse_memory
from agent.runtime import make_runtime
from agent.runtime.local_userns import parse_base
from agent.server import AgentServer
from agent.spares import parse_warm
from agent.storage import allowed_roots
from aviato._auth import CurveKeys
from aviato._flags import (
    RUNTIMES,
    add_keys,
    add_log_format,
    add_log_level,
    add_metrics,
    add_token,
    default_slots,
    endpoint,
)
from aviato._server.auth import ServerKeys, agent_keys
from aviato._server.daemon import (
    daemon_setup,
    exit_on_one_line_failure,
    exit_watchdog,
    exit_with_parent,
    log_to_stderr,
)
from aviato._server.metrics import MetricsEndpoint
from aviato.exceptions import AgentIdInUseError, ConfigurationError, UnauthorizedError

T = TypeVar("T")
SHUTDOWN_GRACE = 50.0  # seconds from a stop request to exit, stuck or not


def _labels(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--label takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _parsed(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser raising ValueError with a message for the user."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent", description=__doc__)
    p.add_argument(
        "--scheduler",
        default=os.environ.get("AVIATO_SCHEDULER"),
        type=endpoint(bind=False),
        help="scheduler endpoint, e.g. tcp://10.0.0.1:5555 (default $AVIATO_SCHEDULER)",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=default_slots(),
        help="how many sandboxes this host runs at once",
    )
    p.add_argument(
        "--runtime",
        default=os.environ.get("AVIATO_RUNTIME", "docker"),
        choices=RUNTIMES,
        help="sandbox runtime",
    )
    p.add_argument(
        "--agent-id",
        help="unique id in the cluster; its sandboxes are labelled with it and reaped when"
        " it starts again (default: the hostname plus a suffix remembered in --state-dir"
        " for this scheduler and --bind, so a restarted agent gets the same id)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="where agent ids are remembered and locked (default $AVIATO_STATE_DIR, else"
        " $XDG_STATE_HOME/aviato, else ~/.local/state/aviato)",
    )
    p.add_argument(
        "--bind",
        default="tcp://127.0.0.1:0",
        type=endpoint(bind=True),
        help="data-plane endpoint for clients (port 0: any free port); loopback by default,"
        " use tcp://0.0.0.0:PORT with --advertise-host for other hosts",
    )
    p.add_argument("--advertise-host", help="host name or address clients use to reach us")
    p.add_argument(
        "--publish-host",
        help="the address sandboxes' ports are published on and reached at (default: the"
        " host clients reach this agent at: --advertise-host, else --bind's); with Docker,"
        " an address of the engine's host",
    )
    p.add_argument(
        "--label",
        action="append",
        default=[],
        help="KEY=VALUE, repeatable: a create with agent_labels={KEY: VALUE} is placed"
        " only on agents that carry it",
    )
    p.add_argument(
        "--gpus",
        type=_parsed(parse_gpus),
        default=None,
        help="GPU ids this host gives sandboxes, e.g. 0,1 (each to one sandbox at a time;"
        " 'none' for none; default: those nvidia-smi -L lists)",
    )
    p.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="CPUs to advertise for placement (default: the cores this process may use)",
    )
    p.add_argument(
        "--memory",
        type=_parsed(parse_memory),
        default=None,
        help="memory to advertise for placement, bytes or e.g. 16G (default: the host's)",
    )
    p.add_argument("--pids-limit", type=int, default=1024)
    p.add_argument(
        "--cap-add",
        action="append",
        default=[],
        metavar="CAP",
        help="a capability sandboxes keep (Docker runtime; repeatable; default none, e.g."
        " CHOWN SETUID SETGID for images whose tools drop privileges)",
    )
    p.add_argument(
        "--isolation",
        default=os.environ.get("AVIATO_ISOLATION"),
        help="isolation levels sandboxes may ask for, the default first: runc (Docker's"
        " default), gvisor (Docker with the runsc runtimes registered; see README), or"
        " runc,gvisor for both; the local runtime offers bwrap only (default"
        " $AVIATO_ISOLATION, else runc on Docker)",
    )
    p.add_argument(
        "--userns-uid",
        default=os.environ.get("AVIATO_USERNS_UID"),
        metavar="BASE",
        help="local runtime: root inside a sandbox is an unprivileged uid BASE+n on the"
        " host (a user namespace per sandbox; default $AVIATO_USERNS_UID, else off)",
    )
    p.add_argument(
        "--probe-image",
        default="python:3.11",
        help="image of the probe sandbox run at start for --isolation gvisor",
    )
    add_token(p)
    add_keys(
        p,
        help="CURVE key directory from `aviato keys` (default $AVIATO_KEYS): authenticate to"
        " the scheduler and serve only client keys",
    )
    p.add_argument(
        "--agent-key",
        default=os.environ.get("AVIATO_AGENT_KEY"),
        help="this host's key in KEYS/agents (default $AVIATO_AGENT_KEY, else the only one"
        " whose secret is there)",
    )
    p.add_argument(
        "--no-supervisor",
        action="store_true",
        help="exec and files through the runtime (docker exec) instead of the in-sandbox"
        " supervisor",
    )
    p.add_argument(
        "--keep-on-exit",
        action="store_true",
        help="leave sandboxes running when the agent exits (default: stop them)",
    )
    p.add_argument(
        "--warm",
        action="append",
        default=[],
        metavar="IMAGE=N",
        help="keep N pre-started spare sandboxes of IMAGE (default resources), so that a"
        " create of it is ready in milliseconds (Docker and local runtimes; repeatable;"
        " spares fill free slots only)",
    )
    p.add_argument(
        "--warm-learn",
        type=int,
        default=0,
        metavar="N",
        help="also keep up to N spares of the image and resource shapes created in the"
        " last minute, most created first (default 0: none)",
    )
    add_metrics(p)
    p.add_argument(
        "--allow-mount",
        action="append",
        default=[d for d in os.environ.get("AVIATO_ALLOW_MOUNT", "").split(os.pathsep) if d],
        metavar="DIR",
        help="a host directory whose contents sandboxes may mount (Mount(source, target));"
        " paths are resolved with symlinks followed, so nothing outside DIR is reachable"
        " (repeatable; also $AVIATO_ALLOW_MOUNT, ':'-separated; default: no host mounts)",
    )
    add_log_level(p)
    add_log_format(p)
    return p


def _keys(args: argparse.Namespace) -> tuple[ServerKeys, CurveKeys] | None:
    if not args.keys:
        return None
    try:
        return agent_keys(args.keys, args.agent_key)
    except UnauthorizedError as exc:
        raise SystemExit(f"agent: {exc}") from None


def _identity(args: argparse.Namespace) -> Identity:
    """Claim our agent id before touching anything keyed by it (see agent/identity.py)."""
    directory = Path(args.state_dir) if args.state_dir else state_dir()
    try:
        if args.agent_id:
            return claim(args.agent_id, directory)
        return default_agent_id(args.scheduler, args.bind, directory)
    except AgentIdInUseError as exc:
        print(f"agent: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except OSError as exc:
        raise SystemExit(f"agent: cannot use the state directory {directory}: {exc}") from None


async def run(
    args: argparse.Namespace,
    keys: tuple[ServerKeys, CurveKeys] | None,
    identity: Identity,
) -> None:
    if args.cap_add and args.runtime != "docker":
        raise SystemExit("--cap-add applies to the Docker runtime only (--runtime docker)")
    extra = {"cap_add": args.cap_add} if args.cap_add else {}
    try:
        userns = parse_base(args.userns_uid)
    except ValueError as exc:
        raise SystemExit(f"agent: {exc}") from None
    if userns is not None:
        if args.runtime != "local":
            raise SystemExit(
                "--userns-uid applies to the local runtime (--runtime local); for Docker,"
                " set userns-remap in the engine's daemon.json"
            )
        extra["userns_uid"] = userns
    try:
        warm = parse_warm(args.warm)
    except ValueError as exc:
        raise SystemExit(f"agent: {exc}") from None
    if args.warm_learn < 0:
        raise SystemExit("agent: --warm-learn must be 0 or more")
    try:
        roots = allowed_roots(args.allow_mount)
    except ValueError as exc:
        raise SystemExit(f"agent: {exc}") from None
    try:
        runtime = make_runtime(
            args.runtime, isolation=args.isolation, pids_limit=args.pids_limit, **extra
        )
        probe = await runtime.probe(args.probe_image)
    except ConfigurationError as exc:
        raise SystemExit(f"agent: {exc}") from None
    runtime.probe_note = probe
    if probe:
        logging.getLogger("aviato.agent").info("isolation probe: %s", probe)
    server = AgentServer(
        runtime,
        scheduler=args.scheduler,
        agent_id=args.agent_id,
        slots=args.slots,
        bind=args.bind,
        advertise_host=args.advertise_host,
        labels=_labels(args.label),
        token=args.token,
        keys=keys,
        supervisor=not args.no_supervisor,
        instance=identity.instance,
        replaces=identity.replaces,
        warm=warm,
        learn_spares=args.warm_learn,
        state_directory=Path(args.state_dir) if args.state_dir else state_dir(),
        allow_mounts=roots,
        publish_host=args.publish_host,
        capacity=Capacity.of_host(args.cpus, args.memory, args.gpus),
    )
    endpoint = None
    if args.metrics is not None:
        from agent.metrics import AgentMetrics

        server.metrics = AgentMetrics(server)
        server.metrics.attach()
        endpoint = MetricsEndpoint(server.metrics.registry, f"agent {args.agent_id}")
        await endpoint.start(args.metrics[0], args.metrics[1], logging.getLogger("aviato.agent"))
    stopping = False

    def stop() -> None:
        # Stopping its sandboxes may take 30 s; whoever stops us may wait 60. Stuck or
        # not, we are gone within SHUTDOWN_GRACE, with our stacks in the log if stuck.
        nonlocal stopping
        if not stopping:
            stopping = True
            exit_watchdog(SHUTDOWN_GRACE, f"agent {args.agent_id}", last=server.remove_socket_dir)
        server.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    parent = os.environ.get("AVIATO_PARENT_PID")

    async def note_address() -> None:
        await server.ready.wait()
        identity.note_address(server.address)

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(exit_with_parent(int(parent), stop)) if parent else None
        noter = tg.create_task(note_address())
        try:
            await server.serve(cleanup_on_exit=not args.keep_on_exit)
        finally:
            if endpoint is not None:
                await endpoint.close()
        noter.cancel()
        if watcher is not None:
            watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    daemon_setup()
    if not args.scheduler:
        print("agent: --scheduler (or $AVIATO_SCHEDULER) is required", file=sys.stderr)
        raise SystemExit(2)
    if args.slots < 1:
        raise SystemExit("agent: --slots must be at least 1")
    if args.cpus is not None and not 0 < args.cpus <= 1 << 20:
        raise SystemExit("agent: --cpus must be above 0")
    keys = _keys(args)
    log_to_stderr(args.log_level, args.log_format, "agent")
    identity = _identity(args)
    args.agent_id = identity.agent_id
    code = 0
    try:
        uvloop.run(run(args, keys, identity))
    except BaseException as exc:
        identity.release()
        exit_on_one_line_failure("agent", exc)
        logging.getLogger("aviato.agent").exception("agent failed")
        code = 1
    # Any exit that gets here left nothing to take over (kill -9 never gets here).
    identity.release()
    # Everything is stopped and closed by now. Exit at once: a Docker SDK call stuck in
    # a pool thread must not hold the process at the interpreter's thread joins.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
