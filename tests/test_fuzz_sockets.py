"""Hostile input on the live sockets: junk, wrong shapes, wrong versions, oversize
frames and floods sent to a REAL scheduler's ROUTER and a REAL agent's data-plane
ROUTER. Each daemon must answer exactly what the protocol says (a refusal carrying
the request id when one was given, silence otherwise), survive, stay as fast and as
small as before, and the agent must keep its link to the scheduler throughout.
(Decoding itself is fuzzed without sockets in tests/test_protocol.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import cloudpickle
import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from aviato._lane import local_path
from aviato._server import sockets
from aviato.link import MAX_FRAMES, Serialization
from aviato.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    CallHeader,
    CallResults,
    ClusterStatus,
    CreateSandbox,
    Decoded,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecChunk,
    ExecReply,
    GetSandbox,
    MsgType,
    Ping,
    Pong,
    ReadFile,
    RunCalls,
    SandboxReply,
    SandboxSpec,
    StopSandbox,
    WriteFile,
    encode,
)
from tests._fuzz import (
    FENCE_BASE,
    Baseline,
    Peer,
    Target,
    closed_by_peer,
    envelope,
    expected_reply,
    junk_pool,
    long_frame_header,
    median_latency,
    read_frame,
    rss,
    short_frame,
    side_effecting,
    wait_idle,
    zmtp_dealer,
)
from tests._strategies import agent_requests, conforms, hostile_specs, scheduler_requests
from tests.conftest import IMAGE, Cluster, docker_cluster

MiB = 1024 * 1024
ABSENT = object()
#: The scheduler's ROUTER, an agent's ROUTER, and that agent's local lane (the same
#: messages over a Unix socket, in the lane's framing).
KINDS = ["scheduler", "agent", "lane"]
#: Every example is a live round trip: deterministic, so a failure replays exactly.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster of its own: nothing else runs on it while it is under attack."""
    yield from docker_cluster(tmp_path_factory.mktemp("fuzz"), agents=1)


@pytest.fixture(scope="module")
def baselines(fuzz_cluster: Cluster) -> dict[str, tuple[Target, Baseline]]:
    """Each daemon's latency and memory, measured before any test of this module fuzzes."""
    agent_id = fuzz_cluster.agent_ids[0]
    (agent,) = fuzz_cluster.status().agents
    targets = [
        Target(
            "scheduler",
            "scheduler",
            fuzz_cluster.address,
            fuzz_cluster.procs["scheduler"].pid,
            ClusterStatus(),
        ),
        Target("agent", agent_id, agent.address, fuzz_cluster.procs[agent_id].pid, Ping()),
        Target("lane", agent_id, agent.lane, fuzz_cluster.procs[agent_id].pid, Ping()),
    ]
    return {t.kind: (t, Baseline(median_latency(t.address, t.probe), rss(t.pid))) for t in targets}


@pytest.fixture(params=KINDS)
def target(
    request: pytest.FixtureRequest, baselines: dict[str, tuple[Target, Baseline]]
) -> tuple[Target, Baseline]:
    return baselines[request.param]


@pytest.fixture(params=["scheduler", "agent"])
def zmq_target(
    request: pytest.FixtureRequest, baselines: dict[str, tuple[Target, Baseline]]
) -> tuple[Target, Baseline]:
    return baselines[request.param]


def agent_registrations(cluster: Cluster) -> int:
    log = (cluster.tmp / f"{cluster.agent_ids[0]}.log").read_text(errors="replace")
    return log.count(" registered with ")


def assert_agent_linked(cluster: Cluster) -> None:
    (agent,) = cluster.status().agents
    # Heartbeats every 0.2 s; 10x that only catches a stalled link (it is also declared
    # dead past 1.5 s, and re-registers: counted below).
    assert agent.alive and agent.seconds_since_heartbeat < 2.0, agent
    # One registration ever: the link never dropped (the agent re-registers when it
    # misses heartbeats or the scheduler declared it dead).
    assert agent_registrations(cluster) == 1, cluster.logs()


def assert_healthy(cluster: Cluster, target: Target, base: Baseline) -> None:
    """Alive, done with any backlog, as fast as before, no bigger, and still linked."""
    assert cluster.procs[target.name].poll() is None, f"{target.name} died\n{cluster.logs()}"
    wait_idle(target.pid)
    latency = median_latency(target.address, target.probe)
    # A hang-catching bound (10x, plus 10 ms: sub-millisecond medians on a busy 2-core
    # machine are noisy); the latency figures themselves are the benchmarks'.
    assert latency <= 10 * base.latency + 0.010, (
        f"{target.kind} median round trip {latency * 1e3:.2f} ms after fuzzing, "
        f"{base.latency * 1e3:.2f} ms before"
    )
    grown = rss(target.pid) - base.rss
    assert grown < 50 * MiB, f"{target.kind} RSS grew by {grown / MiB:.1f} MiB"
    assert_agent_linked(cluster)


def check_answer(peer: Peer, kind: str, frames: list[bytes]) -> None:
    """Send ``frames``; the daemon must answer exactly as the protocol prescribes."""
    owed_id, code = expected_reply(kind, frames)
    assume(owed_id is None or not FENCE_BASE <= owed_id < FENCE_BASE + 2**32)
    replies = peer.exchange(frames, owed_id)
    if owed_id is None:
        assert replies == []
        return
    (reply,) = replies
    assert reply.request_id == owed_id
    if code is not None:
        assert isinstance(reply.msg, ErrorReply) and reply.msg.code is code, reply.msg
    if isinstance(reply.msg, ErrorReply):
        assert len(reply.msg.message) < 1000, "a refusal must not echo a peer's data at length"


# --------------------------------------------------------------------------- strategies

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)
_keys = st.sampled_from(["v", "t", "id", "b", "tok", "sandbox_id", "spec"]) | st.text(max_size=4)
_type_numbers = st.sampled_from([int(t) for t in MsgType]) | _values
_payloads = st.lists(st.binary(max_size=64), max_size=4)


# --------------------------------------------------------------------------- junk


def test_random_frames(fuzz_cluster: Cluster, target: tuple[Target, Baseline]) -> None:
    """Random bytes, as one frame or several: silence, or a refusal with the id."""
    t, base = target
    with Peer(t.address) as peer:

        @FUZZ
        @given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
        def check(frames: list[bytes]) -> None:
            check_answer(peer, t.kind, frames)

        check()
    assert_healthy(fuzz_cluster, t, base)


def test_msgpack_of_the_wrong_shape(fuzz_cluster: Cluster, target: tuple[Target, Baseline]) -> None:
    """Valid msgpack that is no envelope, or an envelope with wrong keys, types, bodies,
    tokens and stray payload frames."""
    t, base = target
    with Peer(t.address) as peer:

        @FUZZ
        @given(
            top=_values | st.dictionaries(_keys, _values, max_size=6),
            env=st.fixed_dictionaries(
                {
                    "v": st.just(PROTOCOL_VERSION),
                    "t": _type_numbers,
                    "id": st.integers(min_value=0, max_value=2**40),
                },
                optional={
                    "b": st.dictionaries(_keys, _values, max_size=4) | _values,
                    "tok": _values,
                },
            ),
            which=st.booleans(),
            payloads=_payloads,
        )
        def check(top: Any, env: dict[str, Any], which: bool, payloads: list[bytes]) -> None:
            frames = [msgpack.packb(top if which else env, use_bin_type=True), *payloads]
            assume(not side_effecting(frames))
            check_answer(peer, t.kind, frames)

        check()
    assert_healthy(fuzz_cluster, t, base)


def test_other_protocol_versions_are_refused_by_name(
    fuzz_cluster: Cluster, target: tuple[Target, Baseline]
) -> None:
    """Whatever else an envelope holds, another version gets VERSION_MISMATCH naming
    both versions, answered to its request id; without an id there is no one to tell."""
    t, base = target
    with Peer(t.address) as peer:

        @FUZZ
        @given(
            version=st.integers(min_value=-(2**63), max_value=2**64 - 1).filter(
                lambda v: v != PROTOCOL_VERSION
            )
            | st.text(max_size=5)
            | st.none()
            | st.just(ABSENT),
            rid=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
            kind=_type_numbers,
            payloads=_payloads,
        )
        def check(version: Any, rid: int | None, kind: Any, payloads: list[bytes]) -> None:
            env: dict[str, Any] = {"t": kind, "b": {"junk": [1]}}
            if version is not ABSENT:
                env["v"] = version
            if rid is not None:
                env["id"] = rid
            replies = peer.exchange([envelope(**env), *payloads], rid)
            if rid is None:
                assert replies == []
                return
            (reply,) = replies
            assert reply.request_id == rid and isinstance(reply.msg, ErrorReply)
            assert reply.msg.code is ErrorCode.VERSION_MISMATCH
            named = None if version is ABSENT else version
            assert f"protocol version {named!r}, this side speaks {PROTOCOL_VERSION}" in (
                reply.msg.message
            )

        check()
    assert_healthy(fuzz_cluster, t, base)


def test_frame_counts_around_a_valid_envelope(
    fuzz_cluster: Cluster, target: tuple[Target, Baseline]
) -> None:
    """Stray payload frames are ignored by requests that take none; an envelope that is
    not the first frame (a REQ-style empty delimiter before it) is junk."""
    t, base = target
    with Peer(t.address) as peer:
        for n in (0, 1, 5, 50):
            (reply,) = peer.exchange([*encode(t.probe, 7), *[b"p" * 100] * n], 7)
            assert not isinstance(reply.msg, ErrorReply), reply.msg
        assert peer.exchange([b"", *encode(t.probe, 8)], None) == []
        assert peer.exchange([b"", b""], None) == []
    assert_healthy(fuzz_cluster, t, base)


def test_huge_values_are_not_echoed_back(
    fuzz_cluster: Cluster, target: tuple[Target, Baseline]
) -> None:
    """Regression: refusals quoted the offending value whole (repr: four bytes out per
    byte in), so 8 MiB in made 32 MiB of reply, and of log, and held the loop."""
    t, base = target
    big = b"\x00" * (8 * MiB)
    huge_str = "\x00" * (8 * MiB)
    cases = [
        envelope(v=PROTOCOL_VERSION, t=big, id=1),
        envelope(v=big, t=int(MsgType.PING), id=2),
        envelope(v=PROTOCOL_VERSION, t=int(MsgType.LIST_SANDBOXES), id=3, b={"statuses": [big]}),
        envelope(v=PROTOCOL_VERSION, t=int(MsgType.GET_SANDBOX), id=4, b={huge_str: 1}),
        envelope(
            v=PROTOCOL_VERSION,
            t=int(MsgType.EXEC),
            id=5,
            b={"sandbox_id": "sb-1", "argv": ["x"], "env": {huge_str: 1}},
        ),
    ]
    if t.kind == "scheduler":  # well-formed requests whose refusals quoted a field
        spec = SandboxSpec(image=IMAGE, command="sleep", network=huge_str)
        cases += [
            encode(GetSandbox(huge_str[: 2 * MiB]), 6)[0],
            encode(CreateSandbox(spec, 1.0), 7)[0],
        ]
    with Peer(t.address) as peer:
        for rid, frame in enumerate(cases, 1):
            (reply,) = peer.exchange([frame], rid, timeout=10)
            assert isinstance(reply.msg, ErrorReply), reply.msg
            assert len(reply.msg.message) < 1000, reply.msg.message[:200]
    assert_healthy(fuzz_cluster, t, base)


# --------------------------------------------------------------------------- transport


def test_oversize_frame_drops_the_connection(
    fuzz_cluster: Cluster, zmq_target: tuple[Target, Baseline]
) -> None:
    """ZMQ_MAXMSGSIZE: a frame announced above MAX_FRAME_BYTES gets the peer
    disconnected at its header, before any body is buffered; one at the limit does not."""
    t, base = zmq_target
    with zmtp_dealer(t.address) as raw:
        # The raw connection really speaks ZMTP: a Ping through it is answered.
        raw.sendall(short_frame(envelope(v=PROTOCOL_VERSION, t=int(MsgType.PING), id=5, b={})))
        _, body = read_frame(raw)
        assert msgpack.unpackb(body)["t"] == int(MsgType.PONG)
        raw.sendall(long_frame_header(MAX_FRAME_BYTES + 1))
        assert closed_by_peer(raw, 5.0), "an oversize frame did not drop the connection"
    with zmtp_dealer(t.address) as raw:
        raw.sendall(long_frame_header(MAX_FRAME_BYTES))
        assert not closed_by_peer(raw, 0.5), "a frame at the limit dropped the connection"
    assert_healthy(fuzz_cluster, t, base)


def _lane(address: str) -> socket.socket:
    path = local_path(address)
    assert path is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def test_lane_framing_violations_drop_the_connection(
    fuzz_cluster: Cluster, baselines: dict[str, tuple[Target, Baseline]]
) -> None:
    """The lane's own framing: a message announced above MAX_FRAME_BYTES, with no
    frames, or with more than MAX_FRAMES gets the connection closed at its header (no
    body buffered); one at the limit does not; random bytes end in silence or a close.
    Other connections are served throughout."""
    t, base = baselines["lane"]
    bad_heads = [
        struct.pack("!I", 0),
        struct.pack("!I", MAX_FRAMES + 1),
        struct.pack("!IQ", 1, MAX_FRAME_BYTES + 1),
        struct.pack("!IQQ", 2, MAX_FRAME_BYTES, 1),
    ]
    with Peer(t.address) as witness:
        for head in bad_heads:
            with _lane(t.address) as raw:
                raw.sendall(head)
                assert closed_by_peer(raw, 5.0), f"{head[:16]!r}... did not close the lane"
            (pong,) = witness.exchange(encode(Ping(), 1), 1)
            assert isinstance(pong.msg, Pong)
        with _lane(t.address) as raw:
            raw.sendall(struct.pack("!IQ", 1, MAX_FRAME_BYTES))
            assert not closed_by_peer(raw, 0.5), "a message at the limit closed the lane"
        rng = random.Random(7)
        for _ in range(50):
            with _lane(t.address) as raw:
                raw.sendall(rng.randbytes(rng.randrange(1, 2000)))
                closed_by_peer(raw, 0.05)  # either is right; the agent must not care
        (pong,) = witness.exchange(encode(Ping(), 2), 2)
        assert isinstance(pong.msg, Pong)
    assert_healthy(fuzz_cluster, t, base)


def test_flood_from_one_peer(fuzz_cluster: Cluster, target: tuple[Target, Baseline]) -> None:
    """50k assorted junk as fast as one DEALER can send, reading nothing meanwhile:
    every message is answered as the protocol says, in order, and the daemon (and the
    agent's link to the scheduler) never falters. Regression: the receive loop never
    yielded while messages were queued, so a flood on an agent starved its heartbeats
    and the scheduler declared it dead."""
    t, base = target
    pool = junk_pool(seed=5, n=1000)
    flood = [pool[i % len(pool)] for i in range(50_000)]
    owed = [expected_reply(t.kind, f) for f in flood]
    owed_ids = [rid for rid, _ in owed if rid is not None]
    log = fuzz_cluster.tmp / f"{t.name}.log"
    log_size = log.stat().st_size
    with Peer(t.address, SNDHWM=0) as peer:
        started = time.monotonic()
        for frames in flood:
            peer.send(frames)
        fence = peer.next_fence()
        peer.send(encode(Ping(), fence))
        got: list[int] = []
        next_check = 0.0
        while True:
            if time.monotonic() > next_check:  # the agent stays linked throughout
                assert_agent_linked(fuzz_cluster)
                next_check = time.monotonic() + 0.5
            reply = peer.recv(max(0.1, 60 - (time.monotonic() - started)))
            assert reply is not None, f"{len(got)} of {len(owed_ids)} replies, then nothing"
            if reply.request_id == fence:
                break
            got.append(reply.request_id)
        elapsed = time.monotonic() - started
    # Each daemon answers one connection's requests in order (the agent serves Ping and
    # refusals inline), so the ids match one for one.
    assert got == owed_ids
    print(f"{t.kind}: 50k junk answered in {elapsed:.1f}s")
    # Regression: each refusal was a log line (~5 MB for this flood): now 20 per 10 s.
    assert log.stat().st_size - log_size < 64 * 1024
    assert_healthy(fuzz_cluster, t, base)


async def test_replies_to_a_peer_that_never_reads_are_dropped_not_waited_for() -> None:
    """Regression: a reply to a peer whose queue was full (it read nothing) made the
    daemon wait, and every later send on the socket queued behind it: with no other
    peer connected an agent stopped serving altogether. On a real daemon that takes
    over 100k unread replies (SNDHWM), so this drives the daemons' own send path on a
    ROUTER made as theirs are, with a small queue and 64 KiB replies."""
    ctx = zmq.asyncio.Context()
    router, _ = sockets.router(ctx, "tcp://127.0.0.1:*")
    reader = ctx.socket(zmq.DEALER)
    for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 1), (zmq.RCVBUF, 4096)):
        reader.setsockopt(option, value)
    reader.bind("tcp://127.0.0.1:*")
    # A pipe takes the HWM in force when its bind or connect is made: so the ROUTER
    # reaches this peer by a connect of its own, made after the HWM is lowered.
    router.setsockopt(zmq.SNDHWM, 10)
    router.connect(reader.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        await reader.send_multipart(encode(Ping(), 1))
        identity = (await router.recv_multipart())[0]
        blob = b"x" * (64 * 1024)
        async with asyncio.timeout(10):  # it hung here
            sent = [
                await sockets.send_to(router, identity, Pong(server="t"), i, (blob,))
                for i in range(1000)
            ]
        # The first went out; past the queue and the kernel's buffers the rest dropped.
        assert sent[0] and not sent[-1], sent.count(True)
    finally:
        reader.close()
        router.close()
        ctx.term()


# --------------------------------------------------------------------------- handlers


@pytest.fixture
def function_sandbox(fuzz_cluster: Cluster) -> Iterator[tuple[str, str]]:
    """A function-worker sandbox (id, agent address), made and stopped over raw sockets."""
    spec = SandboxSpec(image=IMAGE, command="python", function_worker=True)
    with Peer(fuzz_cluster.address) as peer:
        peer.send(encode(CreateSandbox(spec, 60.0), 1))
        reply = peer.recv(90)
        assert reply is not None and isinstance(reply.msg, SandboxReply), reply
        info = reply.msg.sandbox
        assert info.agent_address
        try:
            yield info.sandbox_id, info.agent_address
        finally:
            peer.send(encode(StopSandbox(info.sandbox_id), 2))
            stopped = peer.recv(30)
            assert stopped is not None and isinstance(stopped.msg, SandboxReply), stopped


def test_wrong_payload_counts_are_refused(
    fuzz_cluster: Cluster,
    baselines: dict[str, tuple[Target, Baseline]],
    function_sandbox: tuple[str, str],
) -> None:
    """Requests whose payload frames do not match what they announce get BAD_REQUEST;
    junk blobs that do match reach the function worker, which answers an error outcome
    and keeps serving."""
    sid, address = function_sandbox
    t, base = baselines["agent"]
    call = CallHeader(
        call_id=1, digest="d" * 24, ship_function=True, serialization=Serialization.JSON
    )
    refused = [
        (WriteFile(sid, "/tmp/x"), [], "exactly one payload"),
        (WriteFile(sid, "/tmp/x"), [b"a", b"b"], "exactly one payload"),
        (Exec(sid, ("true",)), [b"in", b"more"], "at most one payload frame (its stdin)"),
        (RunCalls(sid, (call,)), [b"x"], "names 2 payload frames but carries 1"),
        (RunCalls(sid, (call,)), [b"x"] * 3, "names 2 payload frames but carries 3"),
        (RunCalls(sid, (call, call)), [b"x"] * 3, "names 4 payload frames but carries 3"),
        # Out-of-band buffers: counted among the frames, and only those the batch has.
        (RunCalls(sid, (call,), 1), [b"x"] * 2, "names 3 payload frames but carries 2"),
        (
            RunCalls(sid, (dataclasses.replace(call, buffers=(0, 1)),), 1),
            [b"x"] * 3,
            "names a buffer it has not",
        ),
        (RunCalls(sid, (call,), -1), [b"x"], "names -1 buffers"),
    ]
    with Peer(address) as peer:
        for rid, (msg, payloads, words) in enumerate(refused, 10):
            (reply,) = peer.exchange(encode(msg, rid, payloads), rid, timeout=10)
            assert isinstance(reply.msg, ErrorReply), reply.msg
            assert reply.msg.code is ErrorCode.BAD_REQUEST and words in reply.msg.message
        # Junk where the worker expects a pickled function and JSON arguments.
        (reply,) = peer.exchange(
            encode(RunCalls(sid, (call,)), 20, [b"\x80junk", b"{"]), 20, timeout=30
        )
        assert isinstance(reply.msg, CallResults), reply.msg
        assert [o.status for o in reply.msg.outcomes] == ["error"]
        # ... and the worker still runs a real call (len, shipped by reference).
        real = CallHeader(
            call_id=2, digest="l" * 24, ship_function=True, serialization=Serialization.JSON
        )
        blobs = [cloudpickle.dumps(len), b'[["abc"], {}]']
        (reply,) = peer.exchange(encode(RunCalls(sid, (real,)), 21, blobs), 21, timeout=30)
        assert isinstance(reply.msg, CallResults), reply.msg
        assert [o.status for o in reply.msg.outcomes] == ["ok"]
        assert bytes(reply.payloads[0]) == b"3"
    assert_healthy(fuzz_cluster, t, base)


@pytest.fixture
def live_sandbox(fuzz_cluster: Cluster) -> Iterator[str]:
    """A plain sandbox (``sleep infinity``), made and stopped over raw sockets."""
    spec = SandboxSpec(image=IMAGE, command="sleep", args=("infinity",))
    with Peer(fuzz_cluster.address) as peer:
        peer.send(encode(CreateSandbox(spec, 60.0), 1))
        reply = peer.recv(90)
        assert reply is not None and isinstance(reply.msg, SandboxReply), reply
        sid = reply.msg.sandbox.sandbox_id
        try:
            yield sid
        finally:
            peer.send(encode(StopSandbox(sid), 2))
            stopped = peer.recv(30)
            assert stopped is not None and isinstance(stopped.msg, SandboxReply), stopped


#: A seed per run (printed; AVIATO_FUZZ_SEED replays one): these examples differ from
#: run to run, where the derandomized fuzzers above repeat theirs exactly.
FUZZ_SEED = int(os.environ.get("AVIATO_FUZZ_SEED") or random.randrange(2**32))
#: Refusals that mean a request never got past decoding to a handler.
NOT_HANDLED = {ErrorCode.MALFORMED, ErrorCode.VERSION_MISMATCH, ErrorCode.UNAUTHORIZED}


def _final_reply(peer: Peer, frames: list[Any], rid: int, timeout: float) -> Decoded:
    """Send a request; return its final reply (past any ExecChunks of a stream)."""
    peer.send(frames)
    deadline = time.monotonic() + timeout
    while True:
        reply = peer.recv(max(0.0, deadline - time.monotonic()))
        assert reply is not None, f"no reply within {timeout}s"
        assert reply.request_id == rid, f"a reply to {reply.request_id}, not {rid}: {reply}"
        if not isinstance(reply.msg, ExecChunk):
            return reply


def test_handlers_get_well_typed_hostile_requests(
    fuzz_cluster: Cluster, target: tuple[Target, Baseline], live_sandbox: str
) -> None:
    """Requests that decode, with hostile values where handlers use them: odd paths,
    argv, env, ids, timeouts (NaN, infinite, negative), sizes and counts, mostly aimed at
    a live sandbox. Each is answered once, never with an INTERNAL error (a handler that
    crashed), and most reach a handler: the count is printed and checked."""
    t, base = target
    agent_id = fuzz_cluster.agent_ids[0]
    requests = (
        scheduler_requests(live_sandbox, agent_id)
        if t.kind == "scheduler"
        else agent_requests(live_sandbox)
    )
    outcomes: Counter[str] = Counter()
    print(f"fuzz seed {FUZZ_SEED} (AVIATO_FUZZ_SEED={FUZZ_SEED} replays it)")
    with Peer(t.address) as peer:
        rids = iter(range(1, 2**31))

        @seed(FUZZ_SEED)
        @settings(
            max_examples=100,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(request=requests)
        def check(request: tuple[Any, list[bytes]]) -> None:
            msg, payloads = request
            assert conforms(msg, type(msg)) is None, msg  # hostile, yet well typed
            rid = next(rids)
            reply = _final_reply(peer, encode(msg, rid, payloads), rid, 30)
            name = type(msg).__name__
            if isinstance(reply.msg, ErrorReply):
                assert reply.msg.code is not ErrorCode.INTERNAL, (name, msg, reply.msg)
                assert len(reply.msg.message) < 1000
                handled = reply.msg.code not in NOT_HANDLED
                outcomes[f"{'' if handled else 'NOT HANDLED '}{name} {reply.msg.code.value}"] += 1
            else:
                outcomes[f"{name} {type(reply.msg).__name__}"] += 1

        check()
    reached = sum(n for k, n in outcomes.items() if not k.startswith("NOT HANDLED"))
    total = sum(outcomes.values())
    print(f"{t.kind}: {reached} of {total} hostile requests reached a handler: {dict(outcomes)}")
    assert reached >= 0.9 * total, outcomes
    # The live sandbox still runs commands, and the daemon is as it was.
    with Peer(fuzz_cluster.status().agents[0].address) as peer:
        (done,) = peer.exchange(encode(Exec(live_sandbox, ("echo", "ok")), 7), 7, timeout=30)
        assert isinstance(done.msg, ExecReply) and bytes(done.payloads[0]) == b"ok\n", done
    assert_healthy(fuzz_cluster, t, base)


@pytest.mark.parametrize("kind", ["agent", "lane"])
def test_requests_the_handler_fuzz_found_hanging_are_refused(
    fuzz_cluster: Cluster,
    baselines: dict[str, tuple[Target, Baseline]],
    live_sandbox: str,
    kind: str,
) -> None:
    """Regression (found by the fuzz above): well-typed values the supervisor's handler
    threads could not take (a NUL in a path, argv or env, a mode past 0o7777) left the
    request unanswered for ever, as did a RunCalls with no call; a NaN timeout was
    silently no timeout. Each is now refused, at once."""
    t, base = baselines[kind]
    sid = live_sandbox
    cases = [
        (WriteFile(sid, "\x00"), [b""], "NUL"),
        (WriteFile(sid, "/tmp/x", mode=2**63 - 1), [b""], "not a file mode"),
        (ReadFile(sid, "/tmp/\x00"), [], "NUL"),
        (Exec(sid, ("echo", "a\x00b")), [], "NUL"),
        (Exec(sid, ("pwd",), cwd="/\x00"), [], "NUL"),
        (Exec(sid, ("env",), env={"A=B": "c"}), [], "is not one"),
        (Exec(sid, ("env",), env={"A": "\x00"}), [], "NUL"),
        (Exec(sid, ("true",), timeout_seconds=math.nan), [], "NaN"),
        (RunCalls(sid, ()), [], "no call"),
    ]
    with Peer(t.address) as peer:
        for rid, (msg, payloads, words) in enumerate(cases, 1):
            (reply,) = peer.exchange(encode(msg, rid, payloads), rid, timeout=10)
            assert isinstance(reply.msg, ErrorReply), (msg, reply.msg)
            assert reply.msg.code is ErrorCode.BAD_REQUEST and words in reply.msg.message, (
                msg,
                reply.msg,
            )
    assert_healthy(fuzz_cluster, t, base)


def test_creates_with_hostile_specs(fuzz_cluster: Cluster) -> None:
    """CreateSandbox with hostile specs (odd images, commands, argv, env, working dirs,
    NaN/negative/huge lifetimes, memory, CPUs and pids limits, networks) through the
    scheduler to the agent's runtime: each create is answered (a sandbox with a finite
    deadline, stopped at once, or a typed refusal), never INTERNAL; the daemons stay
    well and linked."""
    t, base = _scheduler_target(fuzz_cluster)
    outcomes: Counter[str] = Counter()
    print(f"fuzz seed {FUZZ_SEED} (AVIATO_FUZZ_SEED={FUZZ_SEED} replays it)")
    with Peer(fuzz_cluster.address) as peer:
        rids = iter(range(1, 2**31))

        @seed(FUZZ_SEED)
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(spec=hostile_specs(), timeout=st.sampled_from([5.0, 5.0, 0.0, -1.0, math.nan]))
        def check(spec: SandboxSpec, timeout: float) -> None:
            rid = next(rids)
            reply = _final_reply(peer, encode(CreateSandbox(spec, timeout), rid), rid, 60)
            if isinstance(reply.msg, SandboxReply):
                info = reply.msg.sandbox
                outcomes[f"created, {info.status.value}"] += 1
                # A limit it took is a limit: a lifetime that never ends is not one.
                assert info.deadline is None or math.isfinite(info.deadline), (spec, info)
                rid = next(rids)
                stop = StopSandbox(reply.msg.sandbox.sandbox_id)
                stopped = _final_reply(peer, encode(stop, rid), rid, 60)
                assert isinstance(stopped.msg, SandboxReply), stopped.msg
                return
            assert isinstance(reply.msg, ErrorReply), reply.msg
            assert reply.msg.code is not ErrorCode.INTERNAL, (spec, reply.msg)
            assert len(reply.msg.message) < 1000
            outcomes[f"refused, {reply.msg.code.value}"] += 1

        check()
    print(f"creates: {dict(outcomes)}")
    assert_healthy(fuzz_cluster, t, base)


def _scheduler_target(cluster: Cluster) -> tuple[Target, Baseline]:
    t = Target("scheduler", "scheduler", cluster.address, cluster.procs["scheduler"].pid, Ping())
    return t, Baseline(median_latency(t.address, t.probe), rss(t.pid))
