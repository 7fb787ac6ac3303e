"""A second Docker engine with gVisor's runtimes registered, for the tests (a pytest
plugin, loaded by tests/conftest.py).

The host's engine is never touched: this one has its own data and exec roots, socket,
pid file, containerd, and a bridge of its own (``--bridge none`` would make dockerd
delete the host's docker0). It carries the runsc runtimes of
agent/runtime/isolation.py's ``DAEMON_JSON`` and the python:3.11 image, copied from
the host's engine. Session-scoped: started by the first test that needs it, torn
down at the end with nothing left (no container, mount, bridge or directory).

Skips without runsc or dockerd, unless AVIATO_REQUIRE_GVISOR=1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime.isolation import DAEMON_JSON

IMAGE = "python:3.11"
REQUIRE = os.environ.get("AVIATO_REQUIRE_GVISOR") == "1"
START_SECONDS = 60.0


def gvisor_problem() -> str | None:
    """Why no gVisor engine can be started here (None: one can)."""
    if not shutil.which("runsc"):
        return "runsc is not installed (apt-get install runsc)"
    if not shutil.which("dockerd"):
        return "dockerd is not installed"
    if os.geteuid() != 0:
        return "starting a second dockerd needs root"
    return None


class GvisorEngine:
    """One dockerd of our own; ``host`` is its DOCKER_HOST."""

    #: More dockerd flags (a subclass's: tests/_userns_engine.py).
    extra_args: tuple[str, ...] = ()

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.root = Path(tempfile.mkdtemp(prefix="avgv-"))
        self.bridge = f"avb-{tag}"
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.root / "daemon.json").write_text(json.dumps(DAEMON_JSON))

    def start(self) -> None:
        subnet = f"10.{random.randint(200, 249)}.{random.randint(0, 255)}"
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--config-file", str(self.root / "daemon.json"),
                "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "x"),
                "--pidfile", str(self.root / "dockerd.pid"),
                "-H", self.host,
                "--bridge", self.bridge,
                "--iptables=false",
                "--ip6tables=false",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while self.docker("info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "dockerd.log").read_text()[-2000:]
                raise RuntimeError(f"the gVisor test dockerd did not start:\n{tail}")
            time.sleep(0.2)
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        assert save.stdout is not None
        subprocess.run(
            ["docker", "-H", self.host, "load"], stdin=save.stdout, check=True, capture_output=True
        )
        save.stdout.close()
        assert save.wait(120) == 0, f"docker save {IMAGE} failed"

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def containers(self, *filters: str) -> list[str]:
        out = self.docker("ps", "-aq", *(f"--filter={f}" for f in filters), check=False)
        return out.stdout.split()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            left = self.containers()
            if left:
                self.docker("rm", "-f", *left, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Anything dockerd left mounted under our root (it unmounts on a clean exit).
        mounts = Path("/proc/mounts").read_text().split("\n")
        ours = [m.split()[1] for m in mounts if len(m.split()) > 1 and str(self.root) in m]
        for target in sorted(ours, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        self._ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], capture_output=True, check=check)


@pytest.fixture(scope="session")
def gvisor_engine() -> Iterator[GvisorEngine]:
    problem = gvisor_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"{problem} (AVIATO_REQUIRE_GVISOR=1)")
        pytest.skip(problem)
    engine = GvisorEngine()
    try:
        engine.start()
        yield engine
        left = engine.containers()
        assert not left, f"containers leaked in the gVisor engine: {left}"
    finally:
        engine.stop()
    assert not engine.root.exists(), f"{engine.root} was left behind"


def gvisor_cluster(
    tmp: Path,
    engine: GvisorEngine,
    isolation: str = "gvisor",
    *,
    agents: int = 1,
    slots: int = 4,
    agent_args: list[str] | None = None,
) -> Iterator[Any]:
    """A fixture's body: a test cluster whose agents run on ``engine`` offering
    ``isolation`` (e.g. "gvisor", "gvisor,runc"), stopped after the test with no
    container of theirs left in that engine."""
    from tests.conftest import Cluster, need_docker

    need_docker()
    c = Cluster(
        tmp,
        agents=agents,
        slots=slots,
        agent_env={"DOCKER_HOST": engine.host},
        agent_args=["--isolation", isolation, *(agent_args or [])],
    )
    try:
        yield c
    finally:
        c.close()
        left = engine.containers(*(f"label=aviato.agent={a}" for a in c.agent_ids))
        assert not left, f"containers left behind in the gVisor engine: {left}\n{c.logs()}"
