"""The embedded cluster: a private scheduler and one agent on loopback.

With no scheduler address configured, the first sandbox or session in a process
starts one (as ``ray.init()`` does) and it is torn down, with its sandboxes, when
the interpreter exits. The daemons also exit by themselves if this process dies.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from aviato._auth import Role, client_keys, scheduler_public_key, secret_key_names
from aviato._flags import default_slots
from aviato.exceptions import AddressInUseError, ClusterUnavailableError
from aviato.protocol import ClusterStatus, ClusterStatusReply, decode, encode

__all__ = [
    "LocalCluster",
    "ensure_cluster",
    "ensure_cluster_sync",
    "shutdown",
]

log = logging.getLogger("aviato.local")


class LocalCluster:
    def __init__(
        self,
        *,
        slots: int | None = None,
        runtime: str | None = None,
        agent_id: str | None = None,
        bind_host: str = "127.0.0.1",
        port: int | None = None,
        keys: str | None = None,
        client_key: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        log_level: str = "WARNING",
        daemon_args: dict[str, list[str]] | None = None,
    ) -> None:
        """``port``: the scheduler's (None: any free one). ``log_dir``: where the
        daemons' logs go and stay after ``stop()`` (None: a temporary directory,
        removed at ``stop()``)."""
        self.slots = slots or int(os.environ.get("AVIATO_LOCAL_SLOTS", default_slots()))
        self.runtime = runtime or os.environ.get("AVIATO_RUNTIME", "auto")
        self.agent_id = agent_id or f"embedded-{os.getpid()}"
        self.bind_host = bind_host
        self.port = port
        #: CURVE key directory (``aviato up --keys``); the embedded default has none.
        self.keys = keys
        # With several keys in the folder (it is the whole cluster's), the first of each
        # role: the agent's unless $AVIATO_AGENT_KEY names one, the probe's (a client).
        self.agent_key = os.environ.get("AVIATO_AGENT_KEY") or _first_key(keys, Role.AGENT)
        self.client_key = client_key or _first_key(keys, Role.CLIENT)
        self.log_level = log_level
        #: Extra flags per daemon ("scheduler", "agent"), e.g. ``--metrics``.
        self.daemon_args = daemon_args or {}
        self.address = ""
        #: What the agent says it runs sandboxes with (and how isolated), once it is up.
        self.agent_runtime = ""
        self.keep_logs = log_dir is not None
        if log_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="aviato-local-"))
        else:
            self.dir = Path(log_dir)
            self.dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen[bytes]] = []

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        logfile = open(self.log_path(name), "wb")
        try:
            # -P: a folder named scheduler/ or agent/ where the user runs is not ours.
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-P", "-m", name, *args),
                    *self.daemon_args.get(name, ()),
                    *("--log-level", self.log_level),
                ],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env={**self._env(), "AVIATO_PARENT_PID": str(os.getpid())},
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not them
            )
        finally:
            logfile.close()
        self._procs.append(proc)
        return proc

    def _env(self) -> dict[str, str]:
        # Keys only when asked for: $AVIATO_KEYS names a real cluster's, not ours.
        env = dict(os.environ)
        env.pop("AVIATO_KEYS", None)
        return env

    def _key_args(self, name: str) -> list[str]:
        if not self.keys:
            return []
        if name == "agent" and self.agent_key:
            return ["--keys", self.keys, "--agent-key", self.agent_key]
        return ["--keys", self.keys]

    def _log_tail(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            text = path.read_text(errors="replace").strip().splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def start(self, timeout: float = 60.0) -> str:
        """Start both daemons and return the scheduler address once an agent is live."""
        deadline = time.monotonic() + timeout
        ready = self.dir / "scheduler.addr"
        ready.unlink(missing_ok=True)  # a kept directory may hold one from an earlier run
        port = "*" if self.port is None else str(self.port)
        sched = self._spawn(
            "scheduler",
            [
                "--bind",
                f"tcp://{self.bind_host}:{port}",
                "--ready-file",
                str(ready),
                *self._key_args("scheduler"),
            ],
        )
        while not ready.exists():
            self._check_alive(sched, "scheduler", deadline)
            time.sleep(0.01)
        self.address = ready.read_text().strip()
        agent = self._spawn(
            "agent",
            [
                "--scheduler",
                self.address,
                "--slots",
                str(self.slots),
                "--runtime",
                self.runtime,
                "--agent-id",
                self.agent_id,
                "--bind",
                f"tcp://{self.bind_host}:*",
                *self._key_args("agent"),
            ],
        )
        while not self._agent_live():
            self._check_alive(agent, "agent", deadline)
            time.sleep(0.02)
        log.info("embedded aviato cluster at %s (agent %s)", self.address, self.agent_id)
        return self.address

    def _check_alive(self, proc: subprocess.Popen[bytes], name: str, deadline: float) -> None:
        if proc.poll() is not None:
            # A daemon that cannot listen says so in one line: pass that on, alone.
            lines = self.log_path(name).read_text(errors="replace").splitlines()
            last = lines[-1] if lines else ""
            if last.startswith(f"{name}: address already in use: "):
                self.stop()
                raise AddressInUseError(last.removeprefix(f"{name}: "))
        if proc.poll() is not None or time.monotonic() > deadline:
            why = "exited" if proc.returncode is not None else "did not come up in time"
            if self.keep_logs:
                # One line, and the log that stays: where the whole story is.
                last = _last_error(self.log_path(name).read_text(errors="replace"))
                message = f"aviato {name} {why}: {last} (its log: {self.log_path(name)})"
            else:
                message = f"embedded aviato {name} {why}:\n{self._log_tail()}"
            self.stop()
            raise ClusterUnavailableError(message)

    def _agent_live(self) -> bool:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys:
            public = scheduler_public_key(self.keys)
            client_keys(self.keys, self.client_key, public).apply(sock)
        try:
            sock.connect(self.address)
            # The daemons take $AVIATO_TOKEN from the environment they inherit.
            sock.send_multipart(encode(ClusterStatus(), 1, token=self._env().get("AVIATO_TOKEN")))
            if not sock.poll(500):
                return False
            reply = decode(sock.recv_multipart()).msg
            if not isinstance(reply, ClusterStatusReply):
                return False
            live = [a for a in reply.agents if a.alive]
            if live:
                self.agent_runtime = live[0].runtime
            return bool(live)
        finally:
            sock.close()

    def metrics_url(self, name: str, timeout: float = 10.0) -> str:
        """Where daemon ``name`` serves its metrics (what it printed), "" if nowhere."""
        return self._printed_url(name, "metrics", timeout)

    def dashboard_url(self, timeout: float = 10.0) -> str:
        """Where the scheduler serves its dashboard (with its login), "" if nowhere."""
        return self._printed_url("scheduler", "dashboard", timeout)

    def _printed_url(self, name: str, what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path(name).read_text(errors="replace")
            found = re.search(rf": {what} on (http://\S+)", text)
            if found or time.monotonic() > deadline:
                return found.group(1) if found else ""
            time.sleep(0.02)

    def stop(self) -> None:
        """Agent first (it stops its sandboxes), then the scheduler; idempotent."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self.keep_logs:
            (self.dir / "scheduler.addr").unlink(missing_ok=True)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def _first_key(directory: str | None, role: Role) -> str | None:
    names = secret_key_names(directory, role) if directory else []
    return names[0] if names else None


def _last_error(log_text: str) -> str:
    """The line of a daemon's log that best says why it stopped: its last error line."""
    lines = [ln.strip(" |+-") for ln in log_text.splitlines() if ln.strip(" |+-")]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else "(its log is empty)"


_cluster: LocalCluster | None = None
_lock = threading.Lock()


def ensure_cluster_sync() -> str:
    global _cluster
    with _lock:
        if _cluster is None:
            cluster = LocalCluster()
            cluster.start()
            _cluster = cluster
            atexit.register(shutdown)
        return _cluster.address


async def ensure_cluster() -> str:
    """The embedded cluster's address, starting it on first use."""
    if _cluster is not None:
        return _cluster.address
    # Spawning and waiting block; keep the caller's loop free meanwhile.
    return await asyncio.to_thread(ensure_cluster_sync)


def shutdown() -> None:
    global _cluster
    with _lock:
        if _cluster is not None:
            _cluster.stop()
            _cluster = None
