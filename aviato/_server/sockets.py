"""The daemons' ROUTER sockets: bound, and sent on without waiting for a slow or gone
peer (the client's DEALER and the address checks: aviato/_zmq.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio

from aviato._server.throttle import LogThrottle
from aviato._zmq import ZERO_COPY_BYTES, check_endpoint
from aviato.exceptions import AddressInUseError
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
    from aviato._server.auth import ServerKeys

__all__ = ["advertised", "refusals", "reply_decode_error", "router", "send_now", "send_to"]

log = logging.getLogger("aviato.zmq")


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


#: Warnings about peers' bad messages: a peer sending junk as fast as it can must not
#: fill the disk (or spend our time).
refusals = LogThrottle(seconds=10.0, burst=20)


async def reply_decode_error(
    sock: zmq.asyncio.Socket, identity: bytes, error: DecodeError, who: str
) -> None:
    """Answer a message we could not decode, when it told us whom to answer."""
    if error.request_id is None:
        refusals.warning(log, "%s: dropped an undecodable message: %s", who, error)
        return
    refusals.warning(log, "%s: refused a message: %s", who, error)
    await send_to(sock, identity, ErrorReply(error.code, str(error)), error.request_id)
