"""One DEALER connection to a daemon: request ids mapped to futures, a reader task.

Connections belong to one event loop; :func:`connection` hands out one per
(loop, address) so concurrent requests share a socket and a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from aviato import _zmq
from aviato._auth import CurveKeys, handshake_refusal
from aviato._errors import to_exception
from aviato.exceptions import (
    AviatoError,
    ClusterUnavailableError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from aviato.protocol import (
    MAX_PAYLOAD_BYTES,
    Decoded,
    DecodeError,
    ErrorCode,
    ErrorReply,
    Message,
    Payload,
    Ping,
    decode,
    encode,
    payload_size,
)

log = logging.getLogger("aviato.connection")
_ids = itertools.count(1)
_CTX: zmq.asyncio.Context | None = None


def _context() -> zmq.asyncio.Context:
    global _CTX
    if _CTX is None:
        _CTX = zmq.asyncio.Context()
    return _CTX


#: Handshake outcomes a connection watches: a daemon refusing our credentials.
_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


class Connection:
    def __init__(
        self, address: str, token: str | None = None, curve: CurveKeys | None = None
    ) -> None:
        self.address = address
        self.token = token
        self.curve = curve
        self._sock = _zmq.dealer(_context(), address, curve)
        #: Why the daemon refused our handshake, until one succeeds ("" otherwise).
        self.refused = ""
        # request id -> what to do with each reply to it (a future, a queue, a pool)
        self._waiting: dict[int, Callable[[Decoded], None]] = {}
        loop = asyncio.get_running_loop()
        self._monitor = self._sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        self._reader = loop.create_task(self._read())
        self._watcher = loop.create_task(self._watch())
        self.closed = False

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                decoded = decode(frames)
            except DecodeError:
                continue  # nothing to route it to; the request's deadline will fire
            handler = self._waiting.get(decoded.request_id)
            if handler is not None:
                handler(decoded)

    async def _watch(self) -> None:
        """A refused handshake (no key, an unknown key, another mechanism) would leave
        requests to time out in silence: fail them now with the reason."""
        while True:
            event = await recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused = ""
                continue
            why = handshake_refusal(
                event["event"], event["value"], self.address, self.curve is not None
            )
            if not why:
                continue
            if why != self.refused:
                log.info("%s", why)  # the waiting requests raise it
            self.refused = why
            refusal = ErrorReply(ErrorCode.UNAUTHORIZED, why)
            for request_id, handler in list(self._waiting.items()):
                handler(Decoded(refusal, request_id))

    def _no_answer(self, what: str) -> Exception:
        if self.refused:
            return UnauthorizedError(self.refused)
        hint = (
            "check that this client's key is one the cluster knows (AVIATO_KEYS, "
            "AVIATO_CLIENT_KEY)"
            if self.curve is not None
            else "is it running and reachable? (if the cluster uses keys, set AVIATO_KEYS)"
        )
        return ClusterUnavailableError(f"{what}; {hint}")

    async def _send(self, request_id: int, msg: Message, payloads: Sequence[Payload]) -> None:
        size = payload_size(payloads)
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLargeError(
                f"{type(msg).__name__} carries {size} bytes, above the {MAX_PAYLOAD_BYTES}-byte "
                "limit; split the data into smaller pieces"
            )
        frames = encode(msg, request_id, payloads, token=self.token)
        await self._sock.send_multipart(frames, copy=size < 64 * 1024)

    async def request(
        self, msg: Message, payloads: Sequence[Payload] = (), *, timeout: float
    ) -> Decoded:
        """Send ``msg`` and return its reply; error replies raise their exception."""
        request_id = next(_ids)
        queue: asyncio.Queue[Decoded] = asyncio.Queue()
        self._waiting[request_id] = queue.put_nowait
        try:
            await self._send(request_id, msg, payloads)
            try:
                async with asyncio.timeout(timeout):
                    reply = await queue.get()
            except TimeoutError:
                raise self._no_answer(
                    f"no answer from {self.address} to {type(msg).__name__} within {timeout:g}s"
                ) from None
        finally:
            del self._waiting[request_id]
        if isinstance(reply.msg, ErrorReply):
            raise to_exception(reply.msg)
        return reply

    async def request_probed(
        self, msg: Message, payloads: Sequence[Payload] = (), *, timeout: float, probe: float
    ) -> Decoded:
        """``request`` for a reply that may rightly take long (a create queued for a
        slot): meanwhile the peer must answer a Ping every ``probe`` seconds, so a dead
        or restarted daemon is a prompt ``ClusterUnavailableError``, not a long hang."""
        main = asyncio.ensure_future(self.request(msg, payloads, timeout=timeout))
        try:
            while True:
                done, _ = await asyncio.wait({main}, timeout=probe)
                if done:
                    return main.result()
                try:
                    await self.request(Ping(), timeout=probe)
                except ClusterUnavailableError as exc:
                    raise ClusterUnavailableError(
                        f"{exc} (while waiting for the reply to {type(msg).__name__}; "
                        "it may have been lost)"
                    ) from None
        finally:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, AviatoError):
                    await main

    async def stream(
        self,
        msg: Message,
        payloads: Sequence[Payload] = (),
        *,
        idle_timeout: float,
        is_last: type[Message],
    ) -> AsyncIterator[Decoded]:
        """Send ``msg`` and yield replies until one of type ``is_last``."""
        request_id = next(_ids)
        queue: asyncio.Queue[Decoded] = asyncio.Queue()
        self._waiting[request_id] = queue.put_nowait
        try:
            await self._send(request_id, msg, payloads)
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        reply = await queue.get()
                except TimeoutError:
                    raise self._no_answer(
                        f"{self.address} went silent for {idle_timeout:g}s during "
                        f"{type(msg).__name__}"
                    ) from None
                if isinstance(reply.msg, ErrorReply):
                    raise to_exception(reply.msg)
                yield reply
                if isinstance(reply.msg, is_last):
                    return
        finally:
            del self._waiting[request_id]

    def send_nowait(
        self, msg: Message, payloads: Sequence[Payload], handler: Callable[[Decoded], None]
    ) -> int:
        """Send without waiting; every reply to it goes to ``handler`` until ``forget``.

        For the function pool, which dispatches from plain callbacks: zmq queues the
        frames at once (the socket's high-water mark is far above what the pool keeps
        in flight)."""
        size = payload_size(payloads)
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLargeError(
                f"{type(msg).__name__} carries {size} bytes, above the {MAX_PAYLOAD_BYTES}-byte "
                "limit; pass smaller arguments (or write big data to a file in the sandbox)"
            )
        request_id = next(_ids)
        self._waiting[request_id] = handler
        frames = encode(msg, request_id, payloads, token=self.token)
        sent = asyncio.ensure_future(self._sock.send_multipart(frames, copy=size < 64 * 1024))
        sent.add_done_callback(_log_send_failure)
        return request_id

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def redirect(self, request_id: int, handler: Callable[[Decoded], None]) -> None:
        """Send a reply still awaited for ``request_id`` to ``handler`` instead."""
        if request_id in self._waiting:
            self._waiting[request_id] = handler

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reader.cancel()
            self._watcher.cancel()
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)


def _log_send_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("send failed: %s", future.exception())


_Key = tuple[str, str | None, CurveKeys | None]
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[_Key, Connection]] = (
    weakref.WeakKeyDictionary()
)


def connection(
    address: str, token: str | None = None, curve: CurveKeys | None = None
) -> Connection:
    """The shared connection to ``address`` for the running loop."""
    loop = asyncio.get_running_loop()
    conns = _by_loop.setdefault(loop, {})
    conn = conns.get((address, token, curve))
    if conn is None or conn.closed:
        conn = Connection(address, token, curve)
        conns[(address, token, curve)] = conn
    return conn


def close_all() -> None:
    """Close the running loop's connections (a session does this when it closes)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    for conn in _by_loop.pop(loop, {}).values():
        conn.close()
