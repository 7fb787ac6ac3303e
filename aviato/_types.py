"""Small public value types, stdlib-only: the agent's runtimes use ``OutputChunk`` too
(one class for a piece of output, from the container to the user)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ExecResult", "FileInfo", "OutputChunk"]


@dataclass(frozen=True, slots=True)
class ExecResult:
    """What one ``exec`` produced. ``stdout`` and ``stderr`` are bytes, as the program wrote
    them: ``r.stdout.decode()`` for text."""

    stdout: bytes
    stderr: bytes
    returncode: int
    command: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A piece of streamed exec output: ``fd`` is 1 (stdout) or 2 (stderr)."""

    fd: int
    data: bytes

    @property
    def stream(self) -> str:
        return "stdout" if self.fd == 1 else "stderr"


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One entry of ``list_files``: its name (not its path), its size in bytes, whether
    it is a directory, and its modification time (seconds since the epoch)."""

    name: str
    size: int
    is_dir: bool
    mtime: float
