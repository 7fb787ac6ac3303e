"""Host mounts, named volumes and ports of a sandbox: the public records (``Mount``,
``Tunnel``) and the checks of what a user asked for, made by the client before a create
is sent and by the scheduler on every create (through ``SandboxOptions.problems``).

Whether a host path may be mounted at all is the agent's to say (its ``--allow-mount``
roots, with symlinks resolved on its host): see agent/storage.py.

Imports the standard library only: the daemons import it (through aviato.protocol).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_MOUNTS",
    "VOLUME_NAME",
    "Mount",
    "Tunnel",
    "mount_problems",
    "port_problems",
    "volume_problems",
]

MAX_MOUNTS = 64
#: A volume's name: what Docker accepts in a volume name, and a single path component
#: (the local runtime keeps each volume as a directory of that name).
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
#: Places inside a sandbox nothing is mounted over: the kernel's, and aviato's own.
_RESERVED = ("/proc", "/sys", "/dev", "/run/aviato", "/run/aviato-lib", "/run/aviato-bin")


@dataclass(frozen=True, slots=True)
class Mount:
    """A directory of the agent's host, seen at ``target`` inside the sandbox:
    ``Mount("/datasets/imagenet", "/data", read_only=True)``. The agent mounts only
    paths under the roots its operator allows (``python -m agent --allow-mount DIR``)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Where a sandbox's port is reached from outside: ``host:port`` on its agent's host."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def _target_problem(what: str, target: object) -> str:
    if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
        return f"{what} target {target!r} must be an absolute path inside the sandbox, e.g. '/data'"
    if ".." in target.split("/"):
        return f"{what} target {target!r} must not contain '..'"
    norm = posixpath.normpath(target)
    # Not at, under or over (hiding) a reserved place.
    if any(
        norm == r or norm.startswith(r + "/") or r.startswith(norm.rstrip("/") + "/")
        for r in _RESERVED
    ):
        return f"{what} target {target!r} is reserved: choose a directory such as /data or /mnt/x"
    return ""


def mount_problems(mounts: Sequence[Mount], volumes: Mapping[str, str]) -> list[str]:
    """What is wrong with ``mounts`` and ``volumes`` (target -> volume name) as asked for."""
    out: list[str] = []
    if len(mounts) + len(volumes) > MAX_MOUNTS:
        out.append(f"at most {MAX_MOUNTS} mounts and volumes per sandbox")
        return out
    targets: list[str] = []
    for m in mounts:
        if not isinstance(m.source, str) or not m.source.startswith("/") or "\0" in m.source:
            out.append(
                f"mount source {m.source!r} must be an absolute path on the agent's host,"
                " e.g. Mount('/datasets/imagenet', '/data')"
            )
        problem = _target_problem("mount", m.target)
        out.extend([problem] if problem else [])
        targets.append(m.target)
    for target, name in volumes.items():
        problem = _target_problem("volume", target)
        out.extend([problem] if problem else [])
        problem = volume_problems(name)
        out.extend([f"{problem}, e.g. volumes={{'/cache': 'pip-cache'}}"] if problem else [])
        targets.append(target)
    norms = [posixpath.normpath(t) for t in targets if isinstance(t, str)]
    dupes = sorted({t for t in norms if norms.count(t) > 1})
    if dupes:
        out.append(f"two mounts or volumes at one target: {', '.join(dupes)}")
    return out


def port_problems(ports: Sequence[int], network: str | None) -> list[str]:
    """What is wrong with ``ports`` (in-sandbox TCP ports to publish)."""
    out: list[str] = []
    bad = [p for p in ports if type(p) is not int or not 1 <= p <= 65535]
    if bad:
        out.append(f"ports must be TCP port numbers from 1 to 65535, got {bad[:5]}")
    if len(set(ports)) != len(ports):
        out.append(f"ports lists a port twice: {list(ports)}")
    if ports and network == "none":
        out.append(
            f"ports {list(ports)} cannot be published from a sandbox with network='none':"
            " drop the ports, or leave network unset"
        )
    return out


def volume_problems(name: object) -> str:
    """Why ``name`` is not a volume name ("" when it is)."""
    if isinstance(name, str) and VOLUME_NAME.match(name):
        return ""
    return (
        f"volume name {name!r} must be 1-63 letters, digits, '_', '.' or '-' (starting"
        " with a letter or digit; no '/')"
    )
