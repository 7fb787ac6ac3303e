"""The scheduler's web dashboard (``--dashboard HOST:PORT``): static pages shipped in
``static/`` (no build step, nothing fetched from the internet), a JSON API, and
server-sent events for live updates, served on the scheduler's own loop.

Access: loopback by default; with a cluster token or CURVE keys configured, every
request needs the login token the scheduler prints (``?login=...`` once; a cookie
then); a public address is announced loudly."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import zmq.asyncio

from aviato._server.http import HttpServer, Request, Response, is_loopback
from aviato.exceptions import AddressInUseError
from aviato.protocol import PoolFigures
from scheduler.dashboard.agents import AgentAsker, Extras
from scheduler.dashboard.logs import LogSource, delta
from scheduler.dashboard.views import StateView, View
from scheduler.state import SchedulerState

__all__ = ["Dashboard"]

log = logging.getLogger("aviato.dashboard")

STATIC = Path(__file__).parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
COOKIE = "aviato_dashboard"
#: Seconds between the live snapshots a page receives, and between log reads.
SNAPSHOT_SECONDS = 0.5
LOG_SECONDS = 1.0
#: A stream sends a comment at least this often (proxies drop silent connections).
KEEPALIVE_SECONDS = 15.0


def _json(value: Any, status: int = 200) -> Response:
    body = json.dumps(value, separators=(",", ":")).encode()
    return Response(status, body, "application/json")


def _event(name: str, value: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(value, separators=(',', ':'))}\n\n".encode()


class Dashboard:
    """The web dashboard over a ``View``: the scheduler's own state (``state=``, in
    ``python -m scheduler --dashboard``) or a running scheduler's (``view=``, as
    ``aviato dashboard`` serves it: see scheduler/dashboard/__main__.py)."""

    def __init__(
        self,
        state: SchedulerState | None = None,
        *,
        token: str | None,
        curve: bool,
        totals: Callable[[], tuple[int, int]] = lambda: (0, 0),
        pools: Mapping[str, tuple[PoolFigures, ...]] | None = None,
        view: View | None = None,
        who: str = "the scheduler",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if view is None:
            assert state is not None, "a dashboard needs the scheduler's state or a view"
            view = StateView(state, totals, pools if pools is not None else {}, clock)
        self.view: View = view
        self.clock = clock
        self.token = token
        self.who = who
        #: None: open (no credentials configured on the cluster).
        self.login = secrets.token_urlsafe(18) if (token or curve) else None
        self._ctx = zmq.asyncio.Context()
        self.logs = LogSource(self._ctx, token, curve)
        self.agents = AgentAsker(self._ctx, token, curve)
        #: Pages open (event streams): agents are asked for the rows' extras only then.
        self._watchers = 0
        self.extras = Extras(self.agents, self._busy_agents, lambda: self._watchers > 0)
        self._extras: asyncio.Task[None] | None = None
        self._assets = {p.name: p.read_bytes() for p in STATIC.iterdir() if p.suffix in _TYPES}
        self._snapshot: tuple[float, bytes] = (float("-inf"), b"")
        self._stop = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.http = HttpServer(
            {
                "/": self._index,
                "/static/": self._static,
                "/api/cluster": self._api_cluster,
                "/api/sandboxes": self._api_sandboxes,
                "/api/sandbox/": self._api_sandbox,
                "/api/events": self._api_events,
                "/api/logs/": self._api_logs,
                "/api/execs/": self._api_execs,
            },
            "dashboard",
        )

    async def start(self, host: str, port: int) -> str:
        try:
            await self.http.start(host, port)
        except OSError as exc:
            raise AddressInUseError(
                f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}; pick "
                "another --dashboard HOST:PORT (port 0: any free one)"
            ) from None
        self._sampler = asyncio.get_running_loop().create_task(self.view.run(self._stop))
        self._extras = asyncio.get_running_loop().create_task(self.extras.run(self._stop))
        url = self.http.url("/")
        shown = f"{url}?login={self.login}" if self.login else url
        # Printed whatever the log level: the operator opens this URL.
        print(f"aviato {self.who}: dashboard on {shown}", file=sys.stderr, flush=True)
        if not is_loopback(host):
            log.warning(
                "DASHBOARD ON A PUBLIC ADDRESS (%s): anyone who reaches it sees the cluster's "
                "state and sandbox logs%s; bind it to 127.0.0.1 and tunnel (ssh -L) instead",
                url,
                "" if self.login else ", WITH NO LOGIN (the cluster has no token or keys)",
            )
        return url

    async def close(self) -> None:
        self._stop.set()
        for task in (self._sampler, self._extras):
            if task is not None:
                task.cancel()
        await self.http.close()
        self._ctx.destroy(linger=0)

    # ------------------------------------------------------------------ access

    def _allowed(self, request: Request) -> bool:
        if self.login is None:
            return True
        given = request.arg("login") or _cookie(request.headers.get("cookie", ""), COOKIE)
        if not given:
            return False
        ok = hmac.compare_digest(given.encode(), self.login.encode())
        if not ok and self.token:
            ok = hmac.compare_digest(given.encode(), self.token.encode())
        return ok

    def _refused(self) -> Response:
        body = (
            b"This dashboard needs its login token: open the URL it printed "
            b"('dashboard on http://...?login=...').\n"
        )
        return Response(401, body)

    # ------------------------------------------------------------------ pages

    async def _index(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        if request.arg("login"):
            # Into a cookie, and off the address bar (and out of the browser's history).
            cookie = f"{COOKIE}={request.arg('login')}; HttpOnly; SameSite=Strict; Path=/"
            return Response(302, b"", headers={"Location": "/", "Set-Cookie": cookie})
        return Response(200, self._assets["index.html"], _TYPES[".html"])

    async def _static(self, request: Request) -> Response:
        name = request.path.removeprefix("/static/")
        body = self._assets.get(name)
        if body is None or "/" in name:
            return Response(404, b"not found\n")
        return Response(200, body, _TYPES[Path(name).suffix])

    # ------------------------------------------------------------------ API

    def _snapshot_bytes(self) -> bytes:
        """The page's whole view, made at most once per half-period for all pages."""
        now = self.clock()
        made, body = self._snapshot
        if now - made < SNAPSHOT_SECONDS / 2:
            return body
        view = {
            "cluster": self.view.cluster(),
            "sandboxes": self.extras.add_to(self.view.sandboxes()),
        }
        body = _event("snapshot", view)
        self._snapshot = (now, body)
        return body

    async def _api_cluster(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        return _json(self.view.cluster())

    async def _api_sandboxes(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        return _json(self.extras.add_to(self.view.sandboxes()))

    async def _api_sandbox(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        try:
            row = await self.view.sandbox(request.path.removeprefix("/api/sandbox/"))
        except RuntimeError as exc:  # a remote scheduler did not answer
            return _json({"error": str(exc)}, 503)
        if row is None:
            return _json({"error": "no such sandbox (or it ended long ago)"}, 404)
        return _json(row)

    async def _api_events(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        return Response(200, content_type="text/event-stream", stream=self._events())

    async def _events(self) -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        last = b""
        quiet = 0.0
        self._watchers += 1
        try:
            while not self._stop.is_set():
                body = self._snapshot_bytes()
                if body != last or quiet >= KEEPALIVE_SECONDS:
                    yield body
                    last, quiet = body, 0.0
                await asyncio.sleep(SNAPSHOT_SECONDS)
                quiet += SNAPSHOT_SECONDS
        finally:
            self._watchers -= 1

    def _busy_agents(self) -> list[str]:
        """The data-plane addresses of the live agents that run sandboxes."""
        agents = self.view.cluster().get("agents") or []
        return [str(a["address"]) for a in agents if a.get("state") == "alive" and a.get("used")]

    async def _api_logs(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        sandbox_id = request.path.removeprefix("/api/logs/")
        try:
            known = await self.view.sandbox(sandbox_id) is not None
        except RuntimeError as exc:
            return _json({"error": str(exc)}, 503)
        if not known:
            return _json({"error": "no such sandbox (or it ended long ago)"}, 404)
        return Response(200, content_type="text/event-stream", stream=self._logs(sandbox_id))

    async def _logs(self, sandbox_id: str) -> AsyncIterator[bytes]:
        """The sandbox's output as it grows, while it is listed and its agent answers."""
        yield b"retry: 2000\n\n"
        shown = ""
        problem = ""
        while not self._stop.is_set():
            address = await self.view.agent_address(sandbox_id)
            if address is None:
                yield _event("error", {"message": "the sandbox or its agent is gone"})
                return
            try:
                text = await self.logs.read(address, sandbox_id)
            except Exception as exc:  # the page says why; the stream goes on trying
                if str(exc) != problem:
                    problem = str(exc)
                    yield _event("error", {"message": problem})
            else:
                problem = ""
                reset, more = delta(shown, text)
                if reset or more:
                    yield _event("logs", {"reset": reset, "text": more})
                    shown = text
            await asyncio.sleep(LOG_SECONDS)

    async def _api_execs(self, request: Request) -> Response:
        if not self._allowed(request):
            return self._refused()
        sandbox_id = request.path.removeprefix("/api/execs/")
        try:
            known = await self.view.sandbox(sandbox_id) is not None
        except RuntimeError as exc:
            return _json({"error": str(exc)}, 503)
        if not known:
            return _json({"error": "no such sandbox (or it ended long ago)"}, 404)
        return Response(200, content_type="text/event-stream", stream=self._execs(sandbox_id))

    async def _execs(self, sandbox_id: str) -> AsyncIterator[bytes]:
        """The sandbox's last exec results (its agent keeps a few), when they change."""
        yield b"retry: 2000\n\n"
        shown: object = None
        problem = ""
        while not self._stop.is_set():
            address = await self.view.agent_address(sandbox_id)
            if address is None:
                yield _event("error", {"message": "the sandbox or its agent is gone"})
                return
            try:
                results = await self.agents.exec_results(address, sandbox_id)
            except Exception as exc:  # the page says why; the stream goes on trying
                if str(exc) != problem:
                    problem = str(exc)
                    yield _event("error", {"message": problem})
            else:
                problem = ""
                if results != shown:
                    yield _event("execs", results)
                    shown = results
            await asyncio.sleep(LOG_SECONDS)


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""
