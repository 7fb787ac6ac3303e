"""The agent's local lane: its data plane on a Unix socket, for clients on its host.

Each accepted connection gets an identity (like a ROUTER peer's) under which its
messages reach the agent's handlers and their replies come back; see aviato/_lane.py
for why it exists and for the framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import resource
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from aviato._lane import FramedSocket, lane_address
from aviato.protocol import MAX_FRAME_BYTES, Frame

log = logging.getLogger("aviato.agent.lane")

#: Connections at once, well below the descriptor limit (worker links, Docker and
#: ZeroMQ need theirs); more are refused. Each client loop needs one per agent.
MAX_PEERS = max(16, min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
#: A client that leaves this much of its replies unread is not read until it catches
#: up (it cannot make the agent hold more); at MAX_PENDING it is cut off.
PAUSE_ABOVE = 64 << 20
MAX_PENDING = 256 << 20
#: Identities of lane peers. Never a ZeroMQ peer's: the data loop drops any message
#: from a ZeroMQ peer that names itself so (a DEALER may choose its routing id).
PREFIX = b"\xfflane:"
#: After running out of descriptors, accepting resumes this much later.
ACCEPT_BACKOFF = 0.5

OnMessage = Callable[[bytes, list[memoryview]], None]


class LaneServer:
    def __init__(
        self,
        directory: Path,
        on_message: OnMessage,
        on_closed: Callable[[bytes], None] | None = None,
    ) -> None:
        self.directory = directory
        self.path = str(directory / "agent.sock")
        self._on_message = on_message
        #: Told of each client that went (its requests under way have nobody to answer).
        self._on_closed = on_closed
        self._peers: dict[bytes, FramedSocket] = {}
        self._ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return lane_address(self.path) if self._listener is not None else ""

    def start(self) -> None:
        # The directory is the access check: only the agent's user may connect.
        self.directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: serve the others, retry later
                log.warning("lane: accept failed (retrying in %gs): %s", ACCEPT_BACKOFF, exc)
                self._pause_accepting()
                return
            if len(self._peers) >= MAX_PEERS:
                log.warning("lane: refusing a connection (%d open)", len(self._peers))
                conn.close()
                continue
            identity = PREFIX + str(next(self._ids)).encode()
            self._peers[identity] = FramedSocket(
                conn,
                functools.partial(self._on_message, identity),
                functools.partial(self._closed, identity),
                max_message=MAX_FRAME_BYTES,
                max_pending=MAX_PENDING,
                pause_above=PAUSE_ABOVE,
                shm=True,  # large replies (results, files) in shared memory
                relay=True,  # and large requests passed on to workers as they came
            )

    def _pause_accepting(self) -> None:
        # The pending connection stays queued: a level-triggered reader would spin.
        assert self._listener is not None and self._loop is not None
        self._loop.remove_reader(self._listener.fileno())
        self._loop.call_later(ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _closed(self, identity: bytes, exc: BaseException | None) -> None:
        self._peers.pop(identity, None)
        if exc is not None:
            log.info("lane: a client connection ended: %s", exc)
        if self._on_closed is not None:
            self._on_closed(identity)

    def owns(self, identity: bytes) -> bool:
        return identity.startswith(PREFIX)

    def send(self, identity: bytes, frames: Sequence[Frame]) -> bool:
        """Send to a lane peer; False when it is gone (its replies cannot be delivered)."""
        peer = self._peers.get(identity)
        return peer is not None and peer.send(frames)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            peer.close()
        self._peers.clear()
        if self._listener is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            self.directory.rmdir()
