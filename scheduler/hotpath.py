"""The scheduler's hot path: CreateSandbox decoded once per distinct spec, and an
agent's success reply read without its body.

A burst of creates carries a few specs many times over; checking each spec field by
field (the generic decoding) cost about a third of the scheduler's work per create.
A spec's wire form, packed again, names it exactly (msgpack keeps str/bytes,
int/float/bool apart), so the checked spec of a wire form seen before is reused.
The first of each goes through the generic decoding: what is refused, and how, is
unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from aviato.protocol import (
    PROTOCOL_VERSION,
    CreateSandbox,
    Decoded,
    Envelope,
    MsgType,
    SandboxSpec,
    decode_body,
)
from scheduler.records import MAX_INTERNED_SPECS


class CreateDecoder:
    """``decode_body`` for CreateSandbox, with the checked spec of each wire form kept
    (bounded: past ``limit`` distinct ones, the memory starts over)."""

    def __init__(self, limit: int = MAX_INTERNED_SPECS) -> None:
        self._limit = limit
        self._specs: dict[bytes, SandboxSpec] = {}
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def decode(self, env: Envelope, frames: Sequence[Any]) -> Decoded | None:
        """The decoded CreateSandbox of ``frames`` (``[envelope, *payloads]``, ``env``
        their opened envelope), or None: not one, or not the one shape the client sends
        (a float timeout, no payloads): the generic decoding then judges it."""
        body = env.body
        if env.type is not MsgType.CREATE_SANDBOX or type(body) is not dict or len(frames) != 1:
            return None
        timeout = body.get("timeout_seconds")
        sandbox_id = body.get("sandbox_id", "")
        if (
            type(timeout) is not float
            or type(sandbox_id) is not str
            or len(body) != 2 + ("sandbox_id" in body)
            or "spec" not in body
        ):
            return None
        try:
            key = self._pack(body["spec"])
        except Exception:  # msgpack raises several types; the generic path says why
            return None
        spec = self._specs.get(key)
        if spec is None:
            decoded = decode_body(env, frames)  # checks it all; DecodeError as ever
            assert isinstance(decoded.msg, CreateSandbox)
            if len(self._specs) >= self._limit:
                self._specs.clear()
            self._specs[key] = decoded.msg.spec
            return decoded
        return Decoded(CreateSandbox(spec, timeout, sandbox_id), env.request_id, (), env.token)


#: An agent's answer that only says "done" (SandboxReply, Ok): its type numbers.
_SUCCESS_TYPES = frozenset({int(MsgType.SANDBOX_REPLY), int(MsgType.OK)})
_ENVELOPE_KEYS = frozenset({"v", "t", "id", "b", "tok"})


def peek_success(frame: Any) -> tuple[int, str | None] | None:
    """(request id, token) of an envelope that is an agent's success reply, read
    without building its body (which the scheduler does not read: half of what it
    decoded per create was the sandbox row an agent echoes back). None for anything
    else, which then takes the checked path: a wrong version, type or id, an
    unknown key, bytes after the envelope, or msgpack that does not parse."""
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        unpacker.feed(frame if isinstance(frame, bytes) else frame.buffer)
        fields: dict[str, Any] = {}
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if type(key) is not str or key not in _ENVELOPE_KEYS:
                return None
            if key == "b":
                unpacker.skip()  # still walked: a body that does not parse fails here
                fields[key] = None
            else:
                value = fields[key] = unpacker.unpack()
                if key == "t" and (type(value) is not int or value not in _SUCCESS_TYPES):
                    return None  # a heartbeat, say: read once, by the checked path
    except Exception:  # msgpack raises several types; the checked path says why
        return None
    try:
        unpacker.unpack()
        return None  # something after the envelope
    except msgpack.OutOfData:
        pass  # nothing: as it should be
    except Exception:
        return None
    request_id, token, version = fields.get("id"), fields.get("tok"), fields.get("v")
    if (
        type(version) is not int
        or version != PROTOCOL_VERSION
        or type(fields.get("t")) is not int
        or fields["t"] not in _SUCCESS_TYPES
        or type(request_id) is not int
        or not (token is None or type(token) is str)
    ):
        return None
    return request_id, token
