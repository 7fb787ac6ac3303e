"""The scheduler's hot create path (scheduler/hotpath.py, SchedulerState._checked_spec):
a spec decoded and checked once per distinct wire form must decode, and be refused,
exactly as the generic decoding and checks do, every time."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest

from aviato.protocol import (
    PROTOCOL_VERSION,
    CreateSandbox,
    DecodeError,
    ErrorCode,
    ErrorReply,
    MsgType,
    OkReply,
    RegisterAgent,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    decode,
    encode,
    open_envelope,
    to_wire,
)
from scheduler.hotpath import CreateDecoder, peek_success
from scheduler.state import Config, Reply, SchedulerState, SendToAgent

SPEC = SandboxSpec(image="python:3.11", command="sleep", args=("infinity",), tags=("t",))


def frame(body: Any, request_id: int = 1, t: int = MsgType.CREATE_SANDBOX) -> list[bytes]:
    env = {"v": PROTOCOL_VERSION, "t": int(t), "id": request_id, "b": body}
    return [msgpack.packb(env, use_bin_type=True)]


def both(dec: CreateDecoder, frames: list[bytes]) -> tuple[Any, Any]:
    """(the hot path's outcome, the generic decoding's), each a Decoded or the error."""

    def outcome(f: Any) -> Any:
        try:
            return f()
        except DecodeError as exc:
            return ("error", exc.code, str(exc), exc.request_id)

    def hot() -> Any:
        got = dec.decode(open_envelope(frames), frames)
        return decode(frames) if got is None else got

    return outcome(hot), outcome(lambda: decode(frames))


def test_a_repeated_spec_decodes_as_the_generic_path_does() -> None:
    dec = CreateDecoder()
    body = to_wire(CreateSandbox(SPEC, 30.0, "sb-x"))
    for rid in range(1, 4):
        hot, generic = both(dec, frame(body, rid))
        assert hot == generic and hot.request_id == rid
    assert len(dec._specs) == 1


# Values that compare (and hash) equal in Python but differ on the wire, where the
# checked decoding tells them apart: a spec remembered for one must not stand for another.
LOOKALIKES: list[tuple[str, list[Any]]] = [
    ("cpus", [1.0, 1, True]),
    ("memory_bytes", [2**30, float(2**30), None]),
    ("function_worker", [False, 0, 0.0]),
    ("args", [["a"], [b"a"], ("a",)]),
    ("image", ["python:3.11", b"python:3.11"]),
    ("env", [{"A": "1"}, {"A": 1}, {"A": True}]),
]


@pytest.mark.parametrize(("field", "values"), LOOKALIKES)
def test_lookalike_values_are_not_confused(field: str, values: list[Any]) -> None:
    dec = CreateDecoder()
    for order in itertools.permutations(values):
        for value in order:  # each twice: the second from what was remembered
            body = to_wire(CreateSandbox(SPEC, 30.0))
            body["spec"][field] = value
            for _ in range(2):
                hot, generic = both(dec, frame(body))
                assert hot == generic, (field, value)
                if not isinstance(hot, tuple):  # decoded: the very types, not just equal
                    got = getattr(hot.msg.spec, field)
                    want = getattr(generic.msg.spec, field)
                    assert type(got) is type(want), (field, value)


@pytest.mark.parametrize(
    "body",
    [
        {"spec": to_wire(SPEC), "timeout_seconds": "soon"},
        {"spec": to_wire(SPEC), "timeout_seconds": 30},  # an int: the generic path's
        {"spec": to_wire(SPEC), "timeout_seconds": 30.0, "sandbox_id": 7},
        {"spec": to_wire(SPEC), "timeout_seconds": 30.0, "extra": 1},
        {"spec": {**to_wire(SPEC), "cpus": "many"}, "timeout_seconds": 30.0},
        {"spec": {**to_wire(SPEC), "bogus": 1}, "timeout_seconds": 30.0},
        {"spec": [], "timeout_seconds": 30.0},
        {"timeout_seconds": 30.0},
        [],
    ],
)
def test_bad_creates_get_the_generic_typed_error_every_time(body: Any) -> None:
    dec = CreateDecoder()
    good = to_wire(CreateSandbox(SPEC, 30.0))
    both(dec, frame(good))  # something remembered already
    for rid in (5, 6):
        hot, generic = both(dec, frame(body, rid))
        assert hot == generic
        if isinstance(hot, tuple):
            assert hot[1] is ErrorCode.MALFORMED and hot[3] == rid


def test_other_messages_and_payloads_take_the_generic_path() -> None:
    dec = CreateDecoder()
    body = to_wire(CreateSandbox(SPEC, 30.0))
    assert dec.decode(open_envelope(frame({"sandbox_id": "x"}, t=MsgType.GET_SANDBOX)), []) is None
    frames = [*frame(body), b"payload"]
    assert dec.decode(open_envelope(frames), frames) is None


def test_the_memory_of_specs_is_bounded() -> None:
    dec = CreateDecoder(limit=8)
    for i in range(50):
        body = to_wire(CreateSandbox(SandboxSpec(image=f"img{i}", command="true"), 1.0))
        hot, generic = both(dec, frame(body))
        assert hot == generic
        assert len(dec._specs) <= 8


def test_a_bad_spec_object_is_refused_every_time_it_comes() -> None:
    """The state machine checks a spec object once and remembers the verdict: the
    same (shared) object must be refused again, and a good one placed again."""
    counter = itertools.count(1)
    state = SchedulerState(Config(dead_after_seconds=1e9), new_id=lambda: f"sb-{next(counter)}")
    state.register_agent(RegisterAgent("a1", "tcp://x:1", 10, "docker", fresh=True), 0.0)
    bad = SandboxSpec(image="", command="sleep")
    for key in ("c1", "c2"):
        actions = state.request_create(key, bad, 10.0, 1.0)
        assert len(actions) == 1 and isinstance(actions[0], Reply)
        assert isinstance(actions[0].msg, ErrorReply)
        assert actions[0].msg.code is ErrorCode.BAD_REQUEST
        assert "container_image is empty" in actions[0].msg.message
    for key in ("c3", "c4"):
        actions = state.request_create(key, SPEC, 10.0, 1.0)
        assert [type(a) for a in actions] == [SendToAgent]
    # A bad sandbox id is still refused, with a spec already found good.
    actions = state.request_create("c5", SPEC, 10.0, 1.0, sandbox_id="x" * 5000)
    assert isinstance(actions[0], Reply) and isinstance(actions[0].msg, ErrorReply)


# --------------------------------------------------------------------------- peek_success

INFO = SandboxInfo("sb-0123456789abcdef", SPEC, SandboxStatus.RUNNING, agent_id="a1")


@pytest.mark.parametrize("token", [None, "s3cret"])
@pytest.mark.parametrize("msg", [SandboxReply(INFO), OkReply()])
def test_peek_reads_an_agents_success_reply(msg: Any, token: str | None) -> None:
    frames = encode(msg, 42, token=token)
    assert peek_success(frames[0]) == (42, token)
    assert decode(frames).request_id == 42  # what the checked path reads of it


def envelope(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": int(MsgType.OK), "id": 3, "b": {}}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not DROP}, use_bin_type=True)


DROP = object()
GOOD = envelope()


@pytest.mark.parametrize(
    "frame",
    [
        envelope(v=PROTOCOL_VERSION + 1),
        envelope(v=float(PROTOCOL_VERSION)),
        envelope(v=DROP),
        envelope(t=int(MsgType.AGENT_HEARTBEAT)),
        envelope(t=float(MsgType.OK)),
        envelope(t=DROP),
        envelope(id=True),
        envelope(id="3"),
        envelope(id=DROP),
        envelope(tok=7),
        envelope(extra=1),
        GOOD + b"\x00",  # something after the envelope
        GOOD[:-1],  # cut short
        GOOD[:3],
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: "x"}),
        b"",
        b"\xc1",  # never valid msgpack
        envelope(b=b"\xff").replace(b"\xc4\x01\xff", b"\xa1\xff"),  # a str not UTF-8...
    ],
)
def test_peek_leaves_everything_else_to_the_checked_path(frame: bytes) -> None:
    if frame.endswith(b"\xa1\xff"):
        # ...in a body the scheduler never reads: taken (the checked path refused it
        # before; the agent owning the request is the only one who can send it).
        assert peek_success(frame) == (3, None)
        return
    assert peek_success(frame) is None


def test_peek_accepts_an_explicit_null_token_as_open_envelope_does() -> None:
    frame = envelope(tok=None)
    assert peek_success(frame) == (3, None)
    assert open_envelope([frame]).token is None
