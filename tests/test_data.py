"""Arguments and results with large buffers: out of band, exact, over both wires.

The test image has no numpy, so buffers here are bytes, bytearrays, memoryviews of
several formats and shapes (contiguous or not) and PickleBuffer-based objects; numpy
arrays take the same path (their own ``__reduce_ex__`` makes PickleBuffers).
The daemons of every test cluster run with unpickling forbidden.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import time
from typing import Any

import pytest

from aviato import Sandbox, SandboxDefaults, _buffers, _pool, _pool_state
from aviato._buffers import OOB_MIN_BYTES

BIG = 3 * 1024 * 1024 + 7  # an odd size: no frame lines up by luck


class Blob:
    """A user type that hands pickle its buffer (as numpy and Arrow do)."""

    def __init__(self, data: bytes | bytearray | memoryview, tag: str) -> None:
        self.data = data
        self.tag = tag

    def __reduce_ex__(self, protocol: Any) -> Any:
        if protocol >= 5:
            return type(self), (pickle.PickleBuffer(self.data), self.tag)
        return type(self), (bytes(self.data), self.tag)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Blob)
            and bytes(other.data) == bytes(self.data)
            and (other.tag == self.tag)
        )


def pattern(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (n // len(block) + 1))[:n]


def describe(value: Any) -> Any:
    """What must survive the trip, exactly: type, format, shape, flags, bytes."""
    if isinstance(value, memoryview):
        return ("mv", value.format, value.shape, value.readonly, value.tobytes())
    if isinstance(value, bytes | bytearray):
        return (type(value).__name__, bytes(value))
    if isinstance(value, Blob):
        return ("blob", value.tag, bytes(value.data))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [describe(v) for v in value])
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


def values() -> dict[str, Any]:
    big = pattern(BIG)
    grid = memoryview(bytearray(pattern(8 * 300 * 500, 3))).cast("d", [300, 500])
    return {
        "small bytes": b"abc",
        "big bytes": big,
        "big bytearray": bytearray(pattern(BIG, 1)),
        "small bytearray": bytearray(b"xyz"),
        "memoryview B": memoryview(pattern(BIG, 2)),
        "memoryview readonly d 2-D": grid.toreadonly(),
        "memoryview writable d 2-D": grid,
        "memoryview non-contiguous": memoryview(bytearray(pattern(BIG, 4)))[::3],
        "memoryview i 3-D": memoryview(bytearray(pattern(4 * 60 * 70 * 80, 5))).cast(
            "i", [60, 70, 80]
        ),
        "memoryview small": memoryview(b"tiny").cast("B", [2, 2]),
        "PickleBuffer object": Blob(pattern(BIG, 6), "pb"),
        "nested": {"list": [Blob(bytearray(pattern(BIG, 7)), "n"), b"x" * 100], "n": 3},
    }


def echo(value: Any) -> Any:
    return value


def echo_described(value: Any) -> Any:
    return value, describe(value)


def test_pickling_keeps_big_buffers_out_of_the_stream() -> None:
    """Each big buffer is a view of the caller's memory (no copy), not in the pickle."""
    for name, value in values().items():
        blob, frames = _buffers.dumps_args((value,), {})
        if name.startswith("big") or name == "PickleBuffer object":
            assert len(blob) < OOB_MIN_BYTES, name
            assert frames.nbytes >= BIG, name
        back = _buffers.loads(blob, frames.views)
        assert describe(back[0][0]) == describe(value), name
    data = bytearray(pattern(BIG))
    _, frames = _buffers.dumps_args((Blob(data, "x"),), {})
    data[0] ^= 0xFF  # the frame is the caller's memory itself
    assert frames.views[0][0] == data[0]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "zeromq"])
async def test_buffers_round_trip_exactly(defaults: SandboxDefaults, lane: bool) -> None:
    """Every kind of buffer, big and small, there and back, checked in the worker too."""
    defaults = dataclasses.replace(defaults, local_lane=lane)
    async with Sandbox.session(defaults) as session:
        run = session.function(max_workers=1)(echo_described)
        for name, value in values().items():
            result = await run(value)
            back, seen_there = result.value
            assert seen_there == describe(value), f"{name}: as the worker saw it"
            assert describe(back) == describe(value), f"{name}: as it came back"
        # Several big arguments and keyword arguments at once.
        multi = session.function(max_workers=1)(lambda *a, **k: (a, k))
        a, b = pattern(BIG, 8), bytearray(pattern(BIG, 9))
        args, kwargs = (await multi(a, b, key=memoryview(a)[10:], other=a)).value
        assert args == (a, b) and isinstance(args[1], bytearray)
        assert kwargs["key"].tobytes() == a[10:] and kwargs["other"] == a


async def test_a_shared_argument_crosses_once_per_batch(defaults: SandboxDefaults) -> None:
    """One buffer passed to many calls of a batch is one frame, read-only in the worker
    (a call cannot change what the next one sees)."""
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def probe(data: Any, i: int) -> tuple[int, bool, int]:
            view = memoryview(data.data)
            return i, view.readonly, view[i]

        shared = Blob(bytearray(pattern(BIG)), "shared")
        await probe(shared, 0)  # learn the function is fast: the next calls batch
        await probe(shared, 0)
        sent: list[int] = []
        original = _pool.FunctionPool._send

        frames_sent: list[int] = []

        def spy(pool: Any, send: Any) -> None:
            sent.append(len(send.calls))
            shared_views = _pool.SharedBuffers()
            for call in send.calls:
                shared_views.add(call.frames)
            frames_sent.append(len(shared_views.views))
            original(pool, send)

        _pool.FunctionPool._send = spy  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(probe(shared, i) for i in range(50)))
        finally:
            _pool.FunctionPool._send = original  # type: ignore[method-assign]
        assert [r.value[0] for r in results] == list(range(50))
        assert all(r.value[2] == shared.data[i] for i, r in enumerate(results))
        assert max(sent) > 1, f"no batch formed: {sent}"
        assert set(frames_sent) == {1}, f"buffer frames per batch: {frames_sent}"
        assert any(r.value[1] for r in results), "a shared buffer must be read-only"


async def test_batches_are_bounded_by_bytes(defaults: SandboxDefaults, monkeypatch) -> None:
    """Calls too big to share a batch go in several, each under the byte budget, and a
    call bigger than the budget goes alone; all succeed. (Batched by count alone, the
    13 calls went as one batch of 58 MB; at 10 MB each, 100 of them passed the 512 MB
    message cap and were refused.)"""
    budget = 8 * 1024 * 1024
    monkeypatch.setattr(_pool_state, "BATCH_BYTES", budget)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def size(data: bytes) -> int:
            return len(data)

        await size(b"")
        await size(b"")  # fast: the next ones are batched by count
        weights: list[int] = []
        original = _pool.FunctionPool._send

        def spy(pool: Any, send: Any) -> None:
            weight = _pool_state.BatchBytes()
            for call in send.calls:
                weight.add(call)
            weights.append(weight.total)
            if weight.total > budget and len(send.calls) > 1:
                over.append((len(send.calls), weight.total))
            original(pool, send)

        over: list[tuple[int, int]] = []

        monkeypatch.setattr(_pool.FunctionPool, "_send", spy)
        t0 = time.monotonic()
        sizes = [3 * 1024 * 1024 + i for i in range(12)] + [20 * 1024 * 1024]
        results = await asyncio.gather(*(size(bytes(n)) for n in sizes))
        assert [r.value for r in results] == sizes
        assert not over, f"batches over the {budget}-byte budget (calls, bytes): {over}"
        assert len(weights) >= 5, weights  # 12 x 3 MB in 8 MB batches, then 20 MB alone
        assert time.monotonic() - t0 < 60


# --------------------------------------------------------------------------- shared memory


async def _pair(shm: bool) -> tuple[Any, Any, list[list[memoryview]], list[Any]]:
    import socket

    from aviato._lane import FramedSocket

    got: list[list[memoryview]] = []
    closed: list[Any] = []
    a, b = socket.socketpair()
    sender = FramedSocket(a, lambda f: None, lambda e: None, max_message=1 << 30, shm=shm)
    receiver = FramedSocket(b, got.append, closed.append, max_message=1 << 30, relay=True)
    return sender, receiver, got, closed


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_large_frames_cross_a_lane_in_shared_memory() -> None:
    """A frame of SHM_MIN bytes or more goes as a memfd: the receiver's frame is a
    mapping of it (writable, its own), and a relay passes the same memory on."""
    from aviato._lane import SHM_MIN, Shared

    sender, relay, got, closed = await _pair(shm=True)
    big = pattern(SHM_MIN + 5)
    try:
        sender.send([b"head", b"small", big, b"x" * 10, memoryview(big)[1:]])
        await _until(lambda: got)
        frames = got[0]
        assert [bytes(f) for f in frames] == [b"head", b"small", big, b"x" * 10, big[1:]]
        assert isinstance(frames[2].obj, Shared) and isinstance(frames[4].obj, Shared)
        assert not isinstance(frames[1].obj, Shared)
        frames[2][0] ^= 0xFF  # copy on write: the receiver's to change
        # Relayed on, the same memfd goes (not a copy of what the relay changed).
        onward, receiver, got2, _ = await _pair(shm=True)
        try:
            onward.send(frames)
            await _until(lambda: got2)
            assert bytes(got2[0][2]) == big  # the memfd as sent, not the relay's copy
            assert os.path.samestat(os.fstat(got2[0][2].obj.fd), os.fstat(frames[2].obj.fd)), (
                "the relay passed the memfd on"
            )
            assert got2[0][2].obj.fd >= 0
        finally:
            onward.close()
            receiver.close()
        assert not closed
    finally:
        sender.close()
        relay.close()


@pytest.mark.parametrize("bad", ["unsealed", "wrong size", "a pipe", "missing"])
async def test_a_shared_frame_that_could_change_is_refused(bad: str) -> None:
    """What a sandbox sends is not trusted: a descriptor that is not a memfd of exactly
    the announced size, sealed against shrinking (a reader would fault), growing and
    writing, ends the connection; the receiver survives."""
    import array
    import fcntl
    import socket
    import struct

    from aviato._lane import FramedSocket
    from aviato.link import SHM_FLAG, FramingError

    got: list[Any] = []
    closed: list[Any] = []
    a, b = socket.socketpair()
    receiver = FramedSocket(b, got.append, closed.append, max_message=1 << 30)
    size = 4096
    fds: list[int] = []
    try:
        if bad == "a pipe":
            r, w = os.pipe()
            fds, extra = [r], [w]
        else:
            fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
            os.write(fd, b"z" * (size if bad != "wrong size" else size // 2))
            if bad != "unsealed":
                seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            fds, extra = [fd], []
        head = struct.pack("!IQ", 1, SHM_FLAG | size)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        a.sendmsg([head], rights if bad != "missing" else [])
        await _until(lambda: closed)
        assert isinstance(closed[0], FramingError | OSError) and not got
        for fd in fds + extra:
            os.close(fd)
    finally:
        receiver.close()
        a.close()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "zeromq"])
async def test_the_worker_maps_large_arguments(defaults: SandboxDefaults, lane: bool) -> None:
    """A large buffer reaches the worker as a mapping of shared memory (no read through
    its socket); a small one in a buffer of its own; either way without a copy into
    the pickle."""
    defaults = dataclasses.replace(defaults, local_lane=lane)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def holder(blob: Any) -> str:
            return type(memoryview(blob.data).obj).__name__

        assert (await holder(Blob(pattern(BIG), "big"))).value == "mmap"
        assert (await holder(Blob(pattern(OOB_MIN_BYTES), "mid"))).value == "bytearray"


async def test_a_client_holding_shared_results_holds_no_descriptors() -> None:
    """Only a relay keeps a shared frame's descriptor: a client keeping 50 large results
    keeps 50 mappings and no more open files (else results would run it out of them)."""
    import socket

    from aviato._lane import SHM_MIN, FramedSocket

    got: list[list[memoryview]] = []
    a, b = socket.socketpair()
    sender = FramedSocket(a, lambda f: None, lambda e: None, max_message=1 << 30, shm=True)
    client = FramedSocket(b, got.append, lambda e: None, max_message=1 << 30)
    try:
        before = len(os.listdir("/proc/self/fd"))
        for i in range(50):
            sender.send([b"h", pattern(SHM_MIN, i)])
        await _until(lambda: len(got) == 50)
        assert all(bytes(m[1]) == pattern(SHM_MIN, i) for i, m in enumerate(got))
        assert len(os.listdir("/proc/self/fd")) <= before + 2
    finally:
        sender.close()
        client.close()


async def test_a_result_over_zeromq_is_not_kept_by_the_connection(defaults) -> None:
    """Once the caller drops a large result, its memory goes: the connection's reader,
    waiting for the next message, does not hold the last one (a client echoing 100 MB
    grew by two copies of it)."""
    import gc
    import weakref

    defaults = dataclasses.replace(defaults, local_lane=False)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def make(n: int) -> Blob:
            return Blob(bytearray(n), "made")

        result = (await make(BIG)).value
        frame = memoryview(result.data).obj
        assert type(frame).__name__ == "Frame", "a view of the ZeroMQ frame, not a copy"
        gone = weakref.ref(frame)
        del result, frame
        await asyncio.sleep(0)  # the loop's handle that woke us holds the call's future
        gc.collect()
        assert gone() is None, "the received frame outlived its result"


def test_a_worker_reads_on_when_a_shared_frame_lost_its_descriptor() -> None:
    """A runtime that does not pass descriptors into the sandbox (the agent's probe
    finds out): the probe's frame reads as None, and the link goes on (the agent then
    sends everything in the stream)."""
    import socket
    import struct

    from agent import supervisor_link
    from aviato import link

    a, b = socket.socketpair()
    try:
        head = struct.pack("!IQQ", 2, 5, link.SHM_FLAG | 26)
        a.sendall(head + b"probe")  # no SCM_RIGHTS: lost on the way
        a.sendall(struct.pack("!IQ", 1, 5) + b"calls")
        reader = supervisor_link.FdReader(b)
        assert link.read(reader) == [b"probe", None]
        assert link.read(reader) == [b"calls"]
    finally:
        a.close()
        b.close()


async def test_a_frame_that_cannot_be_shared_goes_in_the_stream(monkeypatch) -> None:
    """Out of descriptors (or memory) for a memfd: the frame goes through the socket."""
    from aviato import _lane

    def no_memfd(view: memoryview) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_lane, "to_shared", no_memfd)
    sender, receiver, got, closed = await _pair(shm=True)
    big = pattern(_lane.SHM_MIN + 1)
    try:
        assert sender.send([b"head", big])
        await _until(lambda: got)
        assert bytes(got[0][1]) == big and not isinstance(got[0][1].obj, _lane.Shared)
        assert not closed
    finally:
        sender.close()
        receiver.close()
