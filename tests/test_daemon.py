"""aviato/_server/daemon.py: what both daemons share at start and at exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_stuck_shutdown_still_exits_with_its_stacks_logged() -> None:
    code = (
        "import logging, time\n"
        "from aviato._server.daemon import exit_watchdog\n"
        "logging.basicConfig()\n"
        "exit_watchdog(0.5, 'agent x')\n"
        "time.sleep(60)  # stuck\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert out.returncode == 70
    assert "agent x: shutdown stuck for 0.5 s; stacks follow, exiting" in out.stderr
    assert "time.sleep(60)" in out.stderr or "line 5" in out.stderr  # where it was stuck


def test_a_stuck_shutdown_runs_its_last_clean_up_before_exiting(tmp_path: Path) -> None:
    """The agent passes its socket directory's removal as ``last``: a stuck shutdown
    (killed by the watchdog) must not leave the directory behind."""
    left = tmp_path / "avw-stuck"
    left.mkdir()
    code = (
        "import shutil, sys, time\n"
        "from aviato._server.daemon import exit_watchdog\n"
        "exit_watchdog(0.5, 'agent x', last=lambda: shutil.rmtree(sys.argv[1]))\n"
        "time.sleep(60)  # stuck\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(left)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
    )
    assert out.returncode == 70
    assert not left.exists(), out.stderr


def test_a_stuck_shutdown_logs_where_each_task_awaits() -> None:
    """An agent's shutdown stuck on an await shows no useful thread stack (the loop's
    thread is idle in select): the watchdog also dumps every task of the loop."""
    code = (
        "import asyncio\n"
        "from aviato._server.daemon import exit_watchdog\n"
        "async def stuck_forever():\n"
        "    await asyncio.Event().wait()\n"
        "async def main():\n"
        "    exit_watchdog(0.5, 'agent x')\n"
        "    await asyncio.gather(asyncio.create_task(stuck_forever(), name='the-stuck-one'))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, cwd=ROOT
    )
    assert out.returncode == 70
    assert "asyncio tasks:" in out.stderr and "the-stuck-one" in out.stderr, out.stderr
    assert "line 4, in stuck_forever" in out.stderr  # the await it is stuck on
