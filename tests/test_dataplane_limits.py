"""Reads are capped while they read, and a request the client gives up on (cancelled,
timed out) stops where it runs: the sandbox stops reading, the command is killed.
On every path: the supervisor (Docker and local) and docker exec/archive (images
without Python)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import psutil
import pytest

from aviato import (
    PayloadTooLargeError,
    Sandbox,
    SandboxFileError,
)
from aviato.protocol import MAX_PAYLOAD_BYTES
from tests.conftest import Cluster
from tests.test_local_runtime import ldefaults, local  # noqa: F401 (fixtures)

MiB = 1 << 20


async def _sandbox_rss(sb: Sandbox) -> int:
    """Bytes resident in all the sandbox's processes (its image has no ps)."""
    r = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null"])
    return sum(int(kb) * 1024 for kb in re.findall(rb"VmRSS:\s+(\d+) kB", r.stdout))


async def _processes(sb: Sandbox) -> str:
    r = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"])
    return r.stdout.decode(errors="replace")


async def _until_gone(sb: Sandbox, marker: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while marker in await _processes(sb):
        assert time.monotonic() < deadline, f"{marker!r} still runs: {await _processes(sb)}"
        await asyncio.sleep(0.1)


async def _supervisor_threads(sb: Sandbox) -> int:
    """The supervisor's thread count, seen from an exec (which adds its own, always the
    same number)."""
    script = (
        "for p in /proc/[0-9]*; do grep -q aviato_worke[r] $p/cmdline 2>/dev/null && "
        "grep Threads: $p/status; done"
    )
    r = await sb.exec(["sh", "-c", script])  # (and bubblewrap's init, one thread)
    return sum(int(n) for n in re.findall(rb"Threads:\s+(\d+)", r.stdout))


def _agent_of(sb: Sandbox, cluster: Cluster) -> psutil.Process:
    assert sb.info is not None and sb.info.agent_id is not None
    return psutil.Process(cluster.procs[sb.info.agent_id].pid)


async def test_read_is_capped_while_reading(flavour: tuple[Sandbox, Cluster]) -> None:
    sb, _ = flavour
    await sb.exec(["sh", "-c", "head -c 3145728 /dev/zero > /tmp/three; truncate -s 20G /tmp/big"])
    assert len(await sb.read_file("/tmp/three", max_bytes=3 * MiB)) == 3 * MiB
    with pytest.raises(PayloadTooLargeError, match="max_bytes"):
        await sb.read_file("/tmp/three", max_bytes=3 * MiB - 1)
    # 20 GiB (sparse): refused at once, by its size, with the default cap
    with pytest.raises(PayloadTooLargeError, match=str(MAX_PAYLOAD_BYTES)):
        await asyncio.wait_for(sb.read_file("/tmp/big"), 30)
    with pytest.raises(ValueError, match="max_bytes"):
        await sb.read_file("/tmp/three", max_bytes=0)
    # an endless file: the supervisor stops at the cap (docker's archive of a device
    # file holds no data: not a regular file)
    with pytest.raises((PayloadTooLargeError, SandboxFileError)):
        await asyncio.wait_for(sb.read_file("/dev/zero", max_bytes=4 * MiB), 30)
    assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"


async def test_endless_read_keeps_daemon_and_sandbox_memory_bounded(
    flavour: tuple[Sandbox, Cluster],
) -> None:
    """Regression: the sandbox side read /dev/zero on and on (2.4 -> 4.3 GiB in 6 s)
    after the client gave up. Now it stops at the payload limit, or as soon as the
    client gives up, and both the agent and the sandbox give the memory back."""
    sb, cluster = flavour
    agent = _agent_of(sb, cluster)
    agent_before = agent.memory_info().rss
    sandbox_before = await _sandbox_rss(sb)
    for give_up_after in (60.0, 0.3):  # read to the cap; cancelled on the way there
        reading = asyncio.ensure_future(asyncio.wait_for(sb.read_file("/dev/zero"), give_up_after))
        try:
            while not reading.done():
                # the agent never holds the data it refuses; the sandbox at most the cap
                assert agent.memory_info().rss - agent_before < 128 * MiB
                assert await _sandbox_rss(sb) - sandbox_before < MAX_PAYLOAD_BYTES + 128 * MiB
        finally:
            reading.cancel()  # a failed check must not leave it reading
        with pytest.raises((PayloadTooLargeError, SandboxFileError, TimeoutError)):
            await reading
        # and then gives it back (a cancelled read stops within a chunk)
        deadline = time.monotonic() + 15
        while (now := await _sandbox_rss(sb)) - sandbox_before > 64 * MiB:
            assert time.monotonic() < deadline, (sandbox_before, now)
            await asyncio.sleep(0.1)
        assert agent.memory_info().rss - agent_before < 128 * MiB


async def test_cancelled_read_stops_reading_in_the_sandbox(
    flavour: tuple[Sandbox, Cluster],
) -> None:
    """A FIFO fed forever: while the sandbox reads it, the writer lives; once the read is
    cancelled and the reader closes the FIFO, the writer dies of SIGPIPE."""
    sb, _ = flavour
    if "aviato_supervisor" not in await _processes(sb):
        # docker's archive of a FIFO holds no data: refused at once, nothing to cancel
        await sb.exec(["mkfifo", "/tmp/fifo"])
        with pytest.raises(SandboxFileError, match="not a regular file"):
            await asyncio.wait_for(sb.read_file("/tmp/fifo"), 30)
        return
    writer = "while :; do echo feeding-fifo-7; sleep 0.01; done > /tmp/fifo"
    await sb.exec(["sh", "-c", f"mkfifo /tmp/fifo; ({writer}) >/dev/null 2>&1 &"])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sb.read_file("/tmp/fifo"), 1.0)
    await _until_gone(sb, "feeding-fifo-7")
    # A FIFO nobody writes to: the read waits, and a cancel ends the wait too (its
    # thread in the supervisor ends, instead of blocking for ever in open()).
    await sb.exec(["mkfifo", "/tmp/silent"])
    threads = await _supervisor_threads(sb)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sb.read_file("/tmp/silent"), 1.0)
    deadline = time.monotonic() + 15
    while await _supervisor_threads(sb) != threads:
        assert time.monotonic() < deadline, "the cancelled read's thread still waits"
        await asyncio.sleep(0.1)


async def test_cancelled_exec_kills_its_process(flavour: tuple[Sandbox, Cluster]) -> None:
    sb, _ = flavour
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sb.exec(["sleep", "4242"]), 1.0)
    await _until_gone(sb, "sleep 4242")
    chunks = sb.exec_stream(["sh", "-c", "echo started; exec sleep 4343"]).__aiter__()
    assert (await chunks.__anext__()).data == b"started\n"
    await chunks.aclose()  # type: ignore[attr-defined]  # the consumer leaves early
    await _until_gone(sb, "sleep 4343")


async def test_exec_of_a_killed_local_client_is_killed(flavour: tuple[Sandbox, Cluster]) -> None:
    """A client on the agent's host that dies (kill -9, so it sends no Cancel) closes its
    local lane: what it ran stops too."""
    sb, cluster = flavour
    command = ["exec", sb.sandbox_id or "", "--", "sleep", "5252"]
    cli = subprocess.Popen(
        [sys.executable, "-m", "aviato.cli", "--scheduler", cluster.address, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while "sleep 5252" not in await _processes(sb):
            assert cli.poll() is None and time.monotonic() < deadline, "the exec never ran"
            await asyncio.sleep(0.1)
    finally:
        cli.kill()
        cli.wait(timeout=30)
    await _until_gone(sb, "sleep 5252")
