"""The Docker runtime's lifecycle operations (a mixin of ``DockerRuntime``): pause and
resume (``docker pause``: the engine's cgroup freezer), and snapshots (``docker
commit`` to a local image named and labelled as aviato's)."""

from __future__ import annotations

import builtins
import contextlib
import json
import os
from typing import Any

import psutil

from agent.runtime.base import LABEL_SPARE, RuntimeSnapshot
from agent.runtime.docker_errors import DockerError, explain, http_status
from agent.runtime.snapshots import LABEL_SNAPSHOT_AGENT, is_snapshot
from aviato.exceptions import SandboxError, SandboxNotFoundError, UnsupportedOperationError

__all__ = ["DockerLifecycle", "is_snapshot"]


class DockerLifecycle:
    """Uses DockerRuntime's plumbing (``_run``, ``_api``, ``_target``, ``_engine_error``)."""

    @property
    def _paused(self) -> set[str]:
        """Sandboxes this runtime paused (a mixin has no __init__ of its own)."""
        paused: set[str] = self.__dict__.setdefault("_paused_sandboxes", set())
        return paused

    async def pause(self, sandbox_id: str) -> None:
        await self._call(sandbox_id, "pausing", "pause")
        self._paused.add(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        if sandbox_id in self._orphans:
            rt: Any = self
            await rt._run(self._kill_orphaned_supervisor, sandbox_id)
        await self._call(sandbox_id, "resuming", "unpause")
        self._paused.discard(sandbox_id)
        self._orphans.discard(sandbox_id)

    @property
    def _orphans(self) -> set[str]:
        """Paused sandboxes this runtime found paused (by an agent before a restart)."""
        orphans: set[str] = self.__dict__.setdefault("_orphaned_supervisors", set())
        return orphans

    def _listed_state(self, sandbox_id: str, row: dict[str, Any]) -> tuple[bool, bool]:
        """(running, paused) of a container as listed: a paused one runs, and is noted
        as paused (a stop thaws it); one paused by an earlier agent, as an orphan."""
        state = row.get("State")
        if state == "paused" and sandbox_id not in self._paused:
            self._paused.add(sandbox_id)
            self._orphans.add(sandbox_id)
        return state in ("running", "paused"), state == "paused"

    def _kill_orphaned_supervisor(self, sandbox_id: str) -> None:
        """Frozen, a sidecar supervisor missed its agent's exit; thawed, it would find
        its link closed and, as the container's watchdog, stop it. Killed while frozen,
        it dies as it thaws (a pending SIGKILL comes before any more of its code): the
        sandbox lives on, served through the engine (docker exec). Under gVisor its
        processes are not the host's: not found, and its watchdog stops the sandbox."""
        rt: Any = self
        try:
            pid = int(rt._api.inspect_container(rt._target(sandbox_id))["State"]["Pid"] or 0)
        except DockerError as exc:
            raise rt._engine_error(sandbox_id, "resuming", exc) from exc
        try:  # (an exec's processes are the engine's children, not init's: by namespace)
            ns = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            return
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.readlink(f"/proc/{proc.pid}/ns/pid") == ns and (
                    proc.environ().get("AVIATO_WATCHDOG") == "container"
                ):
                    proc.kill()

    async def _thaw_before_stop(self, sandbox_id: str) -> None:
        """``docker rm -f`` of a paused container hangs on this engine (the kill waits
        for the frozen process): a paused sandbox is resumed first."""
        if sandbox_id in self._paused:
            with contextlib.suppress(SandboxError):
                await self.resume(sandbox_id)
            self._paused.discard(sandbox_id)

    async def _call(self, sandbox_id: str, what: str, method: str) -> None:
        rt: Any = self

        def run() -> None:
            try:
                getattr(rt._api, method)(rt._target(sandbox_id))
            except DockerError as exc:
                raise rt._engine_error(sandbox_id, what, exc) from exc

        await rt._run(run)

    async def snapshot(self, sandbox_id: str, image: str, labels: dict[str, str]) -> int:
        """``docker commit`` (the engine pauses the container while it copies). The
        container's own labels would pass to the image, and from it to every sandbox
        made from it: the spare mark is cleared (the others are set anew at create)."""
        rt: Any = self
        if rt._is_gvisor(sandbox_id):
            raise UnsupportedOperationError(
                f"sandbox {sandbox_id} runs under gVisor, whose /tmp is a tmpfs in runsc's "
                "own memory: docker commit cannot see it, and the snapshot would silently "
                "lack it. Snapshot a sandbox created with isolation='runc'",
                sandbox_id=sandbox_id,
            )
        repository, _, tag = image.partition(":")
        changes = [f"LABEL {k}={json.dumps(v)}" for k, v in {**labels, LABEL_SPARE: ""}.items()]

        def commit() -> int:
            try:
                rt._api.commit(
                    rt._target(sandbox_id),
                    repository=repository,
                    tag=tag,
                    changes=changes,
                    # Not frozen while copied: on this engine a commit that pauses a
                    # sandbox whose supervisor is up never returned (and left it paused).
                    pause=False,
                )
                return int(rt._api.inspect_image(image).get("Size") or 0)
            except DockerError as exc:
                raise rt._engine_error(sandbox_id, "taking a snapshot", exc) from exc

        size: int = await rt._run(commit)
        return size

    async def list_snapshots(self, agent_id: str) -> builtins.list[RuntimeSnapshot]:
        rt: Any = self

        def images() -> builtins.list[RuntimeSnapshot]:
            rows = rt._api.images(filters={"label": f"{LABEL_SNAPSHOT_AGENT}={agent_id}"})
            return [
                RuntimeSnapshot(tag, dict(row.get("Labels") or {}), int(row.get("Size") or 0))
                for row in rows
                for tag in row.get("RepoTags") or ()
                if is_snapshot(tag)
            ]

        found: builtins.list[RuntimeSnapshot] = await rt._run(images)
        return found

    async def remove_snapshot(self, image: str) -> None:
        rt: Any = self
        if not is_snapshot(image):
            raise ValueError(f"{image!r} is not a snapshot (aviato-snapshot:...): not removed")

        def remove() -> None:
            try:
                rt._api.remove_image(image)
            except DockerError as exc:
                if http_status(exc) == 404:
                    raise SandboxNotFoundError(f"no snapshot {image} on this host") from exc
                if http_status(exc) == 409:
                    raise SandboxError(
                        f"snapshot {image} is in use by a sandbox: stop the sandboxes "
                        f"made from it first ({explain(exc)})"
                    ) from exc
                raise SandboxError(f"could not remove snapshot {image}: {explain(exc)}") from exc

        await rt._run(remove)
