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

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence

from agent.data_plane import DataPlane, Running
from agent.runtime.base import Mount as RuntimeMount
from agent.runtime.volumes import VolumeStore
from aviato._storage import volume_problems
from aviato.exceptions import SandboxFailedError
from aviato.protocol import AgentVolumes, Decoded, Message, OkReply, RemoveVolume, SandboxSpec

log = logging.getLogger("aviato.agent.storage")

__all__ = ["VolumeService", "allowed_roots", "resolve_mount", "sandbox_mounts"]


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


class VolumeService:
    """The agent's volumes as others see them: reported to the scheduler (AgentVolumes,
    after each registration and each change) and removed on a client's request."""

    def __init__(
        self,
        store: VolumeStore,
        agent_id: str,
        sandboxes: Mapping[str, Running],
        ask: Callable[[Message, float], Awaitable[Message | None]],
    ) -> None:
        self.store = store
        self.agent_id = agent_id
        self.sandboxes = sandboxes
        self._ask = ask
        self.changed = asyncio.Event()

    async def mounts(
        self, sandbox_id: str, spec: SandboxSpec, roots: Sequence[str]
    ) -> list[RuntimeMount]:
        """``sandbox_mounts``, telling the scheduler when a volume may have been made."""
        try:
            return await sandbox_mounts(sandbox_id, spec, roots, self.store, self.agent_id)
        finally:
            if spec.volumes:
                self.changed.set()

    async def on_remove(self, plane: DataPlane, identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, RemoveVolume)
        await self.remove(d.msg.name)
        plane.send_now(identity, d.request_id, OkReply())

    async def report(self) -> None:
        """Runs as the agent's task: the scheduler hears of every change (a failed report
        is retried at the next change or registration)."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            try:
                names = tuple(await self.store.names())
            except Exception as exc:  # the engine is down: told at the next change
                log.warning("agent %s: could not list its volumes: %s", self.agent_id, exc)
                continue
            await self._ask(AgentVolumes(self.agent_id, names), 2.0)
            await asyncio.sleep(0.1)  # a burst of creates is one report

    async def remove(self, name: str) -> None:
        problem = volume_problems(name)
        if problem:
            raise ValueError(problem)
        using = sorted(
            sid for sid, run in self.sandboxes.items() if name in run.spec.volumes.values()
        )
        if using:
            raise SandboxFailedError(
                f"volume {name!r} is mounted by running sandbox(es) {', '.join(using)}: stop"
                " them first"
            )
        try:
            await self.store.remove(name)
        finally:
            self.changed.set()
