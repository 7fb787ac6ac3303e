"""Processes across hosts: a client on one host (network namespace) spawns a process
in a sandbox on an agent's host and leaves; another client process finds it by id over
ZeroMQ, sees its backlog, writes to it and reads what comes next (issue 13)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._netns import MultiHostCluster, netns_cluster
from tests.conftest import containers_of, wait_until

pytestmark = pytest.mark.netns


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(lambda: MultiHostCluster(tmp_path, agents=1, slots=2))


def test_reattach_to_a_process_from_another_client_on_another_host(
    mh: MultiHostCluster,
) -> None:
    first = mh.client("_mh_proc_client.py", "spawn")
    try:
        spawned = first.result(180)
    finally:
        first.close()
    assert spawned["seen"] == "echo:first\n", spawned
    assert spawned["channel"] == "Connection", spawned  # ZeroMQ, not the local lane
    # The spawning client is gone; the process runs on.
    second = mh.client("_mh_proc_client.py", "attach", spawned["sandbox"], spawned["process"])
    try:
        attached = second.result(180)
    finally:
        second.close()
    assert attached["running"] is True, attached
    # The backlog (what came before it attached), then what came next.
    assert attached["seen"] == "echo:first\necho:second\n", attached
    assert attached["code"] == 128 + 9, attached
    assert attached["channel"] == "Connection", attached
    wait_until(lambda: not containers_of(mh.agent_ids), 60, 0.2, "the sandbox to be removed")
