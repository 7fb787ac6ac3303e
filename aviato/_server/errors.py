"""Exceptions -> wire error codes: the reply a daemon sends for what it raised while
serving a request (clients turn it back into an exception: aviato/_errors.py)."""

from __future__ import annotations

from aviato import exceptions as exc
from aviato.protocol import ErrorCode, ErrorReply

__all__ = ["MAX_MESSAGE_CHARS", "error_reply"]

#: A reply's message is for a person: an error that quotes a peer's input (a hostile
#: spec in an engine's refusal) is cut in its middle, not echoed at length.
MAX_MESSAGE_CHARS = 800

_EXC_TO_CODE: list[tuple[type[BaseException], ErrorCode]] = [
    (exc.SandboxNotFoundError, ErrorCode.NOT_FOUND),
    (exc.SandboxPausedError, ErrorCode.PAUSED),
    (exc.SandboxNotPausedError, ErrorCode.NOT_PAUSED),
    (exc.UnsupportedOperationError, ErrorCode.UNSUPPORTED),
    (exc.SandboxNotRunningError, ErrorCode.NOT_RUNNING),
    (exc.SandboxTimeoutError, ErrorCode.TIMEOUT),
    (exc.SandboxTerminatedError, ErrorCode.TERMINATED),
    (exc.IsolationUnavailableError, ErrorCode.ISOLATION_UNAVAILABLE),
    (exc.ResourcesUnavailableError, ErrorCode.RESOURCES_UNAVAILABLE),
    (exc.SandboxFailedError, ErrorCode.FAILED),
    (exc.SandboxFileError, ErrorCode.FILE_ERROR),
    (exc.PayloadTooLargeError, ErrorCode.TOO_LARGE),
    (exc.UnauthorizedError, ErrorCode.UNAUTHORIZED),
    (exc.ProtocolError, ErrorCode.MALFORMED),
    (exc.ClusterUnavailableError, ErrorCode.UNAVAILABLE),
    (exc.AgentIdInUseError, ErrorCode.ID_IN_USE),
    (exc.ProcessNotFoundError, ErrorCode.PROCESS_NOT_FOUND),
    (exc.ObjectLostError, ErrorCode.OBJECT_LOST),
    (exc.ObjectStoreFullError, ErrorCode.OBJECT_STORE_FULL),
    (exc.SandboxError, ErrorCode.BAD_REQUEST),
    (ValueError, ErrorCode.BAD_REQUEST),
]


def error_reply(error: BaseException) -> ErrorReply:
    """The reply a daemon sends for ``error`` raised while serving a request."""
    for cls, code in _EXC_TO_CODE:
        if isinstance(error, cls):
            # The bare message: the sandbox's id travels in the detail (the client's
            # error names it again from there).
            message = error.message if isinstance(error, exc.SandboxError) else str(error)
            return ErrorReply(code, _short(message), exc.error_detail(error))
    why = f"internal error: {type(error).__name__}: {error}"
    return ErrorReply(ErrorCode.INTERNAL, _short(why))


def _short(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_MESSAGE_CHARS + 40
    head = MAX_MESSAGE_CHARS * 3 // 4
    return f"{message[:head]} [... {cut} characters cut ...] {message[head + cut :]}"
