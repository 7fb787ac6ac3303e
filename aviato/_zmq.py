"""Socket set-up of the client, which the agent shares when it dials the scheduler: the
address checks, the DEALER and its reconnect schedule (the daemons' ROUTER sockets:
aviato/_server/sockets.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from aviato.exceptions import ConfigurationError
from aviato.protocol import MAX_FRAME_BYTES

if TYPE_CHECKING:
    from aviato._auth import CurveKeys

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "ZERO_COPY_BYTES",
    "check_endpoint",
    "dealer",
    "endpoint_host",
    "next_backoff",
]

#: Frames at least this big are sent without a copy (below, copying is cheaper).
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
