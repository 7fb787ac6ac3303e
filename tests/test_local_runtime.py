"""The local runtime (no Docker): the same behaviour, and isolation shown from inside."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.runtime.local import interpreter_binds
from aviato import (
    Sandbox,
    SandboxDefaults,
    SandboxError,
    SandboxFailedError,
    SandboxStatus,
)
from tests.conftest import Cluster, wait_until
from tests.test_supervisor import _same_behaviour

STATE = Path(tempfile.gettempdir()) / "aviato-local"
#: CI sets it: the local runtime's cgroup limits must be in force, never skipped.
REQUIRE_CGROUPS = os.environ.get("AVIATO_REQUIRE_CGROUPS") == "1"


def need_cgroups(runtime: str) -> None:
    """Skip unless the local runtime named ``runtime`` has cgroup limits; under
    AVIATO_REQUIRE_CGROUPS=1 fail instead (as AVIATO_REQUIRE_DOCKER does for Docker)."""
    if "cgroup" in runtime:
        return
    problem = f"the local runtime has no writable cgroups here: {runtime!r}"
    if REQUIRE_CGROUPS:
        pytest.fail(f"AVIATO_REQUIRE_CGROUPS=1 but {problem}")
    pytest.skip(problem)


def _leftovers(c: Cluster) -> list[str]:
    dirs = [str(p) for a in c.agent_ids for p in (STATE / a).glob("*")]
    procs = [
        " ".join(p.info["cmdline"] or ())
        for p in psutil.process_iter(["cmdline"])
        if any(a in " ".join(p.info["cmdline"] or ()) for a in dirs)
    ]
    return dirs + procs


def _local_cluster(
    tmp: Path,
    *,
    agents: int = 2,
    slots: int = 3,
    agent_args: list[str] | None = None,
    **env: str,
) -> Iterator[Cluster]:
    if shutil.which("bwrap") is None and "AVIATO_LOCAL_NO_BWRAP" not in env:
        pytest.fail("bubblewrap (bwrap) is not installed: .ci/run installs it")
    c = Cluster(
        tmp, agents=agents, slots=slots, runtime="local", agent_env=env, agent_args=agent_args
    )
    try:
        yield c
    finally:
        c.close()
        left = _leftovers(c)
        assert not left, f"local sandboxes left behind: {left}"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("local"))


@pytest.fixture
def ldefaults(local: Cluster) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image="python:3.11", scheduler=local.address, lease_seconds=5)
    wait_until(lambda: not _leftovers(local), 15, 0.2, "the test's sandboxes to be removed")


async def test_same_exec_and_file_behaviour(ldefaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=ldefaults) as sb:
        assert sb.runtime.startswith("local (bubblewrap")
        await _same_behaviour(sb)


async def test_lifecycle_exit_code_lifetime_and_functions(ldefaults) -> None:
    sb = await Sandbox.create("sh", "-c", "exit 4", defaults=ldefaults)
    assert await sb.wait(timeout=20) == 4
    sb = await Sandbox.create("sleep", "infinity", defaults=ldefaults, max_lifetime_seconds=1)
    with pytest.raises(SandboxError, match="max lifetime"):
        await sb.wait(timeout=15)
    async with Sandbox.session(ldefaults) as session:

        @session.function(max_workers=2)
        def compute(n: int) -> int:
            import time

            time.sleep(0.2)
            return n * n

        results = await asyncio.gather(compute(1), compute(2), compute(3))
        assert [r.value for r in results] == [1, 4, 9]


async def test_other_images_are_refused_naming_them(ldefaults) -> None:
    with pytest.raises(SandboxFailedError, match=r"'ubuntu:22.04'.*Docker engine"):
        await Sandbox.create("sleep", "1", container_image="ubuntu:22.04", defaults=ldefaults)
    with pytest.raises(SandboxFailedError, match=r"Python 3\.2"):
        await Sandbox.create("sleep", "1", container_image="python:3.2", defaults=ldefaults)


async def test_isolation_from_inside(ldefaults: SandboxDefaults) -> None:
    async with (
        Sandbox(command="sleep", args=["infinity"], defaults=ldefaults) as a,
        Sandbox(command="sleep", args=["infinity"], defaults=ldefaults, network="none") as b,
    ):
        await a.write_file("/tmp/secret", b"a's")
        r = await b.exec(["sh", "-c", "cat /tmp/secret; echo rc=$?"])
        assert b"a's" not in r.stdout  # another sandbox's /tmp is invisible
        r = await a.exec(["sh", "-c", "ls /proc | grep -c '^[0-9]'"])
        assert int(r.stdout) < 10  # its own PID namespace: the host's processes are invisible
        r = await a.exec(["sh", "-c", "touch /etc/x /root/x /usr/x; echo done"])
        assert r.stderr.count(b"Read-only file system") == 3
        r = await a.exec(["sh", "-c", "grep CapEff /proc/self/status"])
        assert r.stdout.split()[-1] == b"0000000000000000"
        r = await b.exec(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"])
        assert r.stdout.split() == [b"lo"]  # network="none": loopback only
        r = await a.exec(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"])
        assert len(r.stdout.split()) > 1  # the default shares the host's network


HOG = "x = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"


async def test_limits_hold_for_the_whole_sandbox(ldefaults: SandboxDefaults) -> None:
    """With writable cgroups (this machine, CI): memory and pids limits hold for the
    sandbox's whole tree, and a memory hog is OOM-killed and reported as such, as with
    Docker. (Skipped without cgroups, failed under AVIATO_REQUIRE_CGROUPS=1.)"""
    sb = await Sandbox.create(
        "python", "-c", HOG, defaults=ldefaults, memory_bytes=64 * 1024 * 1024
    )
    need_cgroups(sb.runtime)
    with pytest.raises(SandboxFailedError, match="out of memory"):
        await sb.wait(timeout=60)
    assert sb.returncode == 137
    async with Sandbox(command="sleep", args=["infinity"], defaults=ldefaults) as small:
        # the agent's --pids-limit (1024) holds for the tree, root or not
        bomb = "i=0; while [ $i -lt 1500 ]; do sleep 30 & i=$((i+1)); done 2>&1 | tail -1"
        r = await small.exec(["sh", "-c", bomb], timeout_seconds=60)
        assert b"fork" in r.stdout.lower() or b"resource" in r.stdout.lower(), r
        r = await small.exec(["sh", "-c", "pkill -f '^sleep 30$'; echo ok"])
        assert r.stdout == b"ok\n"  # the sandbox is still usable


async def test_no_swap_beyond_the_memory_limit(ldefaults: SandboxDefaults) -> None:
    """The sandbox's real memory cgroup allows it no swap beyond its limit (v2:
    memory.swap.max 0; v1: memory + swap, memory.memsw.limit_in_bytes, = the limit)."""
    memory = (96 << 20) + 7 * 4096  # a size no other sandbox has: it finds our group
    async with Sandbox(
        command="sleep", args=["infinity"], defaults=ldefaults, memory_bytes=memory
    ) as sb:
        need_cgroups(sb.runtime)
        root = Path("/sys/fs/cgroup")
        v2 = (root / "cgroup.controllers").exists()
        base, limit, swap, no_swap = (
            (root / "aviato", "memory.max", "memory.swap.max", "0")
            if v2
            else (
                root / "memory" / "aviato",
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                str(memory),
            )
        )
        ours = [
            d
            for d in base.iterdir()
            if (d / limit).exists() and (d / limit).read_text().strip() == str(memory)
        ]
        assert len(ours) == 1, ours
        if not (ours[0] / swap).exists():
            pytest.skip(f"this kernel accounts no swap ({swap} is missing)")
        assert (ours[0] / swap).read_text().strip() == no_swap


async def test_without_cgroups_memory_fails_inside_and_cpus_is_refused(tmp_path: Path) -> None:
    """The weaker branch, on purpose (cgroups turned off): setrlimit makes the hog's
    allocation fail inside it; no OOM killer, so no OOM report; no CPU share at all."""
    for c in _local_cluster(tmp_path, AVIATO_LOCAL_CGROUPS="0"):
        d = SandboxDefaults(scheduler=c.address)
        sb = await Sandbox.create("python", "-c", HOG, defaults=d, memory_bytes=64 * 1024 * 1024)
        assert "cgroup" not in sb.runtime, sb.runtime
        assert await sb.wait(timeout=60) == 1
        assert b"MemoryError" in await sb.logs()
        # A CPU limit it cannot honour is refused, not ignored.
        with pytest.raises(SandboxFailedError, match=r"cpus=0\.5 needs cgroups"):
            await Sandbox.create("sleep", "1", defaults=d, cpus=0.5)


async def test_without_bubblewrap_it_says_it_is_not_isolated(tmp_path: Path) -> None:
    for c in _local_cluster(tmp_path, AVIATO_LOCAL_NO_BWRAP="1"):
        d = SandboxDefaults(scheduler=c.address)
        agents = c.status().agents
        assert all("NOT isolated" in a.runtime for a in agents)
        async with Sandbox(command="sleep", args=["infinity"], defaults=d) as sb:
            assert "NOT isolated" in sb.runtime
            assert (await sb.exec(["echo", "works"])).stdout == b"works\n"
            assert await sb.status() is SandboxStatus.RUNNING


async def test_a_venv_under_tmp_serves_sandboxes(tmp_path: Path) -> None:
    """An agent whose Python is a venv under /tmp (where each sandbox has a /tmp of its
    own): the venv is mounted read-only at its place. Regression: `bwrap: execvp python:
    No such file or directory`."""
    venv = Path(tempfile.mkdtemp(prefix="aviato-venv-", dir="/tmp"))
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
            check=True,
            timeout=120,
        )
        # A module only the venv has: sandboxes run the venv's Python, packages and all.
        (venv / "lib" / "python3.11" / "site-packages" / "only_in_the_venv.py").write_text(
            "VALUE = 42\n"
        )
        path = f"{venv}/bin:{os.environ['PATH']}"  # as when the venv is activated
        for c in _local_cluster(tmp_path, PATH=path):
            d = SandboxDefaults(scheduler=c.address, container_image="python:3.11")
            async with Sandbox(command="sleep", args=["infinity"], defaults=d) as sb:
                probe = "import sys, only_in_the_venv as m; print(sys.prefix, m.VALUE)"
                r = await sb.exec(["python", "-c", probe])
                assert r.stdout == f"{venv} 42\n".encode(), r
                # read-only, and the sandbox's own /tmp is still its own
                r = await sb.exec(["sh", "-c", f"touch {venv}/x; ls /tmp"])
                assert b"Read-only file system" in r.stderr
                assert r.stdout.split() == [venv.name.encode()], r  # just its mount point
            async with Sandbox.session(d) as session:

                @session.function()
                def from_the_venv(n: int) -> int:
                    import only_in_the_venv

                    return int(only_in_the_venv.VALUE) * n

                assert (await from_the_venv(2)).value == 84
    finally:
        shutil.rmtree(venv)


def test_an_interpreter_right_in_tmp_is_refused_saying_why() -> None:
    assert interpreter_binds(["/usr", "/tmp/v/env", "/tmp/v/env/lib", "/tmp/w"]) == [
        "/tmp/v/env",
        "/tmp/w",
    ]
    assert interpreter_binds(["/run/py/", "/opt/x"]) == ["/run/py"]
    with pytest.raises(ValueError, match=r"installed right in /tmp.*private /tmp"):
        interpreter_binds(["/tmp"])


async def test_a_killed_agent_leaves_nothing_once_restarted(tmp_path: Path) -> None:
    """kill -9 of a local agent takes its sandboxes down with it (bubblewrap's
    --die-with-parent); its state is reaped when it starts again."""
    for c in _local_cluster(tmp_path):
        d = SandboxDefaults(scheduler=c.address)
        sb = await Sandbox.create("sleep", "infinity", defaults=d)
        owner = sb.info.agent_id if sb.info else ""
        home = STATE / owner / (sb.sandbox_id or "")
        assert home.exists()
        c.kill(owner)

        def gone(path: Path = home) -> bool:
            lines = [" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])]
            return not any(str(path) in line for line in lines)

        await asyncio.to_thread(wait_until, gone, 10, 0.1, "its processes to die")
        c.start_agent(owner)
        await asyncio.to_thread(
            wait_until,
            lambda p=home: not p.exists(),
            20,
            0.1,
            f"the restarted agent to reap {home}\n{c.logs()}",
        )
        c.wait_agents(2)
