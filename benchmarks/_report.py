"""The report of a run: rich tables on the console, then a plain markdown table for the
README."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ._common import IMAGE, QUICK, RUN_ID, Plan, console
from ._control_plane import Phase, SchedResult
from ._embedded import StartResult
from ._latency import CreateResults, ExecResults
from ._refusals import TARGET_S, RefusalResult, met
from ._stats import Stats, latency_table, ms, new_table, ratio


@dataclass
class Results:
    plan: Plan
    start: StartResult | None = None
    first_create: float | None = None
    create: CreateResults | None = None
    exec: ExecResults | None = None
    loaded_rss: dict[str, float] = field(default_factory=dict)
    sched: SchedResult | None = None
    auth: RefusalResult | None = None


def _rss(label: str, rss: dict[str, float], bold: bool = False) -> str:
    total = f"{sum(rss.values()):.1f} MiB"
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(rss.items()))
    return f"{label}: {f'[bold]{total}[/]' if bold else total}  ({parts})"


def _per_wall(p: Phase, x: float) -> str:
    return f"{100 * x / p.wall:.0f}%" if p.wall else "-"


def _p50_p99(s: Stats) -> str:
    return f"{ms(s.p50)}/{ms(s.p99)}" if s.samples else "-"


SCHED_COLUMNS = [
    "phase",
    "requests",
    "wall s",
    "ops/s",
    "create p50/p99 ms",
    "stop p50/p99 ms",
    "sched CPU",
    "bench CPU",
    "host CPU",
    "sched CPU/req",
    "errors",
]


def print_report(r: Results) -> str:
    """Print the tables; the markdown (printed last) is returned for ``--markdown``."""
    console.rule("[bold]aviato cluster benchmark")
    console.print(
        f"image {IMAGE}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, run id {RUN_ID}"
    )
    if r.start is not None:
        s = r.start
        console.print(
            f"embedded cluster start (LocalCluster().start()): [bold]{ms(s.start_s)} ms[/]"
            f"   (stop: {ms(s.stop_s)} ms)"
        )
        console.print(_rss("embedded cluster idle RSS", s.idle_rss, bold=True))
    if r.first_create is not None:
        console.print(
            f"first Sandbox.create + exec, including the embedded cluster's auto-start: "
            f"{ms(r.first_create)} ms"
        )
    if r.loaded_rss:
        console.print(_rss("embedded cluster RSS after benchmarks 1-2", r.loaded_rss))
    if r.create is not None:
        rows = r.create.rows
        console.print(latency_table("1. create → first exec(['true'])", rows, baseline=rows[2]))
        console.print(
            latency_table(
                "   where aviato's create time goes",
                [rows[0], r.create.replica, *r.create.steps],
                baseline=rows[0],
            )
        )
    if r.exec is not None:
        console.print(
            latency_table("2. exec(['true']) round trip, warm sandbox", r.exec.rows, r.exec.rows[2])
        )
        console.print(latency_table("   where aviato's exec time goes", r.exec.breakdown))
        retries = r.exec.inspect_retries
        if retries:
            late = sum(1 for x in retries if x)
            console.print(
                f"   SDK stream exec: exec_inspect had no exit code yet in {late}/{len(retries)}"
                f" execs (max {max(retries)} extra inspect(s), 5 ms sleep each)"
            )
    if r.sched is not None:
        print_sched(r.plan, r.sched)
    return print_markdown(r)


def print_sched(plan: Plan, sr: SchedResult) -> None:
    cpus = os.cpu_count() or 1
    table = new_table(
        f"3. scheduler control plane ({sr.agents} fake agents, "
        f"{plan.clients} clients x window {plan.window})",
        SCHED_COLUMNS,
        left={"phase", "errors"},
    )
    for p in sr.phases:
        table.add_row(
            p.name,
            str(p.ops),
            f"{p.wall:.2f}",
            f"{p.ops_per_s:,.0f}" if p.wall else "-",
            _p50_p99(p.creates),
            _p50_p99(p.stops),
            _per_wall(p, p.sched_cpu),
            _per_wall(p, p.self_cpu),
            f"{_per_wall(p, p.host_busy)}/{100 * cpus}%" if p.wall else "-",
            f"{1e6 * p.sched_cpu / p.ops:.0f} µs" if p.ops else "-",
            ", ".join(f"{k} x{v}" for k, v in p.errors.items()) or "0",
        )
    console.print(table)
    console.print(
        f"   fake agents: {sr.alive_at_end}/{sr.agents} alive at the end, {sr.placed} "
        f"placements and {sr.stopped_on_agents} stops served, {sr.unregistered} "
        f"'not registered' heartbeat replies, longest heartbeat gap "
        f"{sr.max_heartbeat_gap:.2f}s; scheduler RSS {sr.idle_rss:.1f} MiB idle → "
        f"{sr.end_rss:.1f} MiB after"
    )


def _md_latency(what: str, rows: list[Stats], target: str) -> list[str]:
    """p50 and p99 rows of aviato against the docker CLI and the Docker SDK (the max
    instead of a p99 when there are fewer than 100 samples)."""
    n = len(rows[0].samples)
    tail = ("p99 (ms)", 99) if n >= 100 else (f"max of {n} (ms)", 100)
    out = []
    for label, p, end in (
        (f"p50 (ms, n={n})", 50, f"{target} |"),
        (*tail, "|"),
    ):
        av, cv, sv = (max(x.samples, default=float("nan")) if p == 100 else x.q(p) for x in rows)
        out.append(
            f"| {what}, {label} | {ms(av)} | {ms(cv)} | {ms(sv)} | {ratio(av, cv)} |"
            f" {ratio(av, sv)} | {end}"
        )
    return out


def verdicts(r: Results) -> list[tuple[bool, str]]:
    """Each target of the run, met or not, with the figures it was judged on."""
    out: list[tuple[bool, str]] = []
    if r.create is not None:
        a, c, s = (x.q(50) for x in r.create.rows)
        raw = min(c, s)  # the faster of the docker CLI and the Docker SDK
        out.append(
            (
                a <= 1.3 * raw,
                f"create → first exec p50 ≤ 1.3x raw Docker (the faster of CLI and SDK):"
                f" {ms(a)} ms vs 1.3 x {ms(raw)} ms ({ratio(a, raw)})",
            )
        )
    if r.exec is not None:
        a, _, s = (x.q(50) for x in r.exec.rows)
        out.append(
            (s > 0 and a <= s, f"exec round trip p50 ≤ 1.0x Docker SDK: {ms(a)} vs {ms(s)} ms")
        )
    if r.auth is not None:
        for c in r.auth.cases:
            out.append(
                (
                    met(c),
                    f"UnauthorizedError within about a second (≤ {TARGET_S:g} s), {c.name}:"
                    f" max {ms(max(c.samples))} ms, median {ms(c.p50)} ms, of {len(c.samples)}",
                )
            )
        if r.auth.hangs:
            out.append((False, f"refusals: {r.auth.hangs} hung, counted at their timeout"))
    if r.sched is not None:
        for p in r.sched.phases:
            out.append((p.ops_per_s >= 2000, f"scheduler {p.name} ≥ 2,000/s: {p.ops_per_s:,.0f}/s"))
    return out


def print_markdown(r: Results) -> str:
    lines = [
        f"Image `{IMAGE}`, {os.cpu_count()} CPUs, one run of `python benchmarks/cluster.py"
        f"{' --quick' if r.plan is QUICK else ''}` (the client and daemons on uvloop).",
    ]
    if r.create is not None or r.exec is not None:
        lines += [
            "",
            "| Benchmark | aviato | docker CLI | Docker SDK | aviato / CLI | aviato / SDK"
            " | target |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
    if r.create is not None:
        lines += _md_latency("create → first exec", r.create.rows, "≤ 1.3x raw")
    if r.exec is not None:
        lines += _md_latency("exec(['true']) round trip", r.exec.rows, "≤ 1.0x SDK")
    lines += ["", "| Measure | Value | target |", "|---|---:|---|"]
    if r.sched is not None:
        creates, stops, mixed = r.sched.phases
        goal = "≥ 2,000 ops/s"
        lines += [
            f"| scheduler creates/s ({r.sched.agents} fake agents,"
            f" {len(creates.creates.samples)} creates) | {creates.ops_per_s:,.0f} | {goal} |",
            f"| scheduler stops/s ({len(stops.stops.samples)} stops)"
            f" | {stops.ops_per_s:,.0f} | {goal} |",
            f"| scheduler create→stop mixed, requests/s ({mixed.ops} requests)"
            f" | {mixed.ops_per_s:,.0f} | {goal} |",
        ]
    if r.start is not None:
        lines += [
            f"| embedded cluster start (`LocalCluster().start()`) | {ms(r.start.start_s)} ms | |",
            f"| embedded cluster idle RSS (scheduler + agent, not the Docker engine) |"
            f" {sum(r.start.idle_rss.values()):.1f} MiB | |",
        ]
    if r.auth is not None:
        for c in r.auth.cases:
            lines.append(
                f"| refused client ({c.name}): request → UnauthorizedError, median / max"
                f" of {len(c.samples)} | {ms(c.p50)} / {ms(max(c.samples))} ms |"
                f" max ≤ {TARGET_S:g} s: {'met' if met(c) else 'NOT met'} |"
            )
    lines.append("")
    for ok, text in verdicts(r):
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")
    console.rule("markdown")
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    return text
