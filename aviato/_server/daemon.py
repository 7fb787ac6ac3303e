"""Bits shared by the two daemons' entry points: start-up, exit, and what they log
about themselves (their command-line flags: aviato/_flags.py)."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from aviato.exceptions import AddressInUseError, AgentIdInUseError

__all__ = [
    "ONE_LINE_FAILURES",
    "daemon_setup",
    "exit_on_one_line_failure",
    "exit_watchdog",
    "exit_with_parent",
    "forbid_unpickling",
    "log_to_stderr",
    "one_line_failure",
    "warn_if_open",
]


#: Failures a daemon reports in one line (no traceback): the user's to fix, not a bug.
ONE_LINE_FAILURES = (AddressInUseError, AgentIdInUseError)


def one_line_failure(exc: BaseException) -> str | None:
    """The message of a failure to report in one line, found in ``exc`` or (task
    groups wrap what their body raises) in an exception group around it; else None."""
    if isinstance(exc, ONE_LINE_FAILURES):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = one_line_failure(inner)
            if found is not None:
                return found
    return None


def exit_on_one_line_failure(what: str, exc: BaseException) -> None:
    """Print ``what: message`` to stderr and exit 1 when ``exc`` is a one-line failure."""
    message = one_line_failure(exc)
    if message is not None:
        print(f"{what}: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)


async def exit_with_parent(parent_pid: int, stop: Callable[[], None]) -> None:
    """Call ``stop`` once ``parent_pid`` is gone (an embedded cluster whose owner died,
    even by ``kill -9``). Polls, because PR_SET_PDEATHSIG follows the spawning thread."""
    while True:
        await asyncio.sleep(0.25)
        if os.getppid() != parent_pid:
            stop()
            return


def forbid_unpickling() -> None:
    """Make every unpickling entry point raise in this process. The daemons never
    unpickle (user data stays opaque bytes outside the sandbox); with
    ``AVIATO_FORBID_UNPICKLE=1`` the test suite runs them this way to prove it.

    The module attributes (``pickle``'s, its C twin ``_pickle``'s, cloudpickle's) are
    replaced; an unpickler bound before that, or reached another way, still resolves
    every global it loads through ``find_class``, the step that can run code: an audit
    hook refuses that, whatever called it. (Loading plain data needs no global.)"""
    import _pickle
    import pickle
    import sys

    def refuse(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("unpickling is forbidden in aviato daemons")

    class Refused(pickle.Unpickler):
        def __init__(self, *_args: object, **_kwargs: object) -> None:
            refuse()

    targets: list[tuple[object, str, object]] = [
        (pickle, "loads", refuse),
        (pickle, "load", refuse),
        (pickle, "Unpickler", Refused),
        (pickle, "_loads", refuse),
        (pickle, "_load", refuse),
        (pickle, "_Unpickler", Refused),
        (_pickle, "loads", refuse),
        (_pickle, "load", refuse),
        (_pickle, "Unpickler", Refused),
    ]
    try:
        import cloudpickle
    except ImportError:
        pass
    else:
        targets += [(cloudpickle, "loads", refuse), (cloudpickle, "load", refuse)]
    for module, name, replacement in targets:
        setattr(module, name, replacement)

    def audit(event: str, _args: tuple[object, ...]) -> None:
        if event == "pickle.find_class":
            refuse()

    sys.addaudithook(audit)


def daemon_setup() -> None:
    """What both daemons do first, from their environment. SIGUSR1 dumps every
    thread's stack to stderr (from C: it works even when the event loop is stuck)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if os.environ.get("AVIATO_FORBID_UNPICKLE") == "1":
        forbid_unpickling()


def log_to_stderr(level: str, log_format: str = "text", process: str = "") -> None:
    """A daemon's log: every record at ``level`` or above, timed, on stderr; one
    line of text each, or (``log_format="json"``) one JSON object each."""
    if log_format == "json":
        from aviato._server.logjson import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(process))
        logging.basicConfig(level=level.upper(), handlers=[handler])
        return
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def exit_watchdog(grace: float, what: str, last: Callable[[], object] | None = None) -> None:
    """Once shutdown has begun: if the process still runs after ``grace`` seconds,
    dump every thread's stack and, when called from a running event loop, every task's
    (a shutdown stuck on an await shows only there), run ``last`` (what must not
    outlive the process, e.g. the agent's socket directory) and exit. A daemon whose
    shutdown is stuck must still go away, and say where it was stuck."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def expire() -> None:
        logging.getLogger("aviato").error(
            "%s: shutdown stuck for %g s; stacks follow, exiting", what, grace
        )
        faulthandler.dump_traceback(all_threads=True)
        if loop is not None:
            _dump_tasks(loop)
        if last is not None:
            try:
                last()
            except Exception:
                logging.getLogger("aviato").exception("%s: clean-up at exit failed", what)
        os._exit(70)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()


def _dump_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Each of ``loop``'s tasks and where it awaits, to stderr (from another thread: the
    loop is stuck or busy; a task set changing under us is retried, then given up)."""
    for _ in range(3):
        try:
            tasks = list(asyncio.all_tasks(loop))
            break
        except RuntimeError:  # the set changed while we copied it
            continue
    else:
        return
    print(f"{len(tasks)} asyncio tasks:", file=sys.stderr)
    for task in tasks:
        print(f"- {task.get_name()}: {task.get_coro()!r}", file=sys.stderr)
        with contextlib.suppress(Exception):
            task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


def warn_if_open(
    log_: logging.Logger, what: str, address: str, token: str | None, keys: str | None = None
) -> None:
    """Say plainly when a daemon listens beyond loopback with no credentials."""
    loopback = "127.0.0.1" in address or "localhost" in address or "[::1]" in address
    if keys:
        log_.info("%s: CURVE authentication on: only keys from %s are served", what, keys)
    elif token:
        log_.info("%s: requests must carry the cluster token", what)
    elif loopback:
        log_.info("%s: no authentication; listening on loopback only (%s)", what, address)
    else:
        log_.warning(
            "%s: NO AUTHENTICATION and listening on %s: anyone who reaches it can run "
            "code; set --token (or AVIATO_TOKEN) or bind to loopback",
            what,
            address,
        )
