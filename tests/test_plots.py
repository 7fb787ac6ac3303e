"""benchmarks/_plots.py: each plot is a real PNG drawn from the figures it is given,
beside the markdown table; nothing is drawn without a table to go beside."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import _plots as plots

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data.startswith(PNG), path
    return data


def test_each_plot_is_a_png_beside_its_table(tmp_path: Path) -> None:
    table = tmp_path / "functions.md"
    plots.bars(plots.beside(table, "throughput"), {"aviato": 9000.0, "ray": 700.0}, "t", "c/s")
    plots.latency_cdf(
        plots.beside(table, "latency"), {"aviato": [0.001, 0.002, 0.004]}, "round trip"
    )
    plots.lines(
        plots.beside(table, "workers"), {"aviato": [(1, 90.0), (2, 180.0)]}, "t", "workers", "c/s"
    )
    plots.timeline(
        plots.beside(table, "timeline"), [10.1, 10.5, 11.2, 14.0], 10.0, [(12.0, "kill agent")], "s"
    )
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    assert made == [
        "functions-latency.png",
        "functions-throughput.png",
        "functions-timeline.png",
        "functions-workers.png",
    ]
    for name in made:
        assert len(_png(tmp_path / name)) > 5000  # drawn, not an empty canvas


def test_the_figures_change_the_picture(tmp_path: Path) -> None:
    """Each plot drawn from two sets of figures: two different pictures (a plot that
    ignored its figures would draw the same axes twice)."""
    for i, (x, y) in enumerate([(9000.0, 700.0), (700.0, 9000.0)]):
        plots.bars(tmp_path / f"bars{i}.png", {"aviato": x, "ray": y}, "t", "c/s")
        plots.latency_cdf(tmp_path / f"cdf{i}.png", {"aviato": [x / 1e6, 2 * x / 1e6]}, "t")
        plots.lines(tmp_path / f"lines{i}.png", {"aviato": [(1, x), (2, y)]}, "t", "w", "c/s")
        plots.timeline(tmp_path / f"time{i}.png", [0.5, x / 1000], 0.0, [(y / 1000, "f")], "t")
    for kind in ("bars", "cdf", "lines", "time"):
        assert _png(tmp_path / f"{kind}0.png") != _png(tmp_path / f"{kind}1.png"), kind


def test_no_table_no_plot_and_nothing_to_draw_draws_nothing(tmp_path: Path) -> None:
    assert plots.beside(None, "x") is None
    plots.bars(None, {"aviato": 1.0}, "t", "c/s")
    plots.bars(tmp_path / "nan.png", {"skipped": float("nan")}, "t", "c/s")
    plots.latency_cdf(tmp_path / "empty.png", {"aviato": []}, "t")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("missing", [True])
def test_without_matplotlib_the_run_says_how_to_get_it(
    missing: bool,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    plots.bars(tmp_path / "x.png", {"aviato": 1.0}, "t", "c/s")
    assert not (tmp_path / "x.png").exists()
    assert "pip install -e '.[bench]'" in capsys.readouterr().out
