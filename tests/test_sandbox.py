"""The runtime conformance suite: the Sandbox and Session API, the same tests against a
real cluster of each runtime (Docker containers; the local runtime's bubblewrap
process trees)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from aviato import (
    ExecResult,
    Sandbox,
    SandboxDefaults,
    SandboxError,
    SandboxExecutionError,
    SandboxFileError,
    SandboxNotRunningError,
    SandboxStatus,
    SandboxTimeoutError,
)
from tests.conftest import ROOT, Cluster, containers_of, docker_cluster, wait_until
from tests.test_local_runtime import STATE, _local_cluster, need_cgroups

#: "docker-spare", "local-spare": agents that keep spares (--warm), so most sandboxes are
#: made from one.
RUNTIMES = ["docker", "docker-spare", "local", "local-spare"]
SPARES = ["--warm", "python:3.11=3"]


@pytest.fixture(scope="module", params=RUNTIMES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """This module's cluster, once per runtime (overrides conftest's Docker one)."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "docker":
        yield from docker_cluster(tmp)
    elif request.param == "docker-spare":
        yield from docker_cluster(tmp, agent_args=SPARES)
    elif request.param == "local-spare":
        yield from _local_cluster(tmp, agent_args=SPARES)
    else:
        yield from _local_cluster(tmp)


def sandboxes_of(cluster: Cluster) -> list[str]:
    """The sandboxes the cluster's runtime still holds (containers; local state dirs),
    spares not counted."""
    if cluster.runtime == "docker":
        names = [name.removeprefix("aviato-") for name in containers_of(cluster.agent_ids)]
        return [name for name in names if not name.startswith("spare-")]
    names = [p.name for a in cluster.agent_ids for p in (STATE / a).glob("*")]
    return [name for name in names if not name.startswith("spare-")]


@pytest.fixture
def defaults(cluster: Cluster) -> Iterator[SandboxDefaults]:
    yield SandboxDefaults(container_image="python:3.11", scheduler=cluster.address, lease_seconds=5)
    wait_until(lambda: not sandboxes_of(cluster), 15, 0.2, "the test's sandboxes to be removed")


async def test_exec_bytes_returncode_and_check(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        r = await sb.exec(["echo", "hi"])
        assert isinstance(r, ExecResult)
        assert r.stdout == b"hi\n" and r.stderr == b"" and r.returncode == 0
        assert r.command == ("echo", "hi")
        r = await sb.exec(["sh", "-c", "printf out; printf err >&2; exit 7"])
        assert (r.stdout, r.stderr, r.returncode) == (b"out", b"err", 7)
        with pytest.raises(SandboxExecutionError) as info:
            await sb.exec(["sh", "-c", "echo boom >&2; exit 3"], check=True)
        assert info.value.exec_result.returncode == 3
        assert b"boom" in info.value.exec_result.stderr
        r = await sb.exec(["sh", "-c", 'echo "$FOO $(pwd)"'], cwd="/tmp", env={"FOO": "bar"})
        assert r.stdout == b"bar /tmp\n"


async def test_exec_timeout_kills_the_process(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        # The default path: through the in-sandbox supervisor, once it is up (before,
        # execs go through the runtime: `docker exec`).
        await wait_for_async(
            lambda: _any_running(sb, "aviato_supervisor"), 10, "the sandbox's supervisor"
        )
        t0 = time.monotonic()
        # The shell stays the parent (a last command could be exec'd in its place): the
        # whole process group must die, not the shell alone.
        with pytest.raises(SandboxTimeoutError) as info:
            await sb.exec(["sh", "-c", "echo started; sleep 30; echo never"], timeout_seconds=1)
        assert time.monotonic() - t0 < 10
        assert info.value.exec_result is not None
        assert b"started" in info.value.exec_result.stdout
        # The image has no `ps`: read every process's command line from /proc. The
        # listing must see the sandbox's own command, or it could see nothing at all.
        assert "sleep infinity" in await command_lines(sb)
        await wait_for_async(
            lambda: _none_running(sb, "sleep 30"), 10, "the timed-out exec's processes to die"
        )
        # the sandbox is still usable
        assert (await sb.exec(["true"])).returncode == 0


async def command_lines(sb: Sandbox) -> list[str]:
    """Every process's command line inside the sandbox, read from /proc (no `ps`)."""
    listing = "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null"
    r = await sb.exec(["sh", "-c", listing])
    return [line.strip() for line in r.stdout.decode(errors="replace").splitlines()]


async def _any_running(sb: Sandbox, needle: str) -> bool:
    return any(needle in line for line in await command_lines(sb))


async def _none_running(sb: Sandbox, needle: str) -> bool:
    return not await _any_running(sb, needle)


async def wait_for_async(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    """Poll the coroutine function ``check`` until it returns something true."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.1)
    return value


async def test_exec_stream_yields_output_as_produced(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        # The command prints "b" only once the test has seen "a" and says so (a file):
        # "a" must arrive while the command runs, not at its end. No timing involved.
        gate = "while [ ! -e /tmp/go ]; do sleep 0.05; done"
        stream = sb.exec_stream(["sh", "-c", f"echo a; {gate}; echo b >&2; exit 4"])
        seen = []
        async with asyncio.timeout(60):  # a hang (output held back) ends here
            async for chunk in stream:
                seen.append((chunk.fd, chunk.data))
                if len(seen) == 1:
                    await sb.write_file("/tmp/go", b"")
        assert seen == [(1, b"a\n"), (2, b"b\n")]
        assert stream.returncode == 4


async def test_files_binary_safe_large_and_missing(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        every_byte = bytes(range(256)) * 4
        await sb.write_file("/tmp/deep/dir/bytes.bin", every_byte)
        assert await sb.read_file("/tmp/deep/dir/bytes.bin") == every_byte
        big = os.urandom(64 * 1024 * 1024)
        await sb.write_file("/tmp/big.bin", big)
        r = await sb.exec(["sh", "-c", "wc -c < /tmp/big.bin"])
        assert int(r.stdout) == len(big)
        assert await sb.read_file("/tmp/big.bin") == big
        with pytest.raises(SandboxFileError) as info:
            await sb.read_file("/no/such/file")
        assert info.value.filepath == "/no/such/file"


async def test_start_twice_and_stop_idempotent(defaults: SandboxDefaults) -> None:
    sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults, tags=["twice"])
    first, second = await asyncio.gather(sb.start(), sb.start())
    assert first == second == sb.sandbox_id
    assert await sb.start() == first
    listed = await Sandbox.list(tags=["twice"], defaults=defaults)
    assert [s.sandbox_id for s in listed] == [first]
    await sb.stop()
    await sb.stop()
    assert await sb.status() is SandboxStatus.TERMINATED
    with pytest.raises(SandboxNotRunningError):
        await sb.exec(["true"])


async def test_create_classmethod_wait_and_returncode(defaults: SandboxDefaults) -> None:
    sb = await Sandbox.create("sh", "-c", "exit 5", defaults=defaults)
    assert await sb.wait(timeout=20) == 5
    assert sb.returncode == 5
    assert await sb.status() is SandboxStatus.COMPLETED
    with pytest.raises(SandboxNotRunningError):
        await sb.exec(["true"])


async def test_wait_timeout(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        with pytest.raises(SandboxTimeoutError):
            await sb.wait(timeout=0.5)


async def test_spread_over_both_agents(cluster, defaults: SandboxDefaults) -> None:
    if "--warm" in cluster.agent_args:
        # Creates go where a spare waits (the most of them first): with as many on
        # each agent, they alternate as a spread does.
        await asyncio.to_thread(
            wait_until,
            lambda: all(a.spares == cluster.slots for a in cluster.status().agents),
            60,
            0.1,
            "every agent's spares",
        )
    async with Sandbox.session(defaults) as session:
        sbs = [session.create(command="sleep", args=["infinity"]) for _ in range(2)]
        await asyncio.gather(*(sb.start() for sb in sbs))
        agents = {sb.info.agent_id for sb in sbs if sb.info}
        assert agents == set(cluster.agent_ids)


async def test_queue_waits_for_a_free_slot_then_times_out(cluster, defaults) -> None:
    capacity = cluster.slots * len(cluster.agent_ids)
    async with Sandbox.session(defaults) as session:
        full = [session.create(command="sleep", args=["infinity"]) for _ in range(capacity)]
        await asyncio.gather(*(sb.start() for sb in full))
        waiting = session.create(command="sleep", args=["infinity"])
        task = asyncio.create_task(waiting.start())
        await asyncio.sleep(1.0)
        assert not task.done()  # queued, not dropped and not failed
        await full[0].stop()
        await asyncio.wait_for(task, 20)
        assert await waiting.status() is SandboxStatus.RUNNING
        # Full again: a short start timeout gives a clear SandboxTimeoutError.
        impatient = Sandbox(
            command="sleep", args=["infinity"], defaults=defaults.replace(start_timeout_seconds=0.5)
        )
        with pytest.raises(SandboxTimeoutError, match="no free sandbox slot"):
            await impatient.start()


async def test_max_lifetime_is_enforced_by_the_scheduler(cluster, defaults) -> None:
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults, max_lifetime_seconds=1.5)
    assert sb.sandbox_id in sandboxes_of(cluster)
    with pytest.raises(SandboxError, match="max lifetime"):
        await sb.wait(timeout=15)
    assert await sb.status() is SandboxStatus.TERMINATED
    deadline = time.monotonic() + 10
    while sb.sandbox_id in sandboxes_of(cluster) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert sb.sandbox_id not in sandboxes_of(cluster)


async def test_session_closes_forgotten_sandboxes(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults.replace(tags=("sess",))) as session:
        kept = session.create(command="sleep", args=["infinity"], tags=["extra"])
        await kept.start()
        assert kept.tags == ("sess", "extra")
        assert session.sandbox_count == 1
        unstarted = session.create(command="sleep", args=["infinity"])
        assert session.sandbox_count == 1
    assert await kept.status() is SandboxStatus.TERMINATED
    assert unstarted.sandbox_id is None
    with pytest.raises(SandboxError, match="closed"):
        session.create(command="sleep", args=["infinity"])


async def test_from_id_and_list_from_another_process(defaults: SandboxDefaults) -> None:
    async with Sandbox(
        command="sleep", args=["infinity"], tags=["shared-x"], defaults=defaults
    ) as sb:
        await sb.write_file("/tmp/note", b"from parent")
        code = f"""
import asyncio
from aviato import Sandbox, SandboxDefaults
async def main():
    d = SandboxDefaults(scheduler={defaults.scheduler!r})
    again = await Sandbox.from_id({sb.sandbox_id!r}, defaults=d)
    print((await again.read_file("/tmp/note")).decode())
    print([s.sandbox_id for s in await Sandbox.list(tags=["shared-x"], defaults=d)])
asyncio.run(main())
"""
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["from parent", str([sb.sandbox_id])]


#: Spins for 2 s of wall time; prints the share of a CPU it got (CPU time / wall time).
_SPIN = (
    "import time\n"
    "w, c = time.monotonic(), time.process_time()\n"
    "while time.monotonic() - w < 2.0:\n"
    "    pass\n"
    "print((time.process_time() - c) / (time.monotonic() - w))\n"
)


#: Allocate and touch ``mib`` MiB, hold it 3 s (so that two overlap), say so.
_HOLD = (
    "import time\n"
    "x = bytearray({mib} << 20)\n"
    "x[::4096] = b'1' * len(x[::4096])\n"
    "time.sleep(3)\n"
    "print('held', flush=True)\n"
)


async def test_memory_limit_holds_for_the_whole_tree(cluster: Cluster, defaults) -> None:
    """memory_bytes=128 MiB: one process holding 80 MiB runs to the end; two at once
    (each under the limit, together over it) do not both survive. The limit is the
    sandbox's, not each process's (as a per-process rlimit would be)."""
    async with Sandbox(
        command="sleep", args=["infinity"], memory_bytes=128 << 20, defaults=defaults
    ) as sb:
        if cluster.runtime == "local":
            need_cgroups(sb.runtime)  # without cgroups: a per-process rlimit only
        hog = f'python -c "{_HOLD.format(mib=80)}"'
        r = await sb.exec(["sh", "-c", hog], timeout_seconds=60)
        assert r.stdout == b"held\n", r  # alone, under the limit
        r = await sb.exec(["sh", "-c", f"{hog} & {hog} & wait"], timeout_seconds=60)
        assert r.stdout.count(b"held") < 2, f"two 80 MiB processes under 128 MiB: {r}"


async def test_cpu_limit_throttles_the_whole_sandbox(cluster: Cluster, defaults) -> None:
    """cpus=0.4, measured from inside: two processes spinning at once get 0.4 of a CPU
    between them, not each (without the limit: a CPU each, on two cores)."""
    async with Sandbox(command="sleep", args=["infinity"], cpus=0.4, defaults=defaults) as sb:
        if cluster.runtime == "local":
            need_cgroups(sb.runtime)  # without cgroups the local runtime cannot limit CPU
        spin = f"python -c '{_SPIN}'"
        r = await sb.exec(["sh", "-c", f"{spin} & {spin}; wait"], timeout_seconds=60)
        shares = [float(x) for x in r.stdout.split()]
        assert len(shares) == 2, r
        # 0.4 plus slack for the quota's period; far below the ~1+ an unlimited pair gets
        # even on a busy two-core machine.
        assert sum(shares) < 0.6, f"CPU shares {shares} under cpus=0.4"
        if cluster.runtime == "docker":  # the container's own cgroup says it was throttled
            r = await sb.exec(["cat", "/sys/fs/cgroup/cpu/cpu.stat", "/sys/fs/cgroup/cpu.stat"])
            stat = dict(line.split() for line in r.stdout.decode().splitlines())
            assert int(stat["nr_throttled"]) > 0, stat
