"""The seed's examples as written, the embedded cluster, and the CLI, as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import ROOT, Cluster, need_docker


def _run(args: list[str], env: dict[str, str], timeout: float = 180):
    # stdin: /dev/null, not ours: `aviato exec` reads a stdin that is not a terminal to its
    # end, and a runner's open pipe would never end.
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _run_example(path: str, env: dict[str, str]) -> tuple[list[str], int]:
    proc = subprocess.Popen(
        [sys.executable, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return out.splitlines(), proc.pid


def _embedded_leftovers(pid: int) -> list[str]:
    """Containers and daemons of the embedded cluster the process ``pid`` started."""
    names = subprocess.run(
        [
            "docker",
            "ps",
            "-a",
            "--filter",
            f"label=aviato.agent=embedded-{pid}",
            "--format",
            "{{.Names}}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    procs = [
        " ".join(p.info["cmdline"] or ())
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["status"] != psutil.STATUS_ZOMBIE
        and f"embedded-{pid}" in " ".join(p.info["cmdline"] or ())
    ]
    return names + procs


def test_seed_examples_on_the_embedded_cluster() -> None:
    need_docker()
    env = {k: v for k, v in os.environ.items() if k != "AVIATO_SCHEDULER"}
    lines, pid1 = _run_example("examples/parallel_sandboxes.py", env)
    assert lines[0].startswith("Sandbox 1: sb-") and lines[1].startswith("Sandbox 2: sb-")
    assert lines[2:] == ["sb1: from sandbox 1", "sb2: from sandbox 2"]
    lines, pid2 = _run_example("examples/session_benefits.py", env)
    assert lines == [
        "sb1: image python:3.11, tags ['my-app']",
        "sb2: image python:3.11, tags ['my-app']",
        "before exit: 1 live sandbox(es) in the session",
        "after exit: sb2 is terminated",
    ]
    lines, pid3 = _run_example("examples/parallel_functions.py", env)
    assert lines[0] == "[1, 4, 9]"
    found = re.search(r"3 calls of ([0-9.]+) s each, in parallel", lines[1])
    assert lines[1].startswith("took ") and found, lines[1]
    assert 1.0 <= float(found.group(1)) < 1.5, lines[1]  # a 1 s sleep, on a loaded host too
    assert len(lines) == 2
    # The embedded scheduler and agent went away with the interpreter, and their containers.
    for pid in (pid1, pid2, pid3):
        assert _embedded_leftovers(pid) == []


def test_the_seed_examples_sync_twins_on_the_embedded_cluster() -> None:
    """examples/sync_*.py: the same examples on the blocking API (aviato.sync), with the
    same output."""
    need_docker()
    env = {k: v for k, v in os.environ.items() if k != "AVIATO_SCHEDULER"}
    lines, pid1 = _run_example("examples/sync_parallel_sandboxes.py", env)
    assert lines[0].startswith("Sandbox 1: sb-") and lines[1].startswith("Sandbox 2: sb-")
    assert lines[2:] == ["sb1: from sandbox 1", "sb2: from sandbox 2"]
    lines, pid2 = _run_example("examples/sync_session_benefits.py", env)
    assert lines == [
        "sb1: image python:3.11, tags ['my-app']",
        "sb2: image python:3.11, tags ['my-app']",
        "before exit: 1 live sandbox(es) in the session",
        "after exit: sb2 is terminated",
    ]
    lines, pid3 = _run_example("examples/sync_parallel_functions.py", env)
    assert lines[0] == "[1, 4, 9]"
    assert lines[1].startswith("took ") and "3 calls of 1.0 s each, in parallel" in lines[1]
    for pid in (pid1, pid2, pid3):
        assert _embedded_leftovers(pid) == []


def test_cli_status_ps_exec_logs_stop(cluster: Cluster) -> None:
    env = {**os.environ, "AVIATO_SCHEDULER": cluster.address}
    aviato = [sys.executable, "-m", "aviato.cli"]
    out = _run([*aviato, "status"], env)
    assert out.returncode == 0, out.stderr
    for agent_id in cluster.agent_ids:
        assert agent_id in out.stdout
    code = f"""
import asyncio
from aviato import Sandbox, SandboxDefaults
async def main():
    sb = await Sandbox.create("sh", "-c", "echo booted; sleep infinity", tags=["cli"],
        defaults=SandboxDefaults(scheduler={cluster.address!r}))
    print(sb.sandbox_id)
asyncio.run(main())
"""
    created = _run([sys.executable, "-c", code], env)
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    out = _run([*aviato, "ps", "--tag", "cli"], env)
    assert sandbox_id in out.stdout and "running" in out.stdout
    out = _run(
        [*aviato, "exec", sandbox_id, "--", "sh", "-c", "echo out; echo err >&2; exit 3"], env
    )
    assert (out.returncode, out.stdout, out.stderr) == (3, "out\n", "err\n")
    out = _run([*aviato, "logs", sandbox_id], env)
    assert out.stdout == "booted\n"
    out = _run([*aviato, "stop", sandbox_id], env)
    assert out.returncode == 0 and sandbox_id in out.stdout
    out = _run([*aviato, "ps", "--all", "--tag", "cli"], env)
    assert "terminated" in out.stdout
    out = _run([*aviato, "exec", sandbox_id, "--", "true"], env)
    assert out.returncode == 1 and "SandboxNotRunningError" in out.stderr


def test_aviato_up_serves_other_processes_and_cleans_up(tmp_path: Path) -> None:
    need_docker()
    import signal
    import socket

    env = {k: v for k, v in os.environ.items() if k != "AVIATO_SCHEDULER"}
    env["XDG_STATE_HOME"] = str(tmp_path)  # its logs, kept after exit
    with socket.socket() as s:  # not the default 5555: other runs may hold it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aviato.cli", "up", "--slots", "2", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = ""
        while "AVIATO_SCHEDULER=" not in line:
            line = proc.stdout.readline()
            assert line, "aviato up ended before printing its address"
        address = line.strip().split("AVIATO_SCHEDULER=")[1]
        assert address == f"tcp://127.0.0.1:{port}"
        env["AVIATO_SCHEDULER"] = address
        code = """
import asyncio
from aviato import Sandbox
async def main():
    sb = await Sandbox.create("sleep", "infinity")
    print((await sb.exec(["echo", "via up"])).stdout.decode().strip())
asyncio.run(main())
"""
        out = _run([sys.executable, "-c", code], env)
        assert out.stdout.strip() == "via up", out.stderr
        status = _run([sys.executable, "-m", "aviato.cli", "status"], env)
        assert "running 1" in status.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    names = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=aviato.managed=1", "--format", "{{.Labels}}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert f"aviato.agent=embedded-{proc.pid}" not in names
