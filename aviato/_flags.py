"""Command-line flags that ``aviato`` and the daemons (``python -m scheduler``,
``python -m agent``) spell alike: each is defined here once, with its type and the
environment variable it defaults to."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from aviato._zmq import check_endpoint
from aviato.exceptions import ConfigurationError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "RUNTIMES",
    "add_keys",
    "add_log_format",
    "add_log_level",
    "add_metrics",
    "add_token",
    "default_slots",
    "endpoint",
    "log_level",
    "metrics_address",
    "parse_listen",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The agent's sandbox runtimes (auto: Docker if it answers, else local).
RUNTIMES = ("docker", "local", "auto")


def log_level(value: str) -> str:
    """A ``--log-level`` value (any case) as logging's name; for argparse's ``type=``,
    which also applies it to a default read from $AVIATO_LOG_LEVEL."""
    name = value.strip().upper()
    if name == "WARN":
        name = "WARNING"
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {value!r}: use one of {', '.join(LOG_LEVELS)} (any case)"
        )
    return name


def endpoint(*, bind: bool) -> Callable[[str], str]:
    """argparse ``type=`` for an address flag: tcp://HOST:PORT, checked where the
    client's addresses are (aviato._zmq.check_endpoint)."""

    def parse(value: str) -> str:
        try:
            return check_endpoint(value, what="address", bind=bind)
        except ConfigurationError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def default_slots() -> int:
    """Sandboxes an agent runs at once unless told: max(8, 4 x cores)."""
    return max(8, 4 * (os.cpu_count() or 1))


def add_log_level(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--log-level`` (default $AVIATO_LOG_LEVEL, else INFO)."""
    kwargs.setdefault("default", os.environ.get("AVIATO_LOG_LEVEL", "INFO"))
    p.add_argument("--log-level", type=log_level, **kwargs)


#: ``--log-format`` values: a line of text per record, or a JSON object per record.
LOG_FORMATS = ("text", "json")


def add_log_format(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--log-format text|json`` (default $AVIATO_LOG_FORMAT, else text)."""
    kwargs.setdefault("default", os.environ.get("AVIATO_LOG_FORMAT", "text"))
    kwargs.setdefault(
        "help", "log lines as text, or one JSON object each for log shippers (default text)"
    )
    p.add_argument("--log-format", choices=LOG_FORMATS, **kwargs)


def add_keys(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--keys DIR``: the cluster's CURVE key directory (default $AVIATO_KEYS)."""
    kwargs.setdefault("default", os.environ.get("AVIATO_KEYS"))
    p.add_argument("--keys", **kwargs)


def add_token(p: argparse.ArgumentParser, **kwargs: Any) -> None:
    """``--token``: the shared secret every request carries (default $AVIATO_TOKEN)."""
    kwargs.setdefault("default", os.environ.get("AVIATO_TOKEN"))
    kwargs.setdefault("help", "shared secret every request must carry (default $AVIATO_TOKEN)")
    p.add_argument("--token", **kwargs)


def parse_listen(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int] | None:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback), or ``none`` (off) as
    (host, port); port 0 picks a free one. ConfigurationError with the fix."""
    text = value.strip()
    if text.lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigurationError(
            f"bad listen address {value!r}: use HOST:PORT (e.g. 127.0.0.1:9464), "
            "PORT (loopback), or none"
        )
    return host, int(port)


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
