"""Socket set-up shared by the scheduler, the agents and the client."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from aviato.exceptions import AddressInUseError, ConfigurationError
from aviato.protocol import (
    MAX_FRAME_BYTES,
    DecodeError,
    ErrorReply,
    Frame,
    Message,
    encode,
    payload_size,
)

if TYPE_CHECKING:
    from aviato._auth import CurveKeys, ServerKeys

log = logging.getLogger("aviato.zmq")
ZERO_COPY_BYTES = 64 * 1024


_ENDPOINT = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]*]+):(?P<port>\*|\d{1,5})$")
_EXAMPLE = "tcp://127.0.0.1:5555"


def check_endpoint(address: object, *, what: str = "address", bind: bool = False) -> str:
    """``address`` if it is a ZeroMQ endpoint we use: ``tcp://HOST:PORT`` (to bind,
    the port may be ``*`` or 0: any free one). Else a ``ConfigurationError`` that says
    what to write; every address given by a user passes here before a socket sees it."""
    if not isinstance(address, str) or not address.strip():
        raise ConfigurationError(f"{what} is empty: give tcp://HOST:PORT, e.g. {_EXAMPLE}")
    match = _ENDPOINT.match(address)
    if match is not None:
        port = match["port"]
        if port == "*" or int(port) == 0:
            if bind:
                return address
            raise ConfigurationError(f"{what} {address!r} names no port to connect to")
        if int(port) > 65535:
            raise ConfigurationError(f"{what} {address!r}: port {port} is above 65535")
        return address
    if "://" not in address:
        raise ConfigurationError(
            f"{what} {address!r} lacks the transport: write tcp://{address.strip()}"
            if re.match(r"^[^\s:/]+:\d+$", address.strip())
            else f"{what} {address!r} is not tcp://HOST:PORT (e.g. {_EXAMPLE})"
        )
    scheme = address.split("://", 1)[0]
    if scheme != "tcp":
        raise ConfigurationError(
            f"{what} {address!r}: only tcp:// endpoints are supported, e.g. {_EXAMPLE}"
        )
    raise ConfigurationError(f"{what} {address!r} is not tcp://HOST:PORT (e.g. {_EXAMPLE})")


def endpoint_host(address: str) -> str:
    """The host part of a checked endpoint (without an IPv6 literal's brackets)."""
    match = _ENDPOINT.match(address)
    return match["host"].strip("[]") if match else ""


def router(
    ctx: zmq.asyncio.Context, bind: str, keys: ServerKeys | None = None
) -> tuple[zmq.asyncio.Socket, str]:
    """A daemon's ROUTER socket, bound; returns it and the address it really got.
    With ``keys`` it is a CURVE server (start the context's ZapHandler first)."""
    check_endpoint(bind, what="bind address", bind=True)
    sock = ctx.socket(zmq.ROUTER)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    # A frame above the limit makes libzmq drop that peer's connection instead of
    # buffering an unbounded message; the peer reconnects.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    # Fail loudly (EHOSTUNREACH) instead of silently dropping replies to a gone peer.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A restarted peer reusing an identity takes over its old connection.
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"address already in use: {bind}") from None
        raise
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, address


#: Reconnect backoff, seconds: libzmq's on every DEALER (below), and the agent's own
#: re-registration loop (``next_backoff``), on the same schedule.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


def next_backoff(previous: float) -> float:
    """The wait after ``previous``: doubled, capped at ``BACKOFF_MAX``."""
    return min(max(previous, BACKOFF_FIRST) * 2, BACKOFF_MAX)


def dealer(
    ctx: zmq.asyncio.Context,
    connect: str,
    keys: CurveKeys | None = None,
    before_connect: Callable[[zmq.asyncio.Socket], object] | None = None,
) -> zmq.asyncio.Socket:
    """A DEALER connected to ``connect``; ``before_connect`` sees it just before (to
    attach a monitor that must not miss the connect's events)."""
    check_endpoint(connect)
    sock = ctx.socket(zmq.DEALER)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    # Reconnect with backoff (100 ms doubling to 5 s) when the peer goes away.
    sock.setsockopt(zmq.RECONNECT_IVL, int(BACKOFF_FIRST * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(BACKOFF_MAX * 1000))
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if before_connect is not None:
        before_connect(sock)
    sock.connect(connect)
    return sock


def advertised(address: str, host: str | None) -> str:
    """Turn a bound endpoint (maybe 0.0.0.0) into one that peers can connect to."""
    if host:
        port = address.rsplit(":", 1)[1]
        return f"tcp://{host}:{port}"
    return address.replace("0.0.0.0", "127.0.0.1")


def _start_send(
    sock: zmq.asyncio.Socket,
    identity: bytes,
    msg: Message,
    request_id: int,
    payloads: Sequence[Frame],
) -> Awaitable[Any] | None:
    """Start a send on a ROUTER; None when it failed at once (the peer is gone)."""
    frames: list[Frame] = [identity, *encode(msg, request_id, payloads)]
    try:
        # DONTWAIT: waiting for one peer that does not read would hold up every send on
        # this socket (pyzmq then sends at once). Zero-copy only pays off for big frames.
        return sock.send_multipart(
            frames, flags=zmq.DONTWAIT, copy=payload_size(payloads) < ZERO_COPY_BYTES
        )
    except zmq.ZMQError as exc:
        log.debug("dropping %s to a gone or unread peer: %s", type(msg).__name__, exc)
        return None


async def send_to(
    sock: zmq.asyncio.Socket,
    identity: bytes,
    msg: Message,
    request_id: int,
    payloads: Sequence[Frame] = (),
) -> bool:
    """Send on a ROUTER; a peer that vanished, or let SNDHWM replies pile up unread, is
    logged, not raised (it cannot be told)."""
    sent = _start_send(sock, identity, msg, request_id, payloads)
    if sent is None:
        return False
    try:
        await sent
    except zmq.ZMQError as exc:
        log.debug("dropping %s to a gone or unread peer: %s", type(msg).__name__, exc)
        return False
    return True


def send_now(
    sock: zmq.asyncio.Socket,
    identity: bytes,
    msg: Message,
    request_id: int,
    payloads: Sequence[Frame] = (),
) -> None:
    """:func:`send_to` for callers that do not wait."""
    sent = _start_send(sock, identity, msg, request_id, payloads)
    if sent is not None:
        asyncio.ensure_future(sent).add_done_callback(_dropped)


def _dropped(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("dropped a message to a gone or unread peer: %s", future.exception())


class _Throttle:
    """At most ``burst`` warnings per ``window`` seconds, then a count of the rest: a
    peer sending junk as fast as it can must not fill the disk (or spend our time)."""

    def __init__(self, burst: int, window: float) -> None:
        self.burst, self.window = burst, window
        self.start, self.count, self.skipped = -window, 0, 0

    def warning(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.start >= self.window:
            if self.skipped:
                log.warning("... and %d more like it in %gs", self.skipped, self.window)
            self.start, self.count, self.skipped = now, 0, 0
        if self.count < self.burst:
            self.count += 1
            log.warning(fmt, *args)
        else:
            self.skipped += 1


refusals = _Throttle(burst=20, window=10.0)


async def reply_decode_error(
    sock: zmq.asyncio.Socket, identity: bytes, error: DecodeError, who: str
) -> None:
    """Answer a message we could not decode, when it told us whom to answer."""
    if error.request_id is None:
        refusals.warning("%s: dropped an undecodable message: %s", who, error)
        return
    refusals.warning("%s: refused a message: %s", who, error)
    await send_to(sock, identity, ErrorReply(error.code, str(error)), error.request_id)
