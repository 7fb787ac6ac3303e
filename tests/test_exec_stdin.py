"""Exec stdin beyond the conformance suite (tests/test_supervisor.py's _stdin_behaviour
runs on both runtimes and both exec paths): its size limit, and ``aviato exec`` passing
its own stdin through."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest

from aviato import PayloadTooLargeError, Sandbox, SandboxDefaults
from aviato.protocol import MAX_PAYLOAD_BYTES
from tests.conftest import ROOT, Cluster


async def test_stdin_above_the_payload_limit_is_refused_before_sending(
    defaults: SandboxDefaults,
) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        huge = bytes(MAX_PAYLOAD_BYTES + 1)  # calloc'ed: no memory is touched
        with pytest.raises(PayloadTooLargeError, match="stdin of"):
            await sb.exec(["cat"], stdin=huge)
        with pytest.raises(PayloadTooLargeError, match="stdin of"):
            sb.exec_stream(["cat"], stdin=memoryview(huge))
        with pytest.raises(TypeError, match="stdin must be bytes or str"):
            await sb.exec(["cat"], stdin=42)  # type: ignore[arg-type]
        # The sandbox is unharmed.
        assert (await sb.exec(["cat"], stdin=b"still")).stdout == b"still"


async def test_aviato_exec_passes_its_stdin_through(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    aviato = shutil.which("aviato")
    assert aviato is not None, "the aviato command is not installed (pip install -e .)"
    env = {**os.environ, "AVIATO_SCHEDULER": cluster.address}

    def run(args: list[str], stdin: bytes | None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [aviato, *args],
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            timeout=120,
            cwd=ROOT,
            env=env,
        )

    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        sid = sb.sandbox_id
        assert sid is not None
        # `echo hi | aviato exec ID -- cat` prints hi
        out = await asyncio.to_thread(run, ["exec", sid, "--", "cat"], b"hi\n")
        assert (out.returncode, out.stdout, out.stderr) == (0, b"hi\n", b"")
        data = os.urandom(1 << 20)
        out = await asyncio.to_thread(run, ["exec", sid, "--", "sh", "-c", "cat; exit 4"], data)
        assert (out.returncode, out.stdout == data) == (4, True)
        # An empty stdin (/dev/null) is an empty stdin, not a hang.
        out = await asyncio.to_thread(run, ["exec", sid, "--", "wc", "-c"], None)
        assert (out.returncode, out.stdout.strip()) == (0, b"0")
