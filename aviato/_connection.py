"""Connections to a daemon: request ids mapped to futures (or handlers), replies routed
by id. :class:`Connection` is a ZeroMQ DEALER with a reader task; :class:`LaneConnection`
is an agent's local lane, a Unix socket for a client on the agent's host (see
aviato/_lane.py). Both are a :class:`Channel`.

Channels belong to one event loop and to one owner, a :class:`Connections`: a
session's (closed with it), or the loop's default one for sandboxes made outside any
session. It hands out one channel per address, so that concurrent requests share a
socket and a reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import socket
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from aviato import _zmq
from aviato._auth import CurveKeys, handshake_refusal
from aviato._errors import to_exception
from aviato._lane import FramedSocket, connect_unix, local_path
from aviato._tasks import TaskGroup
from aviato.exceptions import (
    AviatoError,
    ClusterUnavailableError,
    PayloadTooLargeError,
    SandboxNotRunningError,
    UnauthorizedError,
)
from aviato.protocol import (
    MAX_FRAME_BYTES,
    MAX_PAYLOAD_BYTES,
    Cancel,
    Decoded,
    DecodeError,
    ErrorCode,
    ErrorReply,
    Frame,
    Message,
    Payload,
    Ping,
    SandboxInfo,
    decode,
    encode,
    payload_size,
)

__all__ = [
    "FIRST_CONTACT_SECONDS",
    "Channel",
    "Connection",
    "Connections",
    "LaneConnection",
    "agent_connection",
    "close_all",
    "connection",
    "default_connections",
    "nothing_answers",
]


if TYPE_CHECKING:
    from aviato._defaults import SandboxDefaults

log = logging.getLogger("aviato.connection")
_ids = itertools.count(1)
_CTX: zmq.asyncio.Context | None = None


def _context() -> zmq.asyncio.Context:
    global _CTX
    if _CTX is None:
        _CTX = zmq.asyncio.Context()
    return _CTX


#: What a connection watches: a daemon refusing our credentials, and whether anything
#: ever accepted our TCP connection (see ``first_contact``).
_WATCHED_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: How long a first contact with a scheduler may find nothing listening before its
#: requests fail (an address that never answered, not a daemon restarting).
FIRST_CONTACT_SECONDS = 2.0
#: Handshakes a CURVE server ended without a word, in a row, before we call it a
#: refusal: the server cannot read our hello (keys made for another cluster). One
#: alone may be a daemon going down mid-handshake; they come ~0.15 s apart.
_SILENT_REFUSALS = 3
#: Addresses that accepted a connection from this process: they are never "nothing
#: listens", only down for a while (a restart), and get the full deadline.
_answered: set[str] = set()


def nothing_answers(address: str, resolves: bool) -> str:
    """What a user reads when nothing ever accepted a connection at ``address``."""
    host = _zmq.endpoint_host(address)
    if not resolves:
        return (
            f"cannot reach a scheduler at {address}: the host name {host!r} does not "
            "resolve; check --scheduler / $AVIATO_SCHEDULER"
        )
    return (
        f"nothing answers at {address}: no aviato scheduler is listening there. Start one "
        "with `aviato up` (then export AVIATO_SCHEDULER=tcp://127.0.0.1:5555), or fix "
        "--scheduler / $AVIATO_SCHEDULER"
    )


class Channel:
    """Requests to one daemon and their replies, whatever carries them."""

    def __init__(
        self, address: str, token: str | None = None, curve: CurveKeys | None = None
    ) -> None:
        self.address = address
        self.token = token
        self.curve = curve
        #: Why the daemon refused our handshake, until one succeeds ("" otherwise).
        self.refused = ""
        #: Why requests fail at once: nothing ever listened at the address ("" otherwise).
        self.unreachable = ""
        # request id -> what to do with each reply to it (a future, a queue, a pool)
        self._waiting: dict[int, Callable[[Decoded], None]] = {}
        self.closed = False

    # ------------------------------------------------------------------ transport

    async def _transmit(self, frames: list[Frame], size: int) -> None:
        raise NotImplementedError

    def _transmit_nowait(self, request_id: int, frames: list[Frame], size: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _route(self, frames: Sequence[Any]) -> None:
        try:
            decoded = decode(frames)
        except DecodeError:
            return  # nothing to route it to; the request's deadline will fire
        handler = self._waiting.get(decoded.request_id)
        if handler is not None:
            handler(decoded)

    # ------------------------------------------------------------------ requests

    def _check_reachable(self) -> None:
        """After a first contact that found nothing listening, a new request tries
        again (the daemon may have come up since): see ``_contact_again``. A refused
        handshake stands until one succeeds: fail now, not at the deadline (after a
        protocol error ZeroMQ never reconnects, so nothing would ever come)."""
        if self.refused:
            raise UnauthorizedError(self.refused)
        if self.unreachable:
            self._contact_again()

    def _contact_again(self) -> None:
        raise ClusterUnavailableError(self.unreachable)

    def _fail_waiting(self, reply: ErrorReply) -> None:
        for request_id, handler in list(self._waiting.items()):
            handler(Decoded(reply, request_id))

    def _fail_one(self, request_id: int, why: str, code: ErrorCode = ErrorCode.UNAVAILABLE) -> None:
        """A request whose frames never left: its handler hears so as a reply."""
        handler = self._waiting.get(request_id)
        if handler is not None:
            handler(Decoded(ErrorReply(code, why), request_id))

    def _no_answer(self, what: str) -> Exception:
        if self.refused:
            return UnauthorizedError(self.refused)
        hint = (
            "check that this client's key is one the cluster knows (AVIATO_KEYS, AVIATO_CLIENT_KEY)"
            if self.curve is not None
            else "is it running and reachable? (if the cluster uses keys, set AVIATO_KEYS)"
        )
        return ClusterUnavailableError(f"{what}; {hint}")

    def _frames(
        self, request_id: int, msg: Message, payloads: Sequence[Payload], hint: str
    ) -> tuple[list[Frame], int]:
        size = payload_size(payloads)
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadTooLargeError(
                f"{type(msg).__name__} carries {size} bytes, above the {MAX_PAYLOAD_BYTES}-byte "
                f"limit; {hint}"
            )
        return encode(msg, request_id, payloads, token=self.token), size

    async def _send(self, request_id: int, msg: Message, payloads: Sequence[Payload]) -> None:
        frames, size = self._frames(request_id, msg, payloads, "split the data into smaller pieces")
        await self._transmit(frames, size)

    def _abandon(self, request_id: int) -> None:
        """Tell an agent we gave up on ``request_id``: it stops the work at its source
        (kills the command, stops reading) instead of finishing it for nobody."""
        with contextlib.suppress(Exception):
            self._transmit_nowait(request_id, encode(Cancel(), request_id, token=self.token), 0)

    async def request(
        self,
        msg: Message,
        payloads: Sequence[Payload] = (),
        *,
        timeout: float,
        cancel_at_source: bool = False,
    ) -> Decoded:
        """Send ``msg`` and return its reply; error replies raise their exception.
        ``cancel_at_source``: if we leave without the reply (cancelled, timed out), the
        agent is told to stop the request."""
        self._check_reachable()
        request_id = next(_ids)
        queue: asyncio.Queue[Decoded] = asyncio.Queue()
        self._waiting[request_id] = queue.put_nowait
        sent = answered = False
        try:
            try:
                async with asyncio.timeout(timeout):  # a send can wait too (no peer yet)
                    await self._send(request_id, msg, payloads)
                    sent = True
                    reply = await queue.get()
                    answered = True
            except TimeoutError:
                raise self._no_answer(
                    f"no answer from {self.address} to {type(msg).__name__} within {timeout:g}s"
                ) from None
        finally:
            del self._waiting[request_id]
            if cancel_at_source and sent and not answered:
                self._abandon(request_id)
        if isinstance(reply.msg, ErrorReply):
            raise to_exception(reply.msg)
        return reply

    async def request_probed(
        self, msg: Message, payloads: Sequence[Payload] = (), *, timeout: float, probe: float
    ) -> Decoded:
        """``request`` for a reply that may rightly take long (a create queued for a
        slot): meanwhile the peer must answer a Ping every ``probe`` seconds, so a dead
        or restarted daemon is a prompt ``ClusterUnavailableError``, not a long hang."""
        # Owned by this call: awaited, or cancelled and awaited, before it returns.
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
            elif not main.cancelled():
                main.exception()  # we left another way (cancelled, a failed probe)

    async def stream(
        self,
        msg: Message,
        payloads: Sequence[Payload] = (),
        *,
        idle_timeout: float,
        is_last: type[Message],
        cancel_at_source: bool = False,
    ) -> AsyncIterator[Decoded]:
        """Send ``msg`` and yield replies until one of type ``is_last`` (or an error).
        ``cancel_at_source``: as for ``request``, when the consumer leaves before."""
        self._check_reachable()
        request_id = next(_ids)
        queue: asyncio.Queue[Decoded] = asyncio.Queue()
        self._waiting[request_id] = queue.put_nowait
        sent = ended = False
        try:
            try:
                async with asyncio.timeout(idle_timeout):  # a send can wait too (no peer yet)
                    await self._send(request_id, msg, payloads)
            except TimeoutError:
                raise self._no_answer(
                    f"{self.address} took no {type(msg).__name__} within {idle_timeout:g}s"
                ) from None
            sent = True
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
                    ended = True
                    raise to_exception(reply.msg)
                if isinstance(reply.msg, is_last):
                    ended = True
                yield reply
                if ended:
                    return
        finally:
            del self._waiting[request_id]
            if cancel_at_source and sent and not ended:
                self._abandon(request_id)

    def send_nowait(
        self, msg: Message, payloads: Sequence[Payload], handler: Callable[[Decoded], None]
    ) -> int:
        """Send without waiting; every reply to it goes to ``handler`` until ``forget``.

        For the function pool, which dispatches from plain callbacks: the frames are
        queued at once (ZeroMQ's high-water mark is far above what the pool keeps in
        flight; a lane queues without limit)."""
        request_id = next(_ids)
        frames, size = self._frames(
            request_id,
            msg,
            payloads,
            "pass smaller arguments (or write big data to a file in the sandbox)",
        )
        self._waiting[request_id] = handler
        self._transmit_nowait(request_id, frames, size)
        return request_id

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def redirect(self, request_id: int, handler: Callable[[Decoded], None]) -> None:
        """Send a reply still awaited for ``request_id`` to ``handler`` instead."""
        if request_id in self._waiting:
            self._waiting[request_id] = handler


class Connection(Channel):
    """A ZeroMQ DEALER to a daemon, with a reader task and a handshake watcher."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        curve: CurveKeys | None = None,
        first_contact: float | None = None,
    ) -> None:
        """``first_contact``: seconds after which, if nothing ever accepted a connection
        at ``address`` (in this process), requests fail with ``ClusterUnavailableError``
        instead of waiting out their deadline (for a scheduler: see ``nothing_answers``)."""
        super().__init__(address, token, curve)
        monitors: list[zmq.asyncio.Socket] = []

        def monitor(sock: zmq.asyncio.Socket) -> None:
            monitors.append(sock.get_monitor_socket(_WATCHED_EVENTS))

        self._sock = _zmq.dealer(_context(), address, curve, before_connect=monitor)
        self._monitor = monitors[0]
        #: Set while the daemon refuses our handshake: ends sends that wait for a peer.
        self._refusal = asyncio.Event()
        # Its tasks are its own: cancelled by close(); one that fails breaks it.
        self._tasks = TaskGroup(f"connection to {address}")
        self._tasks.spawn(self._read(), on_error=self._broken)
        self._tasks.spawn(self._watch(), on_error=self._broken)
        self._first_contact: asyncio.Task[None] | None = None
        self._first_contact_seconds = first_contact
        self._resolves = True  # until a look-up of the host's name fails
        if first_contact is not None and address not in _answered:
            self._first_contact = self._tasks.spawn(
                self._give_up_unless_reached(first_contact), on_error=self._broken
            )

    def _broken(self, exc: BaseException) -> None:
        """A task of ours failed (the socket is unusable): every waiting request fails
        now, and the owner's next request makes a new connection."""
        why = f"the connection to {self.address} broke: {exc!r}"
        log.warning("%s", why)
        self._fail_waiting(ErrorReply(ErrorCode.UNAVAILABLE, why))
        self.close()

    async def _read(self) -> None:
        frames = await self._sock.recv_multipart(copy=False)
        self._reached()  # (a connect's event may come after its reply)
        while True:
            self._route(frames)
            # Not held while the next one comes: a result of 100 MB would stay twice.
            del frames
            frames = await self._sock.recv_multipart(copy=False)

    def _reached(self) -> None:
        _answered.add(self.address)
        self.unreachable = ""

    async def _give_up_unless_reached(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + seconds
        try:  # meanwhile, learn which message to give
            async with asyncio.timeout(seconds):
                await loop.getaddrinfo(_zmq.endpoint_host(self.address), None)
        except (OSError, TimeoutError):
            self._resolves = False
        await asyncio.sleep(give_up_at - loop.time())
        if self.address not in _answered:
            self.unreachable = nothing_answers(self.address, self._resolves)
            self._fail_waiting(ErrorReply(ErrorCode.UNAVAILABLE, self.unreachable))

    def _contact_again(self) -> None:
        """A fresh first-contact window for this request, and a connect attempt now
        (ZeroMQ's reconnect backoff may have grown to seconds meanwhile)."""
        self.unreachable = ""
        self._resolves = True
        if self._first_contact_seconds is None or (
            self._first_contact is not None and not self._first_contact.done()
        ):
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(self.address)
            self._sock.connect(self.address)
        self._first_contact = self._tasks.spawn(
            self._give_up_unless_reached(self._first_contact_seconds), on_error=self._broken
        )

    def _no_answer(self, what: str) -> Exception:
        if not self.refused and self._first_contact is not None and self.address not in _answered:
            # A deadline shorter than the first-contact wait: the same, better, message.
            return ClusterUnavailableError(nothing_answers(self.address, self._resolves))
        return super()._no_answer(what)

    async def _watch(self) -> None:
        """A refused handshake (no key, an unknown key, another mechanism) would leave
        requests to time out in silence: fail them now with the reason."""
        silent = 0  # handshakes ended without a word, in a row
        while True:
            event = await recv_monitor_message(self._monitor)
            kind = event["event"]
            self._reached()  # each event we watch says something is there
            if kind == zmq.EVENT_CONNECTED:
                continue
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused = ""
                self._refusal.clear()
                silent = 0
                continue
            silent = silent + 1 if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL else 0
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and silent < _SILENT_REFUSALS:
                continue
            why = handshake_refusal(kind, event["value"], self.address, self.curve is not None)
            if not why:
                continue
            if why != self.refused:
                log.info("%s", why)  # the waiting requests raise it
            self.refused = why
            self._refusal.set()
            self._fail_waiting(ErrorReply(ErrorCode.UNAUTHORIZED, why))

    async def _transmit(self, frames: list[Frame], size: int) -> None:
        # (A pyzmq send is a future already, done when queued at once: no wrapping.)
        sending = asyncio.ensure_future(
            self._sock.send_multipart(frames, copy=size < _zmq.ZERO_COPY_BYTES)
        )
        if not sending.done():
            # No connection takes it yet. A refused handshake may be why: after a
            # protocol error (a client without keys) ZeroMQ drops the connection for
            # good, and the send would wait forever. The refusal ends the wait.
            refused = asyncio.ensure_future(self._refusal.wait())
            try:
                await asyncio.wait((sending, refused), return_when=asyncio.FIRST_COMPLETED)
            finally:
                refused.cancel()
                if not sending.done():
                    sending.cancel()
            if sending.cancelled():
                # Ended by the refusal, or by the socket closing under it (the session
                # closed): either way not our caller's cancellation.
                if self.refused:
                    raise UnauthorizedError(self.refused)
                raise ClusterUnavailableError(f"the connection to {self.address} closed")
        sending.result()

    def _transmit_nowait(self, request_id: int, frames: list[Frame], size: int) -> None:
        # Like a reply, the handler hears of a failure from the loop, not in this call.
        if self.closed:
            why = f"the connection to {self.address} is closed"
            asyncio.get_running_loop().call_soon(self._fail_one, request_id, why)
            return
        if self.refused:
            # After a refused handshake ZeroMQ may never connect again: the send
            # would wait forever (a pool's batch, with no call timeout, hung so).
            asyncio.get_running_loop().call_soon(
                self._fail_one, request_id, self.refused, ErrorCode.UNAUTHORIZED
            )
            return
        # A future of the socket's, not a task: it is done when the frames are queued.
        sent: asyncio.Future[Any] = self._sock.send_multipart(  # type: ignore[assignment]
            frames, copy=size < _zmq.ZERO_COPY_BYTES
        )
        sent.add_done_callback(functools.partial(self._sent, request_id))

    def _sent(self, request_id: int, sent: asyncio.Future[Any]) -> None:
        """A send that failed fails its request (the pool's call, a stop) at once."""
        if sent.cancelled():
            why = f"the connection to {self.address} was closed before sending"
        elif sent.exception() is not None:
            why = f"sending to {self.address} failed: {sent.exception()}"
        else:
            return
        self._fail_one(request_id, why)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._tasks.cancel()
            # Requests in flight fail now, not at their deadlines (24 h for an exec).
            why = f"the connection to {self.address} was closed"
            self._fail_waiting(ErrorReply(ErrorCode.UNAVAILABLE, why))
            with contextlib.suppress(zmq.ZMQError):  # (a socket that broke is closed)
                self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)


class LaneConnection(Channel):
    """An agent's data plane over its local lane. Sends go straight to the socket, and
    replies are handled in the loop's reader callback: no task, no I/O thread."""

    def __init__(self, address: str, path: str, sock: socket.socket, token: str | None) -> None:
        super().__init__(address, token)
        self.path = path
        self._lane = FramedSocket(
            sock, self._route, self._lost, max_message=MAX_FRAME_BYTES, shm=True
        )
        #: Why the lane is gone, once it is.
        self._why: str | None = None

    def _lost(self, exc: BaseException | None) -> None:
        """The agent closed the lane (it exited, or was killed): every request still
        waiting fails now, not at its deadline (FramedSocket calls this from the loop,
        never from inside a send)."""
        self.closed = True
        why = f"the agent at {self.address} closed its local connection"
        self._why = f"{why}: {exc}" if exc is not None else why
        self._fail_waiting(ErrorReply(ErrorCode.UNAVAILABLE, self._why))

    async def _transmit(self, frames: list[Frame], size: int) -> None:
        if not self._lane.send(frames):
            self.closed = True
            raise ClusterUnavailableError(
                f"the local connection to the agent at {self.address} is closed"
            )

    def _transmit_nowait(self, request_id: int, frames: list[Frame], size: int) -> None:
        if not self._lane.send(frames):
            self.closed = True
            if self._why is not None:
                # Lost earlier: no _lost() is on its way to fail this one. Like a reply,
                # the handler hears of it from the loop, not from inside this call.
                why = self._why
                asyncio.get_running_loop().call_soon(self._fail_one, request_id, why)

    def close(self) -> None:
        self.closed = True
        if self._why is None:
            self._why = "the connection was closed"
            self._fail_waiting(ErrorReply(ErrorCode.UNAVAILABLE, self._why))
        self._lane.close()


_Key = tuple[str, str | None, CurveKeys | None, str]


class Connections:
    """The channels of one owner: a session's (closed when it closes), or the running
    loop's default owner's (:func:`default_connections`), for sandboxes made outside
    any session. One channel per (address, token, keys, lane), shared by concurrent
    requests.

    Owned, not one process-wide cache: closing a session once closed every channel of
    its loop, and another session on the loop lost its requests in flight and its
    function workers' channels."""

    def __init__(self, name: str = "connections") -> None:
        self.name = name
        self._channels: dict[_Key, Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def __repr__(self) -> str:
        return f"<Connections {self.name} channels={len(self._channels)}>"

    def get(
        self,
        address: str,
        token: str | None = None,
        curve: CurveKeys | None = None,
        lane: str = "",
        first_contact: float | None = None,
    ) -> Channel:
        """The channel to ``address``: over ``lane`` (an agent's local lane) when it is
        on this host and lets us in, else ZeroMQ (``first_contact``: see
        :class:`Connection`)."""
        if self.closed:
            raise RuntimeError(f"{self.name} are closed")
        loop = asyncio.get_running_loop()
        _forget_ended_loops()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(
                    f"{self.name} belong to another event loop: use a session (and its "
                    "sandboxes) on the loop that opened it"
                )
            self._loop = loop
            _open.setdefault(loop, set()).add(self)
        key = (address, token, curve, lane)  # (lane: "" when it is not to be used)
        conn = self._channels.get(key)
        if conn is None or conn.closed:
            conn = _lane_connection(address, lane, token) or Connection(
                address, token, curve, first_contact
            )
            self._channels[key] = conn
        return conn

    def close(self) -> None:
        """Close every channel (requests still waiting on them fail at once)."""
        self.closed = True
        if self._loop is not None:
            _open.get(self._loop, set()).discard(self)
        channels, self._channels = list(self._channels.values()), {}
        for conn in channels:
            conn.close()


#: The open owners of each loop: ``_forget_ended_loops`` closes those of ended loops
#: (their values hold their loops, so the entries go only when popped there).
_open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[Connections]] = (
    weakref.WeakKeyDictionary()
)
_default: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Connections] = (
    weakref.WeakKeyDictionary()
)


def default_connections() -> Connections:
    """The running loop's default owner: for sandboxes made outside any session
    (``Sandbox(...)``, ``Sandbox.from_id``, ``Sandbox.list``) and the CLI."""
    loop = asyncio.get_running_loop()
    conns = _default.get(loop)
    if conns is None or conns.closed:
        conns = _default[loop] = Connections("the default connections")
    return conns


def connection(
    address: str,
    token: str | None = None,
    curve: CurveKeys | None = None,
    lane: str = "",
    first_contact: float | None = None,
) -> Channel:
    """The default owner's channel to ``address`` (see :meth:`Connections.get`)."""
    return default_connections().get(address, token, curve, lane, first_contact)


def _lane_connection(address: str, lane: str, token: str | None) -> LaneConnection | None:
    path = local_path(lane) if lane else None
    if path is None:
        return None
    try:
        sock = connect_unix(path)
    except OSError as exc:  # not ours (another user's agent), or just gone
        log.debug("not using the local lane %s: %s", path, exc)
        return None
    return LaneConnection(address, path, sock, token)


def agent_connection(
    info: SandboxInfo, defaults: SandboxDefaults, conns: Connections | None = None
) -> Channel:
    """The channel to the agent running ``info``'s sandbox, of ``conns`` (by default
    the loop's default owner)."""
    if info.agent_address is None:
        raise SandboxNotRunningError(
            f"sandbox {info.sandbox_id} has no agent ({info.status.value}: {info.reason})",
            sandbox_id=info.sandbox_id,
        )
    return (conns or default_connections()).get(
        info.agent_address,
        defaults.cluster_token(),
        defaults.agent_curve(info),
        info.agent_lane if defaults.lane_enabled() else "",
    )


def _forget_ended_loops() -> None:
    """Close the connections of loops that have ended (``asyncio.run`` returned) that
    no one closed (a session left open, the default owner): their sockets stayed open
    for the life of the process (4 descriptors a loop; a long test run then ran out of
    ZeroMQ sockets)."""
    for ended in [loop for loop in _open if loop.is_closed()]:
        _default.pop(ended, None)
        for conns in list(_open.pop(ended)):
            for conn in list(conns._channels.values()):
                with contextlib.suppress(Exception):  # its tasks ended with their loop
                    conn.close()
            conns._channels.clear()


def close_all() -> None:
    """Close the running loop's default connections (those of sandboxes made outside
    any session; a session closes its own)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    conns = _default.pop(loop, None)
    if conns is not None:
        conns.close()
