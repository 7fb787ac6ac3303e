"""The last execs in each sandbox, for the dashboard's detail page (GetExecResults):
argv, exit code, duration and a tail of stdout and stderr, bounded per exec, per
sandbox and per agent. Kept in memory only; a sandbox's go when it ends (dropped at
the next exec once the table outgrows the running sandboxes)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARGS", "ARG_CHARS", "KEEP", "TAIL_BYTES", "ExecHistory", "ExecRecord"]

#: Execs kept per sandbox (the latest), output bytes kept per stream (the end),
#: arguments kept per exec and characters per argument.
KEEP = 10
TAIL_BYTES = 2048
ARGS = 16
ARG_CHARS = 200
#: Sandboxes whose history may outlive them before a sweep (ended between execs).
SLACK = 16


@dataclass(slots=True)
class ExecRecord:
    """One exec: running until ``finish``; its output's tails grow as it runs."""

    argv: tuple[str, ...]
    started: float
    #: ``time.monotonic()`` at the start, for its duration.
    began: float
    seconds: float | None = None
    exit_code: int | None = None
    timed_out: bool = False
    error: str = ""
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    def output(self, fd: int, data: bytes | memoryview) -> None:
        """Some of its output (fd 1 or 2): only the last TAIL_BYTES are kept."""
        tail = self.stdout if fd == 1 else self.stderr
        chunk = bytes(data[-TAIL_BYTES:])
        tail += chunk
        if len(tail) > TAIL_BYTES:
            del tail[: len(tail) - TAIL_BYTES]

    def finish(self, exit_code: int | None, timed_out: bool = False, error: str = "") -> None:
        self.seconds = time.monotonic() - self.began
        self.exit_code = exit_code
        self.timed_out = timed_out
        self.error = error[:ARG_CHARS]

    def shown(self) -> dict[str, Any]:
        """As the page gets it."""
        return {
            "argv": list(self.argv),
            "started": round(self.started, 3),
            "running": self.seconds is None,
            "seconds": None if self.seconds is None else round(self.seconds, 6),
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "error": self.error,
            "stdout": self.stdout.decode("utf-8", errors="replace"),
            "stderr": self.stderr.decode("utf-8", errors="replace"),
        }


def _argv(argv: Sequence[str]) -> tuple[str, ...]:
    shown = tuple(a[:ARG_CHARS] for a in argv[:ARGS])
    return (*shown, f"… {len(argv) - ARGS} more") if len(argv) > ARGS else shown


class ExecHistory:
    """Per sandbox, its last ``KEEP`` execs; sandboxes not in ``live`` are swept."""

    def __init__(self, live: Container[str] | None = None) -> None:
        self._live = live
        self._by_sandbox: dict[str, deque[ExecRecord]] = {}

    def start(self, sandbox_id: str, argv: Sequence[str]) -> ExecRecord:
        kept = self._by_sandbox.get(sandbox_id)
        if kept is None:
            self._sweep()
            kept = self._by_sandbox[sandbox_id] = deque(maxlen=KEEP)
        record = ExecRecord(_argv(argv), time.time(), time.monotonic())
        kept.append(record)
        return record

    def results(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [r.shown() for r in self._by_sandbox.get(sandbox_id, ())]

    def forget(self, sandbox_id: str) -> None:
        self._by_sandbox.pop(sandbox_id, None)

    def _sweep(self) -> None:
        live = self._live
        if live is None or len(self._by_sandbox) < SLACK:
            return
        for gone in [s for s in self._by_sandbox if s not in live]:
            del self._by_sandbox[gone]

    @contextmanager
    def recorded(self, sandbox_id: str, argv: Sequence[str]) -> Iterator[ExecRecord]:
        """Around an exec: its record, finished by the caller with its exit status, or
        here with the error that ended it (or ``cancelled``)."""
        record = self.start(sandbox_id, argv)
        try:
            yield record
        except BaseException as exc:
            if record.seconds is None:
                record.finish(None, error=f"{type(exc).__name__}: {exc}".rstrip(": "))
            raise
        if record.seconds is None:
            record.finish(None, error="ended without an exit status")
