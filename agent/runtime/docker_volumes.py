"""Named volumes as the Docker engine's own volumes, labelled as aviato's (so that
``aviato volume ls`` lists only ours, and a test run's leak check finds its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import docker.errors

from agent.runtime.docker_errors import DockerError, explain, http_status
from agent.runtime.labels import LABEL_AGENT, LABEL_MANAGED
from agent.runtime.volumes import VolumeStore
from aviato._storage import volume_problems
from aviato.exceptions import SandboxFailedError, SandboxNotFoundError

__all__ = ["LABEL_VOLUME", "DockerVolumes", "engine_name"]

#: On a volume: its aviato name (the engine's name is ``engine_name(name)``).
LABEL_VOLUME = "aviato.volume"


def engine_name(name: str) -> str:
    """The engine's name of aviato's volume ``name``: apart from the user's own volumes."""
    problem = volume_problems(name)
    if problem:
        raise ValueError(problem)
    return f"aviato-{name}"


class DockerVolumes(VolumeStore):
    kind = "volume"

    def __init__(self, client: Callable[[], Any]) -> None:
        self._client = client  # built lazily by the runtime: called on a thread

    async def ensure(self, name: str, agent_id: str) -> str:
        volume = engine_name(name)

        def make() -> None:
            client = self._client()
            try:
                client.volumes.get(volume)
                return
            except docker.errors.NotFound:
                pass
            labels = {LABEL_MANAGED: "1", LABEL_VOLUME: name, LABEL_AGENT: agent_id}
            client.volumes.create(name=volume, labels=labels)

        try:
            await asyncio.to_thread(make)
        except DockerError as exc:
            raise SandboxFailedError(f"could not make volume {name!r}: {explain(exc)}") from exc
        return volume

    async def names(self) -> list[str]:
        def ls() -> list[str]:
            found = self._client().volumes.list(filters={"label": LABEL_VOLUME})
            return sorted(v.attrs.get("Labels", {}).get(LABEL_VOLUME, "") for v in found)

        return [n for n in await asyncio.to_thread(ls) if n]

    async def remove(self, name: str) -> None:
        volume = engine_name(name)

        def rm() -> None:
            found = self._client().volumes.get(volume)
            if (found.attrs.get("Labels") or {}).get(LABEL_VOLUME) != name:
                raise docker.errors.NotFound(f"{volume} is not aviato's")
            found.remove()

        try:
            await asyncio.to_thread(rm)
        except docker.errors.NotFound:
            raise SandboxNotFoundError(f"no volume {name!r} on this agent's host") from None
        except DockerError as exc:
            if http_status(exc) == 409:
                raise SandboxFailedError(
                    f"volume {name!r} is in use by a container: stop the sandboxes that"
                    f" mount it first ({explain(exc)})"
                ) from exc
            raise SandboxFailedError(f"could not remove volume {name!r}: {explain(exc)}") from exc
