"""Latency samples, their percentiles, and how they are shown (numbers and rich tables)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from rich.table import Table


@dataclass
class Stats:
    name: str
    samples: list[float] = field(default_factory=list)  # seconds

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def q(self, p: int) -> float:
        """The p-th percentile (linear interpolation between closest ranks)."""
        xs = self.samples
        if not xs:
            return float("nan")
        if len(xs) == 1:
            return xs[0]
        return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]

    @property
    def p50(self) -> float:
        return self.q(50)

    @property
    def p99(self) -> float:
        return self.q(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")


def ms(seconds: float) -> str:
    value = seconds * 1000
    if value != value:  # NaN
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b <= 0:  # NaN or zero
        return "-"
    return f"{a / b:.2f}x"


def new_table(title: str, columns: list[str], left: set[str]) -> Table:
    """A table titled ``title``: the ``left`` columns left-aligned, the others right."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def latency_table(title: str, rows: list[Stats], baseline: Stats | None = None) -> Table:
    columns = ["", "n", "p50 ms", "p99 ms", "mean ms", "min ms", "max ms"]
    if baseline is not None:
        columns.append(f"p50 vs {baseline.name}")
    table = new_table(title, columns, left={""})
    for s in rows:
        cells = [
            s.name,
            str(len(s.samples)),
            ms(s.p50),
            ms(s.p99),
            ms(s.mean),
            ms(min(s.samples, default=float("nan"))),
            ms(max(s.samples, default=float("nan"))),
        ]
        if baseline is not None:
            cells.append(ratio(s.p50, baseline.p50))
        table.add_row(*cells)
    return table
