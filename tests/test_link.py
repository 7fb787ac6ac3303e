"""The agent <-> worker link's schema (aviato/link.py): every op's header round-trips,
through marshal (agent -> worker) and JSON (worker -> agent), on the host and in the
stand-in build a sandbox uses; the framing round-trips, memfd frames included; and
malformed input is a ProtocolError, never anything else."""

from __future__ import annotations

import asyncio
import fcntl
import importlib.util
import io
import json
import marshal
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import supervisor_link
from agent.supervisor_link import results_header, to_json
from aviato import _spare, link, protocol
from aviato._lane import FramedSocket
from aviato.exceptions import ProtocolError
from aviato.link import (
    HEADERS,
    MAX_FRAMES,
    SHM_FLAG,
    CallBatch,
    CallHeader,
    CallOutcome,
    CallsLink,
    CallStatus,
    Chunk,
    ChunkAck,
    Detach,
    Entry,
    ExecRequest,
    Exit,
    FileDone,
    FramingError,
    Header,
    Hello,
    Kill,
    Listing,
    ListRequest,
    ObjectDrop,
    ObjectFrames,
    Op,
    Output,
    ProcList,
    ProcRead,
    ProcReply,
    ProcResize,
    ProcSignal,
    ProcSpawn,
    ProcState,
    ProcWrite,
    ReadRequest,
    ReadStream,
    RemoveRequest,
    Results,
    Serialization,
    ShmProbe,
    StreamEnd,
    WorkerOutput,
    WriteChunk,
    WriteOpen,
    WriteRequest,
    decode,
    encode,
    encode_calls,
    pack,
    pack_head,
    parse_head,
    read,
)

#: One header of every op, with every field away from its default somewhere.
EXAMPLES: list[Header] = [
    CallBatch(
        (
            CallHeader(7, "d" * 24, True, Serialization.JSON, 1024, (0, 1)),
            CallHeader(8, "e" * 24, False, Serialization.PICKLE),
        ),
        buffers=2,
    ),
    ExecRequest(
        3,
        ("sh", "-c", "echo \u00e9t\u00e9"),
        cwd="/tmp",
        env={"A": "b", "\u00c9": ""},
        timeout=1.5,
        stream=True,
        stdin=True,
    ),
    ExecRequest(4, ("true",), cwd=None, env={}, timeout=None, stream=False, stdin=False),
    ReadRequest(5, "/etc/\u00e9", max=10),
    WriteRequest(6, "/tmp/y", mode=0o600),
    Kill(7),
    ReadStream(8, "/data/\u00e9.bin", window=4),
    WriteOpen(9, "/data/model.bin", mode=0o600),
    WriteChunk(9, 3, last=True),
    ChunkAck(8, 2),
    Chunk(8, 1),
    StreamEnd(9, size=1 << 33),
    StreamEnd(10, error="no such directory: /x", kind="not_found"),
    ListRequest(11, "/data"),
    Listing(11, (Entry("a.txt", 3, False, 1.5), Entry("\u00e9", 0, True, 2.25))),
    Listing(12, ()),
    RemoveRequest(13, "/data/tmp", recursive=True),
    Detach(),
    ObjectFrames("a" * 32),
    ObjectDrop(("a" * 32, "b_-9")),
    ShmProbe(),
    ShmProbe(ok=True),
    Hello("3.11.9", 42, calls=True),
    Hello("3.12.0", 43, error="the image's Python is 3.12 but the client's is 3.11"),
    CallsLink(shm=True),
    Results(
        (
            CallOutcome(7, CallStatus.OK, 0.25, buffers=2),
            CallOutcome(8, CallStatus.ERROR, 1.0),
        )
    ),
    Output(9, 2),
    WorkerOutput(1, "work", dropped=1 << 20),
    WorkerOutput(2),
    Exit(9, -9, timed_out=True),
    FileDone(5, error="no such file"),
    FileDone(6, error="too large", too_large=True),
    ProcSpawn(10, ("bash",), "/tmp", {"TERM": "dumb"}, pty=True, rows=40, cols=120),
    ProcWrite(11, "proc-1", eof=True),
    ProcRead(12, "proc-1", -1, 10.0, 1 << 20),
    ProcSignal(13, "proc-1", 2),
    ProcResize(14, "proc-1", 40, 120),
    ProcList(15, "proc-1", 5.0),
    ProcReply(
        16,
        procs=(ProcState("proc-1", ("sleep", "9"), False, 137, 9, True),),
        offset=7,
        skipped=3,
        eof=True,
        fds=(1, 2),
    ),
    ProcReply(17, error="no process", missing=True),
]


def load_sandbox_build() -> ModuleType:
    """aviato/link.py as a sandbox imports it: a top-level module (``aviato_link``)."""
    spec = importlib.util.spec_from_file_location("aviato_link", link.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.__package__
    return module


lite = load_sandbox_build()


def test_every_op_has_a_record_and_an_example() -> None:
    assert set(HEADERS) == set(Op)
    assert {type(h).OP for h in EXAMPLES} == set(Op)
    assert set(lite.HEADERS) == {lite.Op(op.value) for op in Op}
    for op, cls in HEADERS.items():
        assert cls.OP is op and lite.HEADERS[lite.Op(op.value)].__name__ == cls.__name__


@pytest.mark.parametrize("header", EXAMPLES, ids=lambda h: type(h).__name__)
def test_a_header_round_trips_both_ways(header: Header) -> None:
    wire = encode(header)
    assert wire["op"] == header.OP.value and type(wire["op"]) is str
    # Agent -> worker: marshal, read in the sandbox build (which trusts it).
    in_sandbox = lite.decode(marshal.loads(marshal.dumps(wire)))
    assert type(in_sandbox).__name__ == type(header).__name__
    assert lite.encode(in_sandbox) == wire  # the same wire form from either build
    assert decode(marshal.loads(marshal.dumps(wire))) == header
    # Worker -> agent: the worker's own JSON writer, read and checked on the host.
    assert decode(json.loads(to_json(lite.encode(in_sandbox)))) == header
    assert decode(json.loads(json.dumps(wire))) == header


def test_the_sandbox_build_rebuilds_enums_and_nested_records() -> None:
    batch = lite.decode(marshal.loads(marshal.dumps(encode(EXAMPLES[0]))))
    first = batch.calls[0]
    assert isinstance(batch.calls, tuple) and isinstance(first, lite.CallHeader)
    assert first.serialization is lite.Serialization.JSON and first.buffers == (0, 1)
    results = lite.decode(encode(Results((CallOutcome(1, CallStatus.OK),))))
    assert results.outcomes[0].status is lite.CallStatus.OK


def test_both_builds_behave_alike() -> None:
    """The sandbox's stand-ins for dataclasses and StrEnum do what the link needs of
    them as the real ones do (but freezing: mypy checks that, against the host's)."""
    for mod in (link, lite):
        exit_ = mod.Exit(1, 2)
        assert exit_ == mod.Exit(rid=1, code=2, timed_out=False)
        assert exit_ != mod.Exit(1, 3) and hash(exit_) == hash(mod.Exit(1, 2))
        assert repr(exit_) == "Exit(rid=1, code=2, timed_out=False)"
        with pytest.raises(TypeError):
            mod.Exit(1)  # code missing
        with pytest.raises(TypeError):
            mod.Exit(1, 2, cod=3)
        assert mod.Op("calls") is mod.Op.CALLS and mod.Op.CALLS == "calls"
        assert str(mod.Op.CALLS) == "calls"
        assert str(mod.CallStatus.LOST) == "lost" and f"{mod.CallStatus.OK}" == "ok"
        assert mod.Serialization.JSON.value == "json" and mod.Op.SHM_PROBE.name == "SHM_PROBE"
        assert repr(mod.Op.EXIT) == "<Op.EXIT: 'exit'>"
        with pytest.raises(ValueError):
            mod.Op("nope")
        assert mod.Exit.FIELDS == ("rid", "code", "timed_out")
    with pytest.raises(AttributeError):  # frozen on the host (and so for mypy)
        link.Exit(1, 2).code = 3  # type: ignore[misc]


def test_one_record_from_the_client_to_the_worker_and_back() -> None:
    """A call's header and outcome are the link's records in aviato.protocol too, and
    their enums travel as plain strings (the client <-> agent wire is unchanged)."""
    assert protocol.CallHeader is CallHeader and protocol.CallOutcome is CallOutcome
    call = CallHeader(1, "d" * 24, False, Serialization.PICKLE, 5, (0,))
    frames = protocol.encode(protocol.RunCalls("sbx", (call,), buffers=1), 3)
    import msgpack

    body = msgpack.unpackb(frames[0])["b"]
    assert body["calls"][0]["serialization"] == "pickle"
    assert type(body["calls"][0]["serialization"]) is str
    assert protocol.decode(frames).msg.calls == (call,)
    # The link's batch header names a call's fields as the client's message does.
    assert encode(CallBatch((call,), 1))["calls"] == body["calls"]


def test_the_calls_header_is_the_encoded_record() -> None:
    """The agent builds a batch's header directly (every call's path): it must be what
    encoding the record gives, and what the supervisor reads back."""
    batch = CallBatch(
        (
            CallHeader(1, "d" * 64, True, Serialization.PICKLE, 100, (0, 2)),
            CallHeader(2, "e" * 64, False, Serialization.JSON),
        ),
        3,
    )
    fast = encode_calls(batch)
    assert fast == encode(batch)
    assert marshal.loads(marshal.dumps(fast)) == encode(batch)
    assert decode(fast) == batch


def test_results_header_is_the_encoded_record() -> None:
    """The worker writes its results header by hand (it is on every call's path): it
    must be what encoding the record gives."""
    outcomes = [
        lite.CallOutcome(7, lite.CallStatus.OK, 0.25, buffers=2),
        lite.CallOutcome(8, lite.CallStatus.ERROR, 1e-07),
    ]
    by_hand = json.loads(results_header(outcomes))
    assert by_hand == lite.encode(lite.Results(tuple(outcomes)))
    assert decode(by_hand) == Results(
        (
            CallOutcome(7, CallStatus.OK, 0.25, buffers=2),
            CallOutcome(8, CallStatus.ERROR, 1e-07),
        )
    )


@pytest.mark.parametrize(
    "outcomes",
    [
        [{"call_id": 7, "status": "ok", "seconds": 0.5, "detail": "", "buffers": 2}],
        [
            {"call_id": 1, "status": "error", "seconds": 1e-9, "detail": "", "buffers": 0},
            {"call_id": 2, "status": "lost", "seconds": 0.0, "detail": "gone", "buffers": 0},
        ],
        [{"call_id": 1, "status": "ok", "seconds": 1, "detail": "", "buffers": 0}],  # an int
        [{"call_id": 1, "status": "ok"}],  # defaults
        [],
    ],
)
def test_results_read_inline_as_the_codec_reads_them(outcomes: list[Any]) -> None:
    """The agent reads a worker's results with a fast path: the same records as the
    codec's checked decoding (which takes any shape the fast path does not)."""
    from aviato._codec import decoder

    got = decode({"op": "results", "outcomes": outcomes})
    assert got == decoder(Results)({"outcomes": outcomes})
    assert all(type(o.status) is CallStatus for o in got.outcomes)  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(st.text(), st.text(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_any_text_a_worker_sends_comes_back_exact(python: str, error: str, pid: int) -> None:
    """Odd strings (lone surrogates from undecodable file names, quotes, controls)
    through the worker's hand-written JSON, checked on the host."""
    for header in (lite.Hello(python, pid, error=error), lite.FileDone(pid, error=error)):
        back = decode(json.loads(to_json(lite.encode(header))))
        assert lite.encode(header) == encode(back)


@pytest.mark.parametrize(
    "value, words",
    [
        ([], "is a map"),
        ({}, "unknown op"),
        ({"op": "nope"}, "unknown op"),
        ({"op": 3}, "unknown op"),
        ({"op": ["calls"]}, "unknown op"),
        ({"op": "exit", "rid": 1}, "code"),
        ({"op": "exit", "rid": "1", "code": 0}, "rid"),
        ({"op": "kill", "rid": 1, "extra": 2}, "extra"),
        ({"op": "hello", "python": "3.11", "pid": 1.5}, "pid"),
        ({"op": "results", "outcomes": [{"call_id": 1, "status": "maybe"}]}, "status"),
        ({"op": "results", "outcomes": {"call_id": 1}}, "outcomes"),
        (  # the inline path: a status that would not even hash
            {
                "op": "results",
                "outcomes": [
                    {"call_id": 1, "status": ["ok"], "seconds": 0.1, "detail": "", "buffers": 0}
                ],
            },
            "status",
        ),
        ({"op": "calls", "calls": [{"call_id": 1}]}, "digest"),
        ({"op": "exec", "rid": 1, "argv": "ls", "cwd": None, "env": {}}, "argv"),
    ],
)
def test_a_malformed_header_is_a_protocol_error(value: Any, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(value)
    assert words in str(caught.value)


# --------------------------------------------------------------------------- framing


def _stream(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]


def test_framing_round_trips() -> None:
    messages = [
        [b"h"],
        [b"head", b"", b"x" * 10],
        [b"big", os.urandom(link.OWN_BUFFER + 3)],  # read into a buffer of its own
    ]
    data = b"".join(b"".join(pack(m)) for m in messages)
    for mod in (link, lite):
        stream = _stream(data)
        for message in messages:
            got = mod.read(stream)
            assert [bytes(f) for f in got] == message
        assert mod.read(stream) is None  # a clean end
    head = pack_head([1, 2, SHM_FLAG | 3])
    assert parse_head(head) == (len(head), (1, 2, SHM_FLAG | 3))
    assert parse_head(b"xx" + head, offset=2) == (len(head), (1, 2, SHM_FLAG | 3))
    for cut in range(len(head)):
        assert parse_head(head[:cut]) is None  # not all there yet


def _sealed_memfd(data: bytes) -> int:
    fd = os.memfd_create("test-link", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    return fd


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_memfd_frame_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    """A frame in a sealed memfd, its descriptor sent with the head (as the agent's
    lane sends it to a worker), read by the worker's reader: mapped, not streamed."""
    a, b = pair
    shared = os.urandom(3 << 20)
    fd = _sealed_memfd(shared)
    try:
        head = pack_head([6, SHM_FLAG | len(shared), 4])
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        a.sendmsg([head], rights)
        a.sendall(b"header" + b"tail")
    finally:
        os.close(fd)
    reader = supervisor_link.FdReader(b)
    frames = read(reader)
    assert frames is not None and len(frames) == 3
    assert bytes(frames[0]) == b"header" and bytes(frames[2]) == b"tail"
    assert isinstance(frames[1], memoryview) and frames[1] == shared
    frames[1][:3] = b"abc"  # the receiver's own copy-on-write mapping
    assert reader.fds == []


async def test_the_workers_shared_frames_reach_the_lane(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's sender (large results in memfds) and the agent's reader (the lane's
    FramedSocket) speak the same framing."""
    a, b = pair
    monkeypatch.setattr(supervisor_link, "SHM_MIN", 1 << 20)
    monkeypatch.setattr(_spare, "ENABLED", False)
    big = os.urandom(2 << 20)
    got: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
    framed = FramedSocket(
        b,
        lambda frames: got.set_result([bytes(f) for f in frames]),
        lambda exc: None,
        max_message=64 << 20,
    )
    try:
        await asyncio.to_thread(supervisor_link.send_shared, a, [b"results", big, b"x"])
        async with asyncio.timeout(30):
            assert await got == [b"results", big, b"x"]
    finally:
        framed.close()


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x00\x00", "head"),  # inside the count
        (struct.pack("!I", 0), "0 frames"),
        (struct.pack("!I", MAX_FRAMES + 1), f"at most {MAX_FRAMES}"),
        (struct.pack("!IQ", 2, 5), "head"),  # a length missing
        (pack_head([5]) + b"abc", "inside a message"),
        (pack_head([1, link.OWN_BUFFER * 2]) + b"h" + b"x" * 100, "inside a message"),
    ],
)
def test_malformed_framing_is_a_protocol_error(data: bytes, words: str) -> None:
    with pytest.raises(FramingError) as caught:
        read(_stream(data))
    assert isinstance(caught.value, ProtocolError) and words in str(caught.value)
    with pytest.raises(lite.ProtocolError):  # the sandbox's build: its own ProtocolError
        lite.read(_stream(data))
    if len(data) >= 4 and not 0 < struct.unpack_from("!I", data)[0] <= MAX_FRAMES:
        with pytest.raises(FramingError):
            parse_head(data)


def test_the_supervisor_starts_on_builtin_modules_only(tmp_path: Path) -> None:
    """Inside a sandbox the supervisor, with the link, imports no module written in
    Python but its own and the two it always took (struct, __future__): enum, typing
    or dataclasses would cost every sandbox milliseconds before its first exec."""
    lib = tmp_path / "lib"
    lib.mkdir()
    root = Path(link.__file__).parents[1]
    for source, name in [
        ("agent/supervisor.py", "aviato_supervisor.py"),
        ("agent/supervisor_link.py", "aviato_supervisor_link.py"),
        ("agent/supervisor_output.py", "aviato_supervisor_output.py"),
        ("agent/supervisor_concurrent.py", "aviato_supervisor_concurrent.py"),
        ("agent/worker_actors.py", "aviato_worker_actors.py"),
        ("aviato/link.py", "aviato_link.py"),
        ("aviato/link_actors.py", "aviato_link_actors.py"),
        ("aviato/_spare.py", "aviato_spare.py"),
        ("agent/worker_objects.py", "aviato_worker_objects.py"),
    ]:  # as agent/supervisor_hub.py's _prepare_lib lays them out
        shutil.copy(root / source, lib / name)
    probe = (
        "import sys; before = set(sys.modules); sys.path.insert(0, sys.argv[1]); "
        "import aviato_supervisor; "
        "print('\\n'.join(f'{m} {getattr(sys.modules[m].__spec__, \"origin\", None)}' "
        "for m in sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-I", "-B", "-c", probe, str(lib)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    costly = []
    for line in out.splitlines():
        name, origin = line.split(" ", 1)
        cheap = origin in ("built-in", "frozen") or origin.endswith(".so")
        if not cheap and not name.startswith("aviato_") and name not in ("struct", "__future__"):
            costly.append(name)
    assert not costly, f"the supervisor imports {costly} at start-up"


def test_the_actor_ops_round_trip_both_ways() -> None:
    """aviato/link_actors.py's headers, added to the link's table by their module, in
    both builds (a sandbox loads it beside ``aviato_link``)."""
    from aviato.link_actors import ActorCall, ActorReply

    spec = importlib.util.spec_from_file_location(
        "aviato_link_actors", Path(link.__file__).with_name("link_actors.py")
    )
    assert spec is not None and spec.loader is not None
    lite_actors = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("aviato_link")
    sys.modules["aviato_link"] = lite
    try:
        spec.loader.exec_module(lite_actors)
    finally:
        if saved is None:
            del sys.modules["aviato_link"]
        else:
            sys.modules["aviato_link"] = saved
    assert set(HEADERS) == set(Op)  # the link's own table stays its own
    for header in (
        ActorCall(4, "Model-0a1b2c3d4e5f", "predict"),
        ActorReply(4, "ok", buffers=2, sandbox_id="sb-2", seconds=0.5),
        ActorReply(5, "failed", "its worker was lost", "ActorLostError"),
    ):
        wire = encode(header)
        in_sandbox = lite.decode(marshal.loads(marshal.dumps(wire)))
        assert type(in_sandbox).__name__ == type(header).__name__
        assert lite.encode(in_sandbox) == wire
        assert decode(json.loads(to_json(lite.encode(in_sandbox)))) == header
    with pytest.raises(ProtocolError):  # checked on the host as any header
        decode({"op": "actor-call", "rid": "x", "actor": "a", "method": "m"})
