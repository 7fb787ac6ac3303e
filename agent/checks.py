"""Data-plane requests that decode but cannot be served, refused before any runtime
or supervisor sees them (found by tests/test_fuzz_sockets.py's handler fuzz).

The codec checks types only. A NUL byte in a path, argv or env, a file mode past
0o7777 or a NaN timeout made the supervisor's handler thread fail before it replied,
so the request hung; a RunCalls with no calls has no outcome to answer with.
"""

from __future__ import annotations

import math

from aviato.protocol import Exec, Message, ReadFile, RunCalls, WriteFile


def shown(value: str) -> str:
    """A peer's string for a message: cut short (a refusal must not echo kilobytes)."""
    return value if len(value) <= 60 else value[:57] + "..."


def _shown(value: str) -> str:
    return repr(shown(value))


def _nul(what: str, value: str) -> str:
    return f"{what} {_shown(value)} holds a NUL byte" if "\x00" in value else ""


def request_problem(msg: Message) -> str:
    """Why ``msg`` cannot be served ("" when it can); a BAD_REQUEST's message."""
    if isinstance(msg, ReadFile | WriteFile):
        problem = _nul("path", msg.path)
        if problem:
            return problem
        if isinstance(msg, WriteFile) and not 0 <= msg.mode <= 0o7777:
            return f"mode {msg.mode} is not a file mode (0 to 0o7777)"
        return ""
    if isinstance(msg, Exec):
        for arg in msg.argv:
            if "\x00" in arg:
                return _nul("argument", arg)
        if msg.cwd is not None and "\x00" in msg.cwd:
            return _nul("cwd", msg.cwd)
        for name, value in msg.env.items():
            if not name or "=" in name or "\x00" in name:
                return f"environment variable name {_shown(name)} is not one"
            if "\x00" in value:
                return _nul(f"environment variable {_shown(name)}'s value", value)
        if msg.timeout_seconds is not None and math.isnan(msg.timeout_seconds):
            return "timeout_seconds is NaN: give a number of seconds, or none"
        return ""
    if isinstance(msg, RunCalls) and not msg.calls:
        return "RunCalls carries no call"
    return ""
