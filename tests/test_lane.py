"""The local lane: framing (aviato/_lane.py) on socket pairs, then a real agent's lane:
chosen on its host, refused to other users, token-checked, and failed over promptly
when the agent goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from agent.lane_server import PREFIX as LANE_PREFIX
from aviato import Sandbox, SandboxDefaults, UnauthorizedError, _connection
from aviato._connection import Connection, LaneConnection, agent_connection, connection
from aviato._lane import (
    BIG,
    FramedSocket,
    connect_unix,
    host_key,
    lane_address,
    local_path,
    pack_head,
)
from aviato.exceptions import ClusterUnavailableError
from aviato.link import MAX_FRAMES, FramingError
from aviato.protocol import Decoded, Ping, Pong, encode
from tests._fuzz import Peer
from tests.conftest import Cluster, docker_cluster

Messages = list[list[bytes]]


def _stream(messages: Messages) -> bytes:
    return b"".join(pack_head(m) + b"".join(m) for m in messages)


class _Ends:
    """A FramedSocket on one end of a socket pair; the other end is a plain socket."""

    def __init__(
        self,
        on_message: Callable[[list[memoryview]], None] | None = None,
        **options: int | None,
    ) -> None:
        self.got: list[list[bytes]] = []
        self.closed: list[BaseException | None] = []
        mine, self.theirs = socket.socketpair()
        self.framed = FramedSocket(
            mine,
            on_message or (lambda frames: self.got.append([bytes(f) for f in frames])),
            self.closed.append,
            max_message=options.get("max_message") or 64 << 20,
            max_pending=options.get("max_pending"),
            pause_above=options.get("pause_above"),
        )

    def close(self) -> None:
        self.framed.close()
        self.theirs.close()


async def _until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


# --------------------------------------------------------------------------- framing


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    messages=st.lists(
        st.lists(st.binary(max_size=300), min_size=1, max_size=5), min_size=1, max_size=8
    ),
    cuts=st.lists(st.integers(min_value=1, max_value=97), max_size=20),
)
def test_any_split_of_the_stream_gives_the_same_messages(messages: Messages, cuts: list[int]):
    """However the bytes arrive (one at a time, coalesced, split mid-header), each
    message comes out whole, in order, exactly once."""

    async def run() -> None:
        ends = _Ends()
        try:
            data, at = _stream(messages), 0
            for cut in [*cuts, len(data)]:
                piece = data[at : at + cut]
                at += len(piece)
                ends.theirs.sendall(piece)
                await asyncio.sleep(0)
            await _until(lambda: len(ends.got) == len(messages))
            assert ends.got == messages and not ends.closed
        finally:
            ends.close()

    asyncio.run(run())


async def test_a_big_message_is_read_into_its_own_buffer_and_sent_in_pieces() -> None:
    """Above BIG a message is read straight into one buffer; a send larger than the
    socket takes queues the rest and finishes when the peer reads."""
    a, b = _Ends(), _Ends()
    loop = asyncio.get_running_loop()
    try:
        big = os.urandom(3 * BIG + 17)
        message = [b"head", big, b""]
        assert a.framed.send(message)
        assert a.framed.pending > 0, "a socket pair's buffer cannot take 3 MiB at once"
        received = b""
        want = len(pack_head(message)) + sum(map(len, message))
        a.theirs.setblocking(False)
        while len(received) < want:
            await asyncio.sleep(0.001)
            try:
                received += a.theirs.recv(1 << 20)
            except BlockingIOError:
                pass
        assert a.framed.pending == 0
        b.theirs.setblocking(False)  # the reader is on this loop: never block it
        await loop.sock_sendall(b.theirs, received[:100])
        await asyncio.sleep(0.01)
        await loop.sock_sendall(b.theirs, received[100:])
        await _until(lambda: len(b.got) == 1)
        assert b.got == [message]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (struct.pack("!I", 0), "0 frames"),
        (struct.pack("!I", MAX_FRAMES + 1), f"at most {MAX_FRAMES}"),
        (struct.pack("!IQ", 1, (64 << 20) + 1), "above the"),
    ],
)
async def test_framing_violations_close_with_a_reason(head: bytes, words: str) -> None:
    ends = _Ends()
    try:
        ends.theirs.sendall(head)
        await _until(lambda: bool(ends.closed))
        (why,) = ends.closed
        assert isinstance(why, FramingError) and words in str(why)
        assert ends.framed.closed and not ends.framed.send([b"x"])
    finally:
        ends.close()


async def test_peer_closing_is_reported_once_without_an_error() -> None:
    ends = _Ends()
    ends.theirs.sendall(_stream([[b"last words"]]))
    ends.theirs.close()
    await _until(lambda: bool(ends.closed))
    await asyncio.sleep(0.01)
    assert ends.got == [[b"last words"]] and ends.closed == [None]
    ends.framed.close()


async def test_a_peer_that_reads_nothing_is_cut_off_at_max_pending() -> None:
    ends = _Ends(max_pending=1 << 20)
    try:
        sent = [ends.framed.send([b"x" * 65536]) for _ in range(64)]
        assert sent[0] and not sent[-1]
        assert not ends.closed, "told from inside send"
        await asyncio.sleep(0)
        (why,) = ends.closed
        assert isinstance(why, FramingError) and "unread" in str(why)
    finally:
        ends.close()


def test_lane_addresses_name_this_host_only() -> None:
    assert host_key(), "/proc tells the boot id and network namespace on Linux"
    address = lane_address("/tmp/x/agent.sock")
    assert local_path(address) == "/tmp/x/agent.sock"
    assert local_path(address.replace(host_key(), "0" * 16)) is None
    for junk in ("", "unix:", "unix::/p", "tcp://127.0.0.1:5", f"unix:{host_key()}:"):
        assert local_path(junk) is None


async def test_a_lane_that_cannot_be_reached_falls_back_to_zeromq(tmp_path: Path) -> None:
    missing = lane_address(str(tmp_path / "nobody-listens.sock"))
    conn = connection("tcp://127.0.0.1:1", lane=missing)
    try:
        assert isinstance(conn, Connection)
    finally:
        _connection.close_all()


def _listener(path: Path) -> socket.socket:
    """A stand-in for an agent's lane socket at ``path``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


async def test_requests_fail_at_once_when_the_lane_closes(tmp_path: Path) -> None:
    """The agent's end going away fails a waiting request with ClusterUnavailableError
    now, not at its deadline, and the next connection() is a new one."""
    path = tmp_path / "agent.sock"
    server = _listener(path)
    try:
        conn = connection("tcp://127.0.0.1:1", lane=lane_address(str(path)))
        assert isinstance(conn, LaneConnection)
        peer, _ = server.accept()
        request = asyncio.ensure_future(conn.request(Ping(), timeout=60))
        peer.setblocking(False)
        deadline = time.monotonic() + 10
        while True:  # until the request has reached the agent's end (it is in flight)
            with contextlib.suppress(BlockingIOError):
                if peer.recv(65536):
                    break
            assert time.monotonic() < deadline, "the request never reached the lane"
            await asyncio.sleep(0.01)
        started = time.monotonic()
        peer.close()
        with pytest.raises(ClusterUnavailableError, match="closed its local connection"):
            await request
        # At once, not at its 60 s deadline (10x the expected ~0.1 s: a hang bound).
        assert time.monotonic() - started < 10
        assert conn.closed
        with pytest.raises(ClusterUnavailableError):
            await conn.request(Ping(), timeout=60)
        again = connection("tcp://127.0.0.1:1", lane=lane_address(str(path)))
        assert again is not conn
    finally:
        _connection.close_all()
        server.close()


# --------------------------------------------------------------------------- a real agent


async def test_sessions_on_the_agents_host_use_its_lane(defaults: SandboxDefaults) -> None:
    """Exec and function calls go over the lane by default, and over ZeroMQ with
    local_lane=False; both give the same answers."""
    for lane in (True, False):
        d = defaults.replace(local_lane=lane)
        async with Sandbox.session(d) as session:
            sb = session.create(command="sleep", args=["infinity"])
            await sb.start()
            assert sb.info is not None and local_path(sb.info.agent_lane)
            conn = agent_connection(sb.info, d)
            assert isinstance(conn, LaneConnection if lane else Connection)
            r = await sb.exec(["echo", "hi"])
            assert r.stdout == b"hi\n"

            @session.function()
            def square(n: int) -> int:
                return n * n

            results = await asyncio.gather(*(square(i) for i in range(50)))
            assert [r.value for r in results] == [i * i for i in range(50)]


def test_the_lane_is_the_agent_users_alone(cluster: Cluster) -> None:
    """Its directory is 0700: another user cannot connect (and so gets ZeroMQ)."""
    (agent, *_) = cluster.status().agents
    path = local_path(agent.lane)
    assert path is not None
    mode = stat.S_IMODE(os.stat(Path(path).parent).st_mode)
    assert mode == 0o700, oct(mode)
    probe = (
        "import socket,sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
    )
    done = subprocess.run(
        # The system's Python: another user may not reach the one running the tests.
        ["/usr/bin/python3", "-S", "-c", probe, path],
        user=65534,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 3, done


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("token"), agents=1, token="s3cret")


async def test_the_lane_checks_the_cluster_token(token_cluster: Cluster) -> None:
    (agent,) = token_cluster.status().agents
    for token in (None, "wrong"):
        conn = connection(agent.address, token, lane=agent.lane)
        assert isinstance(conn, LaneConnection)
        with pytest.raises(UnauthorizedError, match="token"):
            await conn.request(Ping(), timeout=5)
        _connection.close_all()
    conn = connection(agent.address, "s3cret", lane=agent.lane)
    try:
        reply = await conn.request(Ping(), timeout=5)
        assert isinstance(reply.msg, Pong)
    finally:
        _connection.close_all()


async def test_a_peer_that_reads_nothing_is_not_read_either() -> None:
    """Server side (pause_above): a peer sending requests without reading the replies
    is paused once a megabyte of replies waits; when it reads, every reply arrives, in
    order, and its remaining requests are served."""
    replies = 0

    def serve(frames: list[memoryview]) -> None:
        nonlocal replies
        replies += 1
        ends.framed.send([bytes(frames[0]), b"r" * 65536])

    ends = _Ends(serve, max_message=1 << 20, pause_above=1 << 20)
    theirs = ends.theirs
    loop = asyncio.get_running_loop()
    try:
        theirs.setblocking(False)
        requests = _stream([[b"%06d" % i] for i in range(200)])
        sending = asyncio.ensure_future(loop.sock_sendall(theirs, requests))
        await asyncio.sleep(0.5)
        assert replies < 200, "it kept reading a peer that reads nothing"
        assert ends.framed.pending <= (1 << 20) + 70_000 * 2
        received = bytearray()
        want = 200 * (len(pack_head([b"x" * 6, b""])) + 6 + 65536)
        async with asyncio.timeout(20):
            while len(received) < want:
                try:
                    received += await loop.sock_recv(theirs, 1 << 20)
                except BlockingIOError:
                    await asyncio.sleep(0)
        await sending
        assert replies == 200 and not ends.closed
        ids, at = [], 0
        while at < len(received):
            _, first, second = struct.unpack_from("!IQQ", received, at)
            at += 20
            ids.append(bytes(received[at : at + first]))
            at += first + second
        assert ids == [b"%06d" % i for i in range(200)]
    finally:
        ends.close()


async def test_a_failed_send_tells_the_waiting_once_and_from_the_loop(tmp_path: Path) -> None:
    """Regression (review): a send that hit a closed lane ran the pool's reply handler
    inside send_nowait, while the pool iterated its workers, and told it twice."""
    path = tmp_path / "agent.sock"
    server = _listener(path)
    try:
        conn = connection("tcp://127.0.0.1:1", lane=lane_address(str(path)))
        assert isinstance(conn, LaneConnection)
        peer, _ = server.accept()
        peer.close()
        told: list[tuple[int, bool]] = []
        inside = False

        def handler(decoded: Decoded) -> None:
            told.append((decoded.request_id, inside))

        ids = []
        for _ in range(3):  # before the loss is seen, while it is, and after
            inside = True
            ids.append(conn.send_nowait(Ping(), [b"x" * 100_000], handler))
            inside = False
            await asyncio.sleep(0.05)
        assert sorted(told) == sorted((i, False) for i in ids), told
    finally:
        _connection.close_all()
        server.close()


def test_a_lane_served_by_another_user_is_not_used() -> None:
    """SO_PEERCRED: a socket at the lane's path, re-created by another user, gets
    neither our token nor our arguments; connection() goes to ZeroMQ instead."""
    shared = Path(tempfile.mkdtemp(prefix="lane-squat-"))  # reachable by another user
    shared.chmod(0o777)
    path = shared / "agent.sock"
    squatter = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-S",
            "-c",
            "import socket,sys,time\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
            "print('ready', flush=True); time.sleep(60)\n",
            str(path),
        ],
        user=65534,
        stdout=subprocess.PIPE,
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"ready\n"
        with pytest.raises(PermissionError, match="served by uid 65534"):
            connect_unix(str(path))

        async def pick() -> type:
            try:
                return type(connection("tcp://127.0.0.1:1", lane=lane_address(str(path))))
            finally:
                _connection.close_all()

        assert asyncio.run(pick()) is Connection
    finally:
        squatter.kill()
        squatter.wait()
        shutil.rmtree(shared)


def test_a_zeromq_peer_posing_as_a_lane_client_gets_nothing(cluster: Cluster) -> None:
    """A DEALER may choose its routing id: one naming itself like a lane peer is
    dropped, so no reply of its requests reaches a local client."""
    (agent, *_) = cluster.status().agents
    with Peer(agent.lane) as local:
        (pong,) = local.exchange(encode(Ping(), 1), 1)  # the lane peer exists
        ctx = zmq.Context.instance()
        posers = []
        try:
            for n in range(1, 65):
                poser = ctx.socket(zmq.DEALER)
                posers.append(poser)
                poser.setsockopt(zmq.LINGER, 0)
                poser.setsockopt(zmq.ROUTING_ID, LANE_PREFIX + str(n).encode())
                _connect_and_wait(poser, agent.address)
                poser.send_multipart(encode(Ping(), 777))
            # Fences, not a sleep: a Ping from an honest peer, connected only now, is
            # answered after the posers' pings (already in the agent's queues) were
            # read; then one on the lane, whose replies arrive in order: a poser's reply
            # routed to the lane would come first ("unexpected reply").
            with Peer(agent.address) as honest:
                (pong,) = honest.exchange(encode(Ping(), 3), 3)
            (pong,) = local.exchange(encode(Ping(), 2), 2)
            assert isinstance(pong.msg, Pong)
            assert not any(p.poll(0) for p in posers)
        finally:
            for poser in posers:
                poser.close()


def _connect_and_wait(sock: zmq.Socket, address: str) -> None:
    """Connect, and return once the ZMTP handshake is done (the peer can read us)."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(address)
        assert monitor.poll(10_000), f"no handshake with {address} within 10 s"
        recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close()
