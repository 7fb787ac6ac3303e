"""Published ports as the Docker engine sees them: the address to publish on, and
the host ports it chose (from a container's inspect)."""

from __future__ import annotations

import ipaddress
from typing import Any

__all__ = ["publish_ip", "published"]


def publish_ip(host: str) -> str:
    """The address to publish on: ``host`` when it is an IP, else all of the host's (the
    engine binds addresses, not names)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host


def published(attrs: dict[str, Any]) -> dict[int, int]:
    """In-container TCP port -> its host port, from ``inspect_container``."""
    out: dict[int, int] = {}
    for key, bindings in (attrs["NetworkSettings"].get("Ports") or {}).items():
        port, _, proto = key.partition("/")
        if proto == "tcp" and bindings:
            out[int(port)] = int(bindings[0]["HostPort"])
    return out
