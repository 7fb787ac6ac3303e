"""An exec's request side and its streamed output: the argv and stdin checks every
exec makes, and ``ExecStream``, which yields a command's output as it comes. The
sandbox hands a stream what it needs (its agent's channel, the deadline, how to judge
the result), so this module knows nothing of ``Sandbox``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

from aviato._connection import Channel
from aviato._types import ExecResult, OutputChunk
from aviato.exceptions import PayloadTooLargeError
from aviato.protocol import MAX_PAYLOAD_BYTES, Exec, ExecChunk, ExecReply, SandboxInfo

__all__ = ["ExecStream", "Judge", "exec_argv", "stdin_payloads"]

#: Raises for a result that failed as asked (``check``) or timed out: the sandbox's.
Judge = Callable[[ExecResult, bool, bool, "float | None"], object]


class ExecStream:
    """Streamed output of one exec: iterate for chunks, then read ``returncode``."""

    def __init__(
        self,
        agent: Callable[[], tuple[SandboxInfo, Channel]],
        idle_timeout: float,
        judge: Judge,
        argv: tuple[str, ...],
        check: bool,
        timeout_seconds: float | None,
        cwd: str | None,
        env: dict[str, str],
        stdin: tuple[bytes | memoryview, ...] = (),
    ) -> None:
        self._agent = agent
        self._idle_timeout = idle_timeout
        self._judge = judge
        self._stdin = stdin
        self.command = argv
        self._check = check
        self._timeout = timeout_seconds
        self._cwd = cwd
        self._env = env
        self.returncode: int | None = None
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._run()

    async def _run(self) -> AsyncIterator[OutputChunk]:
        if self.returncode is not None:
            return
        info, conn = self._agent()
        msg = Exec(info.sandbox_id, self.command, self._cwd, self._env, self._timeout, True)
        async for reply in conn.stream(
            msg,
            self._stdin,
            idle_timeout=self._idle_timeout,
            is_last=ExecReply,
            cancel_at_source=True,
        ):
            if isinstance(reply.msg, ExecChunk):
                data = bytes(reply.payloads[0]) if reply.payloads else b""
                (self._stdout if reply.msg.fd == 1 else self._stderr).append(data)
                yield OutputChunk(reply.msg.fd, data)
            elif isinstance(reply.msg, ExecReply):
                self.returncode = reply.msg.returncode
                self._judge(self._result(), reply.msg.timed_out, self._check, self._timeout)

    def _result(self) -> ExecResult:
        return ExecResult(
            b"".join(self._stdout), b"".join(self._stderr), self.returncode or 0, self.command
        )

    async def result(self) -> ExecResult:
        """Run to the end (if not iterated yet) and return everything as one ExecResult."""
        async for _ in self:
            pass
        return self._result()


def stdin_payloads(
    stdin: bytes | bytearray | memoryview | str | None,
) -> tuple[bytes | memoryview, ...]:
    """An exec's stdin as its one payload frame (none: an empty stdin), checked against
    the payload limit here so that the error names stdin."""
    if stdin is None:
        return ()
    if isinstance(stdin, str):
        stdin = stdin.encode()
    elif isinstance(stdin, bytearray):
        stdin = bytes(stdin)
    elif isinstance(stdin, memoryview):
        stdin = stdin.cast("B")
    elif not isinstance(stdin, bytes):
        raise TypeError(f"stdin must be bytes or str, not {type(stdin).__name__}")
    size = len(stdin)
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"stdin of {size} bytes is above the {MAX_PAYLOAD_BYTES}-byte payload limit; "
            "write the data to files in the sandbox in smaller pieces and read them instead"
        )
    return (stdin,)


def exec_argv(command: Sequence[str]) -> tuple[str, ...]:
    if isinstance(command, str):
        raise TypeError(
            f"exec takes an argv list, not a string: use [{command!r}] or ['sh', '-c', {command!r}]"
        )
    argv = tuple(command)
    if not argv or not argv[0]:
        raise ValueError("exec needs a non-empty command, e.g. ['echo', 'hi']")
    if not all(isinstance(a, str) for a in argv):
        raise TypeError("every exec argument must be a str")
    return argv
