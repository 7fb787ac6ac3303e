"""Bits shared by the two daemons' entry points."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


async def exit_with_parent(parent_pid: int, stop: Callable[[], None]) -> None:
    """Call ``stop`` once ``parent_pid`` is gone (an embedded cluster whose owner died,
    even by ``kill -9``). Polls, because PR_SET_PDEATHSIG follows the spawning thread."""
    while True:
        await asyncio.sleep(0.25)
        if os.getppid() != parent_pid:
            stop()
            return
