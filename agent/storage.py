"""Host mounts and named volumes, as an agent gives them to a sandbox.

A host mount is honoured only under a root the operator allowed (``python -m agent
--allow-mount DIR``). Both the source and the roots are resolved with symlinks followed
(``os.path.realpath``, strict), so neither ``..`` nor a symlink inside an allowed root can
reach outside it; what is mounted is the resolved path, so a symlink swapped after the
check changes nothing.

Named volumes live on this host and outlive sandboxes: each runtime's ``VolumeStore``
(agent/runtime/volumes.py) makes them on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from agent.runtime.base import Mount as RuntimeMount
from agent.runtime.volumes import VolumeStore
from aviato.exceptions import SandboxFailedError
from aviato.protocol import SandboxSpec

__all__ = ["allowed_roots", "resolve_mount", "sandbox_mounts"]


def allowed_roots(paths: Sequence[str]) -> tuple[str, ...]:
    """The operator's ``--allow-mount`` roots, resolved; ValueError for one that is not
    an existing directory (said at start-up, not at the first create)."""
    roots = []
    for path in paths:
        if not os.path.isabs(path):
            raise ValueError(f"--allow-mount takes an absolute directory, got {path!r}")
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise ValueError(f"--allow-mount {path!r} is not a directory on this host")
        roots.append(real)
    return tuple(dict.fromkeys(roots))


def resolve_mount(source: str, roots: Sequence[str], sandbox_id: str) -> str:
    """``source`` resolved (symlinks followed), when it lies under one of ``roots``;
    else ``SandboxFailedError`` naming the path and the flag."""
    flag = "python -m agent --allow-mount DIR"
    if not roots:
        raise SandboxFailedError(
            f"host mount {source!r} refused: this agent allows no host mounts (start it"
            f" with `{flag}` naming a directory that holds {source!r})",
            sandbox_id=sandbox_id,
        )
    try:
        real = os.path.realpath(source, strict=True)
    except OSError as exc:
        raise SandboxFailedError(
            f"host mount {source!r} refused: it does not exist on this agent's host"
            f" ({exc.strerror})",
            sandbox_id=sandbox_id,
        ) from None
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
        shown = f" (it resolves to {real!r})" if real != os.path.normpath(source) else ""
        raise SandboxFailedError(
            f"host mount {source!r} refused: it is outside the roots this agent allows"
            f"{shown}; allowed: {', '.join(roots)}. Mount a path under one of them, or"
            f" start the agent with `{flag}`",
            sandbox_id=sandbox_id,
        )
    return real


async def sandbox_mounts(
    sandbox_id: str,
    spec: SandboxSpec,
    roots: Sequence[str],
    volumes: VolumeStore,
    agent_id: str,
) -> list[RuntimeMount]:
    """The runtime mounts for ``spec``'s host mounts (checked) and volumes (made)."""
    out = [
        RuntimeMount(resolve_mount(m.source, roots, sandbox_id), m.target, m.read_only)
        for m in spec.mounts
    ]
    for target, name in spec.volumes.items():
        source = await volumes.ensure(name, agent_id)
        out.append(RuntimeMount(source, target, read_only=False, kind=volumes.kind))
    return out
