"""agent/runtime/cgroups.py against fake cgroup trees (plain files in a temp dir)."""

from __future__ import annotations

from pathlib import Path

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
