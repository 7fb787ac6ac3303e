"""The hand-built fast paths for the headers on every call's path agree exactly with the
generic ones they stand in for: a call's header and outcome in aviato.protocol's codec
(client <-> agent), the worker's Results read by the agent (aviato.link, checked) and the
agent's CallBatch read by the worker (the sandbox build, trusted). Valid records round
trip both ways through either path; any other value gets the same answer from both (the
same record, or the same error), so malformed input is still refused as before."""

from __future__ import annotations

import array
import enum
import io
import json
import marshal
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.supervisor_link import results_header
from aviato import _codec, link
from aviato._codec import CodecError
from aviato.exceptions import ProtocolError
from aviato.link import (
    CallBatch,
    CallHeader,
    CallOutcome,
    CallStatus,
    Results,
    Serialization,
    decode,
    encode,
    encode_calls,
)
from aviato.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, ErrorCode, MsgType, RunCalls, to_wire
from aviato.protocol import decode as decode_message
from aviato.protocol import encode as encode_message
from aviato.protocol.encoding import DecodeError, open_envelope
from tests._strategies import fields_of, instances, mutations, valid
from tests.test_link import load_sandbox_build

lite = load_sandbox_build()

#: Values a peer may put where a field goes: every wire type, near misses included.
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(["ok", "error", "crashed", "lost", "pickle", "json", "OK", "1"]),
    st.binary(max_size=4),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(min_value=-9, max_value=9), max_size=2),
)


def near(cls: type) -> st.SearchStrategy[Any]:
    """Wire bodies of ``cls``: valid ones, ones with one field changed or removed, maps of
    its field names (and others) to any values, and values that are no map at all."""
    names = [*cls.FIELDS, "extra"]  # type: ignore[attr-defined]
    return st.one_of(
        instances(cls).map(_codec.generic_encoder(cls)),
        mutations(cls).map(lambda drawn: drawn[0]),
        fields_near(cls),
        st.dictionaries(st.sampled_from(names), ANY),
        ANY,
    )


def fields_near(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """Every field there, each a valid value or any value (often one field off)."""
    return st.fixed_dictionaries(
        {name: st.one_of(valid(tp).map(to_wire), ANY) for name, tp, _ in fields_of(cls)}
    )


def answer(convert: Any, value: Any) -> Any:
    """What ``convert`` gives for ``value``: its record, or its error as text."""
    try:
        return convert(value)
    except (CodecError, ProtocolError, lite.ProtocolError) as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_same(got: Any, want: Any) -> None:
    """The same answer, down to each field's exact type (an enum member, not its text);
    by repr, so that a NaN is the same as a NaN and -0.0 is not 0.0."""
    assert repr(got) == repr(want)
    if hasattr(want, "FIELDS"):
        for name in want.FIELDS:
            assert type(getattr(got, name)) is type(getattr(want, name)), name
            inner = getattr(want, name)
            if type(inner) is tuple:
                for mine, theirs in zip(getattr(got, name), inner, strict=True):
                    assert_same(mine, theirs)


# --------------------------------------------------------------------------- the codec


@pytest.mark.parametrize("cls", [CallHeader, CallOutcome])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_record_round_trips_through_both_paths(cls: type, data: st.DataObject) -> None:
    record = data.draw(instances(cls))
    fast, generic = _codec.encode_value(record), _codec.generic_encoder(cls)(record)
    assert fast == generic
    assert [type(v) for v in fast.values()] == [type(v) for v in generic.values()]
    wire = msgpack.unpackb(msgpack.packb(fast))  # as the peer reads it
    assert_same(_codec.decoder(cls)(wire), record)
    assert_same(_codec.generic_decoder(cls)(wire), record)


@pytest.mark.parametrize("cls", [CallHeader, CallOutcome])
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_any_value_gets_the_generic_answer(cls: type, data: st.DataObject) -> None:
    value = data.draw(near(cls))
    assert_same(answer(_codec.decoder(cls), value), answer(_codec.generic_decoder(cls), value))


#: Near misses: a bool or a float for an int, an int for a float or a bool, ...
NEAR = st.sampled_from([0, 1, 2, -1, 2**63, 1.0, 0.0, -0.0, True, False, "", "ok", b"", None, [1]])


@st.composite
def one_off(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    """A valid record's wire form with one field set to a near miss."""
    body: dict[str, Any] = _codec.generic_encoder(cls)(draw(instances(cls)))
    body[draw(st.sampled_from(sorted(body)))] = draw(NEAR)
    return body


@pytest.mark.parametrize("cls", [CallHeader, CallOutcome])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_one_field_off_gets_the_generic_answer(cls: type, data: st.DataObject) -> None:
    value = data.draw(one_off(cls))
    assert_same(answer(_codec.decoder(cls), value), answer(_codec.generic_decoder(cls), value))
    if cls is CallOutcome:  # and the same again inside a worker's Results
        results = {"op": "results", "outcomes": [value]}
        assert_same(answer(decode, results), answer(link._decoder(Results), {"outcomes": [value]}))


def test_the_fast_paths_are_the_ones_in_use() -> None:
    """(So that the tests above test what runs: a call's messages go through them.)"""
    call = CallHeader(1, "d", False, Serialization.PICKLE, 0, (0,))
    frames = encode_message(RunCalls("sbx", (call,), 1), 3)
    assert decode_message(frames).msg.calls == (call,)
    assert _codec.decoder(CallHeader) is not _codec.generic_decoder(CallHeader)
    assert _codec.decoder(CallHeader).__module__ == "aviato._link_fast"
    assert _codec.decoder(CallOutcome).__module__ == "aviato._link_fast"


@pytest.mark.parametrize(
    "outcome, words",
    [
        ({"call_id": 1, "status": "maybe", "seconds": 0.1, "detail": "", "buffers": 0}, "status"),
        ({"call_id": True, "status": "ok", "seconds": 0.1, "detail": "", "buffers": 0}, "call_id"),
        ({"call_id": 1, "status": "ok", "seconds": "0", "detail": "", "buffers": 0}, "seconds"),
        ({"call_id": 1, "status": ["ok"], "seconds": 0.1, "detail": "", "buffers": 0}, "status"),
        ({"call_id": 1, "status": "ok", "seconds": 0.1, "detail": "", "bufs": 0}, "bufs"),
        ("ok", "a map"),
    ],
)
def test_a_malformed_outcome_is_still_refused(outcome: Any, words: str) -> None:
    """The client reading a CallResults: a DecodeError naming the field, as before."""
    body = {"sandbox_id": "s", "outcomes": [outcome]}
    frames = [msgpack.packb({"v": 1, "t": int(MsgType.CALL_RESULTS), "id": 4, "b": body})]
    with pytest.raises(ProtocolError) as caught:
        decode_message(frames)
    assert words in str(caught.value) and caught.value.code is ErrorCode.MALFORMED  # type: ignore[attr-defined]


class Colour(enum.Enum):
    RED = 1
    GREEN = "green"
    BLUE = (1, 2)
    LISTED = [3]  # an unhashable value: only Enum's own call finds it

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls.GREEN if value == "verde" else None


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@settings(max_examples=300, deadline=None)
@given(st.one_of(ANY, st.sampled_from([1, 1.0, True, "green", "verde", (1, 2), [3], [1, 2]])))
def test_an_enum_is_decoded_as_its_call_decodes_it(value: Any) -> None:
    for tp in (Colour, Level, CallStatus, Serialization):
        try:
            want: Any = tp(value)
        except ValueError:
            want = "refused"
        try:
            got: Any = _codec.decoder(tp)(value)
        except CodecError:
            got = "refused"
        assert got is want or got == want == "refused"
        assert _codec.encode_value(got) == (got.value if got != "refused" else got)


# --------------------------------------------------------------------------- the link


def outcome_dicts() -> st.SearchStrategy[Any]:
    return st.one_of(
        instances(CallOutcome).map(_codec.generic_encoder(CallOutcome)),
        fields_near(CallOutcome),
        st.dictionaries(st.sampled_from([*CallOutcome.FIELDS, "extra"]), ANY),
        ANY,
    )


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.lists(outcome_dicts(), max_size=3).map(lambda o: {"op": "results", "outcomes": o}),
        st.dictionaries(st.sampled_from(["op", "outcomes", "extra"]), ANY).map(
            lambda d: {**d, "op": "results"}
        ),
    )
)
def test_results_get_the_generic_answer(value: dict[str, Any]) -> None:
    """The agent's inline read of a worker's Results, against the codec's checked one."""
    fields = {k: v for k, v in value.items() if k != "op"}
    assert_same(answer(decode, value), answer(link._decoder(Results), fields))


@settings(max_examples=200, deadline=None)
@given(st.lists(instances(CallOutcome), max_size=4))
def test_results_round_trip_through_the_worker(outcomes: list[CallOutcome]) -> None:
    """A worker's outcome (ok or error, no detail) through its hand-written JSON and the
    agent's fast read: the record it was (a worker's seconds are finite)."""
    outcomes = [o for o in outcomes if o.status in ("ok", "error") and math.isfinite(o.seconds)]
    mine = [
        lite.CallOutcome(o.call_id, lite.CallStatus(o.status.value), o.seconds, "", o.buffers)
        for o in outcomes
    ]
    want = Results(
        tuple(CallOutcome(o.call_id, o.status, o.seconds, "", o.buffers) for o in outcomes)
    )
    assert_same(decode(json.loads(results_header(mine))), want)


@settings(max_examples=300, deadline=None)
@given(instances(CallBatch))
def test_a_batch_round_trips_through_the_workers_fast_path(batch: CallBatch) -> None:
    wire = marshal.dumps(encode_calls(batch))
    assert marshal.loads(wire) == encode(batch)
    fast = lite._FAST[lite.CallBatch](marshal.loads(wire))
    fields = {k: v for k, v in marshal.loads(wire).items() if k != "op"}
    generic = lite._build_decoder(lite.CallBatch)(fields)
    assert fast is not None
    assert_same(fast, generic)
    assert lite.encode(fast) == encode(batch)  # and back: the record it was
    assert lite.decode(marshal.loads(wire)) == fast


def batch_dicts() -> st.SearchStrategy[Any]:
    calls = st.one_of(
        instances(CallHeader).map(_codec.generic_encoder(CallHeader)),
        fields_near(CallHeader),
        st.dictionaries(st.sampled_from([*CallHeader.FIELDS, "extra"]), ANY),
        ANY,
    )
    return st.one_of(
        st.fixed_dictionaries({"calls": st.lists(calls, max_size=3), "buffers": ANY}),
        st.dictionaries(st.sampled_from(["calls", "buffers", "extra"]), ANY),
    ).map(lambda d: {"op": "calls", **d})


@settings(max_examples=500, deadline=None)
@given(batch_dicts())
def test_the_worker_reads_any_batch_as_the_generic_path_does(value: dict[str, Any]) -> None:
    """Whatever the shape: the fast path gives the generic path's record or passes, and
    what the generic path refuses is a ProtocolError."""
    wire = marshal.dumps(value)
    fields = marshal.loads(wire)
    del fields["op"]
    want = answer(lite._build_decoder(lite.CallBatch), fields)
    fast = lite._FAST[lite.CallBatch](marshal.loads(wire))
    if fast is not None:
        assert_same(fast, want)
    got = answer(lite.decode, marshal.loads(wire))
    assert_same(got, want)
    if isinstance(want, str):
        assert want.startswith("ProtocolError")


# --------------------------------------------------------------------------- envelope


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        ANY,
        st.sampled_from([int(t) for t in MsgType]),
        st.sampled_from([float(t) for t in MESSAGE_TYPES]),
        st.integers(min_value=-2, max_value=300),
    )
)
def test_a_message_number_is_read_as_msgtype_reads_it(number: Any) -> None:
    """Every envelope's number is looked up in one dict: the same verdict as
    ``MsgType(t)`` then MESSAGE_TYPES (unknown or unhashable: MALFORMED)."""
    try:
        want: Any = MsgType(number)
        MESSAGE_TYPES[want]
    except (ValueError, KeyError):
        want = None
    try:
        frames = [msgpack.packb({"v": PROTOCOL_VERSION, "t": number, "id": 5, "b": {}})]
    except OverflowError:  # not on the wire at all
        return
    try:
        got: Any = open_envelope(frames).type
    except DecodeError as exc:
        assert exc.code is ErrorCode.MALFORMED and exc.request_id == 5
        assert "unknown message type" in str(exc)
        got = None
    assert got is want


# --------------------------------------------------------------------------- framing


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.binary(max_size=40).map(bytearray),
            st.binary(max_size=40).map(memoryview),
            st.lists(st.integers(0, 2**31), max_size=5).map(
                lambda v: memoryview(array.array("q", v))  # itemsize 8: nbytes, not len
            ),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_the_compiled_heads_are_the_format_strings(frames: list[Any]) -> None:
    """Heads of up to 8 frames come from precompiled structs, longer ones are packed by
    their format string: the same bytes either way, read back by both readers."""
    lengths = [memoryview(f).nbytes for f in frames]
    count = len(lengths)
    want = struct.pack(f"!I{count}Q", count, *lengths)
    assert link.pack_head(lengths) == want
    packed = link.pack(frames)
    assert packed[0] == want and packed[1:] == frames
    assert link.parse_head(b"xx" + want, 2) == (len(want), tuple(lengths))
    stream = b"".join(bytes(memoryview(f).cast("B")) for f in packed)
    got = link.read(io.BufferedReader(io.BytesIO(stream)))  # type: ignore[arg-type]
    assert got is not None
    assert [bytes(g) for g in got] == [bytes(memoryview(f).cast("B")) for f in frames]
