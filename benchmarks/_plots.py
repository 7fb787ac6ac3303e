"""PNG plots written next to a benchmark's markdown table (``--markdown FILE`` puts
``FILE``'s stem + ``-<name>.png`` beside it), drawn with matplotlib from the ``bench``
extra. Pure drawing: each function takes the run's own figures, nothing is re-measured.
Without matplotlib the plots are skipped with a note (the tables still come)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from benchmarks._common import console

INSTALL = "pip install -e '.[bench]'"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        console.print(f"[yellow]plots skipped: matplotlib is not installed ({escape(INSTALL)})[/]")
        return None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def beside(markdown: Path | None, name: str) -> Path | None:
    """Where the plot ``name`` of a run whose table goes to ``markdown`` goes (None: no
    --markdown, no plots)."""
    if markdown is None:
        return None
    return markdown.with_name(f"{markdown.stem}-{name}.png")


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    console.print(f"[dim]plot written to {path}[/]")


def bars(
    path: Path | None, values: Mapping[str, float], title: str, ylabel: str, note: str = ""
) -> None:
    """One bar per system (NaN values, e.g. a skipped system, are left out)."""
    plt = _pyplot() if path is not None else None
    shown = {k: v for k, v in values.items() if not math.isnan(v)}
    if plt is None or path is None or not shown:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = list(shown)
    bars_ = ax.bar(names, [shown[n] for n in names], color="#4477aa")
    ax.bar_label(bars_, labels=[f"{shown[n]:,.0f}" for n in names], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#666666")
    _save(plt, fig, path)


def latency_cdf(
    path: Path | None, samples: Mapping[str, Sequence[float]], title: str, note: str = ""
) -> None:
    """The distribution of latencies (seconds in, milliseconds shown, log scale): the
    fraction of samples at or below each latency, one line per series."""
    plt = _pyplot() if path is not None else None
    shown = {k: sorted(v) for k, v in samples.items() if v}
    if plt is None or path is None or not shown:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, xs in shown.items():
        n = len(xs)
        ax.step([x * 1e3 for x in xs], [(i + 1) / n for i in range(n)], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of samples ≤ x")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#666666")
    _save(plt, fig, path)


def lines(
    path: Path | None,
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    note: str = "",
) -> None:
    """One line (with markers) per system, e.g. throughput against workers."""
    plt = _pyplot() if path is not None else None
    shown = {k: sorted(v) for k, v in series.items() if v}
    if plt is None or path is None or not shown:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for name, points in shown.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#666666")
    _save(plt, fig, path)


def timeline(
    path: Path | None,
    completions: Sequence[float],
    start: float,
    faults: Sequence[tuple[float, str]],
    title: str,
    window: float = 1.0,
) -> None:
    """Calls completed per second over the run (``completions``: monotonic times, in
    order; ``start``: the run's zero), each fault a labelled vertical line."""
    plt = _pyplot() if path is not None else None
    if plt is None or path is None or not completions:
        return
    end = completions[-1]
    buckets = [0] * (int((end - start) / window) + 1)
    for t in completions:
        if t >= start:
            buckets[int((t - start) / window)] += 1
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.plot([i * window for i in range(len(buckets))], [b / window for b in buckets], lw=1)
    top = max(buckets) / window if buckets else 1
    for at, label in faults:
        x = at - start
        ax.axvline(x, color="#cc3311", alpha=0.6, lw=1)
        ax.text(x, top, label, rotation=90, fontsize=7, va="top", ha="right", color="#cc3311")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("calls completed / s")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    _save(plt, fig, path)
