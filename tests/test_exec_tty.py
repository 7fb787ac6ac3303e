"""``aviato exec -it SANDBOX -- bash``, used as a person would: typed into through tmux
(send-keys) and read off its screen (capture-pane), on both runtimes."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from aviato import Sandbox, SandboxDefaults
from tests.conftest import ROOT, Cluster, wait_until
from tests.test_processes import _until_running
from tests.test_processes import docker as docker
from tests.test_processes import either as either
from tests.test_processes import local as local


class Tmux:
    """A tmux server of our own (its own socket), one window running a command."""

    def __init__(self) -> None:
        self.socket = f"aviato-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            timeout=30,
            check=True,
        )
        return out.stdout.decode()

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "t", "-J", "-S", "-200")

    def type(self, *keys: str) -> None:
        self("send-keys", "-t", "t", *keys)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        wait_until(lambda: text in self.screen(), timeout, 0.05, f"{text!r} on the screen")
        return self.screen()

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (apt-get install -y tmux)")
    t = Tmux()
    yield t
    t.close()


async def test_exec_it_is_an_interactive_shell(
    either: tuple[str, Cluster, SandboxDefaults], tmux: Tmux
) -> None:
    _, cluster, defaults = either
    aviato = shutil.which("aviato")
    assert aviato is not None, "the aviato command is not installed (pip install -e .)"
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert sb.sandbox_id is not None
        env = f"AVIATO_SCHEDULER={cluster.address} PYTHONPATH={ROOT}"
        command = (
            f"cd {ROOT} && env {env} {aviato} exec -it {sb.sandbox_id} -- bash --norc -i; "
            "echo aviato-exec-status-$?; sleep 3600"  # the client's status, on screen
        )
        tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", command)
        tmux("set-option", "-t", "t", "status", "off")
        tmux("resize-window", "-t", "t", "-x", "100", "-y", "30")
        tmux.wait_for("# ")  # bash's prompt
        tmux.type("tty; stty size", "Enter")
        tmux.wait_for("/dev/pts/")
        tmux.wait_for("30 100")
        # A resize of our terminal (SIGWINCH) reaches the sandbox's. The resize and the
        # keys travel separately: a `stty size` typed first may still see the old size,
        # so it is asked again until the new one shows (or the deadline passes).
        tmux("resize-window", "-t", "t", "-x", "120", "-y", "40")

        def resized() -> bool:
            tmux.type("clear; stty size", "Enter")
            try:
                tmux.wait_for("40 120", timeout=2)
            except AssertionError:
                return False
            return True

        wait_until(resized, 60, 0.0, "the resize to reach the sandbox's terminal")
        # ^C as typed reaches the job in the sandbox, not the client.
        tmux.type("sleep 1000", "Enter")
        await _until_running(sb, "sleep 1000")
        tmux.type("C-c")
        tmux.type("echo status-$?", "Enter")
        tmux.wait_for("status-130")
        # Line editing works as in any terminal: typed, erased, retyped.
        tmux.type("echo abX", "BSpace", "c-$((40+2))", "Enter")
        tmux.wait_for("abc-42")
        tmux.type("exit 5", "Enter")
        tmux.wait_for("aviato-exec-status-5")  # bash's status is aviato exec's
        # The shell is gone with the client's session.
        (info,) = [i for i in await sb.processes() if i.argv[0] == "bash"]
        assert (info.running, info.exit_code) == (False, 5)


async def test_exec_i_streams_stdin_without_a_terminal(
    either: tuple[str, Cluster, SandboxDefaults],
) -> None:
    """``-i`` without ``-t``: stdin goes through as it comes, EOF ends it."""
    _, cluster, defaults = either
    aviato = shutil.which("aviato")
    assert aviato is not None
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        assert sb.sandbox_id is not None
        data = os.urandom(3 << 20)
        out = await asyncio.to_thread(
            subprocess.run,
            [aviato, "exec", "-i", sb.sandbox_id, "--", "sh", "-c", "cat; exit 4"],
            input=data,
            capture_output=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "AVIATO_SCHEDULER": cluster.address, "PYTHONPATH": str(ROOT)},
        )
        assert (out.returncode, out.stdout == data, out.stderr) == (4, True, b"")
