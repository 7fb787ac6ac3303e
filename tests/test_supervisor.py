"""The in-sandbox supervisor: exec and files through it when the image has Python,
and through the runtime (docker exec) when it has none — the same results either way."""

from __future__ import annotations

import asyncio
import time

import pytest

from aviato import Sandbox, SandboxDefaults, SandboxFileError, SandboxTimeoutError


async def _wait_for_supervisor(sb: Sandbox) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        if b"aviato_supervisor" in r.stdout:
            return True
        await asyncio.sleep(0.1)
    return False


async def _same_behaviour(sb: Sandbox) -> None:
    r = await sb.exec(["sh", "-c", "printf out; printf err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.returncode) == (b"out", b"err", 3)
    r = await sb.exec(["sh", "-c", 'echo "$FOO" "$(pwd)"'], cwd="/tmp", env={"FOO": "bar"})
    assert r.stdout == b"bar /tmp\n"
    r = await sb.exec(["env"])
    assert b"AVIATO_" not in r.stdout and b"PYTHONPATH" not in r.stdout  # nothing of ours leaks
    chunks = [c async for c in sb.exec_stream(["sh", "-c", "echo a; echo b >&2"])]
    assert sorted((c.fd, c.data) for c in chunks) == [(1, b"a\n"), (2, b"b\n")]
    with pytest.raises(SandboxTimeoutError):
        await sb.exec(["sleep", "30"], timeout_seconds=0.5)
    data = bytes(range(256)) * 1000
    await sb.write_file("/tmp/sub/x.bin", data)
    assert await sb.read_file("/tmp/sub/x.bin") == data
    with pytest.raises(SandboxFileError) as info:
        await sb.read_file("/nope/none")
    assert info.value.filepath == "/nope/none"
    await _missing_program_is_127(sb)
    # SIGPIPE (and SIGXFSZ) at their defaults, as under docker exec: not Python's ignore
    r = await sb.exec(["grep", "SigIgn", "/proc/self/status"])
    assert int(r.stdout.split()[1], 16) & (1 << 12 | 1 << 24) == 0, r
    await _stdin_behaviour(sb)
    await _relative_paths(sb)


async def _missing_program_is_127(sb: Sandbox) -> None:
    """As a shell says it, whatever path the exec took (supervisor or runtime)."""
    r = await sb.exec(["no-such-program"])
    assert (r.returncode, r.stdout) == (127, b""), r
    assert b"no-such-program" in r.stderr and b"No such file" in r.stderr, r
    chunks = [c async for c in sb.exec_stream(["no-such-program"])]
    assert [c.fd for c in chunks] == [2] and b"no-such-program" in chunks[0].data
    r = await sb.exec(["true"], cwd="/no/such/dir")
    assert (r.returncode, r.stdout) == (127, b""), r
    r = await sb.exec(["no-such-program"], stdin=b"x")  # docker exec attached for stdin
    assert (r.returncode, r.stdout) == (127, b""), r


async def _relative_paths(sb: Sandbox) -> None:
    """A relative file path is taken from the sandbox's working directory, where exec
    runs by default; missing parent directories are made."""
    workdir = (await sb.exec(["pwd"])).stdout.decode().strip()
    await sb.write_file("rel/dir/x.txt", b"relative")
    assert (await sb.exec(["cat", f"{workdir.rstrip('/')}/rel/dir/x.txt"])).stdout == b"relative"
    assert (await sb.exec(["cat", "rel/dir/x.txt"])).stdout == b"relative"
    assert await sb.read_file("rel/dir/x.txt") == b"relative"
    assert await sb.read_file("./rel/../rel/dir/x.txt") == b"relative"
    with pytest.raises(SandboxFileError) as info:
        await sb.read_file("rel/none.txt")
    assert info.value.filepath == "rel/none.txt"  # as given


async def _stdin_behaviour(sb: Sandbox) -> None:
    """stdin=: the command reads it, then EOF; none given: an empty stdin."""
    assert (await sb.exec(["cat"], stdin=b"hello")).stdout == b"hello"
    assert (await sb.exec(["cat"])).stdout == b""
    assert (await sb.exec(["wc", "-c"], stdin="héllo")).stdout.strip() == b"6"  # str: UTF-8
    big = bytes(range(256)) * 20_000  # 5 MB: far above any pipe buffer, both ways
    r = await sb.exec(["sh", "-c", "cat; echo done >&2"], stdin=big)
    assert (r.stdout == big, r.stderr, r.returncode) == (True, b"done\n", 0)
    # A command that stops reading early is not stuck on the rest.
    r = await sb.exec(["head", "-c", "3"], stdin=big, timeout_seconds=30)
    assert (r.stdout, r.returncode) == (b"\x00\x01\x02", 0)
    # A reader that stops early ends its writer with SIGPIPE, silently, as in a shell.
    r = await sb.exec(["sh", "-c", "cat | head -c 2"], stdin=big, timeout_seconds=30)
    assert (r.stdout, r.stderr, r.returncode) == (b"\x00\x01", b"", 0)
    stream = sb.exec_stream(["sh", "-c", "tr a-z A-Z; exit 5"], stdin=b"streamed")
    assert [(c.fd, c.data) async for c in stream] == [(1, b"STREAMED")]
    assert stream.returncode == 5


async def test_missing_program_right_after_start_is_127(defaults: SandboxDefaults) -> None:
    """Regression: straight after start (before the supervisor is up, so through docker
    exec) it gave 126 with "OCI runtime exec failed" on stdout; later, 127 on stderr."""
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        await _missing_program_is_127(sb)
        assert await _wait_for_supervisor(sb)
        await _missing_program_is_127(sb)


async def test_supervisor_serves_exec_and_files(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert await _wait_for_supervisor(sb)
        await _same_behaviour(sb)
        # the command really ran under the supervisor, not through docker exec
        r = await sb.exec(["sh", "-c", "cat /proc/$PPID/cmdline"])
        assert b"aviato_supervisor" in r.stdout


_INTRUDE = """
import socket, struct
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("/run/aviato/worker.sock")
except OSError as exc:
    print("refused", type(exc).__name__)
else:
    s.sendall(struct.pack("!IQ", 1, 5) + b"junk!")
    print("connected")
"""


async def test_other_processes_cannot_speak_for_the_supervisor(
    defaults: SandboxDefaults,
) -> None:
    """Once the supervisor (or a function worker, with its calls link) is connected,
    the agent listens no more: code in the sandbox cannot connect and cut the link
    with junk. Regression (review): an extra connection that sent junk ended it."""
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert await _wait_for_supervisor(sb)
        r = await sb.exec(["python", "-c", _INTRUDE])
        # The socket file is there (mounted in) but nothing listens: refused, not absent.
        assert r.stdout == b"refused ConnectionRefusedError\n", r
        assert (await sb.exec(["echo", "still"])).stdout == b"still\n"
    async with Sandbox.session(defaults) as session:

        @session.function()
        def intrude(code: str) -> str:
            import contextlib
            import io

            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code)
            return out.getvalue()

        assert (await intrude(_INTRUDE)).value == "refused ConnectionRefusedError\n"
        assert (await intrude("print('fine')")).value == "fine\n"


async def test_images_without_python_fall_back_to_docker_exec(
    defaults: SandboxDefaults, no_python_image: str
) -> None:
    async with Sandbox(
        command="sleep", args=["infinity"], container_image=no_python_image, defaults=defaults
    ) as sb:
        r = await sb.exec(["sh", "-c", "command -v python3 python || echo none"])
        assert r.stdout == b"none\n"
        assert (await sb.exec(["pwd"])).stdout == b"/work\n"  # the image's WORKDIR
        r = await sb.exec(["sh", "-c", "cat /proc/$PPID/cmdline"])
        assert b"aviato_supervisor" not in r.stdout
        await _same_behaviour(sb)
