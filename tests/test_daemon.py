"""aviato/_server/daemon.py: what both daemons share at start and at exit."""

from __future__ import annotations

import subprocess
import sys

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
