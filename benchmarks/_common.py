"""What every part of the cluster benchmark shares: the run's constants, the sample plan,
the console, and small process / timing helpers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console

IMAGE = "python:3.11"
RUN_ID = uuid.uuid4().hex[:8]
BENCH_LABEL = "aviato-bench.run"
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Plan:
    create_n: int  # samples per method, benchmark 1
    exec_n: int  # samples per method, benchmark 2
    sched_sandboxes: int  # sandboxes per scheduler phase (each one create + one stop)
    fake_agents: int = 50
    agent_slots: int = 100_000
    clients: int = 4
    window: int = 64  # outstanding requests per client socket
    create_timeout: float = 5.0  # CreateSandbox.timeout_seconds in benchmark 3
    refusals_n: int = 20  # refused requests per kind of client


FULL = Plan(create_n=20, exec_n=200, sched_sandboxes=2500)
QUICK = Plan(create_n=5, exec_n=40, sched_sandboxes=500, refusals_n=3)


async def sh(*argv: str, timeout: float = 60.0) -> str:
    """Run a command; its stdout, stripped. Killed (and raised) after ``timeout``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode().strip()}")
    return out.decode().strip()


async def timed(coro: Awaitable[T], timeout: float, what: str) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        raise TimeoutError(f"{what} took more than {timeout:g}s") from None


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def rotated(items: list[T], k: int) -> list[T]:
    k %= len(items)
    return items[k:] + items[:k]


def check_exit(code: int | None, what: str) -> None:
    """Raise unless ``what`` (a ``true`` run somewhere) exited 0."""
    if code != 0:
        raise RuntimeError(f"{what} exited {code}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc`` if it still runs; SIGKILL it after 10 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def spawn_daemon(
    args: list[str],
    logfile: Path,
    cwd: Path,
    *,
    log_level: str = "WARNING",
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python ARGS`` as a quiet daemon logging to ``logfile``: no token from our
    environment, its own session, and it exits by itself if this process dies."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "AVIATO_TOKEN"}
    env["AVIATO_PARENT_PID"] = str(os.getpid())
    env.update(extra_env or {})
    with open(logfile, "wb") as log:
        return subprocess.Popen(
            [sys.executable, *args, "--log-level", log_level],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def add_markdown_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the markdown table, with each target's verdict, to FILE "
        "(what the README's table is generated from)",
    )


def write_markdown(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n")
    console.print(f"[dim]markdown written to {path}[/]")


def daemon_module(cmdline: list[str]) -> str:
    """Which daemon (``scheduler``, ``agent``) a ``python [-P] -m NAME ...`` command line
    runs ("" for anything else): the embedded cluster starts them with -P."""
    if "-m" not in cmdline[:4]:
        return ""
    i = cmdline.index("-m")
    return cmdline[i + 1] if i + 1 < len(cmdline) else ""
