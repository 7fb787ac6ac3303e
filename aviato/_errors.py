"""Exceptions <-> wire error codes: daemons send codes, clients rebuild exceptions."""

from __future__ import annotations

from aviato import exceptions as exc
from aviato.protocol import ErrorCode, ErrorReply

_CODE_TO_EXC: dict[ErrorCode, type[exc.AviatoError]] = {
    ErrorCode.MALFORMED: exc.ProtocolError,
    ErrorCode.VERSION_MISMATCH: exc.ProtocolError,
    ErrorCode.UNAUTHORIZED: exc.UnauthorizedError,
    ErrorCode.BAD_REQUEST: exc.SandboxError,
    ErrorCode.NOT_FOUND: exc.SandboxNotFoundError,
    ErrorCode.NOT_RUNNING: exc.SandboxNotRunningError,
    ErrorCode.TIMEOUT: exc.SandboxTimeoutError,
    ErrorCode.FAILED: exc.SandboxFailedError,
    ErrorCode.TERMINATED: exc.SandboxTerminatedError,
    ErrorCode.FILE_ERROR: exc.SandboxFileError,
    ErrorCode.TOO_LARGE: exc.PayloadTooLargeError,
    ErrorCode.UNAVAILABLE: exc.ClusterUnavailableError,
    ErrorCode.ID_IN_USE: exc.AgentIdInUseError,
    ErrorCode.INTERNAL: exc.AviatoError,
}

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


def to_exception(reply: ErrorReply) -> exc.AviatoError:
    """The exception a client raises for an error reply."""
    cls = _CODE_TO_EXC.get(reply.code, exc.AviatoError)
    sandbox_id = reply.detail.get("sandbox_id")
    sandbox_id = sandbox_id if isinstance(sandbox_id, str) else None
    if cls is exc.SandboxFileError:
        filepath = reply.detail.get("filepath")
        return exc.SandboxFileError(
            reply.message, filepath=str(filepath or ""), sandbox_id=sandbox_id
        )
    if issubclass(cls, exc.SandboxError):
        return cls(reply.message, sandbox_id=sandbox_id)
    return cls(reply.message)
