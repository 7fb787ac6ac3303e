"""Spare memfds (aviato/_spare.py): zeroed ahead of time, used once, sealed, given away.

What must hold: a spare never serves two frames (a frame that left the process is never
written again, by anyone), every frame is exactly its bytes and size and sealed, a
spare is never made without room and never kept idle, and the worker inside a sandbox
uses them too.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import time
from pathlib import Path
from typing import Any

import pytest

from aviato import Sandbox, SandboxDefaults
from aviato import _spare as spare
from aviato._spare import Spare, cgroup_room

MB = 1 << 20
ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def pattern(size: int, seed: int) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (size // 251) + bytes(
        size % 251
    )


def contents(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size + 1, 0)


def memfds(name: str) -> int:
    """This process's open memfds called ``name`` (each once, however many descriptors
    it has: a mapping object keeps one of its own)."""
    inodes = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith(f"/memfd:{name} "):
                inodes.add(os.stat(f"/proc/self/fd/{entry}").st_ino)
        except OSError:
            pass
    return len(inodes)


def mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return f"/memfd:{name} " in f.read()


def assert_frozen(fd: int) -> None:
    """Nothing can change the memfd any more: not through this descriptor, a copy of it,
    nor a mapping made now."""
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & ALL_SEALS == ALL_SEALS
    kept = os.dup(fd)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(kept, b"x", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(kept, 1, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(kept, 1)
        with pytest.raises(PermissionError):
            fcntl.fcntl(kept, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: no unsealing trick either
    finally:
        os.close(kept)


def test_a_spare_serves_one_frame_which_is_then_frozen() -> None:
    spare = Spare("test-spare-once", min_bytes=MB, idle=30)
    a, b, c = pattern(5 * MB + 3, 1), pattern(5 * MB + 3, 2), pattern(5 * MB + 3, 3)
    fds = []
    try:
        fds.append(spare.sealed_copy(memoryview(a)))
        assert (spare.used, spare.fresh) == (0, 1)
        wait_until(lambda: spare.ready)
        fds.append(spare.sealed_copy(memoryview(b)))
        assert (spare.used, spare.fresh) == (1, 1)
        wait_until(lambda: spare.ready)
        fds.append(spare.sealed_copy(memoryview(c)))
        assert spare.used == 2
        assert [contents(fd) for fd in fds] == [a, b, c], "a later frame changed an earlier one"
        inodes = {os.fstat(fd).st_ino for fd in fds}
        assert len(inodes) == 3, "one memfd served two frames"
        for fd in fds:
            assert_frozen(fd)
    finally:
        for fd in fds:
            os.close(fd)
        spare.close()
    assert memfds("test-spare-once") == 0 and not mapped("test-spare-once")


def test_a_larger_spare_is_cut_to_the_frame_and_a_smaller_one_replaced() -> None:
    """Receivers refuse a memfd not exactly its announced size: a spare bigger than the
    frame is cut to it; one too small for the frames now sent is replaced."""
    spare = Spare("test-spare-size", min_bytes=MB, idle=30)
    fds = []
    try:
        fds.append(spare.sealed_copy(memoryview(pattern(2 * MB, 1))))
        wait_until(lambda: spare.ready == 3 * MB)  # with headroom, in MiB
        big = pattern(6 * MB, 2)
        fds.append(spare.sealed_copy(memoryview(big)))  # too big for it: fresh
        assert (spare.used, spare.fresh) == (0, 2)
        wait_until(lambda: spare.ready == 7 * MB)
        assert memfds("test-spare-size") == 2 + 1, "the small spare was not closed"
        small = pattern(MB + 5, 3)
        fds.append(spare.sealed_copy(memoryview(small)))
        assert spare.used == 1
        assert os.fstat(fds[-1]).st_size == MB + 5 and contents(fds[-1]) == small
        assert_frozen(fds[-1])
    finally:
        for fd in fds:
            os.close(fd)
        spare.close()


def test_a_spare_is_released_when_idle_and_never_made_without_room() -> None:
    spare = Spare("test-spare-idle", min_bytes=MB, idle=0.2)
    os.close(spare.sealed_copy(memoryview(pattern(2 * MB, 1))))
    wait_until(lambda: spare.ready)
    assert memfds("test-spare-idle") == 1
    assert mapped("test-spare-idle")  # ready to copy into: mapped, page tables filled
    wait_until(lambda: not spare.ready and memfds("test-spare-idle") == 0)
    assert not mapped("test-spare-idle")

    asked: list[int] = []

    def no_room(size: int) -> bool:
        asked.append(size)
        return False

    tight = Spare("test-spare-room", min_bytes=MB, idle=30, room=no_room)
    os.close(tight.sealed_copy(memoryview(pattern(2 * MB, 1))))
    wait_until(lambda: asked and not tight.making)
    assert not tight.ready and memfds("test-spare-room") == 0
    # Small frames and frames over the bound make no spare at all.
    capped = Spare("test-spare-cap", min_bytes=MB, max_bytes=3 * MB, idle=30)
    os.close(capped.sealed_copy(memoryview(pattern(MB - 1, 1))))
    os.close(capped.sealed_copy(memoryview(pattern(3 * MB + 1, 1))))
    assert not capped.making and not capped.ready


def test_room_is_read_from_the_memory_cgroup(tmp_path: Path) -> None:
    assert cgroup_room(MB, str(tmp_path / "missing"))
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_room(1 << 40, str(tmp_path))
    (tmp_path / "memory.max").write_text("100\n")
    (tmp_path / "memory.current").write_text("50\n")
    assert cgroup_room(25, str(tmp_path))
    assert not cgroup_room(26, str(tmp_path)), "room for the spare twice over is needed"
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("600\n")
    assert cgroup_room(200, str(v1)) and not cgroup_room(201, str(v1))


async def test_a_sandbox_worker_sees_its_memory_limit(defaults: SandboxDefaults) -> None:
    """The room check inside a real container reads that container's limit (a spare
    must not get a sandbox killed for memory)."""
    limited = dataclasses.replace(defaults, memory_bytes=256 * MB)
    async with Sandbox.session(limited) as session:

        @session.function(max_workers=1)
        def room(size: int) -> bool:
            import aviato_spare  # type: ignore[import-not-found]

            return bool(aviato_spare.cgroup_room(size))

        assert (await room(MB)).value
        assert not (await room(200 * MB)).value


def test_a_sender_keeping_a_writable_mapping_cannot_seal() -> None:
    """Why receivers may trust a sealed frame: a sender (a hostile sandbox) that kept a
    writable mapping, to change the frame after sending it, cannot seal it at all (and
    an unsealed frame is refused: tests/test_data.py)."""
    fd = os.memfd_create("test-hostile", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        kept = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED)
        with pytest.raises(OSError) as err:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ALL_SEALS)
        assert err.value.errno == errno.EBUSY
        kept.close()
    finally:
        os.close(fd)


async def test_the_worker_sends_large_results_from_spares(defaults: SandboxDefaults) -> None:
    """In a real sandbox: results big enough come from the worker's spares, exact, and
    the client's arguments from its own."""
    from aviato import _lane

    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def echo(data: bytes) -> tuple[memoryview, int]:
            import sys

            link = sys.modules.get("aviato_supervisor_link") or sys.modules["agent.supervisor_link"]
            return memoryview(data), link.SPARE.used  # a view goes out of band

        before = _lane.SPARE.used
        used = []
        for i in range(6):
            data = pattern(spare.MIN_BYTES + i, i)
            back, worker_used = (await echo(data)).value
            assert back.tobytes() == data
            used.append(worker_used)
        # The spare for the next result is made while the client waits: most calls
        # after the first find one ready (the machine may be slow: not all).
        assert used[-1] >= 1, f"the worker never used a spare: {used}"
        assert _lane.SPARE.used - before >= 1, "the client never used a spare"
