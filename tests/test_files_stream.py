"""Streamed files (upload, download, read_file_stream, list_files, remove) on every
data path: the supervisor (Docker and local) and the engine's archive API (Docker
images without Python); hostile paths refused with typed errors; no half-written
file under the final name after a failure."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path

import psutil
import pytest

from aviato import (
    FileInfo,
    Sandbox,
    SandboxError,
    SandboxFileError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotRunningError,
    SandboxPathError,
)
from aviato.protocol import FileChunk, StreamAck, UploadFile
from tests.conftest import Cluster
from tests.test_local_runtime import ldefaults, local  # noqa: F401 (fixtures)

MiB = 1 << 20


def _random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, MiB))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


async def _ls(sb: Sandbox, directory: str) -> str:
    return (await sb.exec(["ls", "-A", directory])).stdout.decode()


async def test_upload_download_roundtrip(flavour: tuple[Sandbox, Cluster], tmp_path: Path) -> None:
    sb, _ = flavour
    await sb.exec(["mkdir", "-p", "/tmp/data"])
    for size in (0, 1, MiB - 1, MiB, 3 * MiB + 7):
        src = tmp_path / f"in-{size}"
        digest = _random_file(src, size)
        os.chmod(src, 0o640)
        assert await sb.upload(src, "/tmp/data/f.bin") == size
        r = await sb.exec(
            ["sh", "-c", "stat -c '%s %a' /tmp/data/f.bin; sha256sum < /tmp/data/f.bin"]
        )
        stat_line, sha_line = r.stdout.decode().splitlines()
        assert stat_line == f"{size} 640"
        assert sha_line.split()[0] == digest
        out = tmp_path / f"out-{size}"
        assert await sb.download("/tmp/data/f.bin", out) == size
        assert _sha(out) == digest
        streamed = b"".join([c async for c in sb.read_file_stream("/tmp/data/f.bin")])
        assert hashlib.sha256(streamed).hexdigest() == digest
    # a file there is replaced; nothing but it is left in the directory (no temp)
    await sb.upload(tmp_path / "in-1", "/tmp/data/f.bin", mode=0o600)
    assert await _ls(sb, "/tmp/data") == "f.bin\n"
    assert list(tmp_path.glob(".*part")) == []


async def test_list_and_remove(flavour: tuple[Sandbox, Cluster]) -> None:
    sb, _ = flavour
    await sb.exec(
        [
            "sh",
            "-c",
            "mkdir -p /tmp/l/sub/deep && printf abc > /tmp/l/a.txt && "
            "printf x > /tmp/l/sub/deep/y && ln -s a.txt /tmp/l/link",
        ]
    )
    before = time.time()
    entries = await sb.list_files("/tmp/l")
    assert [e.name for e in entries] == ["a.txt", "link", "sub"]
    by_name = {e.name: e for e in entries}
    assert by_name["a.txt"] == FileInfo("a.txt", 3, False, by_name["a.txt"].mtime)
    assert by_name["sub"].is_dir and not by_name["link"].is_dir and by_name["link"].size == 3
    assert abs(by_name["a.txt"].mtime - before) < 120
    with pytest.raises(SandboxNotADirectoryError):
        await sb.list_files("/tmp/l/a.txt")
    with pytest.raises(SandboxFileNotFoundError):
        await sb.list_files("/tmp/none")
    with pytest.raises(SandboxIsADirectoryError, match="recursive"):
        await sb.remove("/tmp/l/sub")
    await sb.remove("/tmp/l/link")  # the link, not its target
    await sb.remove("/tmp/l/a.txt")
    await sb.remove("/tmp/l/sub", recursive=True)
    assert await sb.list_files("/tmp/l") == []
    await sb.remove("/tmp/l")  # empty: no recursive needed
    with pytest.raises(SandboxFileNotFoundError) as info:
        await sb.remove("/tmp/l")
    assert info.value.filepath == "/tmp/l" and isinstance(info.value, FileNotFoundError)


async def test_hostile_paths_and_targets(flavour: tuple[Sandbox, Cluster], tmp_path: Path) -> None:
    sb, _ = flavour
    src = tmp_path / "x"
    src.write_bytes(b"hello")
    for bad in ("relative.txt", "tmp/x", "/tmp/../etc/passwd", "/tmp/a/..", "/tmp/\x00x"):
        with pytest.raises(SandboxPathError):
            await sb.upload(src, bad)
        with pytest.raises(SandboxPathError):
            await sb.download(bad, tmp_path / "y")
        with pytest.raises(SandboxPathError):
            await sb.list_files(bad)
        with pytest.raises(SandboxPathError):
            await sb.remove(bad, recursive=True)
    with pytest.raises(SandboxPathError):
        await sb.remove("/", recursive=True)
    with pytest.raises(ValueError, match="mode"):
        await sb.upload(src, "/tmp/m", mode=0o70000)
    with pytest.raises(SandboxError, match="mode"):  # the agent checks too
        await sb._upload(io.BytesIO(b"x"), 1, "/tmp/m", 0o70000, 8)
    with pytest.raises(SandboxFileNotFoundError, match="no such directory"):
        await sb.upload(src, "/tmp/no/such/dir/x")
    with pytest.raises(SandboxIsADirectoryError):
        await sb.upload(src, "/tmp")
    with pytest.raises(SandboxNotADirectoryError):
        await sb.exec(["sh", "-c", "printf f > /tmp/plain"])
        await sb.upload(src, "/tmp/plain/x")
    with pytest.raises(SandboxFileNotFoundError):
        await sb.download("/tmp/missing", tmp_path / "y")
    with pytest.raises(SandboxIsADirectoryError):
        await sb.download("/tmp", tmp_path / "y")
    assert not (tmp_path / "y").exists() and list(tmp_path.glob(".*part")) == []
    (tmp_path / "y").write_bytes(b"mine")  # a failed download leaves a local file as it was
    with pytest.raises(SandboxFileNotFoundError):
        await sb.download("/tmp/missing", tmp_path / "y")
    assert (tmp_path / "y").read_bytes() == b"mine"
    with pytest.raises(SandboxFileNotFoundError):
        async for _ in sb.read_file_stream("/tmp/missing"):
            pass
    assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"


class _SlowSource:
    """A local "file" read slowly (on the upload's thread): the upload is still under
    way when the test acts."""

    def __init__(self, seconds_per_read: float = 0.05) -> None:
        self.seconds = seconds_per_read
        self.reads = 0

    def read(self, n: int) -> bytes:
        time.sleep(self.seconds)
        self.reads += 1
        return os.urandom(n)


async def test_cancelled_upload_leaves_no_file(flavour: tuple[Sandbox, Cluster]) -> None:
    """A client that gives up mid-upload: neither the final name nor a temporary
    file stays; an existing file under the name is untouched."""
    sb, _ = flavour
    await sb.exec(["sh", "-c", "mkdir -p /tmp/up && printf old > /tmp/up/f"])
    source = _SlowSource()
    upload = asyncio.ensure_future(sb._upload(source, 64 * MiB, "/tmp/up/f", 0o644, 2))
    deadline = time.monotonic() + 60
    # well under way: past the first piece a runtime without a supervisor puts whole
    while source.reads < 24:
        assert not upload.done(), "the upload ended before it could be cancelled"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    deadline = time.monotonic() + 30
    while await _ls(sb, "/tmp/up") != "f\n":
        assert time.monotonic() < deadline, await _ls(sb, "/tmp/up")
        await asyncio.sleep(0.1)
    assert (await sb.exec(["cat", "/tmp/up/f"])).stdout == b"old"


async def test_sandbox_stopped_mid_transfer_is_a_typed_error(
    flavour: tuple[Sandbox, Cluster], tmp_path: Path
) -> None:
    sb, _ = flavour
    await sb.exec(["sh", "-c", "head -c 64M /dev/urandom > /tmp/big"])
    other = await Sandbox.from_id(sb.sandbox_id or "", defaults=sb._defaults)
    # an upload: the client hears a typed error, not a hang
    source = _SlowSource()
    upload = asyncio.ensure_future(sb._upload(source, 64 * MiB, "/tmp/up.bin", 0o644, 2))
    deadline = time.monotonic() + 60
    while source.reads < 8:
        assert not upload.done() or upload.result(), "ended early"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await other.stop()
    with pytest.raises((SandboxNotRunningError, SandboxFileError)):
        await asyncio.wait_for(upload, 60)
    # (a download from a stopped sandbox: refused at once)
    with pytest.raises(SandboxNotRunningError):
        await sb.download("/tmp/big", tmp_path / "big")
    assert not (tmp_path / "big").exists() and list(tmp_path.glob(".*part")) == []


async def test_memory_stays_flat(flavour: tuple[Sandbox, Cluster], tmp_path: Path) -> None:
    """A 192 MiB file up and down: the client and agent grow by far less than it."""
    sb, cluster = flavour
    assert sb.info is not None and sb.info.agent_id is not None
    agent = psutil.Process(cluster.procs[sb.info.agent_id].pid)
    me = psutil.Process()
    src = tmp_path / "big"
    digest = _random_file(src, 192 * MiB)
    peaks = {"agent": 0, "client": 0}
    base = {"agent": agent.memory_info().rss, "client": me.memory_info().rss}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            peaks["agent"] = max(peaks["agent"], agent.memory_info().rss - base["agent"])
            peaks["client"] = max(peaks["client"], me.memory_info().rss - base["client"])
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    try:
        await sb.upload(src, "/tmp/big")
        await sb.download("/tmp/big", tmp_path / "back")
    finally:
        stop.set()
        await watcher
    assert _sha(tmp_path / "back") == digest
    assert peaks["agent"] < 64 * MiB, peaks
    assert peaks["client"] < 64 * MiB, peaks


async def _read_offset(sb: Sandbox, path: str) -> int | None:
    """How far the sandbox's reader of ``path`` got: its descriptor's position, from
    /proc (None: no process has it open)."""
    script = (
        f'for fd in /proc/[0-9]*/fd/*; do [ "$(readlink $fd)" = "{path}" ] && '
        'grep pos: "$(dirname $(dirname $fd))/fdinfo/$(basename $fd)"; done; true'
    )
    out = (await sb.exec(["sh", "-c", script])).stdout.decode().split()
    positions = [int(p) for p in out if p.isdigit()]
    return max(positions) if positions else None


async def test_a_slow_reader_holds_the_sandbox_back(flavour: tuple[Sandbox, Cluster]) -> None:
    """Flow control: while the consumer holds its first chunk, the sandbox reads at
    most the window ahead (the supervisor's file position says so; through the
    engine's archive, the agent's memory), never the whole file."""
    sb, cluster = flavour
    assert sb.info is not None and sb.info.agent_id is not None
    agent = psutil.Process(cluster.procs[sb.info.agent_id].pid)
    await sb.exec(["sh", "-c", "head -c 256M /dev/urandom > /tmp/slow"])
    agent_before = agent.memory_info().rss
    supervised = "no-python" not in sb.container_image
    stream = sb.read_file_stream("/tmp/slow", window=2)
    try:
        first = await anext(stream)
        assert len(first) == MiB
        seen: list[int | None] = []
        for _ in range(20):  # the reader gets every chance to run ahead
            if supervised:
                seen.append(await _read_offset(sb, "/tmp/slow"))
            else:
                await sb.exec(["true"])
            assert agent.memory_info().rss - agent_before < 48 * MiB
        if supervised:
            assert seen and all(p is not None and p <= 8 * MiB for p in seen), seen
        rest = len(first)
        async for chunk in stream:
            rest += len(chunk)
        assert rest == 256 * MiB
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_a_client_past_its_window_is_refused(flavour: tuple[Sandbox, Cluster]) -> None:
    """The agent holds a client to the window it asked for: one that sends chunks
    without waiting for acks is refused, and its temporary file goes."""
    sb, _ = flavour
    await sb.exec(["mkdir", "-p", "/tmp/w"])
    info, stream = sb._stream()
    try:
        await stream.send(UploadFile(info.sandbox_id, "/tmp/w/f", 64 * MiB, 0o644, 2))
        opened = await stream.next()
        assert isinstance(opened.msg, StreamAck) and opened.msg.seq == 0
        with pytest.raises(SandboxError, match="past the window"):
            for seq in range(1, 65):
                await stream.send(FileChunk(seq), (bytes(MiB),))
            while True:
                await stream.next()
    finally:
        stream.close()
    deadline = time.monotonic() + 30
    while await _ls(sb, "/tmp/w") != "":
        assert time.monotonic() < deadline, await _ls(sb, "/tmp/w")
        await asyncio.sleep(0.1)
