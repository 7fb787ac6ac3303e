"""Named volumes on an agent's host, per runtime: made on first use, kept until
removed (``aviato volume rm``). The Docker runtime's are the engine's own volumes
(agent/runtime/docker.py's ``volume_store``); the default is a directory per volume."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from aviato._storage import volume_problems
from aviato.exceptions import SandboxNotFoundError

__all__ = ["DirectoryVolumes", "VolumeStore"]


class VolumeStore:
    """Named volumes on this host: made on first use, kept until removed."""

    #: "bind" (a host directory) or "volume" (the engine's own volume).
    kind = "bind"

    async def ensure(self, name: str, agent_id: str) -> str:
        """The volume ``name``'s mount source, made if missing."""
        raise NotImplementedError

    async def names(self) -> list[str]:
        raise NotImplementedError

    async def remove(self, name: str) -> None:
        """``SandboxNotFoundError`` when there is none (the agent refuses first when
        one of its sandboxes uses it)."""
        raise NotImplementedError


class DirectoryVolumes(VolumeStore):
    """Volumes as directories under ``root`` (the local runtime's)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        problem = volume_problems(name)
        if problem:
            raise ValueError(problem)
        return self.root / name

    async def ensure(self, name: str, agent_id: str) -> str:
        path = self._path(name)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return str(path)

    async def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    async def remove(self, name: str) -> None:
        path = self._path(name)
        if not path.is_dir():
            raise SandboxNotFoundError(f"no volume {name!r} on this agent")
        await asyncio.to_thread(shutil.rmtree, path)
