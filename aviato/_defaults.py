"""``SandboxDefaults``: settings a session hands to every sandbox it creates (its
sandbox options, as a :class:`SandboxOptions` from ``options()``, and how to reach
the cluster)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aviato._auth import CurveKeys, client_keys, scheduler_public_key
from aviato._options import NAMES, SandboxOptions
from aviato._storage import Mount
from aviato._zmq import check_endpoint
from aviato.protocol import SandboxInfo

__all__ = [
    "SandboxDefaults",
]


@dataclass(frozen=True)
class SandboxDefaults:
    container_image: str = "python:3.11"
    command: str | None = None
    args: tuple[str, ...] = ()
    max_lifetime_seconds: float | None = None
    tags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    #: Scheduler endpoint; else $AVIATO_SCHEDULER; else an embedded local cluster.
    scheduler: str | None = None
    #: Deadline for one control or data request (not for an exec's own run time).
    request_timeout_seconds: float = 30.0
    #: How long ``start()`` waits for a free slot before ``SandboxTimeoutError``.
    start_timeout_seconds: float = 120.0
    #: A session's lease: if its client stops renewing it, its sandboxes are stopped.
    lease_seconds: float = 15.0
    memory_bytes: int | None = None
    cpus: float | None = None
    network: str | None = None
    working_dir: str | None = None
    token: str | None = None
    #: CURVE key directory (``aviato keys DIR``); else $AVIATO_KEYS; else no keys.
    keys: str | None = None
    #: This client's key in KEYS/clients; else $AVIATO_CLIENT_KEY; else the only one
    #: whose secret is there.
    client_key: str | None = None
    #: Reach an agent on this host over its local lane (a Unix socket) rather than
    #: ZeroMQ; else $AVIATO_LOCAL_LANE ("0" turns it off); else on.
    local_lane: bool | None = None
    #: Each sandbox is stopped after this long with no exec, process, file or call.
    idle_timeout_seconds: float | None = None
    #: Host directories every sandbox mounts (``Mount``; under the agent's --allow-mount).
    mounts: tuple[Mount, ...] = ()
    #: Named volumes on the agent's host every sandbox mounts: target path -> name.
    volumes: Mapping[str, str] = field(default_factory=dict)
    #: In-sandbox TCP ports every sandbox publishes (see ``Sandbox.tunnels``).
    ports: tuple[int, ...] = ()
    #: "runc", "gvisor" (Docker with runsc) or "bwrap" (the local runtime); None: the
    #: agent's default. Placed only on an agent that offers it.
    isolation: str | None = None
    #: Resources every sandbox asks for (see ``session.create``): GPUs, the agent labels
    #: it must be placed on, and "spread" (None) or "pack".
    gpus: int | None = None
    agent_labels: Mapping[str, str] = field(default_factory=dict)
    placement: str | None = None
    #: Egress allow-list: addresses, CIDRs or host names, each with an optional
    #: ``:port`` (see aviato/_egress.py); None: the whole network.
    network_allow: tuple[str, ...] | None = None
    #: Show what functions and actors print in their workers on this process's stdout
    #: and stderr, each line prefixed ``(function sb-3f2a)``; off: in the sandbox's log.
    forward_output: bool = True

    def __post_init__(self) -> None:
        # Accept lists for convenience; keep the frozen value hashable-ish and immutable.
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "mounts", tuple(self.mounts))
        object.__setattr__(self, "volumes", dict(self.volumes))
        object.__setattr__(self, "ports", tuple(self.ports))
        object.__setattr__(self, "agent_labels", dict(self.agent_labels))
        if self.network_allow is not None and not isinstance(self.network_allow, str):
            object.__setattr__(self, "network_allow", tuple(self.network_allow))

    def replace(self, **changes: Any) -> SandboxDefaults:
        return dataclasses.replace(self, **changes)

    def options(self) -> SandboxOptions:
        """The sandbox options among these settings (what every sandbox starts from)."""
        return SandboxOptions(
            image=self.container_image,
            **{name: getattr(self, name) for name in _SHARED},
        )

    def scheduler_address(self) -> str | None:
        """The scheduler to use (checked: ``ConfigurationError`` if it is not an address);
        None for the embedded cluster."""
        if self.scheduler:
            return check_endpoint(self.scheduler, what="scheduler address")
        env = os.environ.get("AVIATO_SCHEDULER")
        return check_endpoint(env, what="$AVIATO_SCHEDULER") if env else None

    def cluster_token(self) -> str | None:
        return self.token or os.environ.get("AVIATO_TOKEN") or None

    def lane_enabled(self) -> bool:
        if self.local_lane is not None:
            return self.local_lane
        value = os.environ.get("AVIATO_LOCAL_LANE", "").strip().lower()
        return value not in ("0", "false", "no", "off")

    def key_dir(self) -> str | None:
        return self.keys or os.environ.get("AVIATO_KEYS") or None

    def _client_key_name(self) -> str | None:
        return self.client_key or os.environ.get("AVIATO_CLIENT_KEY") or None

    def scheduler_curve(self) -> CurveKeys | None:
        """This client's CURVE keys for the scheduler; None when keys are off."""
        directory = self.key_dir()
        if directory is None:
            return None
        return client_keys(directory, self._client_key_name(), scheduler_public_key(directory))

    def agent_curve(self, info: SandboxInfo) -> CurveKeys | None:
        """This client's CURVE keys for the agent running ``info``'s sandbox (its public
        key comes from the scheduler); None when that agent serves without keys."""
        directory = self.key_dir()
        if directory is None or not info.agent_public_key:
            return None
        return client_keys(directory, self._client_key_name(), info.agent_public_key)


#: The options SandboxDefaults sets under their own names (the image is its
#: ``container_image``).
_SHARED = tuple(
    f.name for f in dataclasses.fields(SandboxDefaults) if f.name in NAMES and f.name != "image"
)
