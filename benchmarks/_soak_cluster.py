"""The soak's cluster: one scheduler and a few Docker agents as real processes, which the
chaos can kill (``kill -9``) and restart (the scheduler on its port, an agent with its id)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.runtime.base import LABEL_AGENT
from aviato._connection import Connection
from aviato.exceptions import AviatoError
from aviato.protocol import ClusterStatus, ClusterStatusReply

from ._cleanup import Cleanup
from ._common import ROOT, RUN_ID, sh, spawn_daemon


@dataclass(frozen=True)
class ClusterConfig:
    agents: int = 3
    slots: int = 3
    dead_after: float = 3.0
    heartbeat_interval: float = 1.0
    log_level: str = "INFO"


@dataclass
class Daemon:
    """One scheduler or agent: its current process, and every process it ever had."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    incarnations: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class SoakCluster:
    """Scheduler + agents on loopback, logging into ``logdir``."""

    def __init__(self, config: ClusterConfig, cleanup: Cleanup, logdir: Path) -> None:
        self.config = config
        self.cleanup = cleanup
        self.logdir = logdir
        self.agent_ids = [f"soak-{RUN_ID}-{i}" for i in range(config.agents)]
        cleanup.agent_ids.update(self.agent_ids)
        self.scheduler = Daemon("scheduler")
        self.agents = {a: Daemon(a) for a in self.agent_ids}
        self.address = ""
        self._status_conn: Connection | None = None
        self.needed_sigkill: list[str] = []  # did not exit within 60 s of SIGTERM

    # ------------------------------------------------------------------ processes

    def _spawn(self, daemon: Daemon, argv: list[str]) -> None:
        n = len(daemon.incarnations) + 1
        logfile = self.logdir / f"{daemon.name}.{n}.log"
        proc = spawn_daemon(
            argv,
            logfile,
            ROOT,
            log_level=self.config.log_level,
            # As the test clusters do: the daemons would fail if they ever unpickled.
            extra_env={"AVIATO_FORBID_UNPICKLE": "1"},
        )
        daemon.proc = proc
        daemon.incarnations.append(proc)
        # Agents first in the cleanup's list: on SIGTERM they stop their sandboxes.
        if daemon is self.scheduler:
            self.cleanup.procs.append(proc)
        else:
            self.cleanup.procs.insert(0, proc)

    async def start_scheduler(self) -> None:
        """Start the scheduler: on any free port the first time, on the same one after."""
        port = self.address.rsplit(":", 1)[1] if self.address else "*"
        ready = self.logdir / "scheduler.addr"
        ready.unlink(missing_ok=True)
        argv = ["-m", "scheduler", "--bind", f"tcp://127.0.0.1:{port}"]
        argv += ["--ready-file", str(ready), "--dead-after", str(self.config.dead_after)]
        argv += ["--heartbeat-interval", str(self.config.heartbeat_interval)]
        self._spawn(self.scheduler, argv)
        deadline = time.monotonic() + 30
        while not ready.exists():
            proc = self.scheduler.proc
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not come up:\n{self.log_tail('scheduler')}")
            await asyncio.sleep(0.02)
        self.address = ready.read_text().strip()

    def start_agent(self, agent_id: str) -> None:
        argv = ["-m", "agent", "--scheduler", self.address, "--agent-id", agent_id]
        argv += ["--slots", str(self.config.slots), "--runtime", "docker"]
        argv += ["--bind", "tcp://127.0.0.1:*"]
        self._spawn(self.agents[agent_id], argv)

    async def start(self) -> None:
        await self.start_scheduler()
        for agent_id in self.agent_ids:
            self.start_agent(agent_id)
        deadline = time.monotonic() + 60
        while len(await self.alive_agents()) < len(self.agent_ids):
            if time.monotonic() > deadline:
                tails = "\n".join(self.log_tail(a) for a in self.agent_ids)
                raise RuntimeError(f"the agents did not all register within 60 s:\n{tails}")
            await asyncio.sleep(0.1)

    @staticmethod
    async def kill(daemon: Daemon) -> None:
        """``kill -9``, and reap it."""
        proc = daemon.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 30)

    def stop(self) -> None:
        """SIGTERM every daemon, agents first (each stops its sandboxes as it exits)."""
        for daemon in [*self.agents.values(), self.scheduler]:
            proc = daemon.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.needed_sigkill.append(daemon.name)
                proc.kill()
                proc.wait(timeout=10)
        if self._status_conn is not None:
            self._status_conn.close()
            self._status_conn = None

    def log_tail(self, name: str, chars: int = 3000) -> str:
        logs = sorted(self.logdir.glob(f"{name}.*.log"))
        if not logs:
            return f"--- {name}: no log"
        return f"--- {logs[-1].name}\n{logs[-1].read_text(errors='replace')[-chars:]}"

    # ------------------------------------------------------------------ looking

    async def status(self, timeout: float = 1.0) -> ClusterStatusReply | None:
        """The scheduler's ClusterStatus, or None when it does not answer in time."""
        if self._status_conn is None:
            self._status_conn = Connection(self.address)
        try:
            reply = await self._status_conn.request(ClusterStatus(), timeout=timeout)
        except AviatoError:
            return None
        return reply.msg if isinstance(reply.msg, ClusterStatusReply) else None

    async def alive_agents(self) -> dict[str, str]:
        """Agent id -> data-plane address, for the agents the scheduler counts alive."""
        status = await self.status()
        if status is None:
            return {}
        return {a.agent_id: a.address for a in status.agents if a.alive}

    async def containers(self, *agent_ids: str, running_only: bool = False) -> list[str]:
        """Names of containers labelled with one of these agent ids (default: ours)."""
        names: list[str] = []
        for agent_id in agent_ids or self.agent_ids:
            argv = ["docker", "ps", "--filter", f"label={LABEL_AGENT}={agent_id}"]
            argv += ["--format", "{{.Names}}"]
            if not running_only:
                argv.insert(2, "-a")
            names += (await sh(*argv, timeout=30)).split()
        return names

    def leftover_processes(self) -> list[str]:
        """Processes we started that still run, and any other with our agent ids."""
        found: dict[int, str] = {}
        for daemon in [self.scheduler, *self.agents.values()]:
            for proc in daemon.incarnations:
                if proc.poll() is None:
                    found[proc.pid] = f"{daemon.name} (pid {proc.pid})"
        for p in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(p.info["cmdline"] or ())
            if f"soak-{RUN_ID}-" in line and p.info["pid"] not in found:
                found[p.info["pid"]] = f"pid {p.info['pid']}: {line[:120]}"
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                if child.pid not in found and child.is_running():
                    if child.status() == psutil.STATUS_ZOMBIE:
                        continue
                    found[child.pid] = f"child pid {child.pid}: {' '.join(child.cmdline())[:120]}"
        return sorted(found.values())

    @staticmethod
    def socket_dir(agent_id: str) -> Path:
        """An agent's worker socket directory (named as agent/supervisor_hub.py names it)."""
        digest = hashlib.sha256(agent_id.encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"avw-{digest}"

    def leftover_socket_dirs(self) -> list[str]:
        """The agents' socket directories still there (an agent removes its own at exit)."""
        return [str(d) for d in map(self.socket_dir, self.agent_ids) if d.exists()]

    def vanished_socket_dirs(self) -> list[tuple[str, int]]:
        """(agent id, incarnation) of running agents, up for 5 s, whose socket directory
        is gone: something removed it under them (their new workers cannot start)."""
        found = []
        for agent_id, daemon in self.agents.items():
            proc = daemon.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                if time.time() - psutil.Process(proc.pid).create_time() < 5:
                    continue
                if not self.socket_dir(agent_id).exists():
                    found.append((agent_id, len(daemon.incarnations)))
        return found
