"""Sandboxes as host process trees, for machines with no Docker engine.

Each sandbox is ``bwrap`` (bubblewrap, when installed) running the in-sandbox
supervisor, which runs the sandbox's command as its child and exits with its exit
code. Inside: the host system read-only, a private writable ``/tmp`` (also the
working directory), private PID/IPC/UTS namespaces, no capabilities, and no
network with ``network="none"``; limits through ``setrlimit``. Without bubblewrap
the same tree runs as plain processes in their own session and directory, and the
runtime's name says plainly that it is not isolated.

Images: ``python:X.Y`` maps to a host interpreter of that version; any other image
is refused (a Docker engine can provide it). Exec and files always go through the
supervisor (the agent's WorkerHub): this runtime's own exec and file methods only
answer that the supervisor is not up.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import psutil

from agent.runtime.base import (
    ExitStatus,
    Mount,
    OutputChunk,
    Runtime,
    RuntimeSandbox,
    SandboxExit,
)
from agent.runtime.cgroups import Cgroups
from agent.workers import WorkerHub
from aviato.exceptions import SandboxFailedError, SandboxNotRunningError
from aviato.protocol import SandboxSpec

log = logging.getLogger(__name__)

LOG_LIMIT = 1024 * 1024
_IMAGE = re.compile(r"^(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:[.\-][\w.\-]*)?$")


def find_python(version: str, configured: Mapping[str, str] | None = None) -> str | None:
    """The real path of a host interpreter for ``version`` ("3.11"), or None.

    Resolved through ``sys.executable`` so that wrappers (pyenv shims) are not what
    runs inside the sandbox."""
    if configured and version in configured:
        return configured[version]
    for name in (f"python{version}", "python3", "python"):
        found = shutil.which(name)
        if not found:
            continue
        try:
            out = subprocess.run(
                [found, "-c", "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if len(out) == 2 and out[0] == version:
            return out[1]
    return None


class LocalRuntime(Runtime):
    supervisor_is_main = True

    def __init__(
        self,
        *,
        pids_limit: int = 1024,
        use_bwrap: bool | None = None,
        state_dir: str | None = None,
        pythons: Mapping[str, str] | None = None,
        use_cgroups: bool = True,
    ) -> None:
        bwrap = shutil.which("bwrap")
        if use_bwrap is None:
            use_bwrap = bwrap is not None and os.environ.get("AVIATO_LOCAL_NO_BWRAP") != "1"
        self.bwrap = bwrap if use_bwrap else None
        self.isolated = self.bwrap is not None
        self.cgroups = Cgroups() if use_cgroups else Cgroups(root="/nonexistent")
        if not self.isolated:
            self.name = "local (NOT isolated: no bubblewrap)"
        elif self.cgroups.version:
            self.name = f"local (bubblewrap, cgroup v{self.cgroups.version} limits)"
        else:
            self.name = "local (bubblewrap)"
        self.pids_limit = pids_limit
        self.root = Path(state_dir or Path(tempfile.gettempdir()) / "aviato-local")
        self.pythons = dict(pythons or {})
        self._python_cache: dict[str, str | None] = {}
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()
        self._exits: asyncio.Queue[SandboxExit | None] = asyncio.Queue()
        self._waiters: set[asyncio.Task[None]] = set()
        self._ended_logs: dict[str, bytes] = {}

    # ------------------------------------------------------------------ helpers

    def _dir(self, agent_id: str, sandbox_id: str) -> Path:
        return self.root / agent_id / sandbox_id

    def _find_dir(self, sandbox_id: str) -> Path | None:
        for path in self.root.glob(f"*/{sandbox_id}"):
            return path
        return None

    def _python_for(self, sandbox_id: str, image: str) -> str:
        match = _IMAGE.match(image)
        if not match:
            raise SandboxFailedError(
                f"the local runtime cannot provide image {image!r}: it runs sandboxes as host "
                "processes and maps only python:X.Y images to a host interpreter. Run the "
                "agent on a host with a Docker engine (--runtime docker) for other images.",
                sandbox_id=sandbox_id,
            )
        version = f"{match.group(1)}.{match.group(2)}"
        if version not in self._python_cache:
            self._python_cache[version] = find_python(version, self.pythons)
        python = self._python_cache[version]
        if python is None:
            raise SandboxFailedError(
                f"image {image!r} needs Python {version} on this host for the local runtime, "
                f"and none was found on PATH; install python{version} or use a Docker engine",
                sandbox_id=sandbox_id,
            )
        return python

    # ------------------------------------------------------------------ create

    async def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        python = self._python_for(sandbox_id, spec.image)
        if not spec.function_worker and not _command_exists(spec):
            raise SandboxFailedError(
                f"command {spec.command!r} was not found on this host (the local runtime's "
                f"sandboxes see the host system, read-only)",
                sandbox_id=sandbox_id,
            )
        agent_id = labels.get("aviato.agent", "agent")
        home = self._dir(agent_id, sandbox_id)
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        (home / "bin").mkdir(exist_ok=True)
        for alias in ("python", "python3", Path(python).name):
            link = home / "bin" / alias
            if not link.exists():
                link.symlink_to(python)
        (home / "labels.json").write_text(json.dumps(labels))
        lib = next((m for m in mounts if m.read_only), None)
        if lib is None:
            raise SandboxFailedError(
                "the local runtime needs the supervisor library mount", sandbox_id=sandbox_id
            )
        if spec.function_worker:
            argv = [spec.command, *spec.args]  # the function worker is itself the supervisor
        else:
            python_cmd, flags = WorkerHub.worker_command(functions=False)
            argv = [python_cmd, *flags, "--main", "--", spec.command, *spec.args]
        bin_dir = "/run/aviato-bin" if self.bwrap else str(home / "bin")
        sockets = next((m for m in mounts if not m.read_only), None)
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp" if self.bwrap else str(home / "tmp"),
            "LANG": "C.UTF-8",
            **spec.env,
        }
        if sockets is not None:
            env.setdefault("AVIATO_WORKER_SOCKET", f"{sockets.target}/worker.sock")
        if self.bwrap:
            cmd = self._bwrap_argv(home, spec, mounts) + argv
            cwd = None
        else:
            # No namespaces: mount targets become the host paths themselves.
            def host(value: str) -> str:
                for m in sorted(mounts, key=lambda m: -len(m.target)):  # longest first
                    value = value.replace(m.target, m.source)
                return value

            cmd = [host(a) for a in argv]
            env = {k: host(v) for k, v in env.items()}
            cwd = str(home / "tmp")
        try:
            groups = self.cgroups.make(
                sandbox_id,
                memory=spec.memory_bytes,
                pids=spec.pids_limit or self.pids_limit,
                cpus=spec.cpus,
            )
        except OSError as exc:
            shutil.rmtree(home, ignore_errors=True)
            raise SandboxFailedError(
                f"could not set the sandbox's cgroup limits: {exc}", sandbox_id=sandbox_id
            ) from exc
        # Small local file the child owns from here on.
        logfile = open(home / "log", "wb")  # noqa: ASYNC230
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=self._limits(spec, groups),
            )
        except OSError as exc:
            shutil.rmtree(home, ignore_errors=True)
            await asyncio.to_thread(self.cgroups.remove, sandbox_id)
            raise SandboxFailedError(
                f"could not start sandbox process: {exc}", sandbox_id=sandbox_id
            ) from exc
        finally:
            logfile.close()
        (home / "pid").write_text(f"{proc.pid} {psutil.Process(proc.pid).create_time()}")
        self._procs[sandbox_id] = proc
        task = asyncio.get_running_loop().create_task(self._wait(sandbox_id, proc))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    def _bwrap_argv(self, home: Path, spec: SandboxSpec, mounts: Sequence[Mount]) -> list[str]:
        assert self.bwrap is not None
        argv = [
            self.bwrap,
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/run",
            "--bind",
            str(home / "tmp"),
            "/tmp",
            "--ro-bind",
            str(home / "bin"),
            "/run/aviato-bin",
            "--chdir",
            spec.working_dir or "/tmp",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--cap-drop",
            "ALL",
            "--new-session",
            "--die-with-parent",
        ]
        if spec.network == "none":
            argv.append("--unshare-net")
        for m in mounts:
            argv += ["--ro-bind" if m.read_only else "--bind", m.source, m.target]
        return argv

    def _limits(self, spec: SandboxSpec, groups: Sequence[str]) -> Callable[[], None]:
        """What the child does before it execs: join its cgroups (whose limits then
        hold for its whole tree), else fall back to per-process setrlimit."""
        memory = spec.memory_bytes
        pids = spec.pids_limit or self.pids_limit
        procs = [p.encode() for p in groups]

        def apply() -> None:  # runs in the child, before exec: syscalls only
            if procs:
                me = str(os.getpid()).encode()
                for path in procs:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, me)
                    finally:
                        os.close(fd)
                return
            if memory:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            with contextlib.suppress(ValueError, OSError):  # root ignores NPROC anyway
                resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))

        return apply

    async def _wait(self, sandbox_id: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._procs.pop(sandbox_id, None)
        if sandbox_id in self._stopping:
            return
        # Ended by itself: keep its last output for `logs`, then leave nothing behind.
        self._ended_logs[sandbox_id] = await self.logs(sandbox_id)
        while len(self._ended_logs) > 64:
            self._ended_logs.pop(next(iter(self._ended_logs)))
        home = self._find_dir(sandbox_id)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)
        exit_code = code if code >= 0 else 128 - code
        # Without cgroups, setrlimit makes allocations fail instead: no OOM killer.
        oom = self.cgroups.oom_killed(sandbox_id)
        await asyncio.to_thread(self.cgroups.remove, sandbox_id)
        await self._exits.put(SandboxExit(sandbox_id, exit_code, oom))

    # ------------------------------------------------------------------ the rest

    @staticmethod
    def _no_supervisor(sandbox_id: str) -> SandboxNotRunningError:
        return SandboxNotRunningError(
            f"sandbox {sandbox_id}'s supervisor is not up (the local runtime execs through it)",
            sandbox_id=sandbox_id,
        )

    def exec_stream(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
    ) -> AsyncIterator[OutputChunk | ExitStatus]:
        raise self._no_supervisor(sandbox_id)

    async def read_file(self, sandbox_id: str, path: str) -> bytes:
        raise self._no_supervisor(sandbox_id)

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | memoryview, mode: int = 0o644
    ) -> None:
        raise self._no_supervisor(sandbox_id)

    async def logs(self, sandbox_id: str) -> bytes:
        if sandbox_id in self._ended_logs:
            return self._ended_logs[sandbox_id]
        home = self._find_dir(sandbox_id)
        if home is None or not (home / "log").exists():
            return b""
        with open(home / "log", "rb") as f:  # noqa: ASYNC230 (local disk, bounded read)
            f.seek(max(0, (home / "log").stat().st_size - LOG_LIMIT))
            return f.read()

    async def stop(self, sandbox_id: str) -> None:
        self._stopping.add(sandbox_id)
        home = self._find_dir(sandbox_id)
        proc = self._procs.pop(sandbox_id, None)
        pid = proc.pid if proc is not None else _live_pid(home)
        if pid is not None:
            # The whole tree: execs run in sessions of their own under the supervisor.
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        p.kill()
            if proc is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await proc.wait()
        # Also kills what left the tree (a double fork) but not the group.
        await asyncio.to_thread(self.cgroups.remove, sandbox_id)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    async def list(self, agent_id: str) -> list[RuntimeSandbox]:
        found = []
        for home in sorted((self.root / agent_id).glob("*")):
            try:
                labels = json.loads((home / "labels.json").read_text())
            except (OSError, ValueError):
                shutil.rmtree(home, ignore_errors=True)  # half-made: nothing runs there
                continue
            running = home.name in self._procs or _live_pid(home) is not None
            found.append(RuntimeSandbox(home.name, labels, running))
        return found

    async def list_all(self) -> builtins.list[RuntimeSandbox]:
        found: builtins.list[RuntimeSandbox] = []
        for agent_dir in self.root.glob("*"):
            found += await self.list(agent_dir.name)
        return found

    async def exits(self) -> AsyncIterator[SandboxExit]:
        while True:
            item = await self._exits.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        await self._exits.put(None)
        # Agent directories left empty (their sandboxes are gone) go too.
        for agent_dir in self.root.glob("*"):
            with contextlib.suppress(OSError):
                agent_dir.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()
        for task in list(self._waiters):
            task.cancel()


def _command_exists(spec: SandboxSpec) -> bool:
    if "/" in spec.command:
        return os.path.exists(spec.command) or bool(spec.working_dir)
    path = (
        os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    return spec.command.startswith("python") or shutil.which(spec.command, path=path) is not None


def _live_pid(home: Path | None) -> int | None:
    """The sandbox's process id if that very process still runs (pid reuse checked)."""
    if home is None:
        return None
    try:
        pid_text, created = (home / "pid").read_text().split()
        proc = psutil.Process(int(pid_text))
        # A zombie is dead (its parent, a killed agent, is gone and init may not reap).
        if abs(proc.create_time() - float(created)) < 0.01 and (
            proc.status() != psutil.STATUS_ZOMBIE
        ):
            return proc.pid
    except (OSError, ValueError, psutil.Error):
        return None
    return None
