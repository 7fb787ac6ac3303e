"""Socket set-up shared by the scheduler, the agents and the client."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq
import zmq.asyncio

from aviato.protocol import (
    MAX_FRAME_BYTES,
    DecodeError,
    ErrorReply,
    Frame,
    Message,
    encode,
    payload_size,
)

log = logging.getLogger("aviato.zmq")
ZERO_COPY_BYTES = 64 * 1024


def router(ctx: zmq.asyncio.Context, bind: str) -> tuple[zmq.asyncio.Socket, str]:
    """A daemon's ROUTER socket, bound; returns it and the address it really got."""
    sock = ctx.socket(zmq.ROUTER)
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
    sock.bind(bind)
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, address


def dealer(ctx: zmq.asyncio.Context, connect: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Reconnect with backoff (100 ms doubling to 5 s) when the peer goes away.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.connect(connect)
    return sock


def advertised(address: str, host: str | None) -> str:
    """Turn a bound endpoint (maybe 0.0.0.0) into one that peers can connect to."""
    if host:
        port = address.rsplit(":", 1)[1]
        return f"tcp://{host}:{port}"
    return address.replace("0.0.0.0", "127.0.0.1")


async def send_to(
    sock: zmq.asyncio.Socket,
    identity: bytes,
    msg: Message,
    request_id: int,
    payloads: Sequence[Frame] = (),
) -> bool:
    """Send on a ROUTER; a peer that vanished is logged, not raised (it cannot be told)."""
    frames: list[Frame] = [identity, *encode(msg, request_id, payloads)]
    try:
        # Zero-copy only pays off for big frames; small ones are cheaper copied.
        await sock.send_multipart(frames, copy=payload_size(payloads) < ZERO_COPY_BYTES)
    except zmq.ZMQError as exc:
        log.debug("dropping %s to a gone peer: %s", type(msg).__name__, exc)
        return False
    return True


async def reply_decode_error(
    sock: zmq.asyncio.Socket, identity: bytes, error: DecodeError, who: str
) -> None:
    """Answer a message we could not decode, when it told us whom to answer."""
    if error.request_id is None:
        log.warning("%s: dropped an undecodable message: %s", who, error)
        return
    log.warning("%s: refused a message: %s", who, error)
    await send_to(sock, identity, ErrorReply(error.code, str(error)), error.request_id)
