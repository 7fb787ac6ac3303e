"""The functions benchmark's report: number formats, the rich tables, the markdown table
with aviato's ratio to each peer, and the verdicts on the issue's targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from rich.table import Table

from benchmarks._fn_common import SLEEP_SECONDS, SLEEP_WORKERS, Memory, Result, console

PEERS = ("ray", "dask", "ppe")
#: The issue's figures for the peers (no-op calls/s, round trip), for context.
REFERENCE = {
    "ray": "Ray 2.60 tasks: about 1,500/s with 1.8 ms",
    "dask": "about 570/s with 10 ms",
    "ppe": "ProcessPoolExecutor(2): about 11,000/s with 0.21 ms",
}


# ---------------------------------------------------------------------- report


def fmt_rate(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def fmt_mem(mem: Memory | None) -> str:
    return "-" if mem is None else f"{mem.mib:,.0f} ({mem.procs})"


def fmt_ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b <= 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def new_table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    return table


def print_tables(results: list[Result], base: Result | None) -> None:
    ran = [r for r in results if not r.skipped and not r.error]

    t = new_table(
        "Start and memory (RSS MiB summed over processes, process count in brackets)",
        [
            "",
            "start s",
            "what started",
            "start with workers s",
            "first gather s",
            "idle RSS",
            "warm RSS",
            "processes",
        ],
    )
    for r in ran:
        t.add_row(
            r.label,
            fmt_s(r.start_s),
            r.start_note,
            fmt_s(with_workers(r)),
            fmt_s(r.first_s),
            fmt_mem(r.idle),
            fmt_mem(r.warm),
            r.memory_note,
        )
    console.print(t)

    cols = ["", "calls", "calls/s (median)", "runs (calls/s)", "workers", "aviato / this"]
    t = new_table("No-op throughput: submit all, then gather", cols)
    for r in ran:
        runs = ", ".join(fmt_rate(x) for x in r.noop_rates)
        vs = fmt_ratio(base.noop_rate, r.noop_rate) if base is not None else "-"
        t.add_row(
            r.label, f"{r.noop_calls:,}", fmt_rate(r.noop_rate), runs, str(r.noop_workers), vs
        )
    console.print(t)

    cols = ["", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms", "aviato / this (p50)"]
    t = new_table("Sequential round trip of one no-op call (warm pool)", cols)
    for r in ran:
        vs = fmt_ratio(base.seq_q(50), r.seq_q(50)) if base is not None else "-"
        t.add_row(
            r.label,
            str(len(r.seq)),
            fmt_ms(r.seq_q(50)),
            fmt_ms(r.seq_q(99)),
            fmt_ms(statistics.fmean(r.seq) if r.seq else math.nan),
            fmt_ms(min(r.seq, default=math.nan)),
            fmt_ms(max(r.seq, default=math.nan)),
            vs,
        )
    console.print(t)

    cols = [""]
    for k in SLEEP_WORKERS:
        cols += [f"k={k} calls/s", f"k={k} % of {k / SLEEP_SECONDS:.0f}", f"k={k} seen"]
    t = new_table("10 ms sleep throughput with k workers (seen: distinct workers used)", cols)
    for r in ran:
        cells = [r.label]
        for k in SLEEP_WORKERS:
            run = r.sleep.get(k)
            if run is None:
                cells += ["-", "-", "-"]
            else:
                ideal = k / SLEEP_SECONDS
                cells += [
                    fmt_rate(run.rate),
                    f"{100 * run.rate / ideal:.0f}%",
                    str(run.workers_seen),
                ]
        t.add_row(*cells)
    console.print(t)


def markdown(results: list[Result], base: Result | None) -> str:
    shown = [r for r in results if not r.skipped and not r.error]
    if not shown:
        return "(no system ran)"
    head = "| | " + " | ".join(r.heading for r in shown) + " |"
    lines = [head, "|---" * (len(shown) + 1) + "|"]

    def row(
        label: str, value: Callable[[Result], float], show: Callable[[float], str], compare: bool
    ) -> None:
        cells = []
        for r in shown:
            v = value(r)
            cell = show(v)
            if compare and base is not None and r.system in PEERS and cell != "-":
                cell += f" (aviato {fmt_ratio(value(base), v)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("no-op throughput, calls/s", lambda r: r.noop_rate, fmt_rate, True)
    row("round trip p50, ms", lambda r: r.seq_q(50), fmt_ms, True)
    row("round trip p99, ms", lambda r: r.seq_q(99), fmt_ms, True)
    for k in SLEEP_WORKERS:
        row(
            f"10 ms sleep, {k} workers, calls/s (ideal {k / SLEEP_SECONDS:.0f})",
            lambda r, k=k: r.sleep[k].rate if k in r.sleep else math.nan,
            fmt_rate,
            True,
        )
    row(
        "start with 2 workers up, s (aviato: scheduler + agent + session + first gather)",
        lambda r: nan_if_none(with_workers(r)),
        lambda v: "-" if math.isnan(v) else f"{v:.2f}",
        False,
    )
    row(
        "start, s (aviato: scheduler + agent only, no worker container yet)",
        lambda r: nan_if_none(r.start_s),
        lambda v: "-" if math.isnan(v) else f"{v:.2f}",
        False,
    )
    row(
        "idle RSS, MiB (the Docker engine not counted)",
        lambda r: math.nan if r.idle is None else r.idle.mib,
        lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
        False,
    )
    row(
        "RSS with the 2-worker pool warm, MiB",
        lambda r: math.nan if r.warm is None else r.warm.mib,
        lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
        False,
    )
    refs = [REFERENCE.get(r.system, "") for r in shown]
    lines.append("| issue's figure | " + " | ".join(refs) + " |")
    return "\n".join(lines)


def nan_if_none(x: float | None) -> float:
    return math.nan if x is None else x


def with_workers(r: Result) -> float | None:
    """Start with the workers up: aviato's own figure; a peer's start includes them."""
    return r.start_with_workers_s if r.system.startswith("aviato") else r.start_s


def verdicts(results: list[Result], base: Result | None) -> list[str]:
    if base is None:
        return []
    by = {r.system: r for r in results if not r.skipped and not r.error}
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'met' if ok else 'NOT met'}: {text}")

    if "ray" in by:
        ray_rate = by["ray"].noop_rate
        check(
            base.noop_rate >= 10 * ray_rate,
            f"aviato no-op throughput >= 10x Ray's: {fmt_rate(base.noop_rate)}/s vs "
            f"10 x {fmt_rate(ray_rate)} = {fmt_rate(10 * ray_rate)}/s "
            f"({fmt_ratio(base.noop_rate, ray_rate)})",
        )
    if "ppe" in by:
        ppe_rate = by["ppe"].noop_rate
        check(
            base.noop_rate >= ppe_rate,
            f"aviato no-op throughput >= ProcessPoolExecutor(2)'s: "
            f"{fmt_rate(base.noop_rate)}/s vs {fmt_rate(ppe_rate)}/s "
            f"({fmt_ratio(base.noop_rate, ppe_rate)})",
        )
    p50 = base.seq_q(50)
    check(p50 < 0.0005, f"aviato sequential round trip p50 < 0.5 ms: {fmt_ms(p50)} ms")
    return out
