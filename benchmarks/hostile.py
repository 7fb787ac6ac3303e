#!/usr/bin/env python
"""What a sandbox can and cannot do: hostile programs run inside a sandbox of each
isolation level, each found blocked or allowed.

    python benchmarks/hostile.py [--markdown FILE]

Levels: ``runc`` and ``gvisor`` (Docker, on an engine of this run's own that carries
the runsc runtimes, tests/_gvisor_engine.py; the host's engine is not touched),
``runc+userns`` (Docker on a second engine of this run's own with ``--userns-remap``,
tests/_userns_engine.py: root inside is an unprivileged uid on the host), ``bwrap``
(the local runtime: bubblewrap + cgroups) and ``bwrap+userns`` (the same with
``--userns-uid``: root inside is an unprivileged uid on the host). One scheduler and
agent per runtime setting, on loopback; image python:3.11.

Programs (one row each; a cell says blocked or ALLOWED, and what the program saw):

- fork bomb: forks until refused (the agents run with ``--pids-limit 100``); blocked when it
  stops far short of 5,000 (and the host still starts processes);
- memory hog: touches 1 GiB in a sandbox with ``memory_bytes=128 MiB``;
- read /proc/kcore; read a root-only (0600) file of the host's (``/var/tmp``);
- mount a tmpfs; ptrace-attach to a host process (a ``sleep`` of this script's);
- load a kernel module (``finit_module``);
- open a raw socket; write to ``/proc/sys`` (a value written back unchanged);
- reach the Docker socket; reach the scheduler's port (on the host's loopback);
- network egress to a listener on a host address that is not loopback, with the
  default network, with ``network="none"``, and with ``network_allow`` naming only
  another port (refused by the runtimes that cannot give it: said so).

The verdict per level counts the blocked rows. Everything it starts (engine, daemons,
sandboxes, the host file and process) is gone at exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import psutil
from rich.table import Table

from aviato import SandboxDefaults
from benchmarks._common import (
    IMAGE,
    ROOT,
    RUN_ID,
    add_markdown_option,
    console,
    spawn_daemon,
    stop_process,
    wait_until,
    write_markdown,
)
from tests._gvisor_engine import GvisorEngine, gvisor_problem
from tests._hostile import ROWS, Target, probe_level, surprises
from tests._tally import Tally
from tests._userns_engine import UsernsEngine, userns_problem

LEVELS = ("runc", "runc+userns", "gvisor", "bwrap", "bwrap+userns")
USERNS_BASE = 400_000


@contextlib.contextmanager
def cluster(tmp: Path, name: str, agent_args: list[str], env: dict[str, str]) -> Iterator[str]:
    """A scheduler and one agent; yields the scheduler's address."""
    ready = tmp / f"{name}-scheduler.addr"
    procs = [
        spawn_daemon(
            ["-m", "scheduler", "--bind", "tcp://127.0.0.1:0", "--ready-file", str(ready)],
            tmp / f"{name}-scheduler.log",
            ROOT,
        )
    ]
    try:
        wait_until(ready.exists, 30, "the scheduler to listen")
        address = ready.read_text().strip()
        procs.append(
            spawn_daemon(
                [
                    "-m", "agent", "--scheduler", address, "--slots", "4",
                    "--agent-id", f"bench-hostile-{name}-{RUN_ID}", "--pids-limit", "100",
                    *agent_args,
                ],
                tmp / f"{name}-agent.log",
                ROOT,
                extra_env={"AVIATO_STATE_DIR": str(tmp / f"{name}-state"), **env},
            )
        )  # fmt: skip
        yield address
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def _address_of(bridge: str) -> str:
    for addr in psutil.net_if_addrs().get(bridge, []):
        if addr.family == socket.AF_INET:
            return str(addr.address)
    raise SystemExit(f"hostile: bridge {bridge} has no address")


async def run(markdown: Path | None) -> None:
    problem = gvisor_problem() or userns_problem()
    if problem:
        raise SystemExit(f"hostile benchmark: {problem}")
    if not shutil.which("bwrap"):
        raise SystemExit("hostile benchmark: bubblewrap is not installed")
    engine, remapping = GvisorEngine(), UsernsEngine()
    tmp = Path(tempfile.mkdtemp(prefix="aviato-bench-hostile-"))
    secret_dir = Path(tempfile.mkdtemp(prefix="aviato-hostile-", dir="/var/tmp"))
    secret_dir.chmod(0o755)
    secret = secret_dir / "secret"
    secret.write_text("the host's\n")
    secret.chmod(0o600)
    victim = subprocess.Popen(["sleep", "600"])
    results: dict[str, dict[str, tuple[bool | None, str]]] = {}
    try:
        console.print("[dim]starting a Docker engine with the runsc runtimes...[/]")
        engine.start()
        console.print("[dim]starting a Docker engine with --userns-remap...[/]")
        remapping.start()
        host = _address_of(engine.bridge)
        settings = (
            ("docker", ("runc", "gvisor"), ["--runtime", "docker", "--isolation", "runc,gvisor"],
             {"DOCKER_HOST": engine.host}),
            ("remap", ("runc+userns",), ["--runtime", "docker", "--isolation", "runc"],
             {"DOCKER_HOST": remapping.host}),
            ("local", ("bwrap",), ["--runtime", "local"], {}),
            ("userns", ("bwrap+userns",), ["--runtime", "local", "--userns-uid",
                                            str(USERNS_BASE)], {}),
        )  # fmt: skip
        with Tally(host) as tally:
            for name, levels, args, env in settings:
                with cluster(tmp, name, args, env) as address:
                    port = int(address.rsplit(":", 1)[1])
                    for level in levels:
                        console.print(f"[dim]{level}...[/]")
                        isolation = level.split("+")[0]
                        defaults = SandboxDefaults(
                            container_image=IMAGE,
                            scheduler=address,
                            isolation=isolation,
                            start_timeout_seconds=60,
                        )
                        target = Target(
                            defaults, port, host, tally.address[1], victim.pid, str(secret)
                        )
                        results[level] = await probe_level(target)
    finally:
        victim.kill()
        victim.wait()
        engine.stop()
        remapping.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(secret_dir, ignore_errors=True)
    table, md = render(results)
    console.print(table)
    console.print(md)
    if markdown is not None:
        write_markdown(markdown, md)


def _cell(value: tuple[bool | None, str] | None) -> str:
    if value is None:
        return "-"
    blocked, seen = value
    word = "n/a" if blocked is None else "blocked" if blocked else "**ALLOWED**"
    return f"{word} ({seen if len(seen) <= 48 else seen[:45] + '...'})"


def render(results: dict[str, dict[str, tuple[bool | None, str]]]) -> tuple[Table, str]:
    levels = [lv for lv in LEVELS if lv in results]
    table = Table(title="hostile code inside a sandbox, per isolation level")
    table.add_column("")
    md = ["| | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for lv in levels:
        table.add_column(lv)
    for row in ROWS:
        cells = [_cell(results[lv].get(row)) for lv in levels]
        table.add_row(row, *cells)
        md.append(f"| {row} | " + " | ".join(cells) + " |")
    verdicts = []
    for lv in levels:
        known = [v for v in results[lv].values() if v[0] is not None]
        odd = surprises(lv, results[lv])
        verdicts.append(
            f"{sum(1 for v in known if v[0])}/{len(known)} blocked, "
            + ("as designed" if not odd else "UNEXPECTED: " + "; ".join(odd))
        )
    table.add_row("verdict", *verdicts)
    md.append("| **verdict** | " + " | ".join(verdicts) + " |")
    md.append(
        "\nALLOWED is what the program managed; the parenthesis is what it saw (an errno,"
        " or what it did). n/a: the runtime refuses that setting (its error, shortened)."
    )
    return table, "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_markdown_option(parser)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("hostile benchmark: needs root (a second Docker engine)")
    asyncio.run(run(args.markdown))


if __name__ == "__main__":
    main()
