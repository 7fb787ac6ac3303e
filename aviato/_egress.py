"""Egress allow-lists (``network_allow``): what each entry means, and why one is wrong.

An entry is an IPv4 address or CIDR, or a host name, with an optional ``:port``::

    network_allow=["10.1.2.0/24", "pypi-mirror.internal:443", "192.0.2.7:53"]

A sandbox with an allow-list reaches those destinations (on that port, TCP and UDP,
when one is given) and nothing else: DNS too is dropped unless its server is listed.
Host names are resolved once, by the agent, when the sandbox is made.

Standard library only: the client checks entries before sending, the scheduler checks
every spec it receives, the agent turns them into rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aviato._codec import brief

__all__ = ["Allowed", "allow_problems", "parse_allowed"]

#: A DNS name: labels of letters, digits and hyphens (RFC 1123), dot-separated.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")
#: More entries than any sensible list: each is a rule in the sandbox's netns.
MAX_ENTRIES = 256


@dataclass(frozen=True, slots=True)
class Allowed:
    """One entry: a network (an address is a /32) or a host name, and a port or None
    (every port)."""

    network: ipaddress.IPv4Network | None
    host: str | None
    port: int | None


def parse_allowed(entry: str) -> Allowed:
    """The meaning of one entry; ``ValueError`` says why it has none."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"an entry must be a non-empty string, got {brief(entry)}")
    target, port = entry.strip(), None
    if target.count(":") == 1:  # IPv6 (more colons) is refused below, not split
        target, _, port_text = target.partition(":")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{entry!r}: the port must be 1-65535")
        port = int(port_text)
    try:
        network = ipaddress.ip_network(target, strict=False)
    except ValueError:
        if ":" in target:
            raise ValueError(f"{entry!r}: only IPv4 addresses and networks are supported") from None
        if not _HOST.match(target) or target.replace(".", "").isdigit():
            raise ValueError(f"{entry!r} is neither an IPv4 address/CIDR nor a host name") from None
        return Allowed(None, target.rstrip(".").lower(), port)
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"{entry!r}: only IPv4 addresses and networks are supported")
    return Allowed(network, None, port)


def allow_problems(allow: Sequence[str] | None, network: str | None) -> list[str]:
    """Why ``network_allow`` cannot be honoured with ``network`` (none: it can)."""
    if allow is None:
        return []
    if isinstance(allow, str):
        return [f"network_allow must be a list of entries, got the string {allow!r}"]
    out = []
    if network in ("none", "internal"):
        out.append(
            f"network_allow needs a network to allow into, and network={network!r} has"
            " none: leave network unset (or 'bridge')"
        )
    if len(allow) > MAX_ENTRIES:
        out.append(f"network_allow has {len(allow)} entries: at most {MAX_ENTRIES}")
    for entry in allow:
        try:
            parse_allowed(entry)
        except ValueError as exc:
            out.append(f"network_allow: {exc}")
    return out
