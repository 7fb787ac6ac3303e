"""``SandboxOptions``: the one record of what a sandbox is made of, as chosen.

``SandboxDefaults``, ``Sandbox(...)``, ``session.create`` and ``@session.function``
keep their own keyword arguments (the public surface), and each turns them into this
record; the record merges them (``over``), once, and says what is wrong with them
(``problems``). The scheduler checks every spec it receives with the same
``problems`` (through ``SandboxSpec.problems`` in aviato/protocol/records.py), so the client
refuses, before sending, exactly what the scheduler would.

Adding an option: a field here (and its check in ``problems``), the same field in
``SandboxSpec``, the keyword arguments that set it, and the runtimes that honour it.
Options merge as "set wins" unless ``over`` says otherwise.

Imports the standard library, aviato._codec, aviato._egress and aviato._storage only: the daemons
import it (through aviato.protocol).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aviato._codec import brief
from aviato._egress import allow_problems
from aviato._storage import Mount, mount_problems, port_problems

__all__ = [
    "ISOLATIONS",
    "MAX_CPUS",
    "MAX_IMAGE_CHARS",
    "MIN_MEMORY_BYTES",
    "NAMES",
    "NETWORKS",
    "PLACEMENTS",
    "SandboxOptions",
    "as_args",
]

#: A bound any host is under, far from the overflow (Docker takes billionths of a CPU
#: as a 64-bit integer; cgroup quotas microseconds).
MAX_CPUS = 4096
#: Docker's own bound on an image reference.
MAX_IMAGE_CHARS = 255
#: Below this Docker refuses to make the container.
MIN_MEMORY_BYTES = 6 * 1024 * 1024
#: "internal": the sandboxes of one session reach each other, nothing else (the scheduler
#: places them on one agent: an internal network does not span agents).
NETWORKS = (None, "none", "bridge", "internal")
#: runc: Docker's default (namespaces, shared kernel); gvisor: Docker with runsc (a
#: user-space kernel); bwrap: the local runtime's bubblewrap namespaces. None: any,
#: the placing agent's default.
ISOLATIONS = (None, "runc", "gvisor", "bwrap")
#: spread: the agent with the most free slots (the default, None); pack: the fullest
#: agent it fits on (leaves whole agents free for big requests).
PLACEMENTS = (None, "spread", "pack")
#: GPUs one sandbox may ask for at most, and agent labels one create may name.
MAX_GPUS = 1024
MAX_AGENT_LABELS = 64


@dataclass(frozen=True, slots=True)
class SandboxOptions:
    """Sandbox options; None (or empty) is "not set here". Lists given for ``args`` and
    ``tags`` become tuples, any mapping for ``env`` a dict."""

    image: str | None = None
    command: str | None = None
    #: None: not set. ``()``: no arguments (a command set without args gets these).
    args: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    max_lifetime_seconds: float | None = None
    memory_bytes: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    network: str | None = None
    working_dir: str | None = None
    idle_timeout_seconds: float | None = None
    #: Host directories (under the agent's --allow-mount roots), added to the defaults'.
    mounts: tuple[Mount, ...] = ()
    #: Named volumes on the agent's host: target path -> volume name.
    volumes: dict[str, str] = field(default_factory=dict)
    #: In-sandbox TCP ports published on the agent's host (``Sandbox.tunnels()``).
    ports: tuple[int, ...] = ()
    isolation: str | None = None
    #: GPUs it needs, each its own (None or 0: none); placed where that many are free.
    gpus: int | None = None
    #: Placed only on an agent started with each ``--label KEY=VALUE`` named here.
    agent_labels: dict[str, str] = field(default_factory=dict)
    #: "spread" (None: the default) or "pack" (see PLACEMENTS).
    placement: str | None = None
    #: Egress allow-list (see aviato/_egress.py); None: not set (the whole network).
    network_allow: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.agent_labels, dict):
            object.__setattr__(self, "agent_labels", dict(self.agent_labels))
        if self.network_allow is not None and not isinstance(self.network_allow, str | tuple):
            object.__setattr__(self, "network_allow", tuple(self.network_allow))
        if not isinstance(self.mounts, tuple):
            object.__setattr__(self, "mounts", tuple(self.mounts))
        if not isinstance(self.volumes, dict):
            object.__setattr__(self, "volumes", dict(self.volumes))
        if not isinstance(self.ports, tuple):
            object.__setattr__(self, "ports", tuple(self.ports))
        if self.args is not None and not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
        if not isinstance(self.tags, tuple):
            object.__setattr__(self, "tags", tuple(self.tags))
        if not isinstance(self.env, dict):
            object.__setattr__(self, "env", dict(self.env))

    def over(self, base: SandboxOptions) -> SandboxOptions:
        """These options over ``base`` (defaults): what is set here wins; tags and env
        are combined; args go with their command (a command set here without args runs
        with none, not with ``base``'s); an empty image is not set."""
        plain = {
            name: mine if (mine := getattr(self, name)) is not None else getattr(base, name)
            for name in _PLAIN
        }
        args = self.args
        if args is None:
            args = base.args if self.command is None else ()
        return SandboxOptions(
            image=self.image or base.image,
            args=args,
            env={**base.env, **self.env},
            agent_labels={**base.agent_labels, **self.agent_labels},
            tags=tuple(dict.fromkeys((*base.tags, *self.tags))),
            mounts=(*base.mounts, *self.mounts),
            volumes={**base.volumes, **self.volumes},
            ports=tuple(dict.fromkeys((*base.ports, *self.ports))),
            **plain,
        )

    def problems(self) -> list[str]:
        """Why these options cannot make a sandbox (none: they can). Checked by the
        client before a create is sent, and by the scheduler on every create."""
        out = []
        if not self.image or not self.image.strip():
            out.append("container_image is empty: name an image such as 'python:3.11'")
        elif len(self.image) > MAX_IMAGE_CHARS:
            out.append(
                f"container_image is {len(self.image)} characters long: at most {MAX_IMAGE_CHARS}"
            )
        if not self.command or not self.command.strip():
            out.append(
                "a sandbox needs a command: pass command='sleep', args=['infinity'] "
                "(or set SandboxDefaults(command=...))"
            )
        # `not x > 0` also refuses NaN (no comparison holds); infinity is no limit: None is.
        lifetime = self.max_lifetime_seconds
        if lifetime is not None and not 0 < lifetime < math.inf:
            out.append(
                f"max_lifetime_seconds must be positive and finite (or None), got {lifetime}"
            )
        idle = self.idle_timeout_seconds
        if idle is not None and not 0 < idle < math.inf:
            out.append(
                f"idle_timeout_seconds must be positive and finite (or None: no idle "
                f"timeout), got {idle}"
            )
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            out.append(f"memory_bytes must be at least 6 MiB, got {self.memory_bytes}")
        if self.cpus is not None and not 0 < self.cpus <= MAX_CPUS:
            out.append(f"cpus must be above 0 and at most {MAX_CPUS} (or None), got {self.cpus}")
        if self.pids_limit is not None and self.pids_limit < 1:
            out.append(f"pids_limit must be at least 1 (or None), got {self.pids_limit}")
        if self.network not in NETWORKS:
            out.append(
                f"network must be None, 'none', 'bridge' or 'internal', got {brief(self.network)}"
            )
        out += allow_problems(self.network_allow, self.network)
        out += mount_problems(self.mounts, self.volumes)
        out += port_problems(self.ports, self.network)
        if self.isolation not in ISOLATIONS:
            out.append(
                "isolation must be None (the agent's default), 'runc', 'gvisor' or 'bwrap',"
                f" got {brief(self.isolation)}"
            )
        out += self._placement_problems()
        return out

    def _placement_problems(self) -> list[str]:
        out = []
        gpus = self.gpus
        if gpus is not None and (
            isinstance(gpus, bool) or not isinstance(gpus, int) or not 0 <= gpus <= MAX_GPUS
        ):
            out.append(f"gpus must be a whole number from 0 to {MAX_GPUS} (or None), got {gpus!r}")
        if self.placement not in PLACEMENTS:
            out.append(f"placement must be None, 'spread' or 'pack', got {brief(self.placement)}")
        labels = self.agent_labels
        if len(labels) > MAX_AGENT_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) and k for k, v in labels.items()
        ):
            out.append(
                f"agent_labels must map up to {MAX_AGENT_LABELS} non-empty label names to "
                "string values, e.g. {'zone': 'a'}"
            )
        return out

    def key(self) -> tuple[Any, ...]:
        """A hashable value equal for equal options (a function pool's key)."""
        return tuple(
            tuple(sorted(value.items())) if isinstance(value, Mapping) else value
            for value in (getattr(self, name) for name in NAMES)
        )

    @classmethod
    def of(cls, source: Any) -> SandboxOptions:
        """The options held by ``source``'s same-named attributes (a ``SandboxSpec``)."""
        return cls(**{name: getattr(source, name) for name in NAMES})


#: Every option's name.
NAMES = tuple(f.name for f in dataclasses.fields(SandboxOptions))
#: Options merged as "set wins" (``over`` merges the others its own way).
_PLAIN = tuple(
    n
    for n in NAMES
    if n not in ("image", "args", "env", "tags", "mounts", "volumes", "ports", "agent_labels")
)


def as_args(args: Sequence[str] | None) -> tuple[str, ...] | None:
    """A user's ``args`` as the record holds them (a str would be its characters)."""
    if isinstance(args, str):
        raise TypeError("args must be a list of strings, e.g. args=['infinity']")
    return None if args is None else tuple(args)
