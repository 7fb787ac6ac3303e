"""The dashboard's asked-on-demand parts (issue 15), in a real browser (Debian's
headless Chromium through Selenium, as tests/test_dashboard.py drives it) against
real clusters of both runtimes: each sandbox row's tunnels and processes, a
sandbox's last exec results on its detail page, and each function's round-trip
percentiles on the Sessions table; with their bounds. Unit tests of the bounded
parts (agent/exec_history.py, agent/dashboard_view.py) close the file."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import dashboard_view, exec_history
from agent.exec_history import ExecHistory
from aviato import Sandbox, SandboxDefaults
from aviato import link as schema
from aviato.protocol import PoolFigures
from scheduler.server import pool_figures
from tests.conftest import IMAGE, ROOT, Cluster, wait_until
from tests.test_dashboard import (
    _URL,
    DASHBOARD,
    _mark,
    _not_reloaded,
    _text,
    browser,
    dashboard_url,
)
from tests.test_local_runtime import _leftovers

__all__ = ["browser"]  # the fixture, shared

RUNTIMES = ["docker", "local"]


@pytest.fixture(scope="module", params=RUNTIMES)
def dash(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    runtime = request.param
    c = Cluster(
        tmp_path_factory.mktemp(f"dash-{runtime}"),
        agents=1,
        slots=4,
        runtime=runtime,
        scheduler_args=DASHBOARD,
    )
    try:
        yield c
    finally:
        c.close()
        if runtime == "local":
            assert not _leftovers(c), _leftovers(c)


def _count(browser: Any, css: str) -> int:
    from selenium.webdriver.common.by import By

    return len(browser.find_elements(By.CSS_SELECTOR, css))


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    """``wait_until`` off the event loop (the sandboxes' client tasks go on meanwhile)."""
    return await asyncio.to_thread(wait_until, predicate, timeout, 0.1, what)


async def _seen(browser: Any, css: str, ok: Any) -> None:
    """Until ``css``'s text is ``ok``: the page redraws its rows on each snapshot,
    so one read may meet an element just replaced."""
    await _until(lambda: ok(_text(browser, css)), 10, f"{css} as expected")


async def test_rows_show_tunnels_and_processes_and_the_detail_page_the_last_execs(
    dash: Cluster, browser: Any, tmp_path: Path
) -> None:
    url = dashboard_url(dash)
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=dash.address, lease_seconds=5)
    many = dashboard_view.MAX_PROCESSES + 2
    async with Sandbox.session(defaults) as session:
        sb = session.create(command="python", args=["-m", "http.server", "8000"], ports=[8000])
        plain = session.create(command="sleep", args=["300"])
        await asyncio.gather(sb.start(), plain.start())
        sid, other = sb.sandbox_id, plain.sandbox_id
        tunnel = (await sb.tunnels())[8000]
        procs = [await sb.spawn(["sleep", "300"]) for _ in range(many)]
        ended = await sb.spawn(["sh", "-c", "exit 3"])
        assert await ended.wait() == 3

        browser.get(url + "#/sandboxes")
        row = f'tr[data-sandbox="{sid}"]'
        # Its tunnel, where sb.tunnels() says it is; its processes: all counted, a
        # few listed (the running first).
        await _until(
            lambda: f"8000 → {tunnel.host}:{tunnel.port}" in _text(browser, f"{row} td.tunnels"),
            20,
            "the tunnel in the sandbox's row",
        )
        await _until(
            lambda: _text(browser, f"{row} .procs-running") == str(many),
            20,
            f"{many} processes running in its row",
        )
        await _seen(browser, f"{row} td.processes", lambda t: "1 ended" in t)
        assert _count(browser, f"{row} .proc") == dashboard_view.MAX_PROCESSES
        assert _count(browser, f"{row} .proc.off") == 0  # the running ones first
        # A sandbox without ports or processes shows none.
        await _seen(browser, f'tr[data-sandbox="{other}"] td.tunnels', lambda t: t == "—")
        await _seen(browser, f'tr[data-sandbox="{other}"] td.processes', lambda t: t == "—")
        _mark(browser)
        # Live: one killed, the row follows without a reload.
        await procs[0].kill()
        await _until(
            lambda: _text(browser, f"{row} .procs-running") == str(many - 1),
            20,
            "a killed process leaves the running count",
        )
        assert _not_reloaded(browser)
        browser.save_screenshot(str(tmp_path / "sandboxes-extras.png"))

        # The detail page: the last execs, the latest first, each bounded.
        keep = exec_history.KEEP
        for i in range(keep + 3):
            r = await sb.exec(["sh", "-c", f"echo out-{i}; echo err-{i} >&2; exit {i % 4}"])
            assert r.returncode == i % 4
        browser.get(url + f"#/sandbox/{sid}")
        last = keep + 2
        first_row = "#exec-results tr.exec:first-child"
        await _until(
            lambda: _text(browser, f"{first_row} .stdout") == f"out-{last}",
            20,
            "the latest exec on the detail page",
        )
        assert _count(browser, "#exec-results tr.exec") == keep
        assert _text(browser, f"{first_row} .stderr") == f"err-{last}"
        assert _text(browser, f"{first_row} .exit") == str(last % 4)
        assert "echo out-" in _text(browser, f"{first_row} .argv")
        oldest = f"out-{last - keep + 1}"
        assert _text(browser, "#exec-results tr.exec:last-child .stdout") == oldest
        assert re.fullmatch(r"\d+\.\d ms", _text(browser, f"{first_row} td:nth-child(3)"))
        await _seen(browser, "#sb-processes", lambda t: t.startswith(f"{many - 1} running"))
        await _seen(browser, "#sb-tunnels", lambda t: "8000 →" in t)
        # A new exec shows up live; its output's tail only, however much it wrote.
        big = exec_history.TAIL_BYTES * 8
        await sb.exec(["sh", "-c", f"head -c {big} /dev/zero | tr '\\0' x; echo; echo END"])
        await _until(
            lambda: _text(browser, f"{first_row} .stdout").endswith("END"),
            20,
            "the new exec, live",
        )
        shown = _text(browser, f"{first_row} .stdout")
        assert len(shown) <= exec_history.TAIL_BYTES, len(shown)
        assert _count(browser, "#exec-results tr.exec") == keep
        assert _not_reloaded(browser)
        browser.execute_script("document.querySelector('#exec-results').scrollIntoView()")
        browser.save_screenshot(str(tmp_path / "sandbox-execs.png"))
        for p in procs[1:]:
            await p.kill()
    if dash.runtime == "local":
        await _until(lambda: not _leftovers(dash), 20, "the test's sandboxes to go")


async def test_the_sessions_table_shows_round_trip_percentiles(
    dash: Cluster, browser: Any, tmp_path: Path
) -> None:
    url = dashboard_url(dash)
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=dash.address, lease_seconds=5)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def slowish(x: int) -> int:
            import time

            time.sleep(0.05)
            return x

        # Ten at once on one worker: each waits for those before it, so the round
        # trip's p99 is far above the run time's (queueing is the client's wait).
        await asyncio.gather(*(slowish(i) for i in range(10)))
        browser.get(url + "#/cluster")
        row = 'tr[data-function$="slowish"]'

        def ms(css: str) -> float:
            found = re.fullmatch(r"([\d.]+) ms", _text(browser, f"{row} {css}"))
            return float(found.group(1)) if found else -1.0

        await _until(lambda: ms(".rt-p50") >= 50, 30, "the round trip's p50 on the page")
        run_p99 = ms("td:nth-child(7)")
        assert 50 <= run_p99 < 1000, run_p99
        assert ms(".rt-p99") >= 5 * 50, (ms(".rt-p99"), run_p99)  # the 10th waited 9 runs
        browser.execute_script("document.querySelector('#sessions').scrollIntoView()")
        browser.save_screenshot(str(tmp_path / "sessions-round-trips.png"))


async def test_aviato_dashboard_asks_the_agents_too(
    dash: Cluster, browser: Any, tmp_path: Path
) -> None:
    """`aviato dashboard` (its own process, the scheduler's view asked over ZeroMQ)
    asks the agents itself: the same tunnels, processes and exec results."""
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aviato.cli", "dashboard", "--scheduler", dash.address],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:

        def found() -> str | None:
            m = _URL.search(log.read_text(errors="replace"))
            return m.group(1) if m else None

        url = await _until(found, 30, "the dashboard's URL")
        defaults = SandboxDefaults(container_image=IMAGE, scheduler=dash.address, lease_seconds=5)
        sb = Sandbox(
            command="python", args=["-m", "http.server", "8000"], ports=[8000], defaults=defaults
        )
        async with sb:
            sid = sb.sandbox_id
            tunnel = (await sb.tunnels())[8000]
            await sb.spawn(["sleep", "300"])
            await sb.exec(["sh", "-c", "echo far-exec"])
            browser.get(url + "#/sandboxes")
            row = f'tr[data-sandbox="{sid}"]'
            await _seen(browser, f"{row} td.tunnels", lambda t: f":{tunnel.port}" in t)
            await _seen(browser, f"{row} .procs-running", lambda t: t == "1")
            browser.get(url + f"#/sandbox/{sid}")
            await _seen(browser, "#exec-results tr.exec .stdout", lambda t: t == "far-exec")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text(errors="replace")
    if dash.runtime == "local":
        await _until(lambda: not _leftovers(dash), 20, "the test's sandboxes to go")


# ---------------------------------------------------------------------- units


def test_exec_history_keeps_the_last_execs_each_bounded() -> None:
    live = {"sb-a"}
    h = ExecHistory(live)
    for i in range(exec_history.KEEP + 5):
        with h.recorded("sb-a", ["echo", str(i)]) as r:
            r.output(1, b"x" * (exec_history.TAIL_BYTES * 3) + b"END")
            r.output(2, b"e")
            r.finish(i)
    got = h.results("sb-a")
    assert [g["exit_code"] for g in got] == list(range(5, exec_history.KEEP + 5))
    assert len(got[-1]["stdout"]) == exec_history.TAIL_BYTES
    assert got[-1]["stdout"].endswith("END") and got[-1]["stderr"] == "e"
    # Argument lists and arguments are cut; an exec that raised says so.
    long = ["a" * 1000] * (exec_history.ARGS + 4)
    with pytest.raises(RuntimeError), h.recorded("sb-a", long):
        raise RuntimeError("engine gone")
    last = h.results("sb-a")[-1]
    assert len(last["argv"]) == exec_history.ARGS + 1 and last["argv"][-1] == "… 4 more"
    assert all(len(a) <= exec_history.ARG_CHARS for a in last["argv"])
    assert last["exit_code"] is None and "engine gone" in last["error"]
    # Ended sandboxes' histories go once the table outgrows the running ones.
    for i in range(exec_history.SLACK + 3):
        with h.recorded(f"gone-{i}", ["true"]) as r:
            r.finish(0)
    assert len(h._by_sandbox) <= exec_history.SLACK + 1
    assert h.results("sb-a")


def test_a_row_lists_a_few_processes_and_counts_them_all() -> None:
    procs = tuple(
        schema.ProcState(str(i), ("sleep", "9" * 200), running=i % 2 == 0, exit_code=None)
        for i in range(20)
    )
    row = dashboard_view.processes_row(procs)
    assert row["running"] == 10 and row["ended"] == 10
    assert len(row["list"]) == dashboard_view.MAX_PROCESSES
    assert all(p["running"] for p in row["list"])
    assert all(len(p["argv"]) <= dashboard_view.ARGV_CHARS for p in row["list"])


def test_round_trip_figures_are_kept_sanitized() -> None:
    (kept,) = pool_figures(
        (PoolFigures("f", round_trip_p50_ms=float("nan"), round_trip_p99_ms=12.5),)
    )
    assert kept.round_trip_p50_ms == 0.0 and kept.round_trip_p99_ms == 12.5


async def test_agents_are_asked_only_while_a_page_watches() -> None:
    """Extras (scheduler/dashboard/agents.py) with a stand-in asker: no page open, no
    question to any agent; one open, every listed agent asked, and its rows kept."""
    from scheduler.dashboard import agents

    asked: list[str] = []

    class Asker:
        async def ask(self, address: str, msg: Any, expect: Any) -> Any:
            asked.append(address)
            if address == "tcp://down:1":
                raise RuntimeError("the agent at tcp://down:1 did not answer")
            return {f"sb-{address[-1]}": {"tunnels": [], "processes": {"running": 1}}}

    watching = False
    extras = agents.Extras(
        Asker(),  # type: ignore[arg-type]
        lambda: ["tcp://a:1", "tcp://a:1", "tcp://b:2", "tcp://down:1"],
        lambda: watching,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(extras.run(stop))
    try:
        await asyncio.sleep(agents.EXTRAS_SECONDS * 1.5)
        assert asked == []
        watching = True
        await _until(lambda: extras.rows, 10 * agents.EXTRAS_SECONDS, "a round of questions")
        assert sorted(set(asked)) == ["tcp://a:1", "tcp://b:2", "tcp://down:1"]
        assert asked.count("tcp://a:1") == asked.count("tcp://b:2")  # each once a round
        assert set(extras.rows) == {"sb-1", "sb-2"}
        rows = extras.add_to([{"id": "sb-1"}, {"id": "sb-9"}])
        assert rows[0]["processes"] == {"running": 1} and rows[1]["tunnels"] is None
    finally:
        stop.set()
        task.cancel()
