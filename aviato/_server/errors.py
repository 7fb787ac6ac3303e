"""Exceptions -> wire error codes: the reply a daemon sends for what it raised while
serving a request (clients turn it back into an exception: aviato/_errors.py)."""

from __future__ import annotations

from aviato import exceptions as exc
from aviato.protocol import ErrorCode, ErrorReply

__all__ = ["error_reply"]

_EXC_TO_CODE: list[tuple[type[BaseException], ErrorCode]] = [
    (exc.SandboxNotFoundError, ErrorCode.NOT_FOUND),
    (exc.SandboxNotRunningError, ErrorCode.NOT_RUNNING),
    (exc.SandboxTimeoutError, ErrorCode.TIMEOUT),
    (exc.SandboxTerminatedError, ErrorCode.TERMINATED),
    (exc.SandboxFailedError, ErrorCode.FAILED),
    (exc.SandboxFileError, ErrorCode.FILE_ERROR),
    (exc.PayloadTooLargeError, ErrorCode.TOO_LARGE),
    (exc.UnauthorizedError, ErrorCode.UNAUTHORIZED),
    (exc.ProtocolError, ErrorCode.MALFORMED),
    (exc.ClusterUnavailableError, ErrorCode.UNAVAILABLE),
    (exc.AgentIdInUseError, ErrorCode.ID_IN_USE),
    (exc.SandboxError, ErrorCode.BAD_REQUEST),
    (ValueError, ErrorCode.BAD_REQUEST),
]


def error_reply(error: BaseException) -> ErrorReply:
    """The reply a daemon sends for ``error`` raised while serving a request."""
    for cls, code in _EXC_TO_CODE:
        if isinstance(error, cls):
            return ErrorReply(code, str(error), exc.error_detail(error))
    return ErrorReply(ErrorCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")
