"""Object refs across hosts (issue 14 part 3): a client on a host of its own puts a
value on one agent's host; workers on another agent's host get it agent-to-agent, once,
over ZeroMQ between the hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._netns import MultiHostCluster, netns_cluster

pytestmark = pytest.mark.netns

SIZE_MIB = 8


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(lambda: MultiHostCluster(tmp_path, agents=2, slots=1))


def test_a_ref_reaches_workers_on_another_host_once(mh: MultiHostCluster) -> None:
    run = mh.client("_mh_objects_client.py", str(SIZE_MIB))
    try:
        summary = run.result(300)
    finally:
        run.close()
    assert summary["channel"] == "Connection", summary  # ZeroMQ between hosts
    assert summary["lengths"] == [SIZE_MIB << 20], summary
    assert summary["ran_on"] == sorted(mh.agent_ids), summary  # both hosts ran calls
    holder = summary["holder"]
    (other,) = set(mh.agent_ids) - {holder}
    fetched, _, handed = summary["counters"][other]
    assert (fetched, handed) == (1, 1), summary  # once from the holder, once to its worker
    assert summary["counters"][holder][1] == 1, summary  # the holder served that fetch
