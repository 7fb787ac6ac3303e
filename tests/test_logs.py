"""``logs`` in the order written, each chunk tagged with its stream, on both runtimes;
and still readable after the sandbox stopped or exited."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from agent.runtime.base import OutputChunk as Chunk
from agent.runtime.base import tail_chunks
from agent.runtime.docker_bytes import order_log_entries
from agent.runtime.local import parse_tagged_log
from agent.supervisor import LOG_MAGIC, LOG_RECORD
from aviato import OutputChunk, Sandbox, SandboxDefaults
from tests.conftest import Cluster
from tests.test_local_runtime import ldefaults, local  # noqa: F401 (fixtures)

# Writes a human's moment apart: each stream is read on its own (by Docker, or by the
# supervisor), so only writes that far apart have an order to keep.
SCRIPT = "echo o1; sleep 0.1; echo e1 >&2; sleep 0.1; echo o2; sleep 0.1; echo e2 >&2"
EXPECTED = [OutputChunk(1, b"o1\n"), OutputChunk(2, b"e1\n"), OutputChunk(1, b"o2\n")]
EXPECTED.append(OutputChunk(2, b"e2\n"))


def _record(fd: int, data: bytes) -> bytes:
    return LOG_RECORD.pack(LOG_MAGIC, fd, len(data)) + data


def test_tagged_log_parsing() -> None:
    raw = b"bwrap: oops\n" + _record(1, b"a") + _record(1, b"b") + _record(2, b"c") + b"died\n"
    assert parse_tagged_log(raw) == [
        Chunk(2, b"bwrap: oops\n"),
        Chunk(1, b"ab"),
        Chunk(2, b"cdied\n"),
    ]
    # a tail read from the middle of a record starts at the next one
    tail = raw[len(b"bwrap: oops\n") + 3 :]
    assert parse_tagged_log(tail, mid_record=True) == [Chunk(1, b"b"), Chunk(2, b"cdied\n")]
    assert parse_tagged_log(_record(2, b"x")[:-3]) == []  # a record still being written


def test_docker_entries_are_put_in_time_order() -> None:
    def entry(fd: int, stamp: str, text: bytes) -> bytes:
        data = stamp.encode() + b" " + text
        return bytes([fd, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    # as the engine gives them: each stream whole; trailing zeros of the fraction trimmed
    # (so .28 sorts after .281 as text)
    raw = (
        entry(2, "2026-11-30T20:16:00.281Z", b"e1\n")
        + entry(2, "2026-11-30T20:16:01Z", b"e2\n")
        + entry(1, "2026-11-30T20:16:00.28Z", b"o1\n")
        + entry(1, "2026-11-30T20:16:00.5Z", b"o2\n")
        + entry(1, "2026-11-30T20:16:00.6Z", b"o3\n")
    )
    assert order_log_entries(raw) == [
        Chunk(1, b"o1\n"),
        Chunk(2, b"e1\n"),
        Chunk(1, b"o2\no3\n"),
        Chunk(2, b"e2\n"),
    ]


def test_tail_chunks() -> None:
    chunks = [Chunk(1, b"abc"), Chunk(2, b"de"), Chunk(1, b"f")]
    assert tail_chunks(chunks, 4) == [Chunk(1, b"c"), Chunk(2, b"de"), Chunk(1, b"f")]
    assert tail_chunks(chunks, 100) == chunks
    assert tail_chunks(chunks, 3) == [Chunk(2, b"de"), Chunk(1, b"f")]


@pytest.fixture(params=["docker", "local"])
def where(request: pytest.FixtureRequest) -> tuple[SandboxDefaults, Cluster]:
    if request.param == "local":
        return request.getfixturevalue("ldefaults"), request.getfixturevalue("local")
    return request.getfixturevalue("defaults"), request.getfixturevalue("cluster")


async def _logs_when(sb: Sandbox, done: bytes, timeout: float = 20) -> list[OutputChunk]:
    deadline = time.monotonic() + timeout
    while done not in (await sb.logs()):
        assert time.monotonic() < deadline, await sb.log_chunks()
        await asyncio.sleep(0.05)
    return await sb.log_chunks()


def _cli_logs(cluster: Cluster, sandbox_id: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", "--scheduler", cluster.address, "logs", sandbox_id],
        capture_output=True,
        timeout=60,
        check=False,
    )


async def test_logs_keep_the_order_written_and_outlive_a_stop(
    where: tuple[SandboxDefaults, Cluster],
) -> None:
    defaults, cluster = where
    sb = await Sandbox.create("sh", "-c", f"{SCRIPT}; exec sleep infinity", defaults=defaults)
    try:
        assert await _logs_when(sb, b"e2") == EXPECTED
        assert await sb.logs() == b"o1\ne1\no2\ne2\n"
        assert [c.stream for c in await sb.log_chunks()] == ["stdout", "stderr"] * 2
    finally:
        await sb.stop()
    # stopped: still readable, from this handle, another, and the CLI
    assert await sb.log_chunks() == EXPECTED
    again = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
    assert await again.logs() == b"o1\ne1\no2\ne2\n"
    cli = _cli_logs(cluster, sb.sandbox_id or "")
    assert (cli.returncode, cli.stdout, cli.stderr) == (0, b"o1\no2\n", b"e1\ne2\n"), cli


async def test_logs_of_a_sandbox_that_exited(where: tuple[SandboxDefaults, Cluster]) -> None:
    defaults, _ = where
    sb = await Sandbox.create("sh", "-c", f"{SCRIPT}; exit 3", defaults=defaults)
    assert await sb.wait(timeout=30) == 3
    assert await sb.log_chunks() == EXPECTED
