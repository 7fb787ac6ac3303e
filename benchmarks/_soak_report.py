"""The soak's report: one rich table of counts, one of recovery times per fault kind."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from rich.markup import escape
from rich.table import Table

from ._common import console
from ._soak_chaos import KINDS, Fault
from ._soak_load import Ledger


@dataclass
class Outcome:
    duration: float
    target_workers: int
    ledger: Ledger
    faults: list[Fault]
    slowest_10s: float
    workers_lost: int
    workers_killed: int  # by the faults: what workers_lost should be
    pool_retried: int
    late_replies_dropped: int
    left_after_session: list[str] = field(default_factory=list)
    leaked_containers: list[str] = field(default_factory=list)
    leftover_processes: list[str] = field(default_factory=list)
    leftover_dirs: list[str] = field(default_factory=list)
    needed_sigkill: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """What makes the soak fail (exit code 1)."""
        led = self.ledger
        bad = {
            "typed failures": sum(led.failed_typed.values()),
            "duplicates": led.duplicates,
            "lost": led.lost,
            "wrong values": led.wrong,
            "hung calls": led.hung,
            "untyped failures": sum(led.failed_untyped.values()),
            "containers left after the session closed": len(self.left_after_session),
            "leaked containers": len(self.leaked_containers),
            "leftover processes": len(self.leftover_processes),
            "leftover socket dirs": len(self.leftover_dirs),
            "daemons needing SIGKILL at the end": len(self.needed_sigkill),
        }
        found = [f"{k}: {v}" for k, v in bad.items() if v]
        if self.workers_lost != self.workers_killed:
            found.append(
                f"workers lost ({self.workers_lost}) differ from workers killed by faults"
                f" ({self.workers_killed})"
            )
        return found


def _s(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1f}"


def _med_max(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):.1f} / {max(xs):.1f}"


def _counts_table(o: Outcome) -> Table:
    led = o.ledger
    t = Table(title="aviato soak", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("must be", justify="right")

    def row(name: str, value: object, must: str = "") -> None:
        bad = must == "0" and value not in (0, "0")
        shown = f"[bold red]{value}[/]" if bad else str(value)
        t.add_row(name, shown, must)

    row("duration (s)", f"{o.duration:.0f}")
    row("calls completed", led.completed)
    row("calls/s", f"{led.completed / o.duration:.1f}" if o.duration else "-")
    row("lowest calls/s over 10 s", _s(o.slowest_10s))
    lat = led.latency
    worst = max(lat.samples, default=float("nan"))
    row("call latency p50 / p99 / max (s)", f"{lat.p50:.2f} / {lat.p99:.2f} / {worst:.2f}")
    row("calls retried (attempts > 1)", led.retried)
    row("  extra attempts", led.extra_attempts)
    row(
        "  pool: calls re-queued / late replies dropped",
        f"{o.pool_retried} / {o.late_replies_dropped}",
    )
    lost_killed = f"{o.workers_lost} / {o.workers_killed}"
    if o.workers_lost != o.workers_killed:
        lost_killed = f"[bold red]{lost_killed}[/]"
    t.add_row("workers lost / killed by faults", lost_killed, "equal")
    typed = sum(led.failed_typed.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(led.failed_typed.items()))
    row("failed, typed (resubmitted)", f"{typed}" + (f" ({kinds})" if kinds else ""), "0")
    row("failed, untyped", sum(led.failed_untyped.values()), "0")
    row("duplicates", led.duplicates, "0")
    row("lost", led.lost, "0")
    row("  wrong values", led.wrong, "0")
    row("  never resolved", led.never_resolved, "0")
    row("hung (unresolved past the hang limit)", led.hung, "0")
    row("containers left after the session closed", len(o.left_after_session), "0")
    row("leaked containers (cluster stopped)", len(o.leaked_containers), "0")
    row(
        "leftover processes / socket dirs",
        f"{len(o.leftover_processes)} / {len(o.leftover_dirs)}",
        "0",
    )
    by_kind = {k: sum(1 for f in o.faults if f.kind == k) for k in KINDS}
    row(
        "faults injected",
        f"{len(o.faults)} (" + ", ".join(f"{k} {n}" for k, n in by_kind.items()) + ")",
    )
    return t


def _recovery_table(o: Outcome) -> Table:
    t = Table(title="time to full capacity after each fault (s, median / max)")
    t.add_column("fault")
    t.add_column("n", justify="right")
    t.add_column("agents alive + calls flowing", justify="right")
    t.add_column(f"pool back to {o.target_workers} workers", justify="right")
    t.add_column("not recovered", justify="right")
    for kind in KINDS:
        faults = [f for f in o.faults if f.kind == kind]
        back = [f.back_at - f.at for f in faults if f.back_at is not None]
        full = [f.pool_full_at - f.at for f in faults if f.pool_full_at is not None]
        stuck = sum(1 for f in faults if f.gave_up_at is not None)
        shown = f"[bold red]{stuck}[/]" if stuck else "0"
        t.add_row(kind, str(len(faults)), _med_max(back), _med_max(full), shown)
    return t


def _faults_table(o: Outcome, t0: float) -> Table:
    t = Table(title="faults")
    for col in ("#", "at (s)", "kind", "victim", "agents back", "calls flowing", "pool full"):
        t.add_column(col, justify="right" if col not in ("kind", "victim") else "left")
    for i, f in enumerate(o.faults, 1):
        t.add_row(
            str(i),
            f"{f.at - t0:.0f}",
            f.kind,
            escape(f.victim),
            _s(f.seconds(f.agents_back_at)),
            _s(f.seconds(f.back_at)),
            _s(f.seconds(f.pool_full_at)) if f.gave_up_at is None else "[red]never[/]",
        )
    return t


def _recovery_text(o: Outcome) -> str:
    parts = []
    for kind in KINDS:
        faults = [f for f in o.faults if f.kind == kind]
        full = [f.pool_full_at - f.at for f in faults if f.pool_full_at is not None]
        if faults:
            parts.append(f"{kind} {_med_max(full)}")
    return ", ".join(parts) or "-"


def markdown(o: Outcome, header: str) -> str:
    """The soak's summary as a markdown table with its verdict: what the README pastes."""
    led = o.ledger
    rate = led.completed / o.duration if o.duration else float("nan")
    by_kind = ", ".join(f"{k} {sum(1 for f in o.faults if f.kind == k)}" for k in KINDS)
    typed = sum(led.failed_typed.values())
    untyped = sum(led.failed_untyped.values())
    stuck = sum(1 for f in o.faults if f.gave_up_at is not None)
    rows = [
        (
            f"calls completed ({o.duration:.0f} s)",
            f"{led.completed:,} ({rate:.0f}/s; lowest 10 s window {_s(o.slowest_10s)}/s)",
            "",
        ),
        ("faults injected", f"{len(o.faults)}: {by_kind}", ""),
        ("calls retried (attempts > 1)", f"{led.retried:,}", ""),
        ("workers lost / killed by faults", f"{o.workers_lost} / {o.workers_killed}", "equal"),
        (
            "duplicates / lost / wrong / hung",
            f"{led.duplicates} / {led.lost} / {led.wrong} / {led.hung}",
            "0",
        ),
        ("failed (typed / untyped)", f"{typed} / {untyped}", "0"),
        (
            "leaked containers / processes / socket dirs",
            f"{len(o.leaked_containers) + len(o.left_after_session)} / "
            f"{len(o.leftover_processes)} / {len(o.leftover_dirs)}",
            "0",
        ),
        ("faults not recovered", str(stuck), "0"),
        ("back to full capacity, median / max (s)", _recovery_text(o), ""),
    ]
    lines = [header, "", "| measure | value | must be |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    problems = o.problems()
    verdict = (
        f"NOT met: {'; '.join(problems)}"
        if problems
        else "met: no duplicate, lost, wrong or hung call, no failure, nothing leaked"
    )
    lines += ["", f"Verdict: {verdict}."]
    return "\n".join(lines) + "\n"


def print_report(o: Outcome, t0: float, header: str) -> None:
    console.rule("[bold]aviato soak")
    console.print(header)
    console.print(_faults_table(o, t0))
    console.print(_counts_table(o))
    console.print(_recovery_table(o))
    led = o.ledger
    for name, sample in sorted(led.failure_samples.items()):
        console.print(f"[dim]{escape(name)}: {escape(sample)}[/]")
    for what, items in (
        ("left after the session closed", o.left_after_session),
        ("leaked", o.leaked_containers),
        ("leftover process", o.leftover_processes),
        ("leftover socket dir", o.leftover_dirs),
        ("needed SIGKILL", o.needed_sigkill),
    ):
        for item in items:
            console.print(f"[red]{what}: {escape(item)}[/]")
    for note in o.notes:
        console.print(f"[yellow]{escape(note)}[/]")
    problems = o.problems()
    if problems:
        console.print(f"[bold red]SOAK FAILED: {'; '.join(problems)}[/]")
    else:
        console.print(
            "[bold green]soak passed: no duplicate, lost or wrong result; nothing leaked[/]"
        )
