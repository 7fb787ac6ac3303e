"""The in-sandbox supervisor: exec and files through it when the image has Python,
and through the runtime (docker exec) when it has none — the same results either way."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from aviato import Sandbox, SandboxDefaults, SandboxFileError, SandboxTimeoutError
from tests.conftest import IMAGE, need_docker

NO_PYTHON = "aviato-test/no-python:1"


@pytest.fixture(scope="module")
def no_python_image() -> str:
    """python:3.11 with every Python removed (built offline by committing a container)."""
    need_docker()
    name = "aviato-test-build-no-python"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    subprocess.run(
        [
            "docker",
            "run",
            "--name",
            name,
            IMAGE,
            "sh",
            "-c",
            "rm -f /usr/bin/python* /usr/local/bin/python*",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        subprocess.run(
            ["docker", "commit", name, NO_PYTHON], check=True, capture_output=True, timeout=120
        )
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
    yield NO_PYTHON
    subprocess.run(["docker", "rmi", "-f", NO_PYTHON], capture_output=True, timeout=60)


async def _wait_for_supervisor(sb: Sandbox) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = await sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])
        if b"aviato_worker" in r.stdout:
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
    r = await sb.exec(["no-such-program"])
    assert r.returncode in (126, 127)


async def test_supervisor_serves_exec_and_files(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert await _wait_for_supervisor(sb)
        await _same_behaviour(sb)
        # the command really ran under the supervisor, not through docker exec
        r = await sb.exec(["sh", "-c", "cat /proc/$PPID/cmdline"])
        assert b"aviato_worker" in r.stdout


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
        r = await sb.exec(["sh", "-c", "cat /proc/$PPID/cmdline"])
        assert b"aviato_worker" not in r.stdout
        await _same_behaviour(sb)
