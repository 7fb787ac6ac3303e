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
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.resources import gpu_binds
from agent.runtime import local_network, local_userns
from agent.runtime.base import (
    LABEL_AGENT,
    LABEL_SPARE,
    ExitStatus,
    Mount,
    OutputChunk,
    Runtime,
    RuntimeSandbox,
    SandboxExit,
    join_chunks,
    sandbox_labels,
)
from agent.runtime.bwrap_root import root_args
from agent.runtime.cgroups import Cgroups
from agent.runtime.local_lifecycle import LocalLifecycle
from agent.runtime.parked import Parked, ParkedPool
from agent.runtime.seccomp_filter import with_seccomp
from agent.runtime.streams import LocalStreams
from agent.supervisor import LOG_MAGIC, LOG_RECORD
from agent.supervisor_launch import supervisor_command
from aviato.exceptions import ConfigurationError, SandboxFailedError, SandboxNotRunningError
from aviato.protocol import MAX_PAYLOAD_BYTES, SandboxSpec

log = logging.getLogger(__name__)

LOG_LIMIT = 1024 * 1024
_IMAGE = re.compile(r"^(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:[.\-][\w.\-]*)?$")


@dataclass(frozen=True, slots=True)
class Interpreter:
    """A host Python: its real path, and the directories it runs from (its venv's and
    its base installation's prefixes)."""

    path: str
    #: sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix
    prefixes: tuple[str, ...] = ()

    @property
    def venv(self) -> str | None:
        """The virtual environment it belongs to, if any."""
        if len(self.prefixes) == 4 and self.prefixes[0] != self.prefixes[2]:
            return self.prefixes[0]
        return None


_PROBE = (
    "import sys\n"
    "print('%d.%d' % sys.version_info[:2])\n"
    "for p in (sys.executable, sys.prefix, sys.exec_prefix, sys.base_prefix,"
    " sys.base_exec_prefix): print(p)"
)


def _probe(python: str) -> list[str] | None:
    try:
        return subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=10, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None


def find_python(
    version: str, configured: Mapping[str, str] | None = None, public: bool = False
) -> Interpreter | None:
    """The host interpreter for ``version`` ("3.11"), or None; ``public``: only one any
    user can run (sandboxes under --userns-uid are not root on the host).

    Resolved through ``sys.executable`` so that wrappers (pyenv shims) are not what
    runs inside the sandbox."""
    if configured and version in configured:
        probed = _probe(configured[version]) or []
        return Interpreter(configured[version], tuple(probed[2:]))
    names = (f"python{version}", "python3", "python", f"/usr/bin/python{version}")
    for name in names:
        found = shutil.which(name)
        out = _probe(found) if found else None
        if out is not None and len(out) == 6 and out[0] == version:
            if not public or local_userns.reachable(out[1]):
                return Interpreter(out[1], tuple(out[2:]))
    return None


#: Parts of /proc that reach the whole kernel, not the sandbox: read-only inside.
_PROC_RO = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
#: Host directories a bubblewrap sandbox does not see: it gets its own over them.
SANDBOX_OWN_DIRS = ("/tmp", "/run")


def interpreter_binds(prefixes: Sequence[str]) -> list[str]:
    """The interpreter's directories that the sandbox's own /tmp or /run would hide (a
    venv under /tmp, say), to mount read-only at the same place inside. Raises
    ValueError for one that IS such a directory: mounting it would replace the
    sandbox's own."""
    binds: list[str] = []
    for prefix in dict.fromkeys(os.path.normpath(p) for p in prefixes if p):
        if prefix in SANDBOX_OWN_DIRS:
            raise ValueError(
                f"the Python to run in sandboxes is installed right in {prefix}, which every "
                f"sandbox gets a private {prefix} of its own over; install it (or make the venv)"
                f" in a directory of its own, e.g. {prefix}/venv or /opt/venv"
            )
        if prefix.startswith(tuple(d + "/" for d in SANDBOX_OWN_DIRS)) and not any(
            prefix.startswith(b + "/") for b in binds
        ):
            binds.append(prefix)
    return binds


#: ``sh -c JOIN_CGROUPS sh PROCS... -- CMD...``: the shell puts itself in each group,
#: then becomes the sandbox; whatever it starts is inside from the first instant.
JOIN_CGROUPS = (
    'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 126; shift; done; shift; exec "$@"'
)


class _Child:
    """A sandbox's first process, and its exit code to come (negative: a signal)."""

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.exited = exited
        #: The sandbox it is (a spare's own id until it is claimed).
        self.sandbox_id = ""


def _spawn_watched(cmd: Sequence[str], env: Mapping[str, str], logfd: int) -> _Child:
    """posix_spawn ``cmd`` in a session of its own, output to ``logfd``."""
    pid = os.posix_spawn(
        cmd[0],
        list(cmd),
        dict(env),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, logfd, 1),
            (os.POSIX_SPAWN_DUP2, logfd, 2),
        ],
        setsid=True,
    )
    return _Child(pid, _watch_exit(pid))


def _watch_exit(pid: int) -> asyncio.Future[int]:
    """The exit code to come of our child ``pid``, noticed through a pidfd on the event
    loop (no thread, no SIGCHLD handler)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()

    def reaped(status: int) -> None:
        if not exited.done():
            exited.set_result(os.waitstatus_to_exitcode(status))

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # a kernel before 5.3: a pool thread waits instead
        loop.run_in_executor(None, lambda: os.waitpid(pid, 0)[1]).add_done_callback(
            lambda f: reaped(f.result())
        )
        return exited

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        reaped(os.waitpid(pid, 0)[1])

    loop.add_reader(pidfd, on_exit)
    return exited


class LocalRuntime(LocalLifecycle, Runtime):
    supervisor_is_main = True
    #: A spare is a sandbox whose supervised command is the parker (agent/spares.py); a
    #: claim renames its directory and rewrites its labels, which, unlike a container's,
    #: can change. Spares die with the agent, as every local sandbox does.
    supports_spares = True

    def __init__(
        self,
        *,
        pids_limit: int = 1024,
        use_bwrap: bool | None = None,
        state_dir: str | None = None,
        pythons: Mapping[str, str] | None = None,
        use_cgroups: bool | None = None,
        userns_uid: int | None = None,
    ) -> None:
        if use_cgroups is None:
            use_cgroups = os.environ.get("AVIATO_LOCAL_CGROUPS", "1") != "0"
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
        #: Root inside is an unprivileged uid from here on the host (local_userns.py).
        self.userns_base = userns_uid
        self._net_locks = local_network.SessionLocks()
        if userns_uid is not None and self.bwrap is None:
            raise ConfigurationError("--userns-uid needs bubblewrap (install bubblewrap)")
        self.pids_limit = pids_limit
        self.root = Path(state_dir or Path(tempfile.gettempdir()) / "aviato-local")
        self.pythons = dict(pythons or {})
        self._python_cache: dict[str, Interpreter | None] = {}
        self._procs: dict[str, _Child] = {}
        # Processes parked in their cgroups ahead of need (see parked.py).
        self._parked = ParkedPool(self.cgroups, _watch_exit) if self.cgroups.version else None
        self._stopping: set[str] = set()
        self._exits: asyncio.Queue[SandboxExit | None] = asyncio.Queue()
        self._waiters: set[asyncio.Task[None]] = set()
        self._ended_logs: dict[str, builtins.list[OutputChunk]] = {}
        self.streams = LocalStreams(self)  # logs as written (files: the supervisor's)
        #: Agent ids we made directories for: only those are ours to tidy at close
        #: (another agent on this host may be creating a sandbox in its own right now).
        self._agent_dirs: set[str] = set()

    # ------------------------------------------------------------------ helpers

    def _dir(self, agent_id: str, sandbox_id: str) -> Path:
        return self.root / agent_id / sandbox_id

    def _find_dir(self, sandbox_id: str) -> Path | None:
        for path in self.root.glob(f"*/{sandbox_id}"):
            return path
        return None

    def _python_for(self, sandbox_id: str, image: str) -> Interpreter:
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
            public = self.userns_base is not None
            self._python_cache[version] = find_python(version, self.pythons, public)
        python = self._python_cache[version]
        if python is None:
            raise SandboxFailedError(
                f"image {image!r} needs Python {version} on this host for the local runtime, "
                f"and none was found on PATH; install python{version} or use a Docker engine",
                sandbox_id=sandbox_id,
            )
        return python

    def _interpreter_binds(self, sandbox_id: str, python: Interpreter) -> list[str]:
        if not self.bwrap:
            return []  # no namespaces: the host's /tmp is the sandbox's
        try:
            return interpreter_binds(python.prefixes)
        except ValueError as exc:
            raise SandboxFailedError(str(exc), sandbox_id=sandbox_id) from None

    # ------------------------------------------------------------------ create

    async def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        if spec.network != "internal":
            return await self._create_one(sandbox_id, spec, labels, mounts)
        async with self._net_locks.hold(spec.session_id or sandbox_id):  # local_network.py
            await self._create_one(sandbox_id, spec, labels, mounts)
            await local_network.wait_netns(lambda: self.netns_pid(sandbox_id))

    async def _create_one(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        image, seed = self._seed(sandbox_id, spec.image)  # a snapshot: its image, files
        python = self._python_for(sandbox_id, image)
        binds = self._interpreter_binds(sandbox_id, python)
        if spec.cpus and not self.cgroups.version:  # setrlimit has no CPU share
            raise SandboxFailedError(
                f"cpus={spec.cpus:g} needs cgroups, and this agent cannot write them (or has "
                "AVIATO_LOCAL_CGROUPS=0); leave cpus unset or use a Docker engine",
                sandbox_id=sandbox_id,
            )
        _check_command(sandbox_id, spec)
        self._check_mounts_and_ports(sandbox_id, spec)
        local_network.check(self.name, sandbox_id, spec, self.bwrap is not None)
        agent_id = labels.get("aviato.agent", "agent")
        self._agent_dirs.add(agent_id)
        home = self._dir(agent_id, sandbox_id)
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        if seed is not None:
            await asyncio.to_thread(self._unpack, seed, home / "tmp")
        (home / "bin").mkdir(exist_ok=True)
        for alias in ("python", "python3", Path(python.path).name):
            link = home / "bin" / alias
            if not link.exists():
                link.symlink_to(python.path)
        (home / "labels.json").write_text(json.dumps(labels))
        lib = next((m for m in mounts if m.read_only), None)
        if lib is None:
            raise SandboxFailedError(
                "the local runtime needs the supervisor library mount", sandbox_id=sandbox_id
            )
        if spec.function_worker:
            argv = [spec.command, *spec.args]  # the function worker is itself the supervisor
        else:
            python_cmd, flags = supervisor_command(functions=False)
            argv = [python_cmd, *flags, "--main", "--", spec.command, *spec.args]
        bin_dir = "/run/aviato-bin" if self.bwrap else str(home / "bin")
        if python.venv:
            # Its own bin first, as when activated: a `python` found there is the venv's
            # (Python recognises a venv by the path it was started by, not a symlink's).
            bin_dir = f"{python.venv}/bin:{bin_dir}"
        sockets = next((m for m in mounts if not m.read_only), None)
        env = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/tmp" if self.bwrap else str(home / "tmp"),
            "LANG": "C.UTF-8",
            **spec.env,
        }
        if sockets is not None:
            env.setdefault("AVIATO_WORKER_SOCKET", f"{sockets.target}/worker.sock")
        env["AVIATO_TAG_OUTPUT"] = "1"  # one log file: the supervisor tags each stream
        if self.bwrap:
            cmd = self._bwrap_argv(home, spec, mounts, binds) + argv
            cwd = None
            if self.userns_base is not None:
                uid = local_userns.sandbox_uid(self.userns_base, sandbox_id)
                local_userns.grant(uid, home, [sockets.source] if sockets else [])
                cmd = local_userns.confine(cmd, self.bwrap, uid)
            peer = local_network.peer_pid(spec, self._procs, self._find_dir, self.netns_pid)
            if peer is not None:
                cmd = local_network.join(cmd, peer)
        else:
            # No namespaces: mount targets become the host paths themselves.
            def host(value: str) -> str:
                for m in sorted(mounts, key=lambda m: -len(m.target)):  # longest first
                    value = value.replace(m.target, m.source)
                return value

            cmd = [host(a) for a in argv]
            env = {k: host(v) for k, v in env.items()}
            cwd = str(home / "tmp")
        if "/" not in cmd[0]:  # posix_spawn and execve do not search PATH
            cmd[0] = shutil.which(cmd[0], path=env.get("PATH")) or cmd[0]
        limits = {
            "memory": spec.memory_bytes,
            "pids": spec.pids_limit or self.pids_limit,
            "cpus": spec.cpus,
        }
        parked = self._parked.take() if self._parked is not None else None
        if parked is not None:
            child = await self._launch_parked(sandbox_id, parked, home, cmd, env, cwd, limits)
        else:
            child = await self._spawn(sandbox_id, spec, home, cmd, env, cwd, limits)
        (home / "cgroup").write_text(parked.group if parked is not None else sandbox_id)
        (home / "pid").write_text(f"{child.pid} {psutil.Process(child.pid).create_time()}")
        child.sandbox_id = sandbox_id
        self._procs[sandbox_id] = child
        task = asyncio.get_running_loop().create_task(self._wait(child))
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)

    async def create_spare(
        self, spare_id: str, spec: SandboxSpec, labels: dict[str, str], mounts: Sequence[Mount]
    ) -> None:
        await self.create(spare_id, spec, labels, mounts)

    async def claim_spare(
        self, spare_id: str, sandbox_id: str, spec: SandboxSpec, created_at: float
    ) -> None:
        child = self._procs.get(spare_id)
        home = self._find_dir(spare_id)
        if child is None or child.exited.done() or home is None:
            raise SandboxNotRunningError(f"spare {spare_id} is gone", sandbox_id=spare_id)
        _check_command(sandbox_id, spec)  # as a fresh create: the spare stays ready
        try:
            agent_id = json.loads((home / "labels.json").read_text())[LABEL_AGENT]
            labels = {**sandbox_labels(sandbox_id, agent_id, spec, created_at), LABEL_SPARE: "1"}
            # No await from here on: the exit watcher reads the child's id when it ends.
            # The new labels are written beside the old, the directory takes the
            # sandbox's name, then they replace the old: a failure before the rename
            # leaves the spare as it was.
            tmp = home / "labels.json.claim"
            try:
                tmp.write_text(json.dumps(labels))
                os.rename(home, home.parent / sandbox_id)
            except OSError:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(
                home.parent / sandbox_id / tmp.name, home.parent / sandbox_id / "labels.json"
            )
        except (OSError, ValueError, KeyError) as exc:
            raise SandboxFailedError(
                f"could not claim a spare for {sandbox_id}: {exc}", sandbox_id=sandbox_id
            ) from exc
        self._procs[sandbox_id] = self._procs.pop(spare_id)
        child.sandbox_id = sandbox_id

    async def _launch_parked(
        self,
        sandbox_id: str,
        parked: Parked,
        home: Path,
        cmd: list[str],
        env: dict[str, str],
        cwd: str | None,
        limits: dict[str, Any],
    ) -> _Child:
        """The fast path: a process already in its cgroups becomes the sandbox."""
        try:
            self.cgroups.set_limits(parked.group, **limits)
            parked.launch(cmd[0], cmd, env, str(home / "log"), cwd)
        except OSError as exc:
            shutil.rmtree(home, ignore_errors=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(parked.pid, signal.SIGKILL)
            await asyncio.to_thread(self.cgroups.remove, parked.group)
            raise SandboxFailedError(
                f"could not start sandbox process: {exc}", sandbox_id=sandbox_id
            ) from exc
        return _Child(parked.pid, parked.exited)

    async def _spawn(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        home: Path,
        cmd: list[str],
        env: dict[str, str],
        cwd: str | None,
        limits: dict[str, Any],
    ) -> _Child:
        """Start the sandbox's first process now (no parked one was ready)."""
        try:
            groups = self.cgroups.make(sandbox_id, **limits)
        except OSError as exc:
            shutil.rmtree(home, ignore_errors=True)
            raise SandboxFailedError(
                f"could not set the sandbox's cgroup limits: {exc}", sandbox_id=sandbox_id
            ) from exc
        if groups:
            cmd = ["/bin/sh", "-c", JOIN_CGROUPS, "sh", *groups, "--", *cmd]
        # Small local file the child owns from here on.
        logfile = open(home / "log", "wb")  # noqa: ASYNC230
        try:
            if cwd is None and (groups or not spec.memory_bytes):
                # posix_spawn: no fork of the agent (~5 ms at its size); the cgroups
                # are joined by a shell that then execs the sandbox.
                child = _spawn_watched(cmd, env, logfile.fileno())
            else:  # setrlimit needs Python in the child before exec
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=self._limits(spec),
                )
                child = _Child(proc.pid, asyncio.ensure_future(proc.wait()))
        except OSError as exc:
            shutil.rmtree(home, ignore_errors=True)
            await asyncio.to_thread(self.cgroups.remove, sandbox_id)
            raise SandboxFailedError(
                f"could not start sandbox process: {exc}", sandbox_id=sandbox_id
            ) from exc
        finally:
            logfile.close()
        return child

    def netns_pid(self, sandbox_id: str) -> int | None:
        """The first process of the sandbox in a network namespace not the agent's (bwrap
        itself stays in ours; its child unshared)."""
        child = self._procs.get(sandbox_id)
        if child is None or not self.bwrap:
            return None
        own = os.stat("/proc/self/ns/net").st_ino
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(child.pid).children(recursive=True):
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{proc.pid}/ns/net").st_ino != own:
                        return proc.pid
        return None

    def _check_mounts_and_ports(self, sandbox_id: str, spec: SandboxSpec) -> None:
        """Host mounts, volumes and ports need bubblewrap's namespaces."""
        if (spec.mounts or spec.volumes or spec.ports) and not self.bwrap:
            why = (
                "host mounts, volumes and ports need bubblewrap's namespaces (install the"
                " bubblewrap package)"
            )
            raise SandboxFailedError(f"the {self.name} runtime: {why}", sandbox_id=sandbox_id)

    def _bwrap_argv(
        self, home: Path, spec: SandboxSpec, mounts: Sequence[Mount], binds: Sequence[str] = ()
    ) -> list[str]:
        assert self.bwrap is not None
        argv = [
            self.bwrap,
            *root_args([m.target for m in mounts]),
            "--dev",
            "/dev",
            *gpu_binds(spec),  # after --dev: into the sandbox's own /dev
            "--proc",
            "/proc",
            # As Docker does: the kernel's knobs read-only (root inside could set them).
            *(a for p in _PROC_RO if os.path.exists(p) for a in ("--ro-bind", p, p)),
            "--tmpfs",
            "/run",
            "--bind",
            str(home / "tmp"),
            "/tmp",
            # The interpreter where our /tmp and /run hide it (a venv under /tmp).
            *(arg for path in binds for arg in ("--ro-bind", path, path)),
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
        if spec.network in ("none", "internal") or spec.ports:
            # Ports: a namespace of its own, loopback only; the agent forwards into it.
            argv.append("--unshare-net")
        for m in mounts:
            argv += ["--ro-bind" if m.read_only else "--bind", m.source, m.target]
        return with_seccomp(argv, home)

    def _limits(self, spec: SandboxSpec) -> Callable[[], None]:
        """Without cgroups: per-process setrlimit, in the child before it execs."""
        memory = spec.memory_bytes
        pids = spec.pids_limit or self.pids_limit

        def apply() -> None:  # runs in the child, before exec
            if memory:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            with contextlib.suppress(ValueError, OSError):  # root ignores NPROC anyway
                resource.setrlimit(resource.RLIMIT_NPROC, (pids, pids))

        return apply

    @staticmethod
    def _group(sandbox_id: str, home: Path | None) -> str:
        """The name of the sandbox's cgroups (a parked process's, or its own id)."""
        if home is not None:
            with contextlib.suppress(OSError):
                return (home / "cgroup").read_text().strip() or sandbox_id
        return sandbox_id

    async def _wait(self, child: _Child) -> None:
        code = await asyncio.shield(child.exited)
        sandbox_id = child.sandbox_id  # read now: a spare may have been claimed since
        self._procs.pop(sandbox_id, None)
        if sandbox_id in self._stopping:
            return
        # Ended by itself: keep its last output for `logs`, then leave nothing behind.
        self._ended_logs[sandbox_id] = await self.logs(sandbox_id)
        while len(self._ended_logs) > 64:
            self._ended_logs.pop(next(iter(self._ended_logs)))
        home = self._find_dir(sandbox_id)
        group = self._group(sandbox_id, home)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)
        exit_code = code if code >= 0 else 128 - code
        # Without cgroups, setrlimit makes allocations fail instead: no OOM killer.
        oom = self.cgroups.oom_killed(group)
        await asyncio.to_thread(self.cgroups.remove, group)
        await asyncio.to_thread(self._unfreeze_gone, sandbox_id, group)
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
        stdin: bytes | memoryview | None = None,
    ) -> AsyncIterator[OutputChunk | ExitStatus]:
        raise self._no_supervisor(sandbox_id)

    async def read_file(
        self, sandbox_id: str, path: str, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> bytes:
        raise self._no_supervisor(sandbox_id)

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | memoryview, mode: int = 0o644
    ) -> None:
        raise self._no_supervisor(sandbox_id)

    async def logs(
        self, sandbox_id: str, tail_lines: int | None = None
    ) -> builtins.list[OutputChunk]:  # always a tail: the last LOG_LIMIT bytes
        if sandbox_id in self._ended_logs:
            return self._ended_logs[sandbox_id]
        home = self._find_dir(sandbox_id)
        if home is None or not (home / "log").exists():
            return []
        with open(home / "log", "rb") as f:  # noqa: ASYNC230 (local disk, bounded read)
            start = max(0, (home / "log").stat().st_size - LOG_LIMIT)
            f.seek(start)
            return parse_tagged_log(f.read(), mid_record=start > 0)

    async def stop(self, sandbox_id: str) -> None:
        self._stopping.add(sandbox_id)
        home = self._find_dir(sandbox_id)
        proc = self._procs.pop(sandbox_id, None)
        pid = proc.pid if proc is not None else _live_pid(home)
        await asyncio.to_thread(self._thaw, sandbox_id, home)  # paused: SIGKILL waits
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
                        await asyncio.shield(proc.exited)
        # Also kills what left the tree (a double fork) but not the group.
        group = self._group(sandbox_id, home)
        await asyncio.to_thread(self.cgroups.remove, group)
        await asyncio.to_thread(self._unfreeze_gone, sandbox_id, group)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)

    async def list(self, agent_id: str) -> list[RuntimeSandbox]:
        self._agent_dirs.add(agent_id)  # asked by the agent itself: its directory
        return self._list(agent_id, tidy=True)

    def _list(self, agent_id: str, *, tidy: bool = False) -> builtins.list[RuntimeSandbox]:
        found = []
        for home in sorted((self.root / agent_id).glob("*")):
            try:
                labels = json.loads((home / "labels.json").read_text())
            except (OSError, ValueError):
                # Half-made: nothing runs there. Only its agent may tidy it (another
                # agent's may be half-made because it is being made right now).
                if tidy:
                    shutil.rmtree(home, ignore_errors=True)
                continue
            running = home.name in self._procs or _live_pid(home) is not None
            paused = running and self._frozen(home.name, home)  # adopted as paused
            found.append(RuntimeSandbox(home.name, labels, running, None, paused))
        return found

    async def list_all(self) -> builtins.list[RuntimeSandbox]:
        found: builtins.list[RuntimeSandbox] = []
        for agent_dir in self.root.glob("*"):
            found += self._list(agent_dir.name)
        return found

    async def exits(self) -> AsyncIterator[SandboxExit]:
        while True:
            item = await self._exits.get()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        if self._parked is not None:
            await self._parked.close()
        await self._exits.put(None)
        # Our agent directories left empty (their sandboxes are gone) go too; the root
        # stays (other agents on this host use it).
        for agent_id in self._agent_dirs:
            with contextlib.suppress(OSError):
                self._dir(agent_id, "").rmdir()
        for task in list(self._waiters):
            task.cancel()


def parse_tagged_log(raw: bytes, *, mid_record: bool = False) -> builtins.list[OutputChunk]:
    """The supervisor's tagged records (see agent/supervisor.py) as chunks. Bytes outside
    any record were written before the supervisor ran, or by it dying: stderr.
    ``mid_record``: ``raw`` may start inside a record (a tail): skip to the first."""
    chunks: builtins.list[OutputChunk] = []
    at = raw.find(LOG_MAGIC) if mid_record else 0
    if at < 0:
        return []
    while at < len(raw):
        start = raw.find(LOG_MAGIC, at)
        if start < 0:
            chunks.append(OutputChunk(2, raw[at:]))
            break
        if start > at:
            chunks.append(OutputChunk(2, raw[at:start]))
        if start + LOG_RECORD.size > len(raw):
            break  # a record still being written
        _, fd, size = LOG_RECORD.unpack_from(raw, start)
        at = start + LOG_RECORD.size
        chunks.append(OutputChunk(2 if fd == 2 else 1, raw[at : at + size]))
        at += size
    return join_chunks(chunks)


def _check_command(sandbox_id: str, spec: SandboxSpec) -> None:
    if not spec.function_worker and not _command_exists(spec):
        raise SandboxFailedError(
            f"command {spec.command!r} was not found on this host (the local runtime's "
            f"sandboxes see the host system, read-only)",
            sandbox_id=sandbox_id,
        )


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
