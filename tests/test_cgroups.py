"""agent/runtime/cgroups.py against fake cgroup trees (plain files in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.runtime import cgroups
from agent.runtime.cgroups import Cgroups


def test_v2_limits_and_oom_count(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    (tmp_path / "aviato").mkdir()
    (tmp_path / "aviato" / "cgroup.subtree_control").write_text("")
    cg = Cgroups(root=str(tmp_path))
    assert cg.version == 2
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    procs = cg.make("sb-1", memory=64 << 20, pids=100, cpus=0.5)
    d = tmp_path / "aviato" / "sb-1"
    assert procs == [str(d / "cgroup.procs")]
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "pids.max").read_text() == "100"
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert not cg.oom_killed("sb-1")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cg.oom_killed("sb-1")


def test_v1_a_hierarchy_per_controller(tmp_path: Path) -> None:
    for c in ("memory", "pids", "cpu"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "cgroup.procs").write_text("")
    cg = Cgroups(root=str(tmp_path))
    assert cg.version == 1
    procs = cg.make("sb-2", memory=1 << 30, pids=None, cpus=2)
    assert procs == sorted(
        str(tmp_path / c / "aviato" / "sb-2" / "cgroup.procs") for c in ("memory", "cpu")
    )  # only what is limited: joins cost
    assert (tmp_path / "memory/aviato/sb-2/memory.limit_in_bytes").read_text() == str(1 << 30)
    assert not (tmp_path / "memory/aviato/sb-2/memory.memsw.limit_in_bytes").exists()
    assert not (tmp_path / "pids/aviato/sb-2").exists()  # no limit asked: not joined
    assert cg.make("sb-4", memory=None, pids=None, cpus=None) == []
    assert (tmp_path / "cpu/aviato/sb-2/cpu.cfs_quota_us").read_text() == "200000"
    (tmp_path / "memory/aviato/sb-2/memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"
    )
    assert cg.oom_killed("sb-2")


def test_without_a_writable_hierarchy_nothing_happens(tmp_path: Path) -> None:
    cg = Cgroups(root=str(tmp_path / "absent"))
    assert cg.version == 0
    assert cg.make("sb-3", memory=1, pids=1, cpus=1) == []
    assert not cg.oom_killed("sb-3")
    cg.remove("sb-3")  # a no-op, not an error


def test_parked_groups_of_a_dead_agent_are_swept(tmp_path: Path) -> None:
    import os

    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    base = tmp_path / "aviato"
    base.mkdir()
    (base / "cgroup.subtree_control").write_text("")
    dead, alive = base / "park-999999999-aaaa", base / f"park-{os.getpid()}-bbbb"
    dead.mkdir()
    alive.mkdir()
    Cgroups(root=str(tmp_path))
    assert not dead.exists() and alive.exists()


def test_no_swap_beyond_the_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel accounts swap, a sandbox may not swap past its memory limit:
    v2 memory.swap.max 0, v1 memory.memsw.limit_in_bytes (memory + swap) = the limit,
    written after the memory limit (v1 refuses memsw below it) and lifted first (v1
    refuses a memory limit above memsw)."""
    (tmp_path / "v2" / "cgroup.controllers").parent.mkdir()
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "v2" / "cgroup.subtree_control").write_text("")
    (tmp_path / "v2" / "aviato").mkdir()
    (tmp_path / "v2" / "aviato" / "cgroup.subtree_control").write_text("")
    v2 = Cgroups(root=str(tmp_path / "v2"))
    group = tmp_path / "v2" / "aviato" / "sb-5"
    group.mkdir()
    (group / "memory.swap.max").write_text("max")  # the kernel makes it with the group
    v2.make("sb-5", memory=64 << 20, pids=None, cpus=None)
    assert (group / "memory.swap.max").read_text() == "0"

    for c in ("memory", "pids", "cpu"):
        (tmp_path / "v1" / c).mkdir(parents=True)
        (tmp_path / "v1" / c / "cgroup.procs").write_text("")
    v1 = Cgroups(root=str(tmp_path / "v1"))
    group = tmp_path / "v1" / "memory" / "aviato" / "sb-6"
    group.mkdir(parents=True)
    memsw = group / "memory.memsw.limit_in_bytes"
    memsw.write_text("-1")
    written: list[tuple[str, str]] = []
    real_write = cgroups._write

    def write(path: Path, value: str) -> None:
        written.append((path.name, value))
        real_write(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    v1.make("sb-6", memory=64 << 20, pids=None, cpus=None)
    assert memsw.read_text() == str(64 << 20)
    assert written == [
        ("memory.memsw.limit_in_bytes", "-1"),
        ("memory.limit_in_bytes", str(64 << 20)),
        ("memory.memsw.limit_in_bytes", str(64 << 20)),
    ]
    v1.set_limits("sb-6", memory=None, pids=None, cpus=None)  # lifted: memsw first
    assert memsw.read_text() == "-1"
    assert (group / "memory.limit_in_bytes").read_text() == "-1"
