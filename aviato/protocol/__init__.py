"""The wire protocol: every message aviato's processes exchange, and its encoding.

A message travels as ZeroMQ frames ``[envelope, *payloads]``. The envelope is a
msgpack map ``{"v": version, "t": type, "id": request id, "tok": token, "b": body}``
where ``body`` holds the message dataclass's fields. Payloads (file contents,
command output, pickled user data) are opaque extra frames: they are never put
inside the msgpack body, never copied to be decoded, and never unpickled here.

Every request carries a request id; its replies echo it. ``decode`` checks the
version and every field's type, so a daemon can answer a malformed message with
an :class:`ErrorReply` instead of failing somewhere deeper.

The parts: ``records`` (version, limits, message numbers, status and error codes, the
records messages carry), ``control`` (client/agent <-> scheduler), ``data`` (client <->
agent, and the calls relayed to function workers), ``encoding``. Import the names from
here: which part holds a name is the package's own business.
"""

from __future__ import annotations

# A call's header and outcome travel on to the function worker and back: their
# records are the worker link's (stdlib-only, as the worker inside a sandbox needs).
from aviato.link import CallHeader, CallOutcome, CallStatus, Serialization
from aviato.protocol.control import (
    AgentHeartbeat,
    AgentSpares,
    ClusterStatus,
    ClusterStatusReply,
    CreateSandbox,
    DeregisterAgent,
    GetSandbox,
    HeartbeatReply,
    ListSandboxes,
    PlaceSandbox,
    RegisterAgent,
    RegisterReply,
    SandboxExited,
    SandboxListReply,
    SandboxReply,
    SessionClose,
    SessionCloseReply,
    SessionKeepalive,
    StopSandbox,
    WaitSandbox,
)
from aviato.protocol.data import (
    CallResults,
    Cancel,
    Exec,
    ExecChunk,
    ExecReply,
    FileReply,
    GetLogs,
    LogsReply,
    Ping,
    Pong,
    ReadFile,
    RunCalls,
    WriteFile,
)
from aviato.protocol.encoding import (
    MESSAGE_MODULES,
    MESSAGE_TYPES,
    Decoded,
    DecodeError,
    Envelope,
    decode,
    decode_body,
    encode,
    encode_body,
    from_wire,
    info_wire,
    open_envelope,
    payload_size,
    to_wire,
)
from aviato.protocol.records import (
    MAX_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    PROTOCOL_VERSION,
    AgentInfo,
    ErrorCode,
    ErrorReply,
    Frame,
    Message,
    MsgType,
    OkReply,
    Payload,
    SandboxInfo,
    SandboxSpec,
    SandboxStatus,
    SpareShape,
    spare_key,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_MODULES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "AgentHeartbeat",
    "AgentInfo",
    "AgentSpares",
    "CallHeader",
    "CallOutcome",
    "CallResults",
    "CallStatus",
    "Cancel",
    "ClusterStatus",
    "ClusterStatusReply",
    "CreateSandbox",
    "DecodeError",
    "Decoded",
    "DeregisterAgent",
    "Envelope",
    "ErrorCode",
    "ErrorReply",
    "Exec",
    "ExecChunk",
    "ExecReply",
    "FileReply",
    "Frame",
    "GetLogs",
    "GetSandbox",
    "HeartbeatReply",
    "ListSandboxes",
    "LogsReply",
    "Message",
    "MsgType",
    "OkReply",
    "Payload",
    "Ping",
    "PlaceSandbox",
    "Pong",
    "ReadFile",
    "RegisterAgent",
    "RegisterReply",
    "RunCalls",
    "SandboxExited",
    "SandboxInfo",
    "SandboxListReply",
    "SandboxReply",
    "SandboxSpec",
    "SandboxStatus",
    "Serialization",
    "SessionClose",
    "SessionCloseReply",
    "SessionKeepalive",
    "SpareShape",
    "StopSandbox",
    "WaitSandbox",
    "WriteFile",
    "decode",
    "decode_body",
    "encode",
    "encode_body",
    "from_wire",
    "info_wire",
    "open_envelope",
    "payload_size",
    "spare_key",
    "to_wire",
]
