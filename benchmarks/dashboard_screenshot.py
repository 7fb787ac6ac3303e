"""The README's screenshot of the dashboard's cluster page, made from a real cluster:
an embedded scheduler with ``--dashboard`` and two agents, a few sandboxes and a
burst of creates (for the chart), shot by Debian's headless Chromium through
Selenium and chromedriver (nothing is downloaded).

    python -m benchmarks.dashboard_screenshot [--out FILE] [--runtime docker]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aviato import Sandbox, SandboxDefaults
from aviato._local import LocalCluster

from ._common import RUN_ID, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
IMAGE = "python:3.11"


def _second_agent(cluster: LocalCluster, runtime: str, workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / "agent-2.log", "wb")
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "agent", "--scheduler", cluster.address),
            *("--agent-id", f"shot-{RUN_ID}-2", "--slots", "8", "--runtime", runtime),
            *("--bind", "tcp://127.0.0.1:*", "--label", "zone=b"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def _activity(address: str, session: Any) -> None:
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=address, lease_seconds=30)
    for _ in range(3):  # bursts of short-lived ones, for the creates/s chart
        short = [Sandbox(command="true", defaults=defaults, tags=["batch"]) for _ in range(6)]
        await asyncio.gather(*(sb.start() for sb in short))
        await asyncio.gather(*(sb.wait(timeout=60) for sb in short))
        await asyncio.sleep(1.5)
    kept = [session.create(command="sleep", args=["infinity"], tags=["web"]) for _ in range(5)]
    await asyncio.gather(*(sb.start() for sb in kept))


def shoot(url: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        driver.get(url.split("?")[0] + "#/cluster")
        deadline = time.monotonic() + 20
        while "agents alive" not in driver.page_source and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # one more snapshot: the chart's latest point
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


async def main_async(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="aviato-shot-"))
    cluster = LocalCluster(
        runtime=args.runtime,
        slots=8,
        agent_id=f"shot-{RUN_ID}-1",
        daemon_args={"scheduler": ["--dashboard", "127.0.0.1:0"]},
        log_level="INFO",
    )
    second = None
    try:
        cluster.start(timeout=120)
        second = _second_agent(cluster, args.runtime, workdir)
        url = cluster.dashboard_url()
        assert url, "the scheduler printed no dashboard URL"
        wait_until(lambda: second is not None and second.poll() is None, 5, "the second agent")
        defaults = SandboxDefaults(container_image=IMAGE, scheduler=cluster.address)
        async with Sandbox.session(defaults) as session:
            await _activity(cluster.address, session)  # the session stops them
            await asyncio.to_thread(shoot, url, args.out)
        print(f"wrote {args.out}")
    finally:
        if second is not None:
            second.terminate()
            second.wait(timeout=60)
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_screenshot")
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures/dashboard.png"))
    p.add_argument("--runtime", default="docker", choices=("docker", "local"))
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
