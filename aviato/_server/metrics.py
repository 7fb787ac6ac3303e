"""Prometheus ``/metrics`` for both daemons: the ``--metrics`` flag, and the endpoint
that serves a registry (prometheus_client's text format, never written by hand).

Label sets stay bounded: per-agent series only for the agents the scheduler lists
(dead ones are forgotten after --forget-dead-after), per-sandbox series only for the
sandboxes running now (read at scrape time, so a gone sandbox has no series)."""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aviato._server.http import HttpServer, Request, Response, is_loopback
from aviato.exceptions import AddressInUseError

__all__ = ["LATENCY_BUCKETS", "MetricsEndpoint"]

#: Seconds: from a millisecond (a placement, a spare) to two minutes (an image pull).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)


class MetricsEndpoint:
    """Serves ``registry`` at ``/metrics`` (anything else: 404)."""

    def __init__(self, registry: CollectorRegistry, what: str) -> None:
        self.registry = registry
        self.what = what
        self.http = HttpServer({"/metrics": self._metrics}, what)

    async def start(self, host: str, port: int, log: logging.Logger) -> str:
        try:
            await self.http.start(host, port)
        except OSError as exc:
            raise AddressInUseError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}; pick another "
                "--metrics HOST:PORT (port 0: any free one) or --metrics none"
            ) from None
        url = self.http.url("/metrics")
        # Printed whatever the log level: whoever started us (``aviato up``) reads it.
        print(f"aviato {self.what}: metrics on {url}", file=sys.stderr, flush=True)
        if not is_loopback(host):
            log.warning(
                "%s: metrics are served on a public address (%s): anyone who reaches it "
                "sees the cluster's state (never user data); bind to 127.0.0.1 unless "
                "your Prometheus scrapes from another host",
                self.what,
                url,
            )
        return url

    async def close(self) -> None:
        await self.http.close()

    async def _metrics(self, request: Request) -> Response:
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
