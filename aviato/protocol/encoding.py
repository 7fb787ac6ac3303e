"""The encoding: a message as frames ``[msgpack envelope, *payloads]`` and back, checked
field by field against the message's dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import msgpack

from aviato._codec import CodecError, brief, decoder, encode_value
from aviato.exceptions import ProtocolError
from aviato.protocol import (
    actors_more,
    control,
    data,
    files,
    lifecycle,
    objects,
    objects_more,
    observe,
    observe_more,
    output,
    processes,
    records,
    storage,
)
from aviato.protocol.records import (
    PROTOCOL_VERSION,
    ErrorCode,
    Frame,
    Message,
    MsgType,
    Payload,
    SandboxInfo,
)

#: The modules that define messages: a new message family adds its module here.
MESSAGE_MODULES: tuple[ModuleType, ...] = (
    records,
    control,
    data,
    processes,
    files,
    lifecycle,
    storage,
    observe,
    observe_more,
    objects,
    objects_more,
    output,
    actors_more,
)


def _message_types(modules: Sequence[ModuleType]) -> dict[MsgType, type[Message]]:
    # From the modules' names, not Message.__subclasses__(): slots=True dataclasses
    # leave their discarded pre-slots class among the subclasses.
    found: dict[MsgType, type[Message]] = {}
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message:
                if found.setdefault(obj.TYPE, obj) is not obj:
                    raise AssertionError(f"two messages numbered {obj.TYPE!r}")
    return found


MESSAGE_TYPES: dict[MsgType, type[Message]] = _message_types(MESSAGE_MODULES)
#: The known numbers, each to its MsgType: what ``MsgType(t)`` then a look-up in
#: MESSAGE_TYPES find, in one dict look-up (every message's envelope is read so).
_NUMBERED: dict[Any, MsgType] = {t: t for t in MESSAGE_TYPES}


class DecodeError(ProtocolError):
    """A message that cannot be decoded; carries what could be read of it."""

    def __init__(self, message: str, *, code: ErrorCode, request_id: int | None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Decoded:
    msg: Message
    request_id: int
    payloads: tuple[Payload, ...] = ()
    token: str | None = None


def to_wire(value: Any) -> Any:
    """A dataclass tree as plain msgpack-able values (enums become their values)."""
    return encode_value(value)


def encode(
    msg: Message,
    request_id: int,
    payloads: Sequence[Payload] = (),
    *,
    token: str | None = None,
) -> list[Frame]:
    return encode_body(msg.TYPE, request_id, to_wire(msg), payloads, token=token)


def encode_body(
    msg_type: MsgType,
    request_id: int,
    body: dict[str, Any],
    payloads: Sequence[Payload] = (),
    *,
    token: str | None = None,
) -> list[Frame]:
    """``encode`` for a body already in wire form (see ``info_wire``)."""
    envelope: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "t": int(msg_type),
        "id": request_id,
        "b": body,
    }
    if token is not None:
        envelope["tok"] = token
    return [msgpack.packb(envelope, use_bin_type=True), *payloads]


_INFO_FIELDS = tuple(f.name for f in dataclasses.fields(SandboxInfo))


def info_wire(info: SandboxInfo, spec_wire: dict[str, Any]) -> dict[str, Any]:
    """``to_wire(info)`` with its spec's wire form given: a sender of many rows that
    share a spec (the scheduler) converts the spec once."""
    out = {name: getattr(info, name) for name in _INFO_FIELDS}
    out["spec"] = spec_wire
    out["status"] = info.status.value
    return out


def _frame_bytes(frame: Any) -> Payload:
    # zmq.Frame (copy=False) exposes .buffer; keep payloads as zero-copy memoryviews.
    buffer = getattr(frame, "buffer", None)
    if buffer is not None:
        return memoryview(buffer)
    if isinstance(frame, bytes | memoryview):
        return frame
    if isinstance(frame, bytearray):
        return bytes(frame)
    raise DecodeError(
        f"frame of type {type(frame).__name__}", code=ErrorCode.MALFORMED, request_id=None
    )


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message's envelope, checked, with its body not yet checked (see ``decode``)."""

    type: MsgType
    request_id: int
    token: str | None
    body: Any


def open_envelope(frames: Sequence[Any]) -> Envelope:
    """The checked envelope of ``[envelope, *payloads]``, its body as msgpack gave it:
    for a daemon that may not need the body (a reply whose content it ignores).
    Raises :class:`DecodeError`, never anything else."""
    if not frames:
        raise DecodeError("empty message", code=ErrorCode.MALFORMED, request_id=None)
    try:
        envelope = msgpack.unpackb(_frame_bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(
            f"envelope is not msgpack: {exc}", code=ErrorCode.MALFORMED, request_id=None
        ) from None
    if not isinstance(envelope, dict):
        raise DecodeError("envelope is not a map", code=ErrorCode.MALFORMED, request_id=None)
    request_id = envelope.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise DecodeError("envelope has no integer 'id'", code=ErrorCode.MALFORMED, request_id=None)
    version = envelope.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise DecodeError(
            f"peer speaks aviato protocol version {brief(version)}, this side speaks "
            f"{PROTOCOL_VERSION}; upgrade the older side so both match",
            code=ErrorCode.VERSION_MISMATCH,
            request_id=request_id,
        )
    try:
        msg_type = _NUMBERED.get(envelope.get("t", -1))
    except TypeError:  # an unhashable number
        msg_type = None
    if msg_type is None:
        raise DecodeError(
            f"unknown message type {brief(envelope.get('t'))}",
            code=ErrorCode.MALFORMED,
            request_id=request_id,
        )
    token = envelope.get("tok")
    if token is not None and not isinstance(token, str):
        raise DecodeError("token is not a string", code=ErrorCode.MALFORMED, request_id=request_id)
    return Envelope(msg_type, request_id, token, envelope.get("b", {}))


def decode(frames: Sequence[Any]) -> Decoded:
    """Decode ``[envelope, *payloads]``; raises :class:`DecodeError`, never anything else."""
    return decode_body(open_envelope(frames), frames)


def decode_body(env: Envelope, frames: Sequence[Any]) -> Decoded:
    """The typed message of an opened envelope (``frames`` for its payloads)."""
    cls = MESSAGE_TYPES[env.type]
    try:
        msg = from_wire(cls, env.body, cls.__name__)
        payloads = tuple(_frame_bytes(f) for f in frames[1:])
    except DecodeError as exc:
        exc.request_id = env.request_id
        raise
    return Decoded(msg=msg, request_id=env.request_id, payloads=payloads, token=env.token)


def from_wire(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build the typed value."""
    try:
        return decoder(tp)(value)
    except CodecError as exc:
        path = (
            f"{where}.{exc.path}"
            if exc.path and not exc.path.startswith("[")
            else (f"{where}{exc.path}")
        )
        raise DecodeError(
            f"{path}: {exc.message}", code=ErrorCode.MALFORMED, request_id=None
        ) from None


def payload_size(payloads: Sequence[Payload]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in payloads)
