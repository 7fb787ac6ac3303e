#!/usr/bin/env python
"""Streamed files: upload and download of a big file, aviato against ``docker cp``.

    python benchmarks/files.py [--quick] [--size-mib N] [--markdown FILE]

One run, one machine: a cluster of one scheduler and one agent (Docker runtime, started
here), one ``python:3.11`` sandbox (its supervisor serves the files). A file of
``--size-mib`` (2048 by default; 256 with --quick) of random bytes is uploaded with
``sb.upload`` and downloaded with ``sb.download``, over the local lane (the client on
the agent's host) and over ZeroMQ (the lane off: as from another host), then copied in
and out of the same container with ``docker cp``. Each transfer is checked whole
(SHA-256). Rows:

1. MB/s of each transfer (file size / wall time), against ``docker cp``'s;
2. the peak growth of the resident memory (RSS, sampled every 10 ms) of the client
   (this process), the agent and the in-sandbox supervisor over each aviato transfer:
   flat (at most 64 MB, whatever the file's size) is the target.

Prints a table with each target's verdict, then the same in markdown.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil
from rich.markup import escape
from rich.table import Table

from aviato._local import LocalCluster
from benchmarks._cleanup import Cleanup
from benchmarks._common import IMAGE, RUN_ID, add_markdown_option, console, write_markdown

MB = 1 << 20
#: Flat: the growth allowed to each process, whatever the file's size.
FLAT_MB = 64
#: aviato's transfers against docker cp's: at least this fraction of its MB/s.
SPEED_TARGET = 0.5


@dataclass
class Measured:
    seconds: float
    growth: dict[str, float] = field(default_factory=dict)  # process -> peak RSS growth, MB


class PeakRss:
    """The peak RSS growth of some processes while the block runs (MB)."""

    def __init__(self, procs: dict[str, psutil.Process]) -> None:
        self.procs = procs

    @contextmanager
    def watch(self, out: dict[str, float]) -> Iterator[None]:
        base = {name: p.memory_info().rss for name, p in self.procs.items()}
        peak = dict(base)
        done = threading.Event()

        def sample() -> None:
            while True:
                for name, p in self.procs.items():
                    try:
                        peak[name] = max(peak[name], p.memory_info().rss)
                    except psutil.Error:
                        pass
                if done.wait(0.01):
                    return

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            for name in self.procs:
                out[name] = (peak[name] - base[name]) / MB


def make_file(path: Path, size: int) -> str:
    """``size`` random bytes (a 64 MiB random block repeated: nothing compresses it)."""
    block = os.urandom(64 * MB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            f.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MB):
            digest.update(block)
    return digest.hexdigest()


def agent_process(agent_id: str) -> psutil.Process:
    for child in psutil.Process().children(recursive=True):
        try:
            if "agent" in child.cmdline() and agent_id in child.cmdline():
                return child
        except psutil.Error:
            continue
    raise RuntimeError(f"cannot find agent {agent_id}")


def supervisor_process(container: str) -> psutil.Process:
    """The container's supervisor, by its host pid (``docker top``)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        top = subprocess.run(
            ["docker", "top", container, "-eo", "pid,args"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        for line in top.splitlines()[1:]:
            pid, _, args = line.strip().partition(" ")
            if "aviato_supervisor" in args:
                return psutil.Process(int(pid))
        time.sleep(0.1)
    raise RuntimeError(f"no supervisor in {container}")


async def run(size: int, work: Path) -> tuple[dict[str, Measured], dict[str, Measured]]:
    """(uploads, downloads) by system."""
    from aviato import Sandbox, SandboxDefaults

    cleanup = Cleanup()
    agent_id = f"bench-{RUN_ID}-files"
    cleanup.agent_ids.add(agent_id)
    cluster = LocalCluster(agent_id=agent_id, runtime="docker")
    cleanup.clusters.append(cluster)
    ups: dict[str, Measured] = {}
    downs: dict[str, Measured] = {}
    try:
        cluster.start(timeout=60)
        src = work / "in.bin"
        console.print(f"[dim]writing a {size // MB} MiB file...[/]")
        digest = make_file(src, size)
        agent = agent_process(agent_id)
        for system, lane in (("aviato (lane)", True), ("aviato (ZeroMQ)", False)):
            defaults = SandboxDefaults(
                container_image=IMAGE, scheduler=cluster.address, local_lane=lane
            )
            async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
                container = f"aviato-{sb.sandbox_id}"
                procs = {
                    "client": psutil.Process(),
                    "agent": agent,
                    "supervisor": supervisor_process(container),
                }
                rss = PeakRss(procs)
                up = ups[system] = Measured(0.0)
                with console.status(f"{system}: upload"), rss.watch(up.growth):
                    t0 = time.perf_counter()
                    await sb.upload(src, "/tmp/big.bin")
                    up.seconds = time.perf_counter() - t0
                back = work / "back.bin"
                down = downs[system] = Measured(0.0)
                with console.status(f"{system}: download"), rss.watch(down.growth):
                    t0 = time.perf_counter()
                    await sb.download("/tmp/big.bin", back)
                    down.seconds = time.perf_counter() - t0
                if sha(back) != digest:
                    raise AssertionError(f"{system}: the file came back changed")
                back.unlink()
                if lane:  # docker cp, same container, same run
                    with console.status("docker cp in"):
                        t0 = time.perf_counter()
                        subprocess.run(
                            ["docker", "cp", str(src), f"{container}:/tmp/cp.bin"],
                            check=True,
                            timeout=3600,
                        )
                        ups["docker cp"] = Measured(time.perf_counter() - t0)
                    with console.status("docker cp out"):
                        t0 = time.perf_counter()
                        subprocess.run(
                            ["docker", "cp", f"{container}:/tmp/cp.bin", str(back)],
                            check=True,
                            timeout=3600,
                        )
                        downs["docker cp"] = Measured(time.perf_counter() - t0)
                    if sha(back) != digest:
                        raise AssertionError("docker cp: the file came back changed")
                    back.unlink()
    finally:
        cleanup.sweep()
    return ups, downs


@dataclass
class Row:
    what: str
    unit: str
    values: dict[str, float]
    target: str
    verdict: str


SYSTEMS = ("aviato (lane)", "aviato (ZeroMQ)", "docker cp")


def rows(size: int, ups: dict[str, Measured], downs: dict[str, Measured]) -> list[Row]:
    out: list[Row] = []
    for name, by in (("upload", ups), ("download", downs)):
        speed = {s: size / MB / m.seconds for s, m in by.items()}
        cp = speed.get("docker cp")
        slowest = min((v for s, v in speed.items() if s != "docker cp"), default=None)
        ok = None if cp is None or slowest is None else slowest >= SPEED_TARGET * cp
        verdict = "not measured" if ok is None else "met" if ok else "NOT met"
        out.append(
            Row(
                f"{name} of {size // MB} MiB",
                "MB/s",
                speed,
                f"≥ {SPEED_TARGET:g}x docker cp's",
                verdict,
            )
        )
    for name, by in (("upload", ups), ("download", downs)):
        for proc in ("client", "agent", "supervisor"):
            growth = {s: m.growth[proc] for s, m in by.items() if proc in m.growth}
            ok = all(v <= FLAT_MB for v in growth.values()) if growth else None
            verdict = "not measured" if ok is None else "met" if ok else "NOT met"
            out.append(
                Row(
                    f"{proc} peak RSS growth, {name}",
                    "MB",
                    growth,
                    f"≤ {FLAT_MB} MB (file: {size // MB} MB)",
                    verdict,
                )
            )
    return out


def fmt(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def print_report(table_rows: list[Row]) -> str:
    table = Table(title="Streamed files: upload and download against docker cp")
    for col in ("row", "unit", *SYSTEMS, "target", "verdict"):
        table.add_column(col, justify="right" if col in SYSTEMS else "left")
    md = [
        "| " + " | ".join(("row", "unit", *SYSTEMS, "target", "verdict")) + " |",
        "|" + "---|" * (len(SYSTEMS) + 4),
    ]
    for row in table_rows:
        cells = [fmt(row.values.get(s)) for s in SYSTEMS]
        color = "green" if row.verdict == "met" else "red"
        table.add_row(row.what, row.unit, *cells, row.target, f"[{color}]{escape(row.verdict)}[/]")
        md.append("| " + " | ".join([row.what, row.unit, *cells, row.target, row.verdict]) + " |")
    console.print(table)
    console.print("\n[bold]Markdown[/]\n")
    print("\n".join(md))
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB file")
    parser.add_argument("--size-mib", type=int, default=None, help="the file's size (2048)")
    add_markdown_option(parser)
    args = parser.parse_args(argv)
    size = (args.size_mib or (256 if args.quick else 2048)) * MB
    with tempfile.TemporaryDirectory(prefix="aviato-bench-files-") as tmp:
        ups, downs = asyncio.run(run(size, Path(tmp)))
    table_rows = rows(size, ups, downs)
    markdown = print_report(table_rows)
    if args.markdown:
        write_markdown(args.markdown, markdown)
    return 0 if all(r.verdict == "met" for r in table_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
