"""The local runtime's lifecycle operations (a mixin of ``LocalRuntime``).

- Pause and resume: the cgroup freezer (agent/runtime/freezer.py). Without writable
  cgroups (or with AVIATO_LOCAL_CGROUPS=0) pause raises UnsupportedOperationError.
- Snapshots: a local sandbox sees the host system read-only; what it can change is its
  private ``/tmp`` (its working directory and HOME). A snapshot is that directory as
  an archive, ``<state dir>/.snapshots/<tag>.tar`` (with its labels beside it in
  ``<tag>.json``), taken with the sandbox frozen; a create from the snapshot's name
  runs the image it started from (``python:X.Y``: the host's Python) with ``/tmp``
  unpacked from the archive first. The archive lives on this host only.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

import psutil

from agent.runtime.base import RuntimeSnapshot
from agent.runtime.freezer import FreezeError, Freezer
from agent.runtime.snapshots import LABEL_SNAPSHOT_AGENT, LABEL_SNAPSHOT_BASE, is_snapshot
from aviato.exceptions import (
    SandboxError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    UnsupportedOperationError,
)

__all__ = ["LocalLifecycle"]

_TAG = re.compile(r"[0-9a-f]{12}-sb-[0-9a-f]{8,32}-[0-9]{1,20}")


class LocalLifecycle:
    """Uses LocalRuntime's state (``cgroups``, ``root``, ``_procs``, ``_find_dir``,
    ``_group``)."""

    @functools.cached_property
    def _freezer(self) -> Freezer:
        rt: Any = self
        return Freezer() if rt.cgroups.version else Freezer(root="/nonexistent")

    @property
    def _snapshot_dir(self) -> Path:
        rt: Any = self
        path: Path = rt.root / ".snapshots"
        return path

    # ------------------------------------------------------------------ pause

    def _running(self, sandbox_id: str) -> tuple[Path, int]:
        from agent.runtime.local import _live_pid

        rt: Any = self
        home = rt._find_dir(sandbox_id)
        proc = rt._procs.get(sandbox_id)
        pid = proc.pid if proc is not None else _live_pid(home)
        if home is None or pid is None:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running on this agent", sandbox_id=sandbox_id
            )
        return home, pid

    def _pids(self, sandbox_id: str, home: Path, pid: int) -> set[int]:
        rt: Any = self
        found = set(rt.cgroups.pids(rt._group(sandbox_id, home)))
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            found |= {root.pid, *(p.pid for p in root.children(recursive=True))}
        return found

    async def pause(self, sandbox_id: str) -> None:
        freezer = self._freezer
        if not freezer.version:
            raise UnsupportedOperationError(
                "the local runtime pauses a sandbox with the cgroup freezer, and this agent "
                "cannot write cgroups (not root, or AVIATO_LOCAL_CGROUPS=0): run the agent "
                "as root with cgroups, or on Docker",
                sandbox_id=sandbox_id,
            )
        rt: Any = self
        home, pid = self._running(sandbox_id)
        group = rt._group(sandbox_id, home)
        try:
            await asyncio.to_thread(
                freezer.freeze, group, lambda: self._pids(sandbox_id, home, pid)
            )
        except (FreezeError, OSError) as exc:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(freezer.thaw, group)
            raise SandboxError(
                f"could not pause sandbox {sandbox_id}: {exc}", sandbox_id=sandbox_id
            ) from exc

    async def resume(self, sandbox_id: str) -> None:
        rt: Any = self
        home, _ = self._running(sandbox_id)
        try:
            await asyncio.to_thread(self._freezer.thaw, rt._group(sandbox_id, home))
        except OSError as exc:
            raise SandboxError(
                f"could not resume sandbox {sandbox_id}: {exc}", sandbox_id=sandbox_id
            ) from exc

    def _frozen(self, sandbox_id: str, home: Path) -> bool:
        rt: Any = self
        return bool(self._freezer.version) and self._freezer.frozen(rt._group(sandbox_id, home))

    def _thaw(self, sandbox_id: str, home: Path | None) -> None:
        """Before a stop: a frozen (v1) process does not die of SIGKILL until thawed."""
        rt: Any = self
        if self._freezer.version:
            with contextlib.suppress(OSError):
                self._freezer.thaw(rt._group(sandbox_id, home))

    def _unfreeze_gone(self, sandbox_id: str, group: str) -> None:
        """After a stop or an exit: the sandbox's freezer group goes too."""
        if self._freezer.version:
            self._freezer.remove(group)

    # ------------------------------------------------------------------ snapshots

    async def snapshot(self, sandbox_id: str, image: str, labels: dict[str, str]) -> int:
        rt: Any = self
        home, _ = self._running(sandbox_id)
        tag = image.partition(":")[2]
        base = labels.get(LABEL_SNAPSHOT_BASE, "")
        if is_snapshot(base):  # a snapshot's snapshot runs the first image
            labels = {**labels, LABEL_SNAPSHOT_BASE: self._meta(base)[LABEL_SNAPSHOT_BASE]}
        freezer = self._freezer
        group = rt._group(sandbox_id, home)
        freeze = bool(freezer.version) and not freezer.frozen(group)
        if freeze:  # a consistent copy, as docker commit pauses the container
            await self.pause(sandbox_id)
        try:
            return await asyncio.to_thread(self._archive, home / "tmp", tag, labels)
        finally:
            if freeze:
                await self.resume(sandbox_id)

    def _archive(self, source: Path, tag: str, labels: dict[str, str]) -> int:
        out = self._snapshot_dir
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        part = out / f"{tag}.tar.part"
        with tarfile.open(part, "w") as tar:
            tar.add(source, arcname=".")
        (out / f"{tag}.json").write_text(json.dumps(labels))
        os.replace(part, out / f"{tag}.tar")  # complete, or not there
        return (out / f"{tag}.tar").stat().st_size

    def _paths(self, image: str) -> tuple[Path, Path]:
        tag = image.partition(":")[2]
        if not is_snapshot(image) or not _TAG.fullmatch(tag):
            raise SandboxNotFoundError(f"{image!r} is not a snapshot name (aviato-snapshot:...)")
        return self._snapshot_dir / f"{tag}.tar", self._snapshot_dir / f"{tag}.json"

    def _meta(self, image: str) -> dict[str, str]:
        archive, meta = self._paths(image)
        try:
            labels: dict[str, str] = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise SandboxNotFoundError(
                f"snapshot {image} is not on this host (removed, or taken on another)"
            ) from exc
        if not archive.exists():
            raise SandboxNotFoundError(f"snapshot {image} is not on this host (removed?)")
        return labels

    def _seed(self, sandbox_id: str, image: str) -> tuple[str, Path | None]:
        """For a create: the image to run, and the archive to unpack into its /tmp
        (None: ``image`` is no snapshot)."""
        if not is_snapshot(image):
            return image, None
        try:
            base = self._meta(image)[LABEL_SNAPSHOT_BASE]
        except SandboxNotFoundError as exc:
            raise SandboxFailedError(str(exc), sandbox_id=sandbox_id) from exc
        return base, self._paths(image)[0]

    @staticmethod
    def _unpack(archive: Path, target: Path) -> None:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")  # no links or paths out of target

    async def list_snapshots(self, agent_id: str) -> builtins.list[RuntimeSnapshot]:
        found = []
        for meta in sorted(self._snapshot_dir.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                labels = json.loads(meta.read_text())
                archive = meta.with_suffix(".tar")
                if labels.get(LABEL_SNAPSHOT_AGENT) == agent_id and archive.exists():
                    image = f"aviato-snapshot:{meta.stem}"
                    found.append(RuntimeSnapshot(image, labels, archive.stat().st_size))
        return found

    async def remove_snapshot(self, image: str) -> None:
        archive, meta = self._paths(image)
        if not archive.exists():
            raise SandboxNotFoundError(f"no snapshot {image} on this host")
        archive.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
