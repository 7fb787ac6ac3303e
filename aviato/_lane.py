"""Framed messages over a stream socket, driven by the event loop's reader and writer
callbacks: no task per message, no I/O thread.

The agent's *local lane* uses it: a client on the agent's own host (and in its network
namespace) reaches the agent's data plane over a Unix socket rather than ZeroMQ over
TCP. A ZeroMQ message wakes three threads per hop (the sender's I/O thread, the
receiver's I/O thread, the receiver); a stream socket wakes one, which is most of a
function call's round trip. The socket's directory is the agent user's alone (0700):
whoever can connect could read the agent's keys anyway, so the lane needs no CURVE.

Framing (aviato/link.py's, which the agent's links to its workers use too): ``u32 frame
count``, the frames' ``u64`` lengths, then the frames. Each frame list is what
:func:`aviato.protocol.encode` makes; a lane carries exactly what ZeroMQ would.

A large frame may travel in shared memory instead (``shm=True`` on the sending side):
written once into a sealed memfd (a spare zeroed ahead of time when one fits:
aviato/_spare.py) whose descriptor goes over the socket (SCM_RIGHTS);
its length has the top bit set and its bytes are not in the stream. The receiver maps
it copy-on-write: no copy, and no read of it through the socket; a relay (the agent)
passes the descriptor on without touching the bytes. Descriptors travel in order, with
or before the bytes of their message, so the receiver takes them first in, first out.
A received descriptor must be a memfd of exactly the announced size, sealed against
shrinking, growing and writing (a sandbox cannot make its reader fault on it later).
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import socket
import stat
import struct
import weakref
from collections import deque
from collections.abc import Callable, Sequence

from aviato import link
from aviato._spare import Spare
from aviato.link import SHM_FLAG, FramingError, parse_head
from aviato.protocol import Frame

__all__ = [
    "ANCILLARY",
    "BIG",
    "FDS_PER_SEND",
    "IOV",
    "MAX_FDS_WAITING",
    "RECV_BYTES",
    "SCHEME",
    "SEALS",
    "SHM_MIN",
    "SPARE",
    "FramedSocket",
    "OnClose",
    "OnMessage",
    "Shared",
    "connect_unix",
    "frame_size",
    "host_key",
    "lane_address",
    "local_path",
    "map_shared",
    "pack_head",
    "shared_fd",
    "shm_wanted",
    "take_fds",
    "to_shared",
]


log = logging.getLogger("aviato.lane")

#: One read's size; a message at least BIG is read straight into its own buffer.
RECV_BYTES = 256 * 1024
BIG = 1 << 20
#: Buffers handed to one sendmsg (Linux's IOV_MAX is 1024).
IOV = 512
SCHEME = "unix:"
#: Frames at least this large go in shared memory where the link allows it (below it,
#: making and mapping a memfd costs more than copying through the socket).
SHM_MIN = int(os.environ.get("AVIATO_SHM_MIN_BYTES", 1 << 20))
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
#: Descriptors one sendmsg carries at most (the kernel's SCM_MAX_FD is 253).
FDS_PER_SEND = 250
ANCILLARY = socket.CMSG_SPACE(FDS_PER_SEND * 4)
#: Descriptors received and not yet claimed by a message, at most.
MAX_FDS_WAITING = 4096

OnMessage = Callable[[list[memoryview]], None]
OnClose = Callable[[BaseException | None], None]


def frame_size(frame: Frame) -> int:
    return len(frame) if isinstance(frame, bytes) else frame.nbytes


def shm_wanted() -> bool:
    """Shared memory on local links, unless AVIATO_LANE_SHM=0 (to measure without)."""
    return os.environ.get("AVIATO_LANE_SHM", "1") != "0"


class Shared(mmap.mmap):
    """A frame received in a memfd by a relay, mapped copy-on-write; ``fd`` kept to pass
    it on."""

    fd: int


def map_shared(fd: int, length: int, keep: bool = False) -> memoryview:
    """Map a received descriptor (closed here if it is refused). ``keep``: as a
    :class:`Shared` that keeps it, to pass on; else without holding it (Python's mmap
    would keep a duplicate open: a client holding many results would run out)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != length:
            raise FramingError(f"a shared frame of {st.st_size} bytes announced as {length}")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            raise FramingError("a shared frame that is not sealed against changes")
        # MAP_PRIVATE: writable for the receiver (as its own copy, page by page), while
        # the memfd itself stays as sent. Pages are faulted in as read (in batches, from
        # the page cache): MAP_POPULATE measured slower here.
        if not keep:
            return _map_private(fd, length)
        region = Shared(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    region.fd = fd
    weakref.finalize(region, os.close, fd)
    return memoryview(region)


_libc: ctypes.CDLL | None = None


def _map_private(fd: int, length: int) -> memoryview:
    """``mmap`` through libc, then the descriptor closed; unmapped with its last view."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]  # fmt: skip
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    try:
        address = _libc.mmap(None, length, prot, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    if address is None or address == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot map a shared frame: {os.strerror(err)}")
    region = (ctypes.c_ubyte * length).from_address(address)
    weakref.finalize(region, _libc.munmap, address, length)
    return memoryview(region).cast("B")


#: This process's spare memfd for the next large frame (aviato/_spare.py).
SPARE = Spare("aviato-frame")


def to_shared(view: memoryview) -> int:
    """A sealed memfd holding ``view``'s bytes (one copy); the caller closes it."""
    return SPARE.sealed_copy(view)


def shared_fd(view: memoryview) -> int | None:
    """A copy of the descriptor ``view`` was received in, when it is that whole frame."""
    owner = view.obj
    if (
        isinstance(owner, Shared)
        and owner.fd >= 0
        and view.nbytes == len(owner)
        and view.c_contiguous
    ):
        return os.dup(owner.fd)
    return None


def take_fds(ancillary: list[tuple[int, int, bytes]], into: deque[int]) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


def pack_head(frames: Sequence[Frame]) -> bytes:
    """The head of a message of ``frames``, all in the stream."""
    return link.pack_head([frame_size(f) for f in frames])


def _split(
    body: memoryview, start: int, lengths: Sequence[int], mapped: Sequence[memoryview] = ()
) -> list[memoryview]:
    frames = []
    shared = iter(mapped)
    for length in lengths:
        if length & SHM_FLAG:
            frames.append(next(shared))
            continue
        frames.append(body[start : start + length])
        start += length
    return frames


class FramedSocket:
    """A connected, non-blocking stream socket carrying framed messages both ways.

    ``on_message`` gets each complete message as memoryviews of one buffer (zero copies
    after the read); ``on_close`` once, when the peer or an error ends the connection
    (not when :meth:`close` is called), always from the event loop, never from inside
    :meth:`send`. Writes go out at once when the socket takes them, else they queue.
    A server sets ``pause_above``: while more than that is queued for a peer that does
    not read, that peer is not read either (it cannot pile up replies); past
    ``max_pending`` it is cut off."""

    def __init__(
        self,
        sock: socket.socket,
        on_message: OnMessage,
        on_close: OnClose,
        *,
        max_message: int,
        max_pending: int | None = None,
        pause_above: int | None = None,
        shm: bool = False,
        relay: bool = False,
    ) -> None:
        sock.setblocking(False)
        #: Send large frames in shared memory (the peer is on this host and reads them).
        self.shm = shm and shm_wanted()
        #: Keep received shared frames' descriptors, to pass them on (the agent).
        self._relay = relay
        #: Descriptors to send (with the next write), and received ones not yet claimed.
        self._fds_out: list[int] = []
        self._fds_in: deque[int] = deque()
        # A big message's shared frames, mapped when its head was read.
        self._mapped: list[memoryview] = []
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self._on_message = on_message
        self._on_close = on_close
        self._max_message = max_message
        self._max_pending = max_pending
        self._pause_above = pause_above
        self._buf = bytearray()
        # A big message being read straight into its own buffer.
        self._body: mmap.mmap | None = None
        self._filled = 0
        self._lengths: tuple[int, ...] = ()
        self._out: deque[memoryview] = deque()
        #: Bytes queued for the peer, headers included.
        self.pending = 0
        self._writing = False
        self._reading = True
        self._drained: asyncio.Future[None] | None = None
        self.closed = False
        self._loop.add_reader(self._fd, self._on_readable)

    # ------------------------------------------------------------------ writing

    def send(self, frames: Sequence[Frame], *, shared_from: int | None = None) -> bool:
        """Queue one message and write what the socket takes now; False once closed.
        ``shared_from``: send payload frames of that many bytes or more in shared memory,
        whatever ``shm`` says (the agent's probe of a worker)."""
        if self.closed:
            return False
        out = self._out
        views = []
        lengths = []
        shared = SHM_MIN if shared_from is None else shared_from
        for i, frame in enumerate(frames):
            view = memoryview(frame)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            fd = None
            if (self.shm or shared_from is not None) and i and view.nbytes >= max(shared, 1):
                try:
                    fd = shared_fd(view)
                    if fd is None:
                        fd = to_shared(view)
                except OSError as exc:  # out of descriptors or memory: in the stream
                    log.warning("lane: a frame of %d bytes not shared: %s", view.nbytes, exc)
            if fd is not None:
                self._fds_out.append(fd)
                lengths.append(SHM_FLAG | view.nbytes)
            else:
                views.append(view)
                lengths.append(view.nbytes)
        head = link.pack_head(lengths)
        out.append(memoryview(head))
        size = len(head)
        for view in views:
            if view.nbytes:
                out.append(view)
                size += view.nbytes
        self.pending += size
        if not self._writing:
            self._flush()
        if self.closed:
            return False
        if self._max_pending is not None and self.pending > self._max_pending:
            why = f"the peer left {self.pending} bytes unread; closing the connection"
            self._fail_soon(FramingError(why))
            return False
        if self._pause_above is not None and self.pending > self._pause_above and self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        return True

    def _flush(self) -> None:
        out = self._out
        while out:
            batch = [out[i] for i in range(min(len(out), IOV))]
            # Descriptors go with the first bytes written after they were queued: with
            # or before their own message's, as the reader needs.
            fds = self._fds_out[:FDS_PER_SEND]
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else ()
            )
            try:
                sent = self._sock.sendmsg(batch, ancillary)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail_soon(exc)
                return
            if fds:  # the peer has its own copies now
                del self._fds_out[: len(fds)]
                for fd in fds:
                    os.close(fd)
            self.pending -= sent
            while sent:
                head = out[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        if not self._reading and self.pending <= (self._pause_above or 0) // 2:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
            if self._buf:  # requests read before the pause: from the loop, not from here
                self._loop.call_soon(self._parse_later)
        if out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)
        elif not out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if not out:
            self._wake_drain()

    async def drain(self) -> None:
        """Until everything queued is written (or the connection is gone)."""
        if self._out and not self.closed:
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)

    def _wake_drain(self) -> None:
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    # ------------------------------------------------------------------ reading

    def _on_readable(self) -> None:
        try:
            if self._body is not None:
                # Read what the socket holds, up to the message's end, in one wake-up.
                count = 0
                ended = False
                with memoryview(self._body) as whole:
                    while self._filled < len(whole):
                        try:
                            got = self._recv_into(whole[self._filled :])
                        except (BlockingIOError, InterruptedError):
                            break
                        if not got:
                            ended = True
                            break
                        count += got
                        self._filled += got
                if count or not ended:
                    if self._filled == len(self._body):
                        body, self._body = self._body, None
                        mapped, self._mapped = self._mapped, []
                        self._deliver(_split(memoryview(body), 0, self._lengths, mapped))
                    return
            else:
                data, ancillary, flags, _ = self._sock.recvmsg(
                    RECV_BYTES, ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
                self._got_fds(ancillary, flags)
                if data:
                    self._buf += data
                    self._parse()
                    return
        except (BlockingIOError, InterruptedError):
            return
        except FramingError as exc:
            self._fail(exc)
            return
        except OSError as exc:
            self._fail(None if exc.errno in (errno.ECONNRESET, errno.EPIPE) else exc)
            return
        self._fail(None)  # end of stream

    def _recv_into(self, view: memoryview) -> int:
        count, ancillary, flags, _ = self._sock.recvmsg_into(
            [view], ANCILLARY, socket.MSG_CMSG_CLOEXEC
        )
        self._got_fds(ancillary, flags)
        return int(count)

    def _got_fds(self, ancillary: list[tuple[int, int, bytes]], flags: int) -> None:
        if not ancillary:
            return
        take_fds(ancillary, self._fds_in)
        if flags & socket.MSG_CTRUNC or len(self._fds_in) > MAX_FDS_WAITING:
            raise FramingError("too many descriptors from the peer")

    def _map(self, lengths: Sequence[int]) -> list[memoryview]:
        """The shared frames a message's head announces, mapped, in order."""
        mapped = []
        for length in lengths:
            if length & SHM_FLAG:
                if not self._fds_in:
                    raise FramingError("a shared frame came without its descriptor")
                mapped.append(map_shared(self._fds_in.popleft(), length & ~SHM_FLAG, self._relay))
        return mapped

    def _parse_later(self) -> None:
        try:
            self._parse()
        except FramingError as exc:
            self._fail(exc)

    def _parse(self) -> None:
        # Paused (the peer reads none of its replies): what is buffered waits too.
        while not self.closed and self._reading:
            buf = self._buf
            parsed = parse_head(buf)
            if parsed is None:
                return
            head, lengths = parsed
            total = sum(n for n in lengths if not n & SHM_FLAG)  # bytes in the stream
            if sum(n & ~SHM_FLAG for n in lengths) > self._max_message:
                raise FramingError(
                    f"a message of {sum(n & ~SHM_FLAG for n in lengths)} bytes, above the "
                    f"{self._max_message}-byte limit"
                )
            end = head + total
            if len(buf) < end:
                if total >= BIG:  # read the rest straight into the message's own buffer
                    # Anonymous memory is committed as it is written: a header that
                    # announces 500 MB costs nothing until the bytes come.
                    body = mmap.mmap(-1, total)
                    have = len(buf) - head
                    body[:have] = bytes(buf[head:])
                    self._mapped = self._map(lengths)
                    self._body, self._filled, self._lengths = body, have, lengths
                    self._buf = bytearray()
                return
            mapped = self._map(lengths) if total != sum(lengths) else []
            if end == len(buf):  # the common case: hand over the buffer itself
                self._buf = bytearray()
                self._deliver(_split(memoryview(buf), head, lengths, mapped))
            else:
                body_bytes = buf[head:end]
                del buf[:end]
                self._deliver(_split(memoryview(body_bytes), 0, lengths, mapped))

    def _deliver(self, frames: list[memoryview]) -> None:
        try:
            self._on_message(frames)
        except Exception:  # one bad message must not end the connection
            log.exception("lane: handling a message failed")

    # ------------------------------------------------------------------ closing

    def _fail(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.close()
        self._on_close(exc)

    def _fail_soon(self, exc: BaseException | None) -> None:
        """Close now, tell the owner from the loop: a failing send must not run its
        owner's callbacks inside the caller (which may be iterating what they change)."""
        if self.closed:
            return
        self.close()
        self._loop.call_soon(self._on_close, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._out.clear()
        self._body = None
        self._mapped = []
        for fd in [*self._fds_out, *self._fds_in]:
            os.close(fd)
        self._fds_out.clear()
        self._fds_in.clear()
        self._sock.close()
        self._wake_drain()


# --------------------------------------------------------------------------- addresses


_host_key: str | None = None


def host_key() -> str:
    """Who shares a filesystem and a network with us: this boot of this machine, in this
    network namespace ("" when /proc cannot tell). Hosts simulated with network
    namespaces on one machine (the tests do) differ, as real hosts do."""
    global _host_key
    if _host_key is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
            netns = os.stat("/proc/self/ns/net").st_ino
            _host_key = hashlib.sha256(f"{boot}:{netns}".encode()).hexdigest()[:16]
        except OSError:
            _host_key = ""
    return _host_key


def lane_address(path: str) -> str:
    """How an agent advertises its lane: ``unix:<host key>:<socket path>``."""
    key = host_key()
    return f"{SCHEME}{key}:{path}" if key else ""


def local_path(lane: str) -> str | None:
    """The socket path of ``lane`` when it is on this host, else None."""
    if not lane.startswith(SCHEME):
        return None
    key, _, path = lane[len(SCHEME) :].partition(":")
    if not key or key != host_key() or not path:
        return None
    return path


_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def connect_unix(path: str) -> socket.socket:
    """Connect to a local lane without blocking (a Unix connect completes at once, or
    fails with EAGAIN when the listener's queue is full). Raises OSError: no such
    socket, not ours to reach, refused, busy, or served by another user (a stale path
    re-created by someone else must not get our token and arguments)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(path)
        _, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != os.geteuid():
            raise PermissionError(
                errno.EACCES, f"{path} is served by uid {uid}, not by ours ({os.geteuid()})"
            )
    except BaseException:
        sock.close()
        raise
    return sock
