"""Prometheus ``/metrics`` for both daemons: the ``--metrics`` flag, and the endpoint
that serves a registry (prometheus_client's text format, never written by hand).

Label sets stay bounded: per-agent series only for the agents the scheduler lists
(dead ones are forgotten after --forget-dead-after), per-sandbox series only for the
sandboxes running now (read at scrape time, so a gone sandbox has no series)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aviato._server.http import HttpServer, Request, Response, is_loopback, parse_listen
from aviato.exceptions import AddressInUseError, ConfigurationError

__all__ = ["LATENCY_BUCKETS", "MetricsEndpoint", "add_metrics", "metrics_address"]

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


def metrics_address(value: str) -> tuple[str, int] | None:
    """argparse ``type=`` for ``--metrics``."""
    try:
        return parse_listen(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_metrics(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--metrics HOST:PORT`` (default off; a bare PORT is on loopback)."""
    kwargs.setdefault("default", None)
    kwargs.setdefault(
        "help",
        "serve Prometheus metrics at http://HOST:PORT/metrics (PORT alone: on loopback; "
        "port 0: any free one; default: none, off)",
    )
    p.add_argument("--metrics", type=metrics_address, **kwargs)


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
        # Printed for whoever started us (``aviato up`` reads this line).
        log.info("%s: metrics on %s", self.what, url)
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
