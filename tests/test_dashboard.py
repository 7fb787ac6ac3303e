"""The scheduler's dashboard in a real browser (issue 15): Debian's headless Chromium
driven by Selenium through Debian's chromedriver (nothing is downloaded), against a
real cluster. Each page's screenshot is saved in the test's temporary directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.supervisor_hub import agent_dir
from aviato import Sandbox, SandboxDefaults
from tests.conftest import IMAGE, ROOT, Cluster, docker_cluster, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: CI sets it: the browser tests must run, never skip.
REQUIRE_BROWSER = os.environ.get("AVIATO_REQUIRE_BROWSER") == "1"
DASHBOARD = ["--dashboard", "127.0.0.1:0"]
_URL = re.compile(r"dashboard on (http://\S+)")


def need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    problem = ""
    if missing:
        problem = f"{missing} not installed (apt-get install chromium chromium-driver)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "selenium is not installed (pip install selenium)"
    if problem:
        if REQUIRE_BROWSER:
            pytest.fail(f"AVIATO_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)


def dashboard_url(c: Cluster) -> str:
    log = c.tmp / "scheduler.log"

    def found() -> str | None:
        m = _URL.search(log.read_text(errors="replace")) if log.exists() else None
        return m.group(1) if m else None

    return wait_until(found, 20, 0.05, "the dashboard URL in the scheduler's log")


@pytest.fixture(scope="module")
def dcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(
        tmp_path_factory.mktemp("dashboard"),
        agents=2,
        slots=3,
        # A killed agent's socket directory is removed by the survivor after this.
        scheduler_args=[*DASHBOARD, "--reap-orphans-after", "1"],
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _text(browser: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _not_reloaded(browser: Any) -> bool:
    """Whether the page is the one marked by ``_mark`` (a reload forgets the mark)."""
    return bool(browser.execute_script("return window.__aviatoTestMark === 1"))


def _mark(browser: Any) -> None:
    browser.execute_script("window.__aviatoTestMark = 1")


async def test_the_dashboard_follows_a_real_cluster(
    dcluster: Cluster, browser: Any, tmp_path: Path
) -> None:
    c = dcluster
    url = dashboard_url(c)
    browser.get(url + "#/cluster")
    for agent in c.agent_ids:
        wait_until(
            lambda a=agent: _text(browser, f'tr[data-agent="{a}"] td.state') == "alive",
            20,
            0.1,
            f"agent {agent} listed alive",
        )
    browser.save_screenshot(str(tmp_path / "cluster.png"))

    browser.get(url + "#/sandboxes")
    wait_until(lambda: "shown" in _text(browser, ".filters"), 20, 0.1, "the sandboxes page")
    _mark(browser)
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    talk = "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done"
    async with Sandbox.session(defaults) as session:
        sb = session.create(command="sh", args=["-c", talk], tags=["dash"])
        await sb.start()
        started = time.monotonic()
        sid = sb.sandbox_id
        assert sid is not None
        wait_until(
            lambda: _text(browser, f'tr[data-sandbox="{sid}"] td.state') == "running",
            10,
            0.05,
            "the new sandbox on the page",
        )
        shown_after = time.monotonic() - started
        assert shown_after < 2.0, f"the sandbox appeared after {shown_after:.2f} s"
        # Its session is listed on the cluster page, with its sandbox.
        session_id = session.session_id
        browser.get(url + "#/cluster")
        wait_until(
            lambda: _text(browser, f'tr[data-session="{session_id}"] td:nth-child(3)') == "1",
            10,
            0.1,
            "the session listed",
        )
        assert _not_reloaded(browser)

        # Its functions too, with the figures its client reports on each keepalive:
        # calls so far and per second, here while calls keep coming.
        @session.function()
        def dash_fn(x: int) -> int:
            return x

        async def keep_calling() -> None:
            while True:
                await asyncio.gather(*(dash_fn(i) for i in range(20)))
                await asyncio.sleep(0.05)

        caller = asyncio.create_task(keep_calling())
        try:
            row = 'tr[data-function$="dash_fn"]'
            await asyncio.to_thread(
                wait_until,
                lambda: (
                    int(_text(browser, f"{row} td:nth-child(3)") or 0) > 0
                    and float(_text(browser, f"{row} td:nth-child(2)") or 0) > 0
                ),
                30,
                0.2,
                "the session's function with its calls and calls/s",
            )
            calls_chart = 'svg[aria-label="function calls per second"] text'
            await asyncio.to_thread(
                wait_until,
                lambda: float((_text(browser, calls_chart) or "0/s").split("/")[0]) > 1,
                30,
                0.2,
                "calls per second on the chart",
            )
            browser.save_screenshot(str(tmp_path / "cluster-functions.png"))
        finally:
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
        # The tag filter keeps it; another tag hides it.
        browser.get(url + "#/sandboxes?tag=dash")
        wait_until(lambda: _text(browser, f'tr[data-sandbox="{sid}"]'), 10, 0.1, "filtered in")
        browser.save_screenshot(str(tmp_path / "sandboxes.png"))
        browser.get(url + "#/sandboxes?tag=other")
        wait_until(lambda: "0 shown" in _text(browser, ".filters"), 10, 0.1, "filtered out")

        browser.get(url + f"#/sandbox/{sid}")

        def line_number() -> int:
            found = re.findall(r"line-(\d+)", _text(browser, "#logs"))
            return int(found[-1]) if found else -1

        first = wait_until(lambda: line_number() >= 2 and line_number(), 20, 0.1, "logs shown")
        # Streaming: later lines arrive on the same page, without a reload.
        wait_until(lambda: line_number() >= first + 5, 20, 0.1, "more log lines")
        assert _not_reloaded(browser)  # only the hash changed since the mark: one page
        browser.save_screenshot(str(tmp_path / "sandbox.png"))
        await sb.stop()
    wait_until(lambda: _text(browser, "#sb-state") == "terminated", 10, 0.1, "shown stopped")

    # An agent killed (no sandbox of the test on it any more) turns dead on the page.
    victim = c.agent_ids[1]
    browser.get(url + "#/cluster")
    wait_until(lambda: _text(browser, f'tr[data-agent="{victim}"] td.state') == "alive", 20, 0.1)
    c.kill(victim)
    wait_until(
        lambda: _text(browser, f'tr[data-agent="{victim}"] td.state') == "dead",
        20,
        0.1,
        f"agent {victim} shown dead",
    )
    assert _text(browser, f'tr[data-agent="{c.agent_ids[0]}"] td.state') == "alive"
    browser.save_screenshot(str(tmp_path / "cluster-agent-dead.png"))
    wait_until(lambda: not agent_dir(victim).exists(), 30, 0.2, "the dead agent's directory")
    for name in ("cluster.png", "sandboxes.png", "sandbox.png", "cluster-agent-dead.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


async def test_aviato_dashboard_serves_a_running_cluster(
    cluster: Cluster, defaults: SandboxDefaults, browser: Any, tmp_path: Path
) -> None:
    """`aviato dashboard` against a scheduler started without --dashboard: its own
    process serves the page from the view it asks the scheduler for, live: agents,
    a new sandbox, its logs; and it goes away cleanly on Ctrl-C."""
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aviato.cli", "dashboard", "--scheduler", cluster.address],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:

        def found() -> str | None:
            m = _URL.search(log.read_text(errors="replace"))
            return m.group(1) if m else None

        url = await asyncio.to_thread(wait_until, found, 30, 0.05, "the dashboard's URL")
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        browser.get(url + "#/cluster")
        for agent in cluster.agent_ids:
            await asyncio.to_thread(
                wait_until,
                lambda a=agent: _text(browser, f'tr[data-agent="{a}"] td.state') == "alive",
                20,
                0.1,
                f"agent {agent} listed alive",
            )
        _mark(browser)
        talk = "i=0; while true; do echo far-$i; i=$((i+1)); sleep 0.2; done"
        async with Sandbox(command="sh", args=["-c", talk], defaults=defaults) as sb:
            sid = sb.sandbox_id
            browser.get(url + "#/sandboxes")
            await asyncio.to_thread(
                wait_until,
                lambda: _text(browser, f'tr[data-sandbox="{sid}"] td.state') == "running",
                10,
                0.05,
                "the new sandbox on the page",
            )
            browser.get(url + f"#/sandbox/{sid}")
            await asyncio.to_thread(
                wait_until, lambda: "far-3" in _text(browser, "#logs"), 20, 0.1, "its logs"
            )
            assert _not_reloaded(browser)
            browser.save_screenshot(str(tmp_path / "remote-sandbox.png"))
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text(errors="replace")


def _get(url: str, cookie: str = "") -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_with_a_token_the_dashboard_needs_the_printed_login(tmp_path: Path) -> None:
    c = Cluster(tmp_path, agents=1, token="s3cret-token", scheduler_args=DASHBOARD)
    try:
        printed = dashboard_url(c)
        assert "?login=" in printed
        base = printed.split("?login=")[0]
        for path in ("", "api/cluster", "api/sandboxes", "api/events"):
            status, _, body = _get(base + path)
            assert status == 401 and b"login" in body, path
        assert _get(base + "?login=wrong")[0] == 401
        status, headers, _ = _get(printed)
        assert status == 302 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"]
        status, _, body = _get(base + "api/cluster", cookie)
        assert status == 200 and c.agent_ids[0].encode() in body
        # The static assets hold no cluster state: served to anyone (the login page's).
        assert _get(base + "static/app.js")[0] == 200
        assert _get(base + "static/../../etc/passwd")[0] == 404
        assert _get(base + "api/logs/sb-0000000000000000", cookie)[0] == 404
    finally:
        c.close()
