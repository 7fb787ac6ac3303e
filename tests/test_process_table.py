"""Unit tests of the process table's pieces: the output backlog (agent/process_table.py)
and the agent's refusal when a sandbox has neither a supervisor nor a runtime fallback."""

from __future__ import annotations

import functools
import time
from types import SimpleNamespace
from typing import Any

import pytest

from agent.process_table import READER_GRACE, Backlog
from agent.processes import ProcessRequests, problem
from aviato import UnsupportedOperationError, link
from aviato.protocol import ReadOutput, ResizeTerminal, SignalProcess, SpawnProcess


def test_the_backlog_keeps_the_last_bytes_at_their_offsets() -> None:
    b = Backlog(limit=10)
    b.read_at = -READER_GRACE  # no reader: nothing is held back
    b.append(1, b"abcd")
    b.append(2, b"EF")
    b.append(2, b"GH")
    assert b.take(0, 100) == ([1, 2], [b"abcd", b"EFGH"], 8)  # one stream's neighbours joined
    assert b.take(5, 2) == ([2], [b"FG"], 2)
    b.append(1, b"ijklm")  # 13 bytes written: the 3 oldest are dropped
    assert (b.start, b.end, b.kept) == (3, 13, 10)
    assert b.take(0, 100)[1] == [b"d", b"EFGH", b"ijklm"]
    # A new reader starts at the oldest held, told what it missed; a reader that fell
    # behind likewise; one ahead of the end is put at the end.
    assert b.start_at(-1) == (3, 3)
    assert b.start_at(1) == (3, 2)
    assert b.start_at(7) == (7, 0)
    assert b.start_at(99) == (13, 0)


def test_a_recent_reader_holds_the_output_back() -> None:
    b = Backlog(limit=10)  # made now: its spawner is about to read
    b.append(1, b"x" * 8)
    assert b.holds_back(3)  # 11 unread bytes would be more than the backlog
    assert not b.holds_back(2)
    b.note_read(8)
    assert not b.holds_back(10)
    assert b.holds_back(3, end=b.end + 8)  # bytes handed on but not yet appended count
    b.read_at = time.monotonic() - READER_GRACE - 1  # the reader went away
    assert not b.holds_back(100)


def test_the_agent_refuses_bad_process_requests() -> None:
    assert "non-empty argv" in problem(SpawnProcess("sb", ()))
    assert "NUL" in problem(SpawnProcess("sb", ("a\x00",)))
    assert "rows and columns" in problem(SpawnProcess("sb", ("sh",), pty=True, rows=0, cols=1))
    assert "rows and columns" in problem(ResizeTerminal("sb", "p", 100000, 100000))
    assert "wait_seconds" in problem(ReadOutput("sb", "p", 0, float("nan")))
    assert "signal number" in problem(SignalProcess("sb", "p", 65))
    assert problem(SpawnProcess("sb", ("bash",), pty=True, rows=24, cols=80)) == ""


async def test_no_supervisor_and_no_fallback_is_a_typed_refusal_naming_the_runtime() -> None:
    runtime: Any = SimpleNamespace(name="local", process_backend=lambda: None)
    plane: Any = SimpleNamespace(runtime=runtime, hub=None, _check_running=lambda sid: None)
    with pytest.raises(UnsupportedOperationError, match="the local runtime needs python3"):
        await ProcessRequests(plane)._ask("sb-1", functools.partial(link.ProcList))
