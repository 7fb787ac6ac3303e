"""A small HTTP/1.1 GET server on the daemon's own event loop, for ``/metrics`` (and
the scheduler's dashboard). On the loop, not in a thread: what it reads (the
scheduler's tables, the agent's sandboxes) is only ever touched by the loop, so a
scrape sees one consistent state and needs no lock.

Deliberately minimal: GET (and HEAD) only, one request per connection, a bounded
request head read within a deadline; every other request gets a plain error status.
A handler that raises answers 500; the server itself never stops for a bad request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

__all__ = ["HttpServer", "Request", "Response", "format_url", "is_loopback"]

log = logging.getLogger("aviato.http")

#: A request head (request line and headers) larger than this is refused.
MAX_HEAD_BYTES = 16 * 1024
#: A client must send its whole request head within this.
HEAD_SECONDS = 10.0
#: A response body (not a stream) must be written within this.
WRITE_SECONDS = 30.0

_REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    #: A body sent as it is made (server-sent events): the connection stays open
    #: until it ends or the client goes away.
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]


def format_url(host: str, port: int, path: str = "/") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


class HttpServer:
    """Routes exact paths (and path prefixes ending in ``/``) to handlers."""

    def __init__(self, routes: dict[str, Handler], what: str) -> None:
        self.routes = routes
        self.what = what
        self.port = 0
        self.host = ""
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        sock = self._server.sockets[0]
        self.host, self.port = host, sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def url(self, path: str = "/") -> str:
        return format_url(self.host, self.port, path)

    def _route(self, path: str) -> Handler | None:
        found = self.routes.get(path)
        if found is not None:
            return found
        for prefix, handler in self.routes.items():
            if prefix.endswith("/") and prefix != "/" and path.startswith(prefix):
                return handler
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or was too slow: nothing to tell it
        except asyncio.CancelledError:
            pass
        except Exception:  # never the server's end
            log.exception("%s: HTTP request failed", self.what)
        finally:
            self._conns.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._write(writer, "GET", Response(431, b"request head too large\n"))
            return
        if len(head) > MAX_HEAD_BYTES:
            await self._write(writer, "GET", Response(431, b"request head too large\n"))
            return
        request = _parse_head(head)
        if request is None:
            await self._write(writer, "GET", Response(400, b"bad request\n"))
            return
        if request.method not in ("GET", "HEAD"):
            response = Response(405, b"only GET is served\n", headers={"Allow": "GET, HEAD"})
            await self._write(writer, request.method, response)
            return
        handler = self._route(request.path)
        if handler is None:
            await self._write(writer, request.method, Response(404, b"not found\n"))
            return
        try:
            response = await handler(request)
        except Exception:
            log.exception("%s: handler for %s failed", self.what, request.path)
            response = Response(500, b"internal error (see the daemon's log)\n")
        await self._write(writer, request.method, response)

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, method: str, response: Response) -> None:
        reason = _REASONS.get(response.status, "")
        headers = {
            "Content-Type": response.content_type,
            "Connection": "close",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            **response.headers,
        }
        if response.stream is None:
            headers["Content-Length"] = str(len(response.body))
        lines = [f"HTTP/1.1 {response.status} {reason}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method == "HEAD":
            await writer.drain()
            return
        if response.stream is None:
            writer.write(response.body)
            async with asyncio.timeout(WRITE_SECONDS):
                await writer.drain()
            return
        try:
            async for chunk in response.stream:
                writer.write(chunk)
                async with asyncio.timeout(WRITE_SECONDS):
                    await writer.drain()  # a reader that stops reading is dropped
        finally:
            aclose = getattr(response.stream, "aclose", None)
            if aclose is not None:
                await aclose()


def _parse_head(head: bytes) -> Request | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _ = parts
    if not target.startswith("/"):
        return None
    url = urlsplit(target)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return Request(method, url.path, parse_qs(url.query), headers)
