"""Several "hosts" on one machine: a network namespace each, wired to one switch.

Layout: a switch namespace holding a bridge; one namespace per host (the scheduler,
each agent, the client), each joined to the bridge by a veth pair and given its own
address; plus a leg from the test's own namespace, for the test to watch the cluster.
Cutting a host off is taking its switch port down: its TCP connections stay open and
stall, as they do when a cable is pulled. Every host shares the one Docker engine (its
Unix socket) and the file system.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import (
    AGENT_IDS,
    ROOT,
    RUN_ID,
    Cluster,
    containers_of,
    need_docker,
    stop_daemons,
    wait_until,
)

C = TypeVar("C", bound="MultiHostCluster")

PREFIX = "avn"  # namespaces and links of these tests, for the leak check


def netns_problem() -> str | None:
    """Why the several-host tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    probe = f"{PREFIX}-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}{RUN_ID}")]


class Hosts:
    """The namespaces and their wiring; ``close`` removes them all."""

    def __init__(self, names: list[str]) -> None:
        self.tag = f"{PREFIX}{RUN_ID}{uuid.uuid4().hex[:3]}"
        self.switch = f"{self.tag}-sw"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"
        self.addresses: dict[str, str] = {}
        self.ports: dict[str, str] = {}  # host name -> its switch-side link
        self._made: list[str] = []
        self._ctl = f"{self.tag}c"  # our own leg onto the switch
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _build(self, names: list[str]) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            ns = self.ns(name)
            _ip("netns", "add", ns)
            self._made.append(ns)
            port = f"p{i}"
            _ip(
                "-n",
                self.switch,
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            address = f"{self.subnet}.{i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.addresses[name] = address
            self.ports[name] = port
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            "ctl",
            "type",
            "veth",
            "peer",
            "name",
            self._ctl,
            "netns",
            "1",
        )
        _ip("-n", self.switch, "link", "set", "ctl", "master", "br0", "up")
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self._ctl)
        _ip("link", "set", self._ctl, "up")

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def cut(self, name: str) -> None:
        """Pull ``name``'s cable: nothing reaches it or leaves it until ``restore``."""
        _ip("-n", self.switch, "link", "set", self.ports[name], "down")

    def restore(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.ports[name], "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self._ctl], capture_output=True)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()


class MultiHostCluster(Cluster):
    """A scheduler, agents and a client, each on a host of its own (see ``Hosts``); the
    test watches them over its own leg (``status``, ``wait_agents``, ``kill``, ``logs``
    are Cluster's)."""

    def __init__(
        self,
        tmp: Path,
        agents: int = 3,
        slots: int = 2,
        dead_after: float = 3.0,
        heartbeat: float = 1.0,
    ) -> None:
        self.tmp = tmp
        self.slots = slots
        self.dead_after, self.heartbeat = dead_after, heartbeat
        self.agent_ids = [f"t{RUN_ID}-mh{uuid.uuid4().hex[:4]}-{i}" for i in range(agents)]
        AGENT_IDS.update(self.agent_ids)
        self.hosts = Hosts(["scheduler", *self.agent_ids, "client"])
        self.address = f"tcp://{self.hosts.addresses['scheduler']}:5555"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed_at_close: list[str] = []
        self.runtime, self.agent_env, self.keys, self.token = "docker", {}, None, None
        try:
            self.start_scheduler()
            for agent_id in self.agent_ids:
                self.start_agent(agent_id)
            self.wait_agents(agents)
        except BaseException:
            self.close()
            raise

    def _spawn_on(self, name: str, host: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts.ns(host), sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "AVIATO_LOG_LEVEL": "INFO", "AVIATO_FORBID_UNPICKLE": "1"},
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_scheduler(self) -> None:
        self._spawn_on(
            "scheduler",
            "scheduler",
            [
                "scheduler",
                "--bind",
                self.address,
                "--dead-after",
                str(self.dead_after),
                "--heartbeat-interval",
                str(self.heartbeat),
            ],
        )
        wait_until(self._scheduler_answers, 20, 0.1, "the scheduler to answer")

    def start_agent(self, agent_id: str) -> None:
        self._spawn_on(
            agent_id,
            agent_id,
            [
                "agent",
                "--scheduler",
                self.address,
                "--agent-id",
                agent_id,
                "--slots",
                str(self.slots),
                "--runtime",
                "docker",
                "--bind",
                f"tcp://{self.hosts.addresses[agent_id]}:0",
                *self.agent_args(agent_id),
            ],
        )

    def agent_args(self, agent_id: str) -> list[str]:
        """More flags for this agent (a subclass's: resources, labels, ...)."""
        return []

    def _scheduler_answers(self) -> bool:
        try:
            self.status(timeout_ms=500)
            return True
        except AssertionError:
            return False

    def alive(self) -> set[str]:
        return {a.agent_id for a in self.status().agents if a.alive}

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def client(self, script: str, *args: str) -> ClientRun:
        """Run ``script`` (a file in tests/) as a client on the client host."""
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.hosts.ns("client"),
                sys.executable,
                str(ROOT / "tests" / script),
                self.address,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return ClientRun(proc)

    def log_of(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for name in list(self.hosts.ports):  # no host stays cut off or frozen
            self.hosts.restore(name)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
        self.killed_at_close += stop_daemons(self.procs)
        left = containers_of(self.agent_ids)
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, timeout=60)
        self.left_behind = left
        self.hosts.close()


def netns_cluster(make: Callable[[], C]) -> Iterator[C]:
    """A fixture's body: the cluster ``make()`` builds (a MultiHostCluster or subclass)
    where network namespaces work (a failure, not a skip, with AVIATO_REQUIRE_NETNS=1),
    stopped after the test with nothing left behind: no container, no daemon that
    needed SIGKILL, no namespace."""
    need_docker()
    problem = netns_problem()
    if problem is not None:
        if os.environ.get("AVIATO_REQUIRE_NETNS") == "1":
            pytest.fail(f"AVIATO_REQUIRE_NETNS=1 but {problem}")
        pytest.skip(problem)
    c = make()
    try:
        yield c
    finally:
        c.close()
        assert not c.left_behind, f"containers left behind: {c.left_behind}\n{c.logs()}"
        assert not c.killed_at_close, f"did not stop cleanly: {c.killed_at_close}\n{c.logs()}"
        assert not leftover_namespaces(), leftover_namespaces()


class ClientRun:
    """A client process whose output lines are read on a thread: waits keep deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.seen: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, prefix: str, timeout: float) -> str:
        """The next output line that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"the client ended without {prefix!r}:\n{err[-3000:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line from the client within {timeout}s")

    def result(self, timeout: float) -> dict[str, Any]:
        """The client's closing summary (a JSON line), once it has exited cleanly."""
        line = self.wait_line("summary ", timeout)
        self.proc.wait(timeout=30)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
