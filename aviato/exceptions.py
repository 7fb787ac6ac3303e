"""The one exception tree of aviato.

Every error a user can see is one of these; the daemons send a wire error code
(:class:`aviato.protocol.ErrorCode`) and the client rebuilds the matching class::

    AviatoError
    ├── ProtocolError                  malformed message, or another protocol version
    ├── ClusterUnavailableError        no answer from the scheduler or an agent in time
    ├── UnauthorizedError              a daemon refused the token or CURVE key (or none loads)
    ├── ConfigurationError             a bad setting (an address, a log level); also ValueError
    ├── AddressInUseError              a daemon cannot listen: another process has the address
    ├── AgentIdInUseError              a live agent already holds this agent id
    ├── FunctionError                  a remote function raised a type we cannot rebuild
    └── SandboxError
        ├── SandboxNotFoundError       no sandbox with that id
        ├── SandboxNotRunningError     not started yet, or already stopped / exited
        │   └── SandboxPausedError     paused (sb.pause()): resume it before exec, files, calls
        ├── SandboxNotPausedError      resume() of a sandbox that is not paused
        ├── UnsupportedOperationError  the sandbox's runtime cannot do this (says which, why)
        ├── SandboxTimeoutError        a deadline passed (queue, exec, request); also TimeoutError
        ├── SandboxTerminatedError     stopped by a user, a limit (.ended_by) or its session
        ├── SandboxFailedError         could not start (bad image, ...) or its agent was lost
        │   ├── ResourcesUnavailableError  no live agent could ever hold its CPUs/memory/GPUs
        │   └── WorkerLostError        a remote call's worker died (killed, OOM) past its retries
        │       └── ActorLostError     an actor's worker died: the instance's state is gone
        ├── SandboxExecutionError      exec with check=True exited non-zero (.exec_result)
        ├── SandboxFileError           read/write failed (.filepath)
        │   ├── SandboxFileNotFoundError   no such path; also FileNotFoundError
        │   ├── SandboxIsADirectoryError   a directory, not a file; also IsADirectoryError
        │   ├── SandboxNotADirectoryError  a file, not a directory; also NotADirectoryError
        │   └── SandboxPathError           not absolute, or has '..'; also ValueError
        ├── PayloadTooLargeError       a message above the size limit; nothing was sent
        ├── ProcessNotFoundError       no spawned process with that id in the sandbox
        ├── FunctionSerializationError a function or argument cannot be pickled
        ├── AsyncFunctionError         @session.function() on an async def; also TypeError
        ├── ObjectLostError            an object ref's value is gone and no call can rebuild it
        └── ObjectStoreFullError       an agent's object store is over its memory and disk caps
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from aviato._types import ExecResult


class AviatoError(Exception):
    """Root of every aviato error."""

    #: True when the same request may well succeed if simply tried again (a daemon
    #: restarting, a host lost): callers can catch ``AviatoError`` and test this.
    retryable: ClassVar[bool] = False


class ProtocolError(AviatoError):
    """A message could not be decoded, or the peer speaks another protocol version."""


class ClusterUnavailableError(AviatoError):
    """The scheduler or an agent did not answer before the deadline."""

    retryable = True


class UnauthorizedError(AviatoError):
    """A daemon refused the request's credentials (cluster token or CURVE key), or this
    process's key files could not be loaded."""


class ConfigurationError(AviatoError, ValueError):
    """A setting cannot be used as given (an address that is not ``tcp://HOST:PORT``, a
    log level); the message says what to write instead."""


class AddressInUseError(AviatoError):
    """A daemon cannot listen on its address: another process already does."""


class AgentIdInUseError(AviatoError):
    """An agent asked to register with an id that a live agent holds (on this host or
    another): ids must be unique in a cluster."""


class FunctionError(AviatoError):
    """A remote function raised an exception whose type cannot be rebuilt locally."""

    def __init__(self, message: str, *, type_name: str = "", traceback_text: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        base = super().__str__()
        if self.traceback_text:
            return f"{base}\n\nRemote traceback:\n{self.traceback_text}"
        return base


class SandboxError(AviatoError):
    """Base of every error about one sandbox."""

    def __init__(self, message: str, *, sandbox_id: str | None = None) -> None:
        super().__init__(message)
        self.sandbox_id = sandbox_id

    @property
    def message(self) -> str:
        """The message alone, without the sandbox's id."""
        return super().__str__()

    def __str__(self) -> str:
        """The message, naming the sandbox when it does not already: the id the
        scheduler's and agents' logs use for it (a client chooses it before creating)."""
        base = self.message
        sid = self.sandbox_id
        return f"{base} [sandbox {sid}]" if sid and sid not in base else base


class SandboxNotFoundError(SandboxError):
    """No sandbox with that id is known to the cluster."""


class SandboxNotRunningError(SandboxError):
    """The sandbox is not running (never started, stopped, or exited)."""


class SandboxPausedError(SandboxNotRunningError):
    """The sandbox is paused: its processes are frozen. ``await sb.resume()`` first."""


class SandboxNotPausedError(SandboxError):
    """``resume()`` of a sandbox that is not paused (running, or still starting)."""


class UnsupportedOperationError(SandboxError):
    """The sandbox's runtime cannot do this operation; the message names the runtime
    and why (e.g. no cgroup freezer for pause on the local runtime)."""


class SandboxTimeoutError(SandboxError, TimeoutError):
    """A deadline passed: waiting for a slot, an exec, or a request."""

    def __init__(
        self,
        message: str,
        *,
        sandbox_id: str | None = None,
        exec_result: ExecResult | None = None,
    ) -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.exec_result = exec_result


class SandboxTerminatedError(SandboxError):
    """The sandbox was stopped by a user, its max lifetime, its idle timeout, or its
    session's lease. ``ended_by`` says which: "stopped", "max_lifetime",
    "idle_timeout", "session" (``aviato.protocol.EndedBy``), or "" when not known."""

    def __init__(self, message: str, *, sandbox_id: str | None = None, ended_by: str = "") -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.ended_by = ended_by


class SandboxFailedError(SandboxError):
    """The sandbox could not start, or was lost with its agent."""


class IsolationUnavailableError(SandboxFailedError):
    """No live agent offers the isolation a sandbox asks for (``SandboxDefaults(
    isolation=...)``), or the agent it reached does not: the message names what the
    agents offer."""


class ResourcesUnavailableError(SandboxFailedError):
    """No live agent could ever hold what a create asks for (``cpus``, ``memory_bytes``,
    ``gpus``, ``agent_labels``), even with nothing else running: the message names the
    largest agent's capacity. A request that fits an agent once others stop waits instead."""


class WorkerLostError(SandboxFailedError):
    """A remote function's worker died while running the call, more times than retries."""

    retryable = True


class ActorLostError(WorkerLostError):
    """An actor instance's worker died: the calls under way fail, and the instance's
    state is gone (with ``max_restarts`` left, the next call builds it again)."""

    retryable = False


class SandboxExecutionError(SandboxError):
    """``exec(..., check=True)`` exited with a non-zero code."""

    def __init__(self, message: str, *, exec_result: ExecResult, sandbox_id: str | None = None):
        super().__init__(message, sandbox_id=sandbox_id)
        self.exec_result = exec_result


class SandboxFileError(SandboxError):
    """Reading or writing a file in the sandbox failed."""

    def __init__(self, message: str, *, filepath: str, sandbox_id: str | None = None) -> None:
        super().__init__(message, sandbox_id=sandbox_id)
        self.filepath = filepath


class SandboxFileNotFoundError(SandboxFileError, FileNotFoundError):
    """The path (or, for an upload, its parent directory) does not exist in the sandbox."""

    KIND: ClassVar[str] = "not_found"


class SandboxIsADirectoryError(SandboxFileError, IsADirectoryError):
    """A directory where a file is expected (a download of one, an upload onto one, a
    remove of one without ``recursive=True``)."""

    KIND: ClassVar[str] = "is_a_directory"


class SandboxNotADirectoryError(SandboxFileError, NotADirectoryError):
    """A file where a directory is expected (``list_files`` of a file, a parent that is
    a file)."""

    KIND: ClassVar[str] = "not_a_directory"


class SandboxPathError(SandboxFileError, ValueError):
    """A sandbox path that is refused before anything is done: not absolute, with a
    ``..`` component or a NUL byte, or ``/`` itself where a file is meant."""

    KIND: ClassVar[str] = "bad_path"


#: A SandboxFileError's kind on the wire (``ErrorReply.detail["kind"]``) -> its class.
FILE_ERROR_KINDS: dict[str, type[SandboxFileError]] = {
    cls.KIND: cls
    for cls in (
        SandboxFileNotFoundError,
        SandboxIsADirectoryError,
        SandboxNotADirectoryError,
        SandboxPathError,
    )
}


class PayloadTooLargeError(SandboxError):
    """A request or reply above the configured size limit; nothing was sent."""


class ProcessNotFoundError(SandboxError):
    """No process with that id was spawned in this sandbox (an id is only good in the
    sandbox that spawned it; ``sb.processes()`` lists them)."""


class FunctionSerializationError(SandboxError):
    """A function, or one of its arguments, cannot be serialized."""


class AsyncFunctionError(SandboxError, TypeError):
    """``@session.function()`` takes a sync function; an ``async def`` was given."""


class ObjectLostError(SandboxError):
    """An object ref's value is no longer held: it was released, its session closed, or
    its agent died and it came from ``session.put`` (a ``fn.ref`` result is made again
    by running its call once more). Put the value again."""


class ObjectStoreFullError(SandboxError):
    """An agent cannot hold another object: its memory budget and its disk cap
    (``AVIATO_OBJECT_MEMORY_BYTES``, ``AVIATO_OBJECT_DISK_BYTES``) are used up. Release
    refs you no longer need (``ref.release()``), or give the agent larger caps."""


def error_detail(exc: BaseException) -> dict[str, Any]:
    """Extra fields worth carrying on the wire for ``exc`` (used by the daemons)."""
    detail: dict[str, Any] = {}
    if isinstance(exc, SandboxError) and exc.sandbox_id:
        detail["sandbox_id"] = exc.sandbox_id
    if isinstance(exc, SandboxFileError):
        detail["filepath"] = exc.filepath
        kind = getattr(exc, "KIND", "")
        if kind:
            detail["kind"] = kind
    if isinstance(exc, SandboxTerminatedError) and exc.ended_by:
        detail["ended_by"] = exc.ended_by
    return detail
