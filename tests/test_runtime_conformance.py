"""The runtime conformance suite: what every ``Runtime`` must do, run against the real
runtimes and the python:3.11 image ("docker", "docker-spare": every sandbox made
from a pre-started spare, and "docker-gvisor": Docker with gVisor's runsc, on a second
engine of the tests' own, tests/_gvisor_engine.py). The local runtime's exec goes
through its supervisor, so it joins at the Sandbox level instead (tests/test_sandbox.py
runs on every runtime).

``RuntimeConformance`` takes a ``runtime`` fixture parametrized by runtime name, so
another runtime joins by adding its name to ``RUNTIMES``. Without a Docker engine or
the image the tests skip, unless AVIATO_REQUIRE_DOCKER=1. Docker-only tests:
tests/test_runtime_docker.py.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from agent.runtime import ExitStatus, OutputChunk, Runtime, SandboxExit
from agent.runtime.base import LABEL_AGENT, LABEL_SANDBOX, sandbox_labels
from agent.runtime.snapshots import LABEL_SNAPSHOT_AGENT, snapshot_labels, snapshot_name
from aviato.exceptions import (
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    UnsupportedOperationError,
)
from aviato.protocol import SNAPSHOT_REPOSITORY, SandboxSpec, snapshot_agent_key

pytestmark = pytest.mark.docker

IMAGE = "python:3.11"
#: "docker-spare": every sandbox made from a pre-started spare (tests/_spare_runtime.py).
RUNTIMES = ["docker", "docker-spare", "docker-gvisor"]
RUN_ID = uuid.uuid4().hex[:8]  # agent ids unique to this test run
_counter = itertools.count()
REQUIRE = os.environ.get("AVIATO_REQUIRE_DOCKER") == "1"
#: The engine the running test's sandboxes are on ("": the host's; set per test).
_HOST = [""]


def _docker(*args: str) -> list[str]:
    return ["docker", *(["-H", _HOST[0]] if _HOST[0] else []), *args]


def _docker_ps(agent_id: str) -> list[str]:
    out = subprocess.run(
        _docker("ps", "-aq", "--filter", f"label={LABEL_AGENT}={agent_id}"),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def _snapshot_images(agent_id: str) -> list[str]:
    """The agent's snapshot images: by label, and by name (a commit that lost its
    labels is found too)."""
    found: set[str] = set()
    named = f"reference={SNAPSHOT_REPOSITORY}:{snapshot_agent_key(agent_id)}-*"
    for flt in (f"label={LABEL_SNAPSHOT_AGENT}={agent_id}", named):
        out = subprocess.run(
            _docker("images", "-q", "--filter", flt), capture_output=True, text=True, check=True
        )
        found.update(out.stdout.split())
    return sorted(found)


def _inspect(sandbox_id: str) -> dict[str, Any]:
    out = subprocess.run(
        _docker("container", "inspect", f"aviato-{sandbox_id}"),
        capture_output=True,
        check=True,
    )
    attrs: dict[str, Any] = json.loads(out.stdout)[0]
    return attrs


@functools.cache
def _docker_problem() -> str | None:
    from agent.runtime.docker import docker_available

    if not docker_available():
        return "no Docker engine answers"
    found = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if found.returncode != 0:
        return f"image {IMAGE} is missing: build it with scripts/build-image.sh"
    return None


@pytest.fixture
def agent_id(request: pytest.FixtureRequest) -> Iterator[str]:
    """An agent id for one test; afterwards every container labelled with it is gone."""
    kind = request.node.callspec.params["runtime"]
    if kind.startswith("docker") and (problem := _docker_problem()):
        if REQUIRE:
            pytest.fail(f"{problem} (AVIATO_REQUIRE_DOCKER=1)")
        pytest.skip(problem)
    _HOST[0] = ""
    if kind == "docker-gvisor":
        _HOST[0] = request.getfixturevalue("gvisor_engine").host
    aid = f"test-{RUN_ID}-{next(_counter)}"
    yield aid
    if kind.startswith("docker"):
        leftover = _docker_ps(aid)
        if leftover:
            subprocess.run(_docker("rm", "-f", *leftover), capture_output=True, check=False)
        assert _docker_ps(aid) == [], f"containers leaked for agent {aid}"
        snapshots = _snapshot_images(aid)
        if snapshots:
            subprocess.run(_docker("rmi", "-f", *snapshots), capture_output=True, check=False)
        assert not snapshots, f"snapshot images leaked for agent {aid}: {snapshots}"
    _HOST[0] = ""


@pytest.fixture(params=RUNTIMES)
async def runtime(request: pytest.FixtureRequest, agent_id: str) -> AsyncIterator[Runtime]:
    if request.param == "docker":
        from agent.runtime.docker import DockerRuntime

        rt: Runtime = DockerRuntime()
    elif request.param == "docker-spare":
        from tests._spare_runtime import SpareBackedDocker

        rt = SpareBackedDocker()
    elif request.param == "docker-gvisor":
        import docker

        from agent.runtime.docker import DockerRuntime

        client = docker.DockerClient(base_url=_HOST[0], max_pool_size=32, timeout=120)
        rt = DockerRuntime(client=client, isolations=("gvisor",))
    else:
        raise AssertionError(f"unknown runtime {request.param}")
    try:
        yield rt
    finally:
        await rt.close()


async def new_sandbox(
    rt: Runtime,
    agent_id: str,
    *args: str,
    command: str = "sleep",
    **spec_fields: Any,
) -> str:
    sid = f"t{uuid.uuid4().hex[:12]}"
    spec = SandboxSpec(
        image=spec_fields.pop("image", IMAGE), command=command, args=args or ("300",), **spec_fields
    )
    await rt.create(sid, spec, sandbox_labels(sid, agent_id, spec, time.time()))
    return sid


async def next_exit(exits: AsyncIterator[SandboxExit], timeout: float = 10) -> SandboxExit:
    return await asyncio.wait_for(anext(exits), timeout)


class RuntimeConformance:
    async def test_exec_echo(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        out = await runtime.exec(sid, ("echo", "hi"))
        assert (out.returncode, out.stdout, out.stderr, out.timed_out) == (0, b"hi\n", b"", False)
        out = await runtime.exec(sid, ("sh", "-c", "echo out; echo err >&2"))
        assert (out.stdout, out.stderr) == (b"out\n", b"err\n")

    async def test_nonzero_exit(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        assert (await runtime.exec(sid, ("sh", "-c", "exit 7"))).returncode == 7
        missing = await runtime.exec(sid, ("no-such-program",))
        assert missing.returncode != 0

    async def test_cwd_and_env(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id, env={"A": "spec"}, working_dir="/srv/app")
        out = await runtime.exec(sid, ("sh", "-c", "pwd; echo $A"))
        assert out.stdout == b"/srv/app\nspec\n"
        out = await runtime.exec(sid, ("sh", "-c", "pwd; echo $A $B"), cwd="/tmp", env={"B": "x"})
        assert out.stdout == b"/tmp\nspec x\n"
        await runtime.write_file(sid, "rel/f.txt", b"relative")  # relative to working_dir
        assert await runtime.read_file(sid, "/srv/app/rel/f.txt") == b"relative"

    async def test_stream_yields_before_exit(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        t0 = time.monotonic()
        seen: list[tuple[float, OutputChunk | ExitStatus]] = []
        async for event in runtime.exec_stream(sid, ("sh", "-c", "echo a; sleep 1; echo b >&2")):
            seen.append((time.monotonic() - t0, event))
        first_t, first = seen[0]
        end_t, end = seen[-1]
        assert first == OutputChunk(1, b"a\n")
        assert end == ExitStatus(0)
        assert end_t - first_t > 0.7, seen
        assert OutputChunk(2, b"b\n") in [e for _, e in seen]

    async def test_exec_timeout_kills(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        t0 = time.monotonic()
        out = await runtime.exec(sid, ("sh", "-c", "echo started; sleep 29"), timeout_seconds=1)
        assert time.monotonic() - t0 < 5
        assert out.timed_out and out.returncode != 0
        assert out.stdout == b"started\n"
        ps = "import os; print([open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc')"
        ps += " if p.isdigit()])"
        listing = await runtime.exec(sid, ("python3", "-c", ps))
        assert b"sleep\\x0029" not in listing.stdout, listing.stdout

        t0 = time.monotonic()
        events = [e async for e in runtime.exec_stream(sid, ("sleep", "30"), timeout_seconds=0.5)]
        assert time.monotonic() - t0 < 5
        assert isinstance(events[-1], ExitStatus) and events[-1].timed_out

    async def test_file_round_trip(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        every_byte = bytes(range(256))
        await runtime.write_file(sid, "/data/deep/dir/bytes.bin", every_byte)
        assert await runtime.read_file(sid, "/data/deep/dir/bytes.bin") == every_byte
        await runtime.write_file(sid, "/tmp/view.bin", memoryview(every_byte)[1:])
        assert await runtime.read_file(sid, "/tmp/view.bin") == every_byte[1:]
        big = os.urandom(64 * 1024 * 1024)
        await runtime.write_file(sid, "/tmp/big.bin", big, 0o600)
        assert await runtime.read_file(sid, "/tmp/big.bin") == big
        # (Python's stat: coreutils' statx fails with EINVAL under Debian's runsc)
        st = "import os; s = os.stat('/tmp/big.bin'); print(f'{s.st_mode & 0o777:o} {s.st_size}')"
        out = await runtime.exec(sid, ("python3", "-c", st))
        assert out.stdout == f"600 {len(big)}\n".encode()
        # symlinks are followed
        assert (await runtime.read_file(sid, "/usr/local/bin/python3"))[:4] == b"\x7fELF"

    async def test_read_errors(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        with pytest.raises(SandboxFileError, match="no such file") as info:
            await runtime.read_file(sid, "/nope/missing.txt")
        assert info.value.filepath == "/nope/missing.txt"
        assert info.value.sandbox_id == sid
        with pytest.raises(SandboxFileError, match="directory"):
            await runtime.read_file(sid, "/usr")

    async def test_stop(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        await runtime.stop(sid)
        with pytest.raises(SandboxNotRunningError, match=f"sandbox {sid} is not running"):
            await runtime.exec(sid, ("true",))
        with pytest.raises(SandboxNotRunningError):
            [e async for e in runtime.exec_stream(sid, ("true",))]
        with pytest.raises(SandboxNotRunningError):
            await runtime.write_file(sid, "/tmp/x", b"x")
        with pytest.raises(SandboxNotFoundError):
            await runtime.logs(sid)
        await runtime.stop(sid)
        await runtime.stop("never-existed")
        assert _docker_ps(agent_id) == []

    async def test_unknown_image(self, runtime: Runtime, agent_id: str) -> None:
        image = f"aviato-no-such-image-{RUN_ID}:1"
        with pytest.raises(SandboxFailedError, match=re.escape(image)) as info:
            await new_sandbox(runtime, agent_id, image=image)
        assert "build-image.sh" in str(info.value) and info.value.sandbox_id
        assert _docker_ps(agent_id) == []

    async def test_unknown_command(self, runtime: Runtime, agent_id: str) -> None:
        with pytest.raises(SandboxFailedError, match="no-such-cmd") as info:
            await new_sandbox(runtime, agent_id, command="no-such-cmd")
        assert IMAGE in str(info.value)
        assert _docker_ps(agent_id) == []

    async def test_list(self, runtime: Runtime, agent_id: str) -> None:
        a = await new_sandbox(runtime, agent_id)
        b = await new_sandbox(runtime, agent_id, session_id="s1")
        found = {s.sandbox_id: s for s in await runtime.list(agent_id)}
        assert set(found) == {a, b}
        assert found[b].running and found[b].exit_code is None
        assert found[b].labels[LABEL_SANDBOX] == b
        assert found[b].labels["aviato.session"] == "s1"
        assert await runtime.list(f"other-{agent_id}") == []

    async def test_exits(self, runtime: Runtime, agent_id: str) -> None:
        exits = aiter(runtime.exits())
        stopped = await new_sandbox(runtime, agent_id)
        await runtime.stop(stopped)  # a stopped sandbox is not an exit
        sid = await new_sandbox(runtime, agent_id, "-c", "echo bye; exit 3", command="sh")
        assert await next_exit(exits) == SandboxExit(sid, 3, False)
        # kept after the container is gone
        assert await runtime.logs(sid) == [OutputChunk(1, b"bye\n")]
        for _ in range(50):
            if not _docker_ps(agent_id):
                break
            await asyncio.sleep(0.1)
        assert _docker_ps(agent_id) == []

    async def test_logs(self, runtime: Runtime, agent_id: str) -> None:
        """In the order written, each chunk tagged with its stream. Regression: Docker
        gave all of stderr, then all of stdout."""
        script = "echo o1; sleep 0.1; echo e1 >&2; sleep 0.1; echo o2; exec sleep 300"
        sid = await new_sandbox(runtime, agent_id, "-c", script, command="sh")
        for _ in range(100):
            logs = await runtime.logs(sid)
            if b"o2" in b"".join(c.data for c in logs):
                break
            await asyncio.sleep(0.05)
        assert logs == [OutputChunk(1, b"o1\n"), OutputChunk(2, b"e1\n"), OutputChunk(1, b"o2\n")]

    async def test_hardened_defaults(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id, memory_bytes=256 * 1024 * 1024, cpus=0.5)
        if runtime.name == "docker":
            host = _inspect(sid)["HostConfig"]
            assert "no-new-privileges" in host["SecurityOpt"]
            assert host["CapDrop"] == ["ALL"]
            assert not host["CapAdd"]  # no capability kept by default
            assert host["PidsLimit"] == 1024 and host["Init"] is True
            # gVisor: the runsc runtime (with a network: the one run in its netns).
            gvisor = "gvisor" in runtime.isolations
            assert host["Runtime"] == ("runsc" if gvisor else "runc")
            # gVisor's own kernel answers (it reports 4.4.0), not the host's.
            kernel = (await runtime.exec(sid, ("uname", "-r"))).stdout.decode().strip()
            assert (kernel == "4.4.0") == gvisor, kernel
            assert host["Memory"] == 256 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
            assert host["MemorySwap"] == host["Memory"]  # no swap beyond the limit
        status = (await runtime.exec(sid, ("cat", "/proc/self/status"))).stdout
        if "gvisor" not in runtime.isolations:  # gVisor's /proc does not show the flag
            assert b"NoNewPrivs:\t1" in status
        assert b"CapEff:\t0000000000000000" in status

    async def test_network_none(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id, network="none")
        # (gVisor has no /sys/class/net; its /proc/net/dev lists the same)
        out = await runtime.exec(sid, ("sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"))
        assert out.stdout.split() == [b"lo"]
        if runtime.name == "docker":
            assert _inspect(sid)["HostConfig"]["NetworkMode"] == "none"
            gvisor = "gvisor" in runtime.isolations
            assert _inspect(sid)["HostConfig"]["Runtime"] == ("runsc-nonet" if gvisor else "runc")

    async def test_oom_exit(self, runtime: Runtime, agent_id: str) -> None:
        exits = aiter(runtime.exits())
        hog = "b = bytearray(512 << 20); b[::4096] = b'1' * len(b[::4096])"
        sid = await new_sandbox(
            runtime, agent_id, "-c", hog, command="python3", memory_bytes=64 << 20
        )
        assert await next_exit(exits) == SandboxExit(sid, 137, True)

    async def test_exits_only_own_sandboxes(self, runtime: Runtime, agent_id: str) -> None:
        """Two runtimes on one host (two agents): each reports and removes only its own."""
        other = type(runtime)()
        try:
            theirs = aiter(other.exits())
            ours = aiter(runtime.exits())
            sid = await new_sandbox(runtime, agent_id, "-c", "exit 5", command="sh")
            assert (await next_exit(ours)).sandbox_id == sid
            with pytest.raises(TimeoutError):
                await next_exit(theirs, timeout=0.5)
        finally:
            await other.close()

    async def test_concurrent_execs(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        outs = await asyncio.gather(*(runtime.exec(sid, ("echo", str(i))) for i in range(40)))
        assert [o.stdout for o in outs] == [f"{i}\n".encode() for i in range(40)]

    async def test_stream_abandoned_kills(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        stream = runtime.exec_stream(sid, ("sh", "-c", "echo go; exec sleep 28"))
        async for event in stream:
            assert event == OutputChunk(1, b"go\n")
            break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(150):  # generous: under load the kill lands late (seen once in CI)
            out = await runtime.exec(sid, ("sh", "-c", "cat /proc/[0-9]*/cmdline"))
            if b"sleep\x0028" not in out.stdout:
                break
            await asyncio.sleep(0.1)
        assert b"sleep\x0028" not in out.stdout

    # ------------------------------------------------------------------ lifecycle (issue 13)

    async def test_pause_freezes_and_resume_thaws(self, runtime: Runtime, agent_id: str) -> None:
        """Paused, the sandbox's counter stops (its logs, read without its processes,
        say so); resumed, it counts again and exec works. A paused sandbox stops and
        leaves nothing (the fixture's leak check)."""
        count = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done"
        sid = await new_sandbox(runtime, agent_id, "-c", count, command="sh")
        await _until_count(runtime, sid, above=3)
        await runtime.pause(sid)
        if runtime.name == "docker":
            assert _inspect(sid)["State"]["Paused"] is True
        paused_at = await _count(runtime, sid)
        await asyncio.sleep(1.0)  # the pause under test: at 20 a second, nothing may count
        assert await _count(runtime, sid) <= paused_at + 1  # one echo may have been in flight
        await runtime.resume(sid)
        await _until_count(runtime, sid, above=paused_at + 5)
        assert (await runtime.exec(sid, ("echo", "back"))).stdout == b"back\n"
        await runtime.pause(sid)
        await runtime.stop(sid)  # paused: stopped all the same
        with pytest.raises(SandboxNotRunningError):
            await runtime.pause(sid)
        with pytest.raises(SandboxNotRunningError):
            await runtime.resume("never-existed")

    async def test_snapshot_and_create_from_it(self, runtime: Runtime, agent_id: str) -> None:
        """A snapshot holds the files the sandbox wrote (through the runtime's file API and
        from inside); a sandbox made from it starts with them; listed with its labels,
        removed, and gone. gVisor refuses, naming itself: its /tmp is a tmpfs inside
        runsc, which the engine's commit does not see (the snapshot would lack it)."""
        sid = await new_sandbox(runtime, agent_id)
        await runtime.write_file(sid, "/tmp/state/put.txt", b"put")
        made = await runtime.exec(sid, ("sh", "-c", "echo inside > /tmp/state/made.txt"))
        assert made.returncode == 0
        image = snapshot_name(agent_id, sid)
        labels = snapshot_labels(agent_id, sid, IMAGE)
        if "gvisor" in runtime.isolations:
            with pytest.raises(UnsupportedOperationError, match=r"gVisor.*/tmp") as info:
                await runtime.snapshot(sid, image, labels)
            assert info.value.sandbox_id == sid
            assert await runtime.list_snapshots(agent_id) == []
            return
        size = await runtime.snapshot(sid, image, labels)
        assert size > 0
        listed = {s.image: s for s in await runtime.list_snapshots(agent_id)}
        assert set(listed) == {image}
        assert listed[image].labels[LABEL_SNAPSHOT_AGENT] == agent_id
        assert listed[image].size_bytes == size
        clone = await new_sandbox(runtime, agent_id, image=image)
        assert await runtime.read_file(clone, "/tmp/state/put.txt") == b"put"
        out = await runtime.exec(clone, ("cat", "/tmp/state/made.txt"))
        assert out.stdout == b"inside\n"
        found = {s.sandbox_id: s for s in await runtime.list(agent_id)}
        assert set(found) == {sid, clone}  # its own labels, not the source's
        await runtime.stop(clone)
        await runtime.remove_snapshot(image)
        assert await runtime.list_snapshots(agent_id) == []
        with pytest.raises(SandboxNotFoundError):
            await runtime.remove_snapshot(image)
        with pytest.raises(SandboxFailedError, match=re.escape(image)):
            await new_sandbox(runtime, agent_id, image=image)

    async def test_snapshot_of_a_stopped_sandbox(self, runtime: Runtime, agent_id: str) -> None:
        sid = await new_sandbox(runtime, agent_id)
        await runtime.stop(sid)
        with pytest.raises((SandboxNotRunningError, UnsupportedOperationError)):
            await runtime.snapshot(sid, snapshot_name(agent_id, sid), {})
        assert await runtime.list_snapshots(agent_id) == []


async def _count(runtime: Runtime, sandbox_id: str) -> int:
    """The last number the counting sandbox printed (0: none yet)."""
    lines = b"".join(c.data for c in await runtime.logs(sandbox_id)).split()
    return int(lines[-1]) if lines else 0


async def _until_count(runtime: Runtime, sandbox_id: str, above: int) -> None:
    deadline = time.monotonic() + 30
    while await _count(runtime, sandbox_id) <= above:
        assert time.monotonic() < deadline, f"{sandbox_id} did not count past {above}"
        await asyncio.sleep(0.05)


class TestRuntime(RuntimeConformance):
    pass
