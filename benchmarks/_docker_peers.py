"""aviato's peers: plain Docker through its CLI and through the Docker SDK, and the SDK
replaying the Docker calls aviato's runtime makes (to split aviato's create time)."""

from __future__ import annotations

import time
from typing import Any

import docker

from agent.runtime.base import LABEL_SANDBOX

from ._common import BENCH_LABEL, IMAGE, RUN_ID, check_exit, sh
from ._stats import Stats

# What aviato's Docker runtime asks for on create (agent/runtime/docker.py at the time of
# writing), replayed through the SDK to split aviato's create time into Docker's and its own.
AVIATO_CAPS = [
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"
]  # fmt: skip
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class DockerPeers:
    """Plain Docker, through the CLI and through the Docker SDK."""

    def __init__(self) -> None:
        self.client = docker.from_env(timeout=120)
        self.labels = {BENCH_LABEL: RUN_ID}

    def close(self) -> None:
        self.client.close()

    # ----------------------------------------------------------------- create → first exec

    async def cli_create_exec(self) -> float:
        t0 = time.perf_counter()
        cid = await sh(
            "docker", "run", "-d", "--label", f"{BENCH_LABEL}={RUN_ID}", IMAGE, "sleep", "infinity"
        )
        await self.cli_exec(cid)
        elapsed = time.perf_counter() - t0
        await sh("docker", "rm", "-f", cid, timeout=120)
        return elapsed

    def sdk_create_exec(self) -> float:
        # Blocking on purpose: the SDK as a plain synchronous caller uses it.
        t0 = time.perf_counter()
        c = self.client.containers.run(
            IMAGE, ["sleep", "infinity"], detach=True, labels=self.labels
        )
        try:
            self.sdk_exec(c)
            return time.perf_counter() - t0
        finally:
            c.remove(force=True)

    def aviato_calls_create_exec(self, steps: dict[str, Stats], n: int) -> float:
        """The Docker API calls aviato's runtime makes to create a sandbox and run its first
        exec, made directly: create_container (init, dropped caps, no-new-privileges, pids
        limit), inspect + HEAD /archive per $PATH entry (the "command exists?" probe),
        start, then a streamed exec + exec_inspect. ``steps`` gets each step's time."""
        api = self.client.api
        t0 = time.perf_counter()
        host_config = api.create_host_config(
            init=True,
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            cap_add=AVIATO_CAPS,
            pids_limit=1024,
        )
        cid = api.create_container(
            IMAGE,
            name=f"aviato-bench-{RUN_ID}-{n}",
            entrypoint=["sleep"],
            command=["infinity"],
            labels=self.labels,
            host_config=host_config,
            detach=True,
        )["Id"]
        try:
            t1 = time.perf_counter()
            env = api.inspect_container(cid)["Config"]["Env"] or []
            path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
            url = api._url("/containers/{0}/archive", cid)
            probes = 0
            for d in path.split(":"):
                probes += 1
                if api.head(url, params={"path": f"{d}/sleep"}, timeout=30).status_code != 404:
                    break
            t2 = time.perf_counter()
            api.start(cid)
            t3 = time.perf_counter()
            self.sdk_stream_exec(cid, [])
            t4 = time.perf_counter()
        finally:
            api.remove_container(cid, force=True)
        for name, dt in (
            ("create_container", t1 - t0),
            (f"inspect + {probes} HEAD /archive probes", t2 - t1),
            ("start", t3 - t2),
            ("first exec (create/start/inspect)", t4 - t3),
        ):
            steps.setdefault(name, Stats(name)).add(dt)
        return t4 - t0

    # ----------------------------------------------------------------- exec

    async def cli_exec(self, cid: str) -> float:
        t0 = time.perf_counter()
        await sh("docker", "exec", cid, "true")
        return time.perf_counter() - t0

    def sdk_exec(self, container: Any) -> float:
        t0 = time.perf_counter()
        result = container.exec_run(["true"])
        elapsed = time.perf_counter() - t0
        check_exit(result.exit_code, "exec_run(['true'])")
        return elapsed

    def sdk_stream_exec(self, cid: str, retries: list[int]) -> float:
        """The SDK calls aviato's Docker runtime makes for one exec: exec_create,
        exec_start(stream=True, demux=True) read to the end, then exec_inspect until an
        exit code shows up (``retries`` gets how many extra inspects that took)."""
        api = self.client.api
        t0 = time.perf_counter()
        exec_id = api.exec_create(cid, ["true"])["Id"]
        stream = api.exec_start(exec_id, stream=True, demux=True)
        for _ in stream:
            pass
        stream.close()
        extra = 0
        while api.exec_inspect(exec_id)["ExitCode"] is None:
            extra += 1
            if extra > 200:
                raise RuntimeError("exec_inspect never reported an exit code")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        retries.append(extra)
        return elapsed

    # ----------------------------------------------------------------- aviato's containers

    def _ids_of(self, sandbox_id: str, *, all: bool) -> list[str]:
        # The low-level call: containers.list() inspects each row and races removals.
        rows = self.client.api.containers(
            all=all, filters={"label": f"{LABEL_SANDBOX}={sandbox_id}"}
        )
        return [row["Id"] for row in rows]

    def container_of(self, sandbox_id: str) -> Any:
        found = self._ids_of(sandbox_id, all=False)
        if len(found) != 1:
            raise RuntimeError(f"expected one container for sandbox {sandbox_id}, got {found}")
        return self.client.containers.get(found[0])

    def sandbox_gone(self, sandbox_id: str) -> bool:
        return not self._ids_of(sandbox_id, all=True)
