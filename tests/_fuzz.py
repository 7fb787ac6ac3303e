"""Hostile peers for tests/test_fuzz_sockets.py: raw DEALERs, a raw ZMTP speaker,
junk generators, and the probes that say whether a daemon is still healthy."""

from __future__ import annotations

import random
import select
import socket
import statistics
import struct
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
import psutil
import zmq

from aviato._lane import local_path, pack_head
from aviato.link import COUNT
from aviato.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Decoded,
    DecodeError,
    ErrorReply,
    Message,
    MsgType,
    OkReply,
    Ping,
    Pong,
    SandboxReply,
    decode,
    encode,
)

Frames = list[bytes]
#: Fence request ids live up here; generated junk keeps its ids out of this range.
FENCE_BASE = 2**62


@dataclass(frozen=True)
class Target:
    """One daemon's ROUTER under attack."""

    kind: str  # "scheduler" | "agent" | "lane" (an agent's local lane)
    name: str  # its key in Cluster.procs
    address: str
    pid: int
    probe: Message  # the normal request whose latency is the health measure


@dataclass(frozen=True)
class Baseline:
    latency: float  # median seconds of a probe round trip
    rss: int  # bytes


# --------------------------------------------------------------------------- peers


class Peer:
    """A DEALER that sends raw frames (or, for a ``unix:`` address, a client of an
    agent's local lane: the same frames, in the lane's framing); :meth:`exchange` tells
    "no reply" from "slow" by following each message with a Ping fence on the same
    connection."""

    def __init__(self, address: str, **options: int) -> None:
        self.lane: socket.socket | None = None
        if address.startswith("unix:"):
            path = local_path(address)
            assert path is not None, f"{address} is not on this host"
            self.lane = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.lane.connect(path)
        else:
            self.sock = zmq.Context.instance().socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            for name, value in options.items():
                self.sock.setsockopt(getattr(zmq, name), value)
            self.sock.connect(address)
        self._fences = 0
        #: Replies still owed, by request id (ids repeat: junk reuses them).
        self.owed: Counter[int] = Counter()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_: object) -> None:
        if self.lane is not None:
            self.lane.close()
        else:
            self.sock.close()

    def send(self, frames: Frames) -> None:
        if self.lane is not None:
            self.lane.settimeout(None)
            self.lane.sendall(pack_head(frames) + b"".join(frames))
        else:
            self.sock.send_multipart(frames)

    def recv(self, timeout: float) -> Decoded | None:
        if self.lane is not None:
            if not select.select([self.lane], [], [], timeout)[0]:
                return None
            self.lane.settimeout(10)
            (count,) = COUNT.unpack(_read_exactly(self.lane, COUNT.size))
            lengths = struct.unpack(f"!{count}Q", _read_exactly(self.lane, 8 * count))
            return decode([_read_exactly(self.lane, n) for n in lengths])
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return decode(self.sock.recv_multipart())

    def next_fence(self) -> int:
        self._fences += 1
        return FENCE_BASE + self._fences

    def exchange(
        self, frames: Frames, expect_id: int | None, timeout: float = 5.0
    ) -> list[Decoded]:
        """Send ``frames`` (owing a reply to ``expect_id`` if not None) and a fence; return
        every non-fence reply that arrived until the fence's Pong and all owed replies."""
        if expect_id is not None:
            self.owed[expect_id] += 1
        self.send(frames)
        fence = self.next_fence()
        self.send(encode(Ping(), fence))
        got: list[Decoded] = []
        fenced = False
        deadline = time.monotonic() + timeout
        while not fenced or +self.owed:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            assert reply is not None, (
                f"no reply within {timeout}s (fence seen: {fenced}, owed: {dict(+self.owed)})"
            )
            if reply.request_id == fence and isinstance(reply.msg, Pong):
                fenced = True
                continue
            assert self.owed[reply.request_id] > 0, f"unexpected reply {reply}"
            self.owed[reply.request_id] -= 1
            got.append(reply)
        return got


def latencies(address: str, msg: Message, n: int) -> list[float]:
    """Seconds of ``n`` sequential round trips of ``msg``, on one fresh connection."""
    with Peer(address) as peer:
        out = []
        for i in range(n):
            start = time.perf_counter()
            peer.send(encode(msg, i))
            reply = peer.recv(5.0)
            assert reply is not None and reply.request_id == i, f"no answer to {msg}"
            assert not isinstance(reply.msg, ErrorReply), reply.msg
            out.append(time.perf_counter() - start)
        return out


def median_latency(address: str, msg: Message, n: int = 50) -> float:
    latencies(address, msg, 10)  # warm up the connection and the daemon's caches
    return statistics.median(latencies(address, msg, n))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def wait_idle(pid: int, timeout: float = 30.0, window: float = 0.25) -> None:
    """Until the process uses under a fifth of a core for two ``window``s in a row: it
    has worked through whatever backlog a flood left in its queues."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + timeout

    def cpu() -> float:
        times = proc.cpu_times()
        return float(times.user + times.system)

    last, quiet = cpu(), 0
    while quiet < 2:
        time.sleep(window)
        now = cpu()
        quiet = quiet + 1 if now - last < 0.2 * window else 0
        last = now
        assert time.monotonic() < deadline, f"pid {pid} still busy after {timeout}s"


# --------------------------------------------------------------------------- oracle


#: Messages that would change the cluster if they decoded: never sent by the fuzzers.
SIDE_EFFECTS = {MsgType.CREATE_SANDBOX, MsgType.REGISTER_AGENT, MsgType.SESSION_KEEPALIVE}


def expected_reply(kind: str, frames: Frames) -> tuple[int | None, Any]:
    """What a daemon must answer ``frames`` with, judged by the wire protocol itself:
    (request id owed a reply or None, the ErrorCode that reply must carry or None)."""
    try:
        decoded = decode(frames)
    except DecodeError as exc:
        return exc.request_id, (exc.code if exc.request_id is not None else None)
    if kind == "scheduler" and isinstance(decoded.msg, SandboxReply | ErrorReply | OkReply):
        return None, None  # only agents answer the scheduler; anyone else's is ignored
    if kind != "scheduler" and isinstance(decoded.msg, Cancel):
        return None, None  # "no reply": it stops the request it names, if any
    return decoded.request_id, None


def side_effecting(frames: Frames) -> bool:
    try:
        return decode(frames).msg.TYPE in SIDE_EFFECTS
    except DecodeError:
        return False


# --------------------------------------------------------------------------- junk


def envelope(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def junk_pool(seed: int, n: int) -> list[Frames]:
    """``n`` assorted hostile messages, the same for the same seed."""
    rng = random.Random(seed)
    types = [int(t) for t in MsgType if t not in SIDE_EFFECTS]
    pool: list[Frames] = []
    for i in range(n):
        rid = rng.randrange(2**31)
        pick = rng.randrange(8)
        if pick == 0:  # random bytes, one to three frames
            pool.append([rng.randbytes(rng.randrange(300)) for _ in range(rng.randrange(1, 4))])
        elif pick == 1:  # valid msgpack, not a map
            value = rng.choice([[1, 2, [3]], i, "str", None, 1.5, b"\x00" * 9, [{}]])
            pool.append([msgpack.packb(value, use_bin_type=True)])
        elif pick == 2:  # another protocol version
            pool.append([envelope(v=rng.choice([0, 2, 99, -1]), t=int(MsgType.PING), id=rid)])
        elif pick == 3:  # unknown message type
            pool.append([envelope(v=PROTOCOL_VERSION, t=rng.choice([0, 3, 999, "x"]), id=rid)])
        elif pick == 4:  # a known type, a body of the wrong shape
            body = rng.choice([[1], {"nope": 1}, {"sandbox_id": 5}, "x", {"agent_id": [None]}])
            pool.append([envelope(v=PROTOCOL_VERSION, t=rng.choice(types), id=rid, b=body)])
        elif pick == 5:  # an envelope missing pieces
            env = {"v": PROTOCOL_VERSION, "t": int(MsgType.PING), "id": rid}
            del env[rng.choice(["v", "t", "id"])]
            pool.append([envelope(**env)])
        elif pick == 6:  # a valid request with stray payload frames
            pool.append([*encode(Ping(), rid), *(rng.randbytes(20) for _ in range(3))])
        else:  # a valid request
            pool.append(encode(Ping(), rid))
    return pool


# --------------------------------------------------------------------------- raw ZMTP

#: ZMTP 3.0 greeting of a NULL-mechanism client (rfc.zeromq.org/spec/23).
GREETING = (
    b"\xff"
    + b"\x00" * 8
    + b"\x7f"
    + b"\x03\x00"
    + b"NULL".ljust(20, b"\x00")
    + b"\x00"
    + b"\x00" * 31
)


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack("!I", len(value)) + value


def short_frame(body: bytes, *, command: bool = False) -> bytes:
    assert len(body) < 256
    return bytes([0x04 if command else 0x00, len(body)]) + body


def long_frame_header(size: int) -> bytes:
    """The 9 bytes that announce a frame of ``size`` bytes (the body is not sent)."""
    return b"\x02" + struct.pack("!Q", size)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    flags = _read_exactly(sock, 1)[0]
    if flags & 0x02:
        (size,) = struct.unpack("!Q", _read_exactly(sock, 8))
    else:
        size = _read_exactly(sock, 1)[0]
    return flags, _read_exactly(sock, size)


def zmtp_dealer(address: str, timeout: float = 5.0) -> socket.socket:
    """A plain TCP socket that has done a ZMTP 3.0 NULL handshake as a DEALER."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock.sendall(GREETING)
        sock.sendall(short_frame(b"\x05READY" + _property(b"Socket-Type", b"DEALER"), command=True))
        theirs = _read_exactly(sock, 64)
        assert theirs[:1] == b"\xff" and theirs[10] == 3, f"not a ZMTP 3 greeting: {theirs!r}"
        flags, ready = read_frame(sock)
        assert flags & 0x04 and ready.startswith(b"\x05READY"), f"no READY: {ready!r}"
    except BaseException:
        sock.close()
        raise
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closes the connection within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True
