"""aviato: sandboxes on your own cluster, with a Ray-style parallel-function API.

async with Sandbox.session(SandboxDefaults(container_image="python:3.11")) as session:
    sb = session.create(command="sleep", args=["infinity"])
    async with sb:
        r = await sb.exec(["echo", "hi"])   # r.stdout == b"hi\\n"
"""

import importlib
from typing import TYPE_CHECKING

from aviato.exceptions import (
    ActorLostError,
    AsyncFunctionError,
    AviatoError,
    ClusterUnavailableError,
    ConfigurationError,
    FunctionError,
    FunctionSerializationError,
    IsolationUnavailableError,
    ObjectLostError,
    ObjectStoreFullError,
    PayloadTooLargeError,
    ProcessNotFoundError,
    ProtocolError,
    ResourcesUnavailableError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxFileError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotFoundError,
    SandboxNotPausedError,
    SandboxNotRunningError,
    SandboxPathError,
    SandboxPausedError,
    SandboxTerminatedError,
    SandboxTimeoutError,
    UnauthorizedError,
    UnsupportedOperationError,
    WorkerLostError,
)
from aviato.protocol import PROTOCOL_VERSION, EndedBy, SandboxStatus, SnapshotInfo

if TYPE_CHECKING:
    from aviato._actor import ActorClass, ActorHandle
    from aviato._defaults import SandboxDefaults
    from aviato._exec import ExecStream
    from aviato._function import FunctionResult, RemoteFunction, Serialization
    from aviato._objects import ObjectRef
    from aviato._process import Process, ProcessInfo
    from aviato._sandbox import Sandbox, SandboxPage
    from aviato._session import Session
    from aviato._storage import Mount, Tunnel
    from aviato._types import ExecResult, FileInfo, OutputChunk
    from aviato._volumes import list_volumes, remove_volume
    from aviato._wait import wait

#: The API's names -> the module of each, imported at first use: the daemons import
#: aviato.protocol (so this file) and must not load the client (tests/test_layering.py).
_LAZY = {
    "ActorClass": "aviato._actor",
    "ActorHandle": "aviato._actor",
    "SandboxDefaults": "aviato._defaults",
    "FunctionResult": "aviato._function",
    "RemoteFunction": "aviato._function",
    "Serialization": "aviato._function",
    "ExecStream": "aviato._exec",
    "ObjectRef": "aviato._objects",
    "Process": "aviato._process",
    "ProcessInfo": "aviato._process",
    "Sandbox": "aviato._sandbox",
    "SandboxPage": "aviato._sandbox",
    "Session": "aviato._session",
    "Mount": "aviato._storage",
    "Tunnel": "aviato._storage",
    "list_volumes": "aviato._volumes",
    "remove_volume": "aviato._volumes",
    "ExecResult": "aviato._types",
    "FileInfo": "aviato._types",
    "OutputChunk": "aviato._types",
    "wait": "aviato._wait",
}


def __getattr__(name: str) -> object:
    if name == "sync":  # the blocking API, a module: `from aviato import sync`
        return importlib.import_module("aviato.sync")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aviato' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later reads do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "sync"})


__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "ActorClass",
    "ActorHandle",
    "ActorLostError",
    "AsyncFunctionError",
    "AviatoError",
    "ClusterUnavailableError",
    "ConfigurationError",
    "EndedBy",
    "ExecResult",
    "ExecStream",
    "FileInfo",
    "FunctionError",
    "FunctionResult",
    "FunctionSerializationError",
    "IsolationUnavailableError",
    "Mount",
    "ObjectLostError",
    "ObjectRef",
    "ObjectStoreFullError",
    "OutputChunk",
    "PayloadTooLargeError",
    "Process",
    "ProcessInfo",
    "ProcessNotFoundError",
    "ProtocolError",
    "RemoteFunction",
    "ResourcesUnavailableError",
    "Sandbox",
    "SandboxDefaults",
    "SandboxError",
    "SandboxExecutionError",
    "SandboxFailedError",
    "SandboxFileError",
    "SandboxFileNotFoundError",
    "SandboxIsADirectoryError",
    "SandboxNotADirectoryError",
    "SandboxNotFoundError",
    "SandboxNotPausedError",
    "SandboxNotRunningError",
    "SandboxPage",
    "SandboxPathError",
    "SandboxPausedError",
    "SandboxStatus",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "Serialization",
    "Session",
    "SnapshotInfo",
    "Tunnel",
    "UnauthorizedError",
    "UnsupportedOperationError",
    "WorkerLostError",
    "__version__",
    "list_volumes",
    "remove_volume",
    "sync",
    "wait",
]
