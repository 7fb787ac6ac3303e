"""Wire error codes -> exceptions: daemons send codes (aviato/_server/errors.py),
clients rebuild exceptions."""

from __future__ import annotations

from aviato import exceptions as exc
from aviato.protocol import ErrorCode, ErrorReply

__all__ = ["to_exception"]

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
    ErrorCode.PROCESS_NOT_FOUND: exc.ProcessNotFoundError,
    ErrorCode.UNSUPPORTED: exc.UnsupportedOperationError,
    ErrorCode.INTERNAL: exc.AviatoError,
    ErrorCode.PAUSED: exc.SandboxPausedError,
    ErrorCode.NOT_PAUSED: exc.SandboxNotPausedError,
    ErrorCode.ISOLATION_UNAVAILABLE: exc.IsolationUnavailableError,
    ErrorCode.RESOURCES_UNAVAILABLE: exc.ResourcesUnavailableError,
    ErrorCode.OBJECT_LOST: exc.ObjectLostError,
    ErrorCode.OBJECT_STORE_FULL: exc.ObjectStoreFullError,
}


def to_exception(reply: ErrorReply) -> exc.AviatoError:
    """The exception a client raises for an error reply."""
    cls = _CODE_TO_EXC.get(reply.code, exc.AviatoError)
    sandbox_id = reply.detail.get("sandbox_id")
    sandbox_id = sandbox_id if isinstance(sandbox_id, str) else None
    if cls is exc.SandboxFileError:
        filepath = reply.detail.get("filepath")
        kind = reply.detail.get("kind")
        file_cls = (
            exc.FILE_ERROR_KINDS.get(kind, exc.SandboxFileError)
            if isinstance(kind, str)
            else exc.SandboxFileError
        )
        return file_cls(reply.message, filepath=str(filepath or ""), sandbox_id=sandbox_id)
    if cls is exc.SandboxTerminatedError:
        ended_by = reply.detail.get("ended_by")
        return exc.SandboxTerminatedError(
            reply.message,
            sandbox_id=sandbox_id,
            ended_by=ended_by if isinstance(ended_by, str) else "",
        )
    if issubclass(cls, exc.SandboxError):
        return cls(reply.message, sandbox_id=sandbox_id)
    return cls(reply.message)
