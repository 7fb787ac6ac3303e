"""Processes you keep (``sb.spawn``), on both runtimes: stdin, live output, signals,
exit codes, reattach from another client process, back-pressure, terminals, and the
hostile inputs (unknown ids, another sandbox's id, huge writes, absurd sizes)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from aviato import (
    OutputChunk,
    PayloadTooLargeError,
    Process,
    ProcessInfo,
    ProcessNotFoundError,
    Sandbox,
    SandboxDefaults,
    SandboxError,
    SandboxTimeoutError,
)
from aviato.protocol import MAX_STDIN_CHUNK, WriteStdin
from tests.conftest import IMAGE, ROOT, Cluster, docker_cluster, wait_until
from tests.test_local_runtime import _leftovers, _local_cluster

#: Both runtimes, and Docker with an image without Python: no supervisor in it, so
#: processes go through the engine's exec API (agent/runtime/docker_procs.py).
RUNTIMES = ["docker", "local", "docker-exec"]


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path_factory.mktemp("docker"))


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("local"), agents=1, slots=4)


@pytest.fixture(params=RUNTIMES)
def either(request: pytest.FixtureRequest) -> Iterator[tuple[str, Cluster, SandboxDefaults]]:
    """(which, its cluster, defaults for it)."""
    which = request.param
    cluster: Cluster = request.getfixturevalue("local" if which == "local" else "docker")
    image = request.getfixturevalue("no_python_image") if which == "docker-exec" else IMAGE
    yield (
        which,
        cluster,
        SandboxDefaults(container_image=image, scheduler=cluster.address, lease_seconds=5),
    )
    if which == "local":
        wait_until(lambda: not _leftovers(cluster), 15, 0.2, "the test's sandboxes to go")


async def _all_output(p: Process, timeout: float = 60) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()

    async def read() -> None:
        async for chunk in p.output():
            (out if chunk.stream == "stdout" else err).extend(chunk.data)

    await asyncio.wait_for(read(), timeout)
    return bytes(out), bytes(err)


async def _until_output(p: Process, want: bytes, timeout: float = 60) -> bytes:
    """Read ``p``'s output until ``want`` shows up in it; all that was read."""
    seen = bytearray()

    async def read() -> None:
        async for chunk in p.output():
            seen.extend(chunk.data)
            if want in seen:
                return
        raise AssertionError(f"{want!r} never came: {bytes(seen)!r}")

    await asyncio.wait_for(read(), timeout)
    return bytes(seen)


async def _until_running(sb: Sandbox, cmdline: str, timeout: float = 60) -> None:
    """Until a process whose command line is ``cmdline`` runs in ``sb``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        r = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        if f" {cmdline} ".encode() in b" " + r.stdout.replace(b"  ", b" "):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{cmdline!r} never ran")


async def test_spawn_write_read_wait(either: tuple[str, Cluster, SandboxDefaults]) -> None:
    which, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        # The buffered exec's stdin (the first snippet), on this runtime too.
        assert (await sb.exec(["cat"], stdin=b"hello")).stdout == b"hello"
        if which == "docker-exec":  # no Python: a shell reads the same lines
            argv = ["sh", "-c", 'while read l; do eval "$l"; done']
            lines = [b"echo $((6 * 7))\n", b"echo to err >&2\n"]
        else:
            argv = ["python3", "-u", "-i", "-q"]
            lines = [b"print(6 * 7)\n", b"import sys; sys.stderr.write('to err\\n')\n"]
        p = await sb.spawn(argv)
        assert p.id.startswith("proc-") and p.argv == tuple(argv)
        for line in lines:
            await p.write(line)
        await p.close_stdin()
        out, err = await _all_output(p)
        assert b"42\n" in out and b"to err\n" in err
        assert await p.wait(timeout=60) == 0
        assert p.returncode == 0
        # The snippet's chunk type, and the listing.
        chunk = OutputChunk(1, b"x")
        assert chunk.stream == "stdout"
        running = await sb.processes()
        assert ProcessInfo(p.id, p.argv, False, 0, None, False) in running
        # Exit codes: as a shell says them; a signal is 128+N with N named.
        q = await sb.spawn(["sh", "-c", "exit 7"])
        assert await q.wait(timeout=60) == 7
        r = await sb.spawn(["sleep", "100"])
        await r.signal(signal.SIGTERM)
        assert await r.wait(timeout=60) == 128 + signal.SIGTERM
        assert r.info.signal == signal.SIGTERM
        k = await sb.spawn(["sleep", "100"])
        assert (await k.refresh()).running
        with pytest.raises(SandboxTimeoutError, match=r"still runs after 0\.5s"):
            await k.wait(timeout=0.5)
        await k.kill()
        assert await k.wait(timeout=60) == 128 + signal.SIGKILL
        await k.kill()  # ended already: nothing happens


async def test_sigint_reaches_a_trap(either: tuple[str, Cluster, SandboxDefaults]) -> None:
    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        script = "trap 'echo interrupted; exit 0' INT; echo up; while :; do sleep 0.1; done"
        p = await sb.spawn(["sh", "-c", script])
        await _until_output(p, b"up\n")
        await p.signal(signal.SIGINT)
        await _until_output(p, b"interrupted")
        assert await p.wait(timeout=60) == 0


_REATTACH = textwrap.dedent(
    """
    import asyncio, sys
    from aviato import Sandbox, SandboxDefaults

    async def main():
        sb = await Sandbox.from_id(sys.argv[1], defaults=SandboxDefaults(scheduler=sys.argv[2]))
        again = await sb.process(sys.argv[3])
        await again.write(b"second\\n")
        seen = b""
        async for chunk in again.output():
            seen += chunk.data
            if b"echo:second" in seen:
                break
        sys.stdout.write(seen.decode())

    asyncio.run(main())
    """
)


async def test_reattach_from_another_client_process(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    """A process outlives the handle that spawned it; another client process finds it by
    id, sees the backlog, writes to it and reads what comes next."""
    _, cluster, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        p = await sb.spawn(["sh", "-c", "while read l; do echo echo:$l; done"])
        await p.write(b"first\n")
        await _until_output(p, b"echo:first\n")
        del p  # this client's handle is gone; the process is not
        pid = (await sb.processes())[0].id
        assert sb.sandbox_id is not None
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _REATTACH, sb.sandbox_id, cluster.address, pid],
            capture_output=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == b"echo:first\necho:second\n"  # the backlog, then what came next
        (info,) = await sb.processes()
        assert info.running  # the other client left; the process keeps running


async def test_backlog_is_bounded_and_reports_what_was_skipped(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        # 3 MiB of output that nobody reads as it comes. The process ends when told, once
        # the agent holds all of it: dockerd cuts an exec's output stream 2 s after the
        # exec exits, and on a loaded machine the agent can be further behind than that.
        p = await sb.spawn(
            ["sh", "-c", "head -c 3145728 /dev/zero | tr '\\0' x; echo END; read _ || :"]
        )
        # A second handle reads from the end only (offset 3 MiB: what the agent has then),
        # keeping nothing back; once it saw the last line, the agent has every byte.
        tail = await sb.process(p.id)
        tail._offset = 3 << 20
        assert (await _until_output(tail, b"END\n")).endswith(b"END\n")
        await p.close_stdin()
        assert await p.wait(timeout=60) == 0
        out, _ = await _all_output(p)
        assert out.endswith(b"END\n") and len(out) == 1 << 20  # the last MiB
        assert p.skipped == 3 * (1 << 20) + 4 - (1 << 20)


async def test_a_slow_reader_loses_nothing(either: tuple[str, Cluster, SandboxDefaults]) -> None:
    """While a reader reads, the process waits for it past the backlog's worth of
    unread output (its pipe fills) instead of dropping what it has not read."""
    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        p = await sb.spawn(["sh", "-c", "head -c 4194304 /dev/zero | tr '\\0' x; echo END"])
        got = bytearray()

        async def read() -> None:
            async for chunk in p.output():
                got.extend(chunk.data)
                await asyncio.sleep(0.05)  # slower than the process writes

        await asyncio.wait_for(read(), 120)
        assert (len(got), p.skipped, bytes(got[-4:])) == ((4 << 20) + 4, 0, b"END\n")


async def test_a_fast_writer_waits_for_a_slow_reader(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    """Back-pressure: a write to a process that does not read blocks (the data is not
    buffered without bound); once it reads, the write completes, whole and in order."""
    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        p = await sb.spawn(["sh", "-c", "until [ -e /tmp/go ]; do sleep 0.05; done; sha256sum"])
        data = os.urandom(8 << 20)
        write = asyncio.ensure_future(p.write(data))
        await asyncio.sleep(1)
        assert not write.done()  # the pipe (64 KiB) is full: the writer waits
        await sb.write_file("/tmp/go", b"")
        await asyncio.wait_for(write, 120)  # it reads now: the write goes through
        await p.close_stdin()
        out, _ = await _all_output(p)
        assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        # A writer that gives up (cancelled) stops there; the process is unharmed.
        q = await sb.spawn(["sleep", "1000"])
        write = asyncio.ensure_future(q.write(data))
        await asyncio.sleep(1)
        assert not write.done()
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        assert (await q.refresh()).running
        await p.kill()


async def test_hostile_inputs(either: tuple[str, Cluster, SandboxDefaults]) -> None:
    which, _, defaults = either
    async with (
        Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb,
        Sandbox(command="sleep", args=["infinity"], defaults=defaults) as other,
    ):
        p = await sb.spawn(["cat"])
        with pytest.raises(ProcessNotFoundError, match="no process 'proc-nope'"):
            await sb.process("proc-nope")
        with pytest.raises(ProcessNotFoundError, match="only good in the sandbox"):
            await other.process(p.id)  # another sandbox's id
        ghost = Process(other._agent, p.info, 10.0)
        calls = (ghost.write(b"x"), ghost.signal(2), ghost.wait(5), ghost.resize(rows=5, cols=5))
        for call in calls:
            with pytest.raises(ProcessNotFoundError):
                await call
        # A write piece above the limit, sent raw: refused, the agent serves on.
        info, conn = sb._agent()
        with pytest.raises(PayloadTooLargeError, match="piece limit"):
            await conn.request(
                WriteStdin(info.sandbox_id, p.id), (bytes(MAX_STDIN_CHUNK + 1),), timeout=30
            )
        # A huge write through the API is split and fed: cat echoes all of it back.
        data = os.urandom(4 << 20)

        async def feed() -> None:
            await p.write(data)
            await p.close_stdin()

        got = bytearray()

        async def drain() -> None:
            async for chunk in p.output():
                got.extend(chunk.data)

        await asyncio.wait_for(asyncio.gather(feed(), drain()), 120)
        assert bytes(got) == data and p.skipped == 0
        with pytest.raises(SandboxError, match=r"stdin of process .* is closed"):
            await p.write(b"more")
        # Terminal sizes: refused by the client, and by the agent when sent raw.
        t = await sb.spawn(["cat"], pty=True)
        for rows, cols in ((0, 0), (100000, 100000), (-1, 80)):
            with pytest.raises(ValueError, match="rows and columns"):
                await t.resize(rows=rows, cols=cols)
            with pytest.raises(ValueError, match="rows and columns"):
                await sb.spawn(["bash"], pty=True, rows=rows, cols=cols)
        from aviato.protocol import ResizeTerminal

        with pytest.raises(SandboxError, match="rows and columns"):
            await conn.request(ResizeTerminal(info.sandbox_id, t.id, 0, 0), timeout=30)
        with pytest.raises(SandboxError, match="no terminal"):
            await p.resize(rows=10, cols=10)
        if which == "docker-exec":  # the engine starts it, and runc says why it ended
            gone = await sb.spawn(["no-such-program"])
            assert await gone.wait(timeout=60) in (126, 127)
        else:
            with pytest.raises(SandboxError, match="command not found"):
                await sb.spawn(["no-such-program"])
        with pytest.raises(SandboxError, match="not a signal"):
            await t.signal(1000)
        await t.kill()
        # Everything still works.
        assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"


async def test_processes_end_with_their_sandbox(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    _, _, defaults = either
    sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults)
    async with sb:
        p = await sb.spawn(["sleep", "1000"])
        assert (await p.refresh()).running
    with pytest.raises(SandboxError):
        await p.refresh()


async def test_hostile_raw_messages_get_errors_and_the_agent_survives(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    from aviato.protocol import ListProcesses, ReadOutput, SignalProcess, SpawnProcess

    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        info, conn = sb._agent()
        sid = info.sandbox_id
        bad = [
            SpawnProcess(sid, ()),
            SpawnProcess(sid, ("a\x00b",)),
            SpawnProcess(sid, ("sh",), env={"A=B": "x"}),
            SpawnProcess(sid, ("sh",), pty=True, rows=0, cols=5),
            ReadOutput(sid, "proc-x", 0, float("nan")),
            ReadOutput(sid, "proc-x", 0, 1e9),
            ListProcesses(sid, "", -1.0),
            SignalProcess(sid, "proc-x", 0),
            SpawnProcess("sb-not-here", ("sh",)),
        ]
        for msg in bad:
            with pytest.raises(SandboxError):
                await conn.request(msg, timeout=30)
        assert (await sb.exec(["echo", "alive"])).stdout == b"alive\n"


async def test_a_terminal(either: tuple[str, Cluster, SandboxDefaults]) -> None:
    """pty=True: a real terminal. ``tty`` names a /dev/pts device, ^C interrupts the
    foreground job (not the shell), and a resize is what ``stty size`` says."""
    _, _, defaults = either
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        t = await sb.spawn(["bash", "--norc", "-i"], pty=True, rows=24, cols=80)
        assert t.pty
        await t.write(b"tty; stty size; echo done-$((6*7))\n")
        seen = await _until_output(t, b"done-42")
        assert b"/dev/pts/" in seen and b"24 80" in seen, seen
        await t.resize(rows=40, cols=120)
        await t.write(b"stty size; echo resized-$((1+1))\n")
        assert b"40 120" in await _until_output(t, b"resized-2")
        await t.write(b"sleep 1000\n")
        await _until_running(sb, "sleep 1000")
        await t.write(b"\x03")
        await t.write(b"echo status-$?\n")
        await _until_output(t, b"status-130")  # 128 + SIGINT: the job's, not bash's
        await t.write(b"echo still-$((2+2))\n")
        await _until_output(t, b"still-4")
        assert (await t.refresh()).running
        await t.write(b"exit 3\n")
        assert await t.wait(timeout=60) == 3
        # Its controlling terminal: /dev/tty opens, and ^C (typed, no shell's job control
        # involved) ends the whole foreground group.
        s = await sb.spawn(["sh", "-c", "echo >/dev/tty && echo has-ctty; sleep 1001"], pty=True)
        await _until_output(s, b"has-ctty")
        await _until_running(sb, "sleep 1001")
        await s.write(b"\x03")
        assert await s.wait(timeout=60) == 128 + signal.SIGINT
        assert s.info.signal == signal.SIGINT
