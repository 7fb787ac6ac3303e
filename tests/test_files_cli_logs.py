"""``sb.stream_logs`` (follow or not) on Docker and the local runtime, and the CLI's
``aviato cp`` both ways and ``aviato logs -f``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aviato import OutputChunk, Sandbox, SandboxDefaults
from tests.conftest import ROOT, Cluster
from tests.test_local_runtime import ldefaults, local  # noqa: F401 (fixtures)

MiB = 1 << 20
#: stdout and stderr a moment apart: Docker reads the two pipes apart and stamps lines
#: as it reads them, so only writes some milliseconds apart keep their order there.
INTERLEAVED = "for i in 1 2 3; do echo out$i; sleep 0.2; echo err$i >&2; sleep 0.2; done; echo last"
EXPECTED = [
    (1, "out1\n"),
    (2, "err1\n"),
    (1, "out2\n"),
    (2, "err2\n"),
    (1, "out3\n"),
    (2, "err3\n"),
    (1, "last\n"),
]


@pytest.fixture(params=["docker", "local"])
def both(request: pytest.FixtureRequest) -> tuple[SandboxDefaults, Cluster]:
    if request.param == "local":
        return request.getfixturevalue("ldefaults"), request.getfixturevalue("local")
    return request.getfixturevalue("defaults"), request.getfixturevalue("cluster")


def _joined(chunks: list[OutputChunk]) -> list[tuple[int, str]]:
    """Adjacent chunks of one stream joined, then split at line ends."""
    out: list[tuple[int, str]] = []
    for chunk in chunks:
        for line in chunk.data.decode().splitlines(keepends=True):
            if out and out[-1][0] == chunk.fd and not out[-1][1].endswith("\n"):
                out[-1] = (chunk.fd, out[-1][1] + line)
            else:
                out.append((chunk.fd, line))
    return out


async def _collect(stream: AsyncIterator[OutputChunk], timeout: float = 60) -> list[OutputChunk]:
    async def run() -> list[OutputChunk]:
        return [c async for c in stream]

    return await asyncio.wait_for(run(), timeout)


async def test_stream_logs_follows_in_order_until_the_end(
    both: tuple[SandboxDefaults, Cluster],
) -> None:
    defaults, _ = both
    sb = await Sandbox.create("sh", "-c", INTERLEAVED, defaults=defaults)
    try:
        # from the start (however early we ask), live, ending when the sandbox ends
        chunks = await _collect(sb.stream_logs(follow=True))
        assert _joined(chunks) == EXPECTED
        await sb.wait(timeout=30)
        # after the end: what is kept, as logs() gives it
        now = await _collect(sb.stream_logs())
        assert _joined(now) == EXPECTED
        assert b"".join(c.data for c in now) == await sb.logs()
        again = await _collect(sb.stream_logs(follow=True))  # ended: what is there, then done
        assert _joined(again) == EXPECTED
    finally:
        await sb.stop()


async def test_stream_logs_live_and_left_early(both: tuple[SandboxDefaults, Cluster]) -> None:
    """Output still being written reaches the follower as it comes; a follower that
    leaves early stops its stream (the sandbox runs on); follow=False returns at once."""
    defaults, _ = both
    ticker = "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.05; done"
    async with Sandbox(command="sh", args=["-c", ticker], defaults=defaults) as sb:
        seen = b""
        started = time.monotonic()
        async for chunk in sb.stream_logs(follow=True):
            seen += chunk.data
            if b"tick30\n" in seen:
                break
        assert time.monotonic() - started < 60
        assert seen.startswith(b"tick0\n")
        now = await _collect(sb.stream_logs(follow=False), timeout=30)
        assert b"tick30\n" in b"".join(c.data for c in now)
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"


def _aviato(
    *args: str, cluster: Cluster, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVIATO_")}
    env["AVIATO_SCHEDULER"] = cluster.address
    return subprocess.run(
        [sys.executable, "-m", "aviato.cli", *args],
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


async def test_cli_cp_both_ways(both: tuple[SandboxDefaults, Cluster], tmp_path: Path) -> None:
    defaults, cluster = both
    data = os.urandom(3 * MiB + 5)
    (tmp_path / "model.bin").write_bytes(data)
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        sid = sb.sandbox_id or ""
        await sb.exec(["mkdir", "-p", "/tmp/data"])
        cp = await asyncio.to_thread(
            _aviato,
            "cp",
            str(tmp_path / "model.bin"),
            f"{sid}:/tmp/data/model.bin",
            cluster=cluster,
        )
        assert cp.returncode == 0, cp.stderr
        assert await sb.read_file("/tmp/data/model.bin") == data
        # into an existing directory, under its own name (as docker cp)
        cp = await asyncio.to_thread(
            _aviato, "cp", str(tmp_path / "model.bin"), f"{sid}:/tmp", cluster=cluster
        )
        assert cp.returncode == 0, cp.stderr
        assert await sb.read_file("/tmp/model.bin") == data
        # out: to a file, into a directory, to stdout
        (tmp_path / "out").mkdir()
        for dest, where in (
            (str(tmp_path / "back.bin"), tmp_path / "back.bin"),
            (str(tmp_path / "out"), tmp_path / "out" / "model.bin"),
        ):
            cp = await asyncio.to_thread(
                _aviato, "cp", f"{sid}:/tmp/data/model.bin", dest, cluster=cluster
            )
            assert cp.returncode == 0, cp.stderr
            assert where.read_bytes() == data
        cp = await asyncio.to_thread(
            _aviato, "cp", f"{sid}:/tmp/data/model.bin", "-", cluster=cluster
        )
        assert cp.returncode == 0 and cp.stdout == data
        # errors: one line each, typed, nothing left behind
        for args, words in (
            (("cp", f"{sid}:/tmp/nope", str(tmp_path / "x")), ("SandboxFileNotFoundError",)),
            (("cp", f"{sid}:relative", str(tmp_path / "x")), ("SandboxPathError", "absolute")),
            (("cp", str(tmp_path / "model.bin"), f"{sid}:/no/dir/x"), ("no such directory",)),
            (("cp", str(tmp_path / "a"), str(tmp_path / "b")), ("ConfigurationError",)),
            (("cp", str(tmp_path / "missing"), f"{sid}:/tmp/x"), ("regular file",)),
        ):
            done = await asyncio.to_thread(_aviato, *args, cluster=cluster)
            lines = done.stderr.decode().strip().splitlines()
            assert done.returncode == 1 and len(lines) == 1, done.stderr
            assert all(w in lines[0] for w in words), lines
        assert not (tmp_path / "x").exists() and list(tmp_path.glob(".*part")) == []


async def test_cli_logs_follow(both: tuple[SandboxDefaults, Cluster]) -> None:
    defaults, cluster = both
    sb = await Sandbox.create("sh", "-c", INTERLEAVED, defaults=defaults)
    try:
        done = await asyncio.to_thread(_aviato, "logs", "-f", sb.sandbox_id or "", cluster=cluster)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b"out1\nout2\nout3\nlast\n"
        assert done.stderr == b"err1\nerr2\nerr3\n"
    finally:
        await sb.stop()
