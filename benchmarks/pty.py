#!/usr/bin/env python
"""Keystroke-to-echo latency through a terminal in a sandbox: aviato's PTY against
``docker exec -it`` in the same run.

    python benchmarks/pty.py [--quick] [--markdown FILE]

In each, a program on a terminal in the sandbox echoes every byte it reads
(``stty raw -echo; exec cat``, as a shell's line editor does); one byte is typed, and
the time until it comes back is one sample (sequential, N of them). Rows:

1. aviato, Docker, over the agent's local lane (a client on the agent's host);
2. aviato, Docker, over ZeroMQ (as a client on another host reaches it);
3. aviato, the local runtime (bubblewrap), over the lane;
4. ``docker exec -it`` on a local terminal (its CLI through dockerd), the peer.

Each aviato row runs on a scheduler and an agent of its own on loopback.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import os
import pty
import select
import socket
import tempfile
import time
import tty
from collections.abc import AsyncIterator

from aviato import OutputChunk, Sandbox, SandboxDefaults
from benchmarks._common import (
    IMAGE,
    ROOT,
    add_markdown_option,
    console,
    spawn_daemon,
    stop_process,
    write_markdown,
)
from benchmarks._stats import Stats, latency_table, ms

ECHO = ["sh", "-c", "stty raw -echo; echo ready; exec cat"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(it: AsyncIterator[OutputChunk], want: bytes) -> None:
    seen = b""
    while want not in seen:
        seen += (await anext(it)).data


async def aviato_row(name: str, runtime: str, n: int, lane: bool, tmp: Path) -> Stats:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    sched = spawn_daemon(["-m", "scheduler", "--bind", address], tmp / f"{name}-s.log", ROOT)
    agent = spawn_daemon(
        ["-m", "agent", "--scheduler", address, "--runtime", runtime, "--slots", "2"],
        tmp / f"{name}-a.log",
        ROOT,
    )
    stats = Stats(name)
    try:
        defaults = SandboxDefaults(container_image=IMAGE, scheduler=address, local_lane=lane)
        async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
            p = await sb.spawn(ECHO, pty=True)
            out = aiter(p.output())
            await _until(out, b"ready")
            for i in range(n + 5):  # the first few warm up
                key = bytes([97 + i % 26])
                t0 = time.perf_counter()
                await p.write(key)
                await _until(out, key)
                if i >= 5:
                    stats.add(time.perf_counter() - t0)
            await p.kill()
    finally:
        stop_process(agent)
        stop_process(sched)
    return stats


def docker_row(n: int) -> Stats:
    stats = Stats("docker exec -it")
    name = f"aviato-bench-pty-{os.getpid()}"
    os.system(f"docker run -d --rm --name {name} {IMAGE} sleep infinity >/dev/null")
    try:
        pid, fd = pty.fork()
        if pid == 0:  # our terminal raw, as the CLI makes it: only the sandbox echoes
            tty.setraw(0)
            os.execvp("docker", ["docker", "exec", "-it", name, *ECHO])
        seen = b""

        def read_until(want: bytes, timeout: float = 30) -> None:
            nonlocal seen
            deadline = time.monotonic() + timeout
            while want not in seen:
                if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"no {want!r} from docker exec")
                seen += os.read(fd, 4096)
            seen = seen[seen.index(want) + len(want) :]

        read_until(b"ready")
        for i in range(n + 5):
            key = bytes([97 + i % 26])
            t0 = time.perf_counter()
            os.write(fd, key)
            read_until(key)
            if i >= 5:
                stats.add(time.perf_counter() - t0)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    finally:
        os.system(f"docker rm -f {name} >/dev/null 2>&1")
    return stats


def markdown(rows: list[Stats], base: Stats | None) -> str:
    lines = [
        "| keystroke to echo | n | p50 ms | p99 ms | p50 vs docker exec -it |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in rows:
        ratio = f"{s.p50 / base.p50:.2f}x" if base is not None and base.p50 > 0 else "-"
        lines.append(f"| {s.name} | {len(s.samples)} | {ms(s.p50)} | {ms(s.p99)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer keystrokes")
    parser.add_argument(
        "--only", default="docker,local,peer", help="rows: docker, local, peer (comma-separated)"
    )
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    only = {x.strip() for x in args.only.split(",")}
    n = 50 if args.quick else 300
    load = os.getloadavg()
    console.print(f"[dim]{os.cpu_count()} cores, load {load[0]:.2f}/{load[1]:.2f}, n={n}[/]")
    with tempfile.TemporaryDirectory(prefix="aviato-bench-pty-") as d:
        tmp = Path(d)
        rows = []
        if "docker" in only:
            rows.append(asyncio.run(aviato_row("aviato, docker, lane", "docker", n, True, tmp)))
            rows.append(asyncio.run(aviato_row("aviato, docker, zmq", "docker", n, False, tmp)))
        if "local" in only:
            rows.append(asyncio.run(aviato_row("aviato, local, lane", "local", n, True, tmp)))
        if "peer" in only:
            rows.append(docker_row(n))
    peer = rows[-1] if "peer" in only else None
    console.print(latency_table("Keystroke to echo through a PTY", rows, baseline=peer))
    text = markdown(rows, peer)
    print(text)
    if args.markdown:
        write_markdown(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
