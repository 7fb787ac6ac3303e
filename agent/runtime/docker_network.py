"""A Docker sandbox's network: ``network="none"``, ``network="internal"`` and egress
allow-lists (``network_allow``).

- ``internal``: one Docker network per (agent, session), ``internal=True`` (no route
  out of it) and with ``inhibit_ipv4`` (its bridge has no address on the host, so the
  host's own services, the agent's ports among them, are not reachable either). The
  session's sandboxes on this agent reach each other on it and nothing else. Its
  subnet is a random /24 of ``INTERNAL_POOL``, not one of the engine's default pools
  (about 30 networks in all, shared with everything else on the engine). The network
  is removed once no container of this agent is on it.
- ``network_allow``: the container joins the default bridge, and its own network
  namespace gets iptables rules (OUTPUT: loopback, replies, the allowed destinations,
  everything else refused) set by the agent through ``nsenter``. They live and die with
  the namespace, so nothing is left on the host, and the sandbox, with no
  CAP_NET_ADMIN, cannot change them. The container is created on the bridge, then
  disconnected before its start, so its namespace has only loopback until the rules
  are in; then the bridge is connected. Its command therefore starts with no network
  for a few milliseconds, never with an unfiltered one.

Each method runs on the Docker runtime's pool threads (they block on the engine).
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import subprocess
import threading
from collections.abc import Iterable
from typing import Any

import docker.errors

from agent.runtime.docker_errors import DockerError, explain, http_status
from agent.runtime.labels import LABEL_AGENT, LABEL_MANAGED, LABEL_SANDBOX, LABEL_SESSION
from aviato._egress import parse_allowed
from aviato.exceptions import SandboxFailedError
from aviato.protocol import SandboxSpec

__all__ = ["INTERNAL_POOL", "DockerNetworks", "egress_rules", "internal_name"]

#: Where internal networks' /24 subnets are picked (RFC 6598 shared space: not a
#: Docker default pool, rarely a LAN's).
INTERNAL_POOL = "100.64.0.0/10"
LABEL_NETWORK = "aviato.network"
SETUP_SECONDS = 30.0


def internal_name(agent_id: str, session_id: str) -> str:
    """The Docker network of ``session_id``'s internal sandboxes on ``agent_id``."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{agent_id}-{session_id}")
    return f"aviato-int-{clean}"[:200]


def egress_rules(allowed: Iterable[tuple[str, int | None]]) -> str:
    """The ``iptables-restore`` input for an allow-list of (CIDR, port or None):
    loopback, replies to connections made into the sandbox (published ports), the
    allowed destinations, and a refusal for the rest (a TCP reset, so a denied connect
    fails at once rather than timing out)."""
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT DROP [0:0]",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    for cidr, port in allowed:
        if port is None:
            lines.append(f"-A OUTPUT -d {cidr} -j ACCEPT")
        else:
            for proto in ("tcp", "udp"):
                lines.append(f"-A OUTPUT -d {cidr} -p {proto} --dport {port} -j ACCEPT")
    lines += [
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited",
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


#: IPv6 out of an allow-listed sandbox: loopback only (allow-lists are IPv4).
_EGRESS6 = "\n".join(
    [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT DROP [0:0]",
        "-A OUTPUT -o lo -j ACCEPT",
        "COMMIT",
        "",
    ]
)


def resolve_allowed(spec: SandboxSpec) -> list[tuple[str, int | None]]:
    """The allow-list as (CIDR, port) pairs: host names resolved now (IPv4), once."""
    out: list[tuple[str, int | None]] = []
    for entry in spec.network_allow or ():
        allowed = parse_allowed(entry)
        if allowed.network is not None:
            out.append((str(allowed.network), allowed.port))
            continue
        assert allowed.host is not None
        try:
            infos = socket.getaddrinfo(allowed.host, None, socket.AF_INET)
        except OSError as exc:
            raise SandboxFailedError(
                f"network_allow: host {allowed.host!r} does not resolve on the agent's host"
                f" ({exc}); give its address, or fix the agent host's DNS"
            ) from None
        for address in sorted({str(info[4][0]) for info in infos}):
            out.append((f"{address}/32", allowed.port))
    return out


class DockerNetworks:
    def __init__(self, api: Any) -> None:
        self._api = api  # a callable: the runtime builds its client lazily
        # Ensure + create_container, and empty-check + remove, exclude each other: a
        # network is never removed between a create finding it and using it.
        self._lock = threading.Lock()
        self._on: dict[str, str] = {}  # sandbox id -> its internal network
        self._swept: set[str] = set()  # agents whose left-over networks were removed

    def mode(self, spec: SandboxSpec, labels: dict[str, str]) -> str | None:
        """The container's network mode (None: the engine's default bridge)."""
        if spec.network == "none":
            return "none"
        if spec.network == "internal":
            session = spec.session_id or labels.get(LABEL_SANDBOX, "")
            return internal_name(labels.get(LABEL_AGENT, "agent"), session)
        return None

    def create_container(
        self, sandbox_id: str, spec: SandboxSpec, image: str, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """``create_container``, with the sandbox's internal network made first."""
        if spec.network != "internal":
            return dict(self._api().create_container(image, **kwargs))
        labels = kwargs["labels"]
        name = self.mode(spec, labels)
        assert name is not None
        agent = labels.get(LABEL_AGENT, "agent")
        if agent not in self._swept:  # once: networks an earlier run left
            self._swept.add(agent)
            self.sweep(agent)
        with self._lock:
            self._ensure(name, agent, labels.get(LABEL_SESSION, ""))
            out = dict(self._api().create_container(image, **kwargs))
            self._on[sandbox_id] = name
            return out

    def _ensure(self, name: str, agent: str, session: str) -> None:
        api = self._api()
        with contextlib.suppress(docker.errors.NotFound):
            api.inspect_network(name)
            return
        labels = {LABEL_MANAGED: "1", LABEL_AGENT: agent, LABEL_SESSION: session}
        labels[LABEL_NETWORK] = "internal"
        last = ""
        for _ in range(16):  # a random /24 may overlap one in use: pick another
            a, b = random.randrange(64, 128), random.randrange(256)
            pool = docker.types.IPAMPool(subnet=f"100.{a}.{b}.0/24")
            try:
                api.create_network(
                    name,
                    driver="bridge",
                    internal=True,
                    labels=labels,
                    ipam=docker.types.IPAMConfig(pool_configs=[pool]),
                    options={"com.docker.network.bridge.inhibit_ipv4": "true"},
                    check_duplicate=True,
                )
                return
            except DockerError as exc:
                last = explain(exc)
                if "overlap" not in last.lower():
                    raise SandboxFailedError(
                        f"could not make internal network {name}: {last}"
                    ) from exc
        raise SandboxFailedError(f"no free /24 in {INTERNAL_POOL} for {name}: {last}")

    def start(self, cid: str, spec: SandboxSpec) -> None:
        """Start the container; with an allow-list, its rules go in before its network."""
        api = self._api()
        if spec.network_allow is None:
            api.start(cid)
            return
        allowed = resolve_allowed(spec)
        api.disconnect_container_from_network(cid, "bridge")
        api.start(cid)
        pid = int(api.inspect_container(cid)["State"]["Pid"])
        self._restore(pid, "iptables-restore", egress_rules(allowed))
        self._restore(pid, "ip6tables-restore", _EGRESS6)
        api.connect_container_to_network(cid, "bridge")

    @staticmethod
    def _restore(pid: int, tool: str, rules: str) -> None:
        argv = ["nsenter", f"--target={pid}", "--net", tool]
        try:
            done = subprocess.run(
                argv, input=rules.encode(), capture_output=True, timeout=SETUP_SECONDS
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxFailedError(
                f"network_allow: could not run {' '.join(argv)} on the agent's host ({exc});"
                " the docker runtime needs nsenter and iptables there (util-linux, iptables)"
            ) from None
        if done.returncode != 0:
            raise SandboxFailedError(
                f"network_allow: {tool} in the sandbox's network namespace failed:"
                f" {done.stderr.decode(errors='replace').strip()}"
            )

    def released(self, sandbox_id: str) -> None:
        """The sandbox's container is gone: remove its internal network if it was the
        last one on it."""
        name = self._on.pop(sandbox_id, None)
        if name is not None:
            self._remove_if_empty(name)

    def sweep(self, agent_id: str) -> None:
        """Remove ``agent_id``'s internal networks that no container is on."""
        try:
            nets = self._api().networks(
                filters={"label": [f"{LABEL_AGENT}={agent_id}", f"{LABEL_NETWORK}=internal"]}
            )
        except DockerError:
            return
        for net in nets:
            self._remove_if_empty(net["Name"])

    def _remove_if_empty(self, name: str) -> None:
        api = self._api()
        with self._lock:
            try:
                # all=True: a created container is on it too (the engine would let its
                # network go, and its start would then fail).
                if api.containers(all=True, filters={"network": name}, quiet=True):
                    return
                api.remove_network(name)
            except DockerError as exc:
                if http_status(exc) not in (404, 409, 403):
                    raise SandboxFailedError(
                        f"could not remove internal network {name}: {explain(exc)}"
                    ) from exc
