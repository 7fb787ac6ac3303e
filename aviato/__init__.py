"""aviato: sandboxes on your own cluster, with a Ray-style parallel-function API.

async with Sandbox.session(SandboxDefaults(container_image="python:3.11")) as session:
    sb = session.create(command="sleep", args=["infinity"])
    async with sb:
        r = await sb.exec(["echo", "hi"])   # r.stdout == b"hi\\n"
"""

from aviato._defaults import SandboxDefaults
from aviato._function import FunctionResult, RemoteFunction, Serialization
from aviato._sandbox import ExecStream, Sandbox, SandboxPage
from aviato._session import Session
from aviato._types import ExecResult, OutputChunk
from aviato.exceptions import (
    AsyncFunctionError,
    AviatoError,
    ClusterUnavailableError,
    ConfigurationError,
    FunctionError,
    FunctionSerializationError,
    PayloadTooLargeError,
    ProtocolError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    UnauthorizedError,
    WorkerLostError,
)
from aviato.protocol import PROTOCOL_VERSION, SandboxStatus

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncFunctionError",
    "AviatoError",
    "ClusterUnavailableError",
    "ConfigurationError",
    "ExecResult",
    "ExecStream",
    "FunctionError",
    "FunctionResult",
    "FunctionSerializationError",
    "OutputChunk",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteFunction",
    "Sandbox",
    "SandboxDefaults",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxNotFoundError",
    "SandboxNotRunningError",
    "SandboxPage",
    "SandboxStatus",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "Serialization",
    "Session",
    "UnauthorizedError",
    "WorkerLostError",
    "__version__",
]
