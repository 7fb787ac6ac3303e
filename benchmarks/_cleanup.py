"""Removal of everything a benchmark run created: processes, embedded clusters,
containers (by the run's label and by the agent ids it started) and temporary dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

from agent.runtime.base import LABEL_AGENT
from aviato import _local
from aviato._local import LocalCluster

from ._common import BENCH_LABEL, RUN_ID, console, stop_process


class Cleanup:
    """Everything this run created, removed once (at the end, on error or on a signal)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.clusters: list[LocalCluster] = []
        self.agent_ids: set[str] = {f"embedded-{os.getpid()}"}  # LocalCluster's default id
        self.dirs: list[str] = []
        self.done = False

    def sweep(self) -> None:
        if self.done:
            return
        self.done = True
        for proc in self.procs:
            stop_process(proc)
        for cluster in self.clusters:
            with contextlib.suppress(Exception):
                cluster.stop()  # the agent removes its sandboxes as it exits
        with contextlib.suppress(Exception):
            _local.shutdown()
        removed = self._remove_containers()
        if removed:
            console.print(f"[yellow]cleanup: removed {removed} leftover container(s)[/]")
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _remove_containers(self) -> int:
        filters = [f"label={BENCH_LABEL}={RUN_ID}"]
        filters += [f"label={LABEL_AGENT}={a}" for a in sorted(self.agent_ids)]
        ids: set[str] = set()
        for flt in filters:
            try:
                out = subprocess.run(
                    ["docker", "ps", "-aq", "--no-trunc", "--filter", flt],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=True,
                ).stdout
            except (subprocess.SubprocessError, OSError) as exc:
                console.print(f"[red]cleanup: cannot list containers ({flt}): {exc}[/]")
                continue
            ids.update(out.split())
        if ids:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["docker", "rm", "-f", *sorted(ids)],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
        return len(ids)
