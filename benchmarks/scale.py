#!/usr/bin/env python
"""The scheduler at scale: a real ``python -m scheduler`` with 1,000 (or more) fake agents
and 100k live sandboxes, against issue 11's targets.

    python benchmarks/scale.py [--agents 1000] [--sandboxes 100000] [--next-rung 5000]
    python benchmarks/scale.py --quick          (200 agents, 10k sandboxes: a smoke run)

Fake agents are DEALER sockets in this process speaking aviato.protocol (see
benchmarks/_control_plane.py): every placement starts at once, heartbeats as the real
agent sends them (deltas, a full list every 20th). Clients are pipelined DEALER
sockets. The listing and ``aviato ps`` run as separate client processes, through the
real client library and CLI. Measured, in this order:

1. idle scheduler CPU with the agents registered and no sandbox;
2. filling the table to N live sandboxes (creates/s while it grows), its memory;
3. idle scheduler CPU with N live sandboxes;
4. a burst of creates on top of the N (creates/s, scheduler CPU per create), then
   their stops;
5. creates paced at 2,500/s (half the target rate), each stopped once answered:
   create latency p50/p99;
6. the full listing streamed to a client (``Sandbox.list``), the first page
   (``Sandbox.page``) and ``aviato ps``, with agents heartbeating throughout;
7. no false death: every fake agent still alive, none told it is unregistered, no
   "declared dead" in the scheduler's log; then one fake agent goes silent, and the
   time until the scheduler declares it dead.

Prints a table with each target and its verdict (met / NOT met), and its markdown.
The machine is shared and small: the load average is printed with the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import uvloop
import zmq
import zmq.asyncio

from aviato.protocol import ClusterStatus, ClusterStatusReply, MsgType, SandboxSpec
from benchmarks._cleanup import Cleanup
from benchmarks._common import (
    IMAGE,
    ROOT,
    RUN_ID,
    add_markdown_option,
    console,
    write_markdown,
)
from benchmarks._control_plane import (
    Client,
    FakeAgent,
    Phase,
    _dealer,
    _frame,
    _request,
    _split,
    _unpack,
    create_body,
    heartbeat_all,
    serve_all,
    start_scheduler,
)
from benchmarks._stats import Stats

PACED_RATE = 2500.0


@dataclass
class Rung:
    agents: int
    sandboxes: int
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def _main_thread_cpu(p: psutil.Process) -> float:
    """CPU seconds of the process's main thread (the event loop); the rest of its CPU
    is ZeroMQ's I/O thread (moving bytes between the sockets and the kernel)."""
    return sum(t.user_time + t.system_time for t in p.threads() if t.id == p.pid)


async def _idle_cpu(sched: psutil.Process, seconds: float) -> float:
    """The scheduler's CPU use (fraction of one core) over ``seconds`` of idling."""
    c0, t0 = _cpu(sched), time.perf_counter()
    await asyncio.sleep(seconds)
    return (_cpu(sched) - c0) / (time.perf_counter() - t0)


async def _status(ctx: zmq.asyncio.Context, address: str) -> ClusterStatusReply:
    """The status with every page of agents."""
    sock = _dealer(ctx, address)
    agents: list[Any] = []
    cursor, n = "", 0
    try:
        while True:
            n += 1
            reply = await _request(sock, ClusterStatus(cursor=cursor), n, "ClusterStatusReply")
            assert isinstance(reply, ClusterStatusReply)
            agents += reply.agents
            if not reply.next_cursor:
                return dataclasses.replace(reply, agents=tuple(agents))
            cursor = reply.next_cursor
    finally:
        sock.close()


async def _paced(
    ctx: zmq.asyncio.Context, address: str, body: dict[str, Any], rate: float, seconds: float
) -> tuple[Stats, int]:
    """Creates sent at ``rate``/s for ``seconds`` (each stopped once answered): their
    latency, and the errors."""
    sock = _dealer(ctx, address)
    stats = Stats("paced create")
    errors = 0
    sent_at: dict[int, float] = {}
    next_id = 0
    start = time.perf_counter()
    total = int(rate * seconds)
    done = 0
    try:
        while done < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * rate) + 1)
            while next_id < due:
                next_id += 1
                sent_at[next_id] = time.perf_counter()
                await sock.send(_frame(MsgType.CREATE_SANDBOX, next_id, body))
            if not await sock.poll(1):
                continue
            while True:
                try:
                    frame = await sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                env = _unpack(frame)
                rid = env["id"]
                if rid < 0:  # a stop's reply
                    continue
                done += 1
                t = sent_at.pop(rid)
                if env["t"] == MsgType.ERROR:
                    errors += 1
                    continue
                stats.add(time.perf_counter() - t)
                sid = env["b"]["sandbox"]["sandbox_id"]
                stop = {"sandbox_id": sid, "reason": "x"}
                await sock.send(_frame(MsgType.STOP_SANDBOX, -rid, stop))
            if time.perf_counter() - start > seconds * 4 + 30:
                raise TimeoutError(f"paced creates: {total - done} unanswered")
    finally:
        sock.close()
    return stats, errors


_LIST_SCRIPT = """
import asyncio, json, sys, time
from aviato import Sandbox, SandboxDefaults
async def main():
    d = SandboxDefaults(scheduler=sys.argv[1], request_timeout_seconds=60)
    t0 = time.perf_counter()
    page = await Sandbox.page(defaults=d)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    async for _ in Sandbox.iterate(defaults=d):
        n += 1
    full = time.perf_counter() - t0
    print(json.dumps({"first_page": first, "full": full, "rows": n}))
asyncio.run(main())
"""


async def _client_listing(address: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LIST_SCRIPT,
        address,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise RuntimeError(f"listing client failed: {err.decode()[-2000:]}")
    result: dict[str, float] = json.loads(out)
    return result


async def _aviato_ps(address: str) -> float:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aviato.cli",
        "ps",
        "--scheduler",
        address,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 300)
    if proc.returncode != 0:
        raise RuntimeError(f"aviato ps failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t0


async def run_rung(
    agents_n: int,
    sandboxes: int,
    *,
    clients_n: int = 4,
    window: int = 128,
    py_spy: str | None = None,
) -> Rung:
    rung = Rung(agents_n, sandboxes)
    f = rung.figures
    cleanup = Cleanup()
    proc, address = await start_scheduler(cleanup, None)
    log_path = Path(cleanup.dirs[-1]) / "scheduler.log"
    sched = psutil.Process(proc.pid)
    me = psutil.Process()
    ctx = zmq.asyncio.Context()
    ctx.set(zmq.MAX_SOCKETS, agents_n + 64)  # one DEALER per fake agent (default 1023)
    slots = max(10, (2 * sandboxes) // agents_n + 10)
    agents = [FakeAgent(ctx, address, f"fake-{RUN_ID}-{i:05d}", slots) for i in range(agents_n)]
    tasks: list[asyncio.Task[None]] = []
    clients: list[Client] = []
    try:
        with console.status(f"registering {agents_n} fake agents"):
            for i in range(0, agents_n, 500):
                await asyncio.gather(*(a.register() for a in agents[i : i + 500]))
        # One task serves them all and one sends their heartbeats: a task each made
        # this process, not the scheduler, the first to fall behind at 5,000 agents.
        tasks.append(asyncio.create_task(serve_all(agents)))
        tasks.append(asyncio.create_task(heartbeat_all(agents)))
        await asyncio.sleep(8.0)  # every agent told its interval, a few heartbeats each
        f["heartbeat_interval"] = max(a.interval for a in agents)
        f["idle_cpu_empty"] = await _idle_cpu(sched, 5.0)
        rss0 = sched.memory_info().rss

        spec = SandboxSpec(image=IMAGE, command="sleep", args=("infinity",), tags=("bench",))
        body = create_body(spec, 60.0)
        clients = [Client(ctx, address, window, body) for _ in range(clients_n)]

        async def phase(name: str, creates: int, stops: list[list[str]], keep: bool) -> Phase:
            ph = Phase(name)
            created: list[list[str]] = [[] for _ in clients]
            per = _split(creates, clients_n)
            c0, t0, m0 = _cpu(sched), time.perf_counter(), _cpu(me)
            l0 = _main_thread_cpu(sched)
            await asyncio.gather(
                *(
                    c.run(ph, per[i], stops[i] if stops else [], not keep, created[i], 120.0)
                    for i, c in enumerate(clients)
                )
            )
            ph.wall = time.perf_counter() - t0
            ph.sched_cpu = _cpu(sched) - c0
            ph.sched_loop_cpu = _main_thread_cpu(sched) - l0  # type: ignore[attr-defined]
            ph.self_cpu = _cpu(me) - m0
            ph.created = created  # type: ignore[attr-defined]
            if ph.errors:
                rung.notes.append(f"{name}: errors {ph.errors}")
            return ph

        with console.status(f"filling the table to {sandboxes} live sandboxes"):
            fill = await phase("fill", sandboxes, [], True)
        f["fill_creates_per_s"] = sandboxes / fill.wall
        f["fill_p99_ms"] = fill.creates.p99 * 1000
        await asyncio.sleep(2.0)
        f["bytes_per_sandbox"] = (sched.memory_info().rss - rss0) / sandboxes
        f["idle_cpu_full"] = await _idle_cpu(sched, 5.0)

        burst_n = max(5000, sandboxes // 5)
        spy = None
        if py_spy:  # where the scheduler's time goes in the burst: collapsed stacks
            out = f"{py_spy}-{agents_n}.txt"
            argv = ["py-spy", "record", "-p", str(proc.pid), "-r", "200", "-f", "raw", "-o", out]
            spy = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await asyncio.sleep(1.0)
        with console.status(f"a burst of {burst_n} creates at {sandboxes} live"):
            burst = await phase("burst", burst_n, [], True)
        if spy is not None:
            spy.send_signal(2)
            await spy.wait()
        f["burst_creates_per_s"] = burst_n / burst.wall
        f["cpu_ms_per_create"] = burst.sched_cpu / burst_n * 1000
        f["loop_cpu_ms_per_create"] = burst.sched_loop_cpu / burst_n * 1000  # type: ignore[attr-defined]
        f["burst_p99_ms"] = burst.creates.p99 * 1000
        # Net of what the scheduler spends idling (heartbeats) over the same time.
        f["cpu_ms_per_create_net"] = (
            (burst.sched_cpu - f["idle_cpu_full"] * burst.wall) / burst_n * 1000
        )
        f["burst_sched_core"] = burst.sched_cpu / burst.wall
        f["burst_bench_core"] = burst.self_cpu / burst.wall
        with console.status("stopping the burst"):
            stop = await phase("stop", 0, burst.created, True)  # type: ignore[attr-defined]
        f["stops_per_s"] = burst_n / stop.wall
        # The same burst on a small table: is the cost per create independent of size?
        f["cpu_ms_per_create_vs_fill"] = fill.sched_cpu / sandboxes * 1000

        with console.status(f"creates paced at {PACED_RATE:.0f}/s"):
            c0, t0 = _cpu(sched), time.perf_counter()
            paced, paced_errors = await _paced(ctx, address, body, PACED_RATE, 6.0)
            f["paced_cpu_fraction"] = (_cpu(sched) - c0) / (time.perf_counter() - t0)
        f["paced_p50_ms"] = paced.p50 * 1000
        f["paced_p99_ms"] = paced.p99 * 1000
        f["paced_errors"] = paced_errors

        await asyncio.sleep(1.0)
        with console.status("listing every sandbox from a client process"):
            listing = await _client_listing(address)
        f["list_full_s"] = listing["full"]
        f["list_rows"] = listing["rows"]
        f["list_first_page_s"] = listing["first_page"]
        with console.status("aviato ps"):
            f["ps_s"] = await _aviato_ps(address)

        await asyncio.sleep(2 * f["heartbeat_interval"])
        status = await _status(ctx, address)
        f["alive_after"] = sum(1 for a in status.agents if a.alive)
        f["unregistered"] = sum(a.unregistered for a in agents)
        f["deaths_logged"] = log_path.read_text(errors="replace").count("declared dead")
        f["max_heartbeat_gap_s"] = max(a.max_heartbeat_gap for a in agents)
        # Who is to blame for a death: an agent this process itself left silent for
        # longer than the scheduler's dead-after (its rule: 3 s, or 3 intervals) was
        # the load generator's doing, not the scheduler's.
        dead_after = max(3.0, 3 * f["heartbeat_interval"])
        dead_ids = {a.agent_id for a in status.agents if not a.alive}
        f["dead_after_s"] = dead_after
        f["dead_late_at_generator"] = sum(
            1 for a in agents if a.agent_id in dead_ids and a.max_heartbeat_gap > dead_after
        )
        f["late_at_generator"] = sum(1 for a in agents if a.max_heartbeat_gap > dead_after)

        victim = agents[len(agents) // 2]
        victim.silent = True
        t0 = time.perf_counter()
        while True:
            status = await _status(ctx, address)
            if any(a.agent_id == victim.agent_id and not a.alive for a in status.agents):
                break
            if time.perf_counter() - t0 > 60:
                raise TimeoutError("the silent fake agent was never declared dead")
            await asyncio.sleep(0.1)
        f["detection_s"] = time.perf_counter() - t0
        return rung
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents:
            a.sock.close()
        for c in clients:
            c.sock.close()
        ctx.term()
        cleanup.sweep()


# --------------------------------------------------------------------------- report


def _targets(r: Rung) -> list[tuple[str, str, str, bool | None]]:
    """(target, wanted, measured, met?) rows; None: reported, no target."""
    f = r.figures
    rows: list[tuple[str, str, str, bool | None]] = [
        (
            f"creates/s at {r.sandboxes:,} live",
            ">= 5,000",
            f"{f['burst_creates_per_s']:,.0f} (scheduler {f['burst_sched_core']:.2f} core, "
            f"fake agents + clients {f['burst_bench_core']:.2f} core)",
            f["burst_creates_per_s"] >= 5000,
        ),
        (
            "create p99 at 2,500/s",
            "< 50 ms",
            f"{f['paced_p99_ms']:.1f} ms (p50 {f['paced_p50_ms']:.1f})",
            f["paced_p99_ms"] < 50,
        ),
        (
            "scheduler CPU per create",
            "<= 0.1 ms",
            f"{f['cpu_ms_per_create']:.3f} ms (event loop {f['loop_cpu_ms_per_create']:.3f}, "
            f"ZeroMQ I/O thread {f['cpu_ms_per_create'] - f['loop_cpu_ms_per_create']:.3f}; "
            f"{f['cpu_ms_per_create_net']:.3f} net of idle; "
            f"{f['cpu_ms_per_create_vs_fill']:.3f} while filling from 0)",
            f["cpu_ms_per_create"] <= 0.1,
        ),
        (
            f"idle scheduler CPU, {r.agents:,} agents",
            "<= 10% of a core",
            f"{100 * f['idle_cpu_empty']:.1f}% ({100 * f['idle_cpu_full']:.1f}% at "
            f"{r.sandboxes:,} live)",
            max(f["idle_cpu_empty"], f["idle_cpu_full"]) <= 0.10,
        ),
        (
            "death detected within",
            "<= 5 s",
            f"{f['detection_s']:.1f} s (heartbeat every {f['heartbeat_interval']:.1f} s)",
            f["detection_s"] <= 5.0,
        ),
        (
            "scheduler memory per live sandbox",
            "<= 1 KiB",
            f"{f['bytes_per_sandbox']:.0f} B",
            f["bytes_per_sandbox"] <= 1024,
        ),
        (
            f"full listing ({int(f['list_rows']):,} rows) to a client",
            "<= 2 s",
            f"{f['list_full_s']:.2f} s (first page {1000 * f['list_first_page_s']:.0f} ms)",
            f["list_full_s"] <= 2.0,
        ),
        ("`aviato ps` (first page, whole command)", "fast", f"{f['ps_s']:.2f} s", None),
        (
            "false deaths (under every query)",
            "0",
            f"{r.agents - int(f['alive_after'])} dead, {int(f['unregistered'])} told "
            f"unregistered, {int(f['deaths_logged'])} logged; the load generator's "
            f"longest gap between one fake agent's heartbeats {f['max_heartbeat_gap_s']:.2f} s"
            f" (every {f['heartbeat_interval']:.1f} s wanted); fake agents it left silent "
            f"past the dead-after of {f['dead_after_s']:.1f} s: "
            f"{int(f['late_at_generator'])}, of them dead: {int(f['dead_late_at_generator'])}",
            f["alive_after"] == r.agents and f["unregistered"] == 0 and not f["deaths_logged"],
        ),
        (
            "filling: creates/s, p99",
            "-",
            f"{f['fill_creates_per_s']:,.0f}/s, {f['fill_p99_ms']:.0f} ms",
            None,
        ),
        ("stops/s", "-", f"{f['stops_per_s']:,.0f}", None),
    ]
    return rows


def _verdict(met: bool | None) -> str:
    return "reported" if met is None else ("met" if met else "NOT met")


def print_report(rungs: list[Rung], load: str, argv: list[str]) -> str:
    """Prints the tables; returns the markdown (for --markdown)."""
    from rich.table import Table

    for r in rungs:
        table = Table(title=f"{r.agents:,} fake agents, {r.sandboxes:,} live sandboxes")
        for col in ("target", "wanted", "measured", "verdict"):
            table.add_column(col)
        for name, want, got, met in _targets(r):
            style = "" if met is None else ("green" if met else "red")
            table.add_row(name, want, got, f"[{style}]{_verdict(met)}[/]" if style else "reported")
        console.print(table)
        for note in r.notes:
            console.print(f"[yellow]{note}[/]")
    console.print(f"load: {load}")
    md = ["```", " ".join(["python benchmarks/scale.py", *argv]), "```", ""]
    for r in rungs:
        md.append(f"**{r.agents:,} fake agents, {r.sandboxes:,} live sandboxes**\n")
        md.append("| target | wanted | measured | verdict |\n|---|---|---|---|")
        for name, want, got, met in _targets(r):
            md.append(f"| {name} | {want} | {got} | {_verdict(met)} |")
        md.append("")
    md.append(f"Load average during the run: {load}")
    print("\n" + "\n".join(md))
    print(json.dumps([{"agents": r.agents, "sandboxes": r.sandboxes, **r.figures} for r in rungs]))
    return "\n".join(md) + "\n"


async def amain(args: argparse.Namespace) -> list[Rung]:
    rungs = [await run_rung(args.agents, args.sandboxes, py_spy=args.py_spy)]
    # Now: the next rung may take long, or fail.
    args.first_markdown = print_report(rungs, _load(), args.raw)
    if args.next_rung:
        rungs.append(await run_rung(args.next_rung, args.sandboxes, py_spy=args.py_spy))
    return rungs


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--sandboxes", type=int, default=100_000)
    parser.add_argument(
        "--next-rung",
        type=int,
        default=0,
        metavar="AGENTS",
        help="then the same with this many agents (e.g. 5000)",
    )
    parser.add_argument("--quick", action="store_true", help="200 agents, 10k sandboxes")
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="record the scheduler with py-spy during the burst into PREFIX-<agents>.txt "
        "(collapsed stacks)",
    )
    add_markdown_option(parser)
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    if args.quick:
        args.agents, args.sandboxes = 200, 10_000
    args.raw = raw
    try:
        rungs = uvloop.run(amain(args))
    except KeyboardInterrupt:
        return 130
    markdown = print_report(rungs, _load(), raw) if len(rungs) > 1 else args.first_markdown
    if args.markdown:
        write_markdown(args.markdown, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
