"""Output forwarding across hosts (issue 14 part 1): a client on one host (network
namespace) runs functions and an actor on agents' hosts; what they print shows on the
client's stdout and stderr, prefixed, over ZeroMQ."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato._output import prefix
from tests._netns import MultiHostCluster, netns_cluster

pytestmark = pytest.mark.netns


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(lambda: MultiHostCluster(tmp_path, agents=2, slots=2))


def test_prints_on_other_hosts_show_on_the_clients_stdout_and_stderr(
    mh: MultiHostCluster,
) -> None:
    run = mh.client("_mh_output_client.py")
    try:
        summary = run.result(300)
    finally:
        run.close()
    assert summary["channels"] == ["Connection"], summary  # ZeroMQ, not a local lane
    out = run.seen
    for x, worker in summary["workers"].items():
        head = prefix("work", worker)
        # In order per worker: the print, then the subprocess's line.
        assert out.index(f"{head}step {x}") < out.index(f"{head}sub {x}"), out
        assert f"{head}warn {x}" in run.stderr.splitlines(), run.stderr[-3000:]
    head = prefix("Model", summary["actor"])
    assert out.index(f"{head}model ready") < out.index(f"{head}predict 7"), out
