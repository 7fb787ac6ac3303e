"""A running sandbox's CPU time and memory, read from its cgroup (cgroup v1 or v2): the
local runtime's own groups, or the Docker engine's (cgroupfs or systemd driver). For
the agent's metrics, at scrape time: a sandbox whose group is not found is left out."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

__all__ = ["Usage", "docker_dirs", "read_usage", "sandbox_usage"]

CGROUP_ROOT = Path("/sys/fs/cgroup")

#: (CPU seconds, memory bytes); either None when not accounted.
Usage = tuple[float | None, int | None]


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().split()[0])
    return None


def read_usage(memory_dir: Path | None, cpu_dir: Path | None) -> Usage:
    """From a v2 group (both dirs the same) or v1 memory and cpuacct groups."""
    memory: int | None = None
    cpu: float | None = None
    if memory_dir is not None:
        memory = _read_int(memory_dir / "memory.current")
        if memory is None:
            memory = _read_int(memory_dir / "memory.usage_in_bytes")
    if cpu_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            for line in (cpu_dir / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    cpu = int(value) / 1e6
        if cpu is None:
            nanos = _read_int(cpu_dir / "cpuacct.usage")
            cpu = nanos / 1e9 if nanos is not None else None
    return cpu, memory


def docker_dirs(container_id: str, root: Path = CGROUP_ROOT) -> tuple[Path | None, Path | None]:
    """A Docker container's memory and CPU groups, where the engine's drivers put them."""
    for unified in (
        root / "system.slice" / f"docker-{container_id}.scope",
        root / "docker" / container_id,
    ):
        if (unified / "cgroup.controllers").exists():
            return unified, unified
    memory = root / "memory" / "docker" / container_id
    cpu = root / "cpuacct" / "docker" / container_id
    if not memory.exists():
        memory = root / "memory" / "system.slice" / f"docker-{container_id}.scope"
        cpu = root / "cpuacct" / "system.slice" / f"docker-{container_id}.scope"
    return (memory if memory.exists() else None), (cpu if cpu.exists() else None)


def sandbox_usage(runtime: Any, sandbox_id: str) -> Usage | None:
    """The sandbox's usage on ``runtime`` (Docker or local), or None if not found."""
    ids = getattr(runtime, "_ids", None)
    if isinstance(ids, dict):  # Docker: sandbox id -> container id
        cid = ids.get(sandbox_id)
        if not cid:
            return None
        memory, cpu = docker_dirs(cid)
    else:
        cgroups = getattr(runtime, "cgroups", None)
        if cgroups is None or not getattr(cgroups, "version", 0):
            return None
        dirs = cgroups._dirs(sandbox_id)
        memory = dirs["memory"] if dirs["memory"].exists() else None
        cpu_dir: Path = dirs["cpu"]
        if cgroups.version == 1:  # cpu time is cpuacct's (often the same mount as cpu)
            cpu_dir = cgroups.root / "cpuacct" / cgroups.name / sandbox_id
        cpu = cpu_dir if cpu_dir.exists() else None
    if memory is None and cpu is None:
        return None
    return read_usage(memory, cpu)
