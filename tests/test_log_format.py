"""``--log-format json`` (issue 15): both daemons log one JSON object per record, for
log shippers; the only other lines are their start-up announcements (printed, not
logged: what ``aviato up`` and the test clusters read)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato import Sandbox, SandboxDefaults
from tests.conftest import IMAGE, Cluster, docker_cluster

JSON = ["--log-format", "json"]
#: Lines printed rather than logged (each daemon's announcements).
PRINTED = ("aviato scheduler listening on ", "aviato scheduler: ", "aviato agent ")


@pytest.fixture
def jcluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from docker_cluster(tmp_path, agents=1, scheduler_args=JSON, agent_args=JSON)


def _records(path: Path) -> list[dict[str, object]]:
    records = []
    for line in path.read_text().splitlines():
        if line.startswith(PRINTED):
            continue
        record = json.loads(line)  # every other line is one JSON object
        assert set(record) >= {"ts", "level", "logger", "process", "msg"}, record
        records.append(record)
    return records


async def test_both_daemons_log_json(jcluster: Cluster) -> None:
    c = jcluster
    defaults = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        await sb.start()
    c.close()  # every record written (the agent logs its stop too)
    sched = _records(c.tmp / "scheduler.log")
    agent = _records(c.tmp / f"{c.agent_ids[0]}.log")
    assert any(f"agent {c.agent_ids[0]} registered" in str(r["msg"]) for r in sched), sched
    assert all(r["process"] == "scheduler" for r in sched)
    assert any("serving clients" in str(r["msg"]) for r in agent), agent
    assert all(r["process"] == "agent" and str(r["ts"]).endswith("Z") for r in agent)
