"""Output forwarding across hosts (issue 14 part 1): a client on one host (network
namespace) runs functions and an actor on agents' hosts; what they print shows on the
client's stdout and stderr, prefixed, over ZeroMQ."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviato._output import prefix
from tests._netns import MultiHostCluster, leftover_namespaces, netns_problem
from tests.conftest import need_docker

pytestmark = pytest.mark.netns


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    need_docker()
    problem = netns_problem()
    if problem is not None:
        if os.environ.get("AVIATO_REQUIRE_NETNS") == "1":
            pytest.fail(f"AVIATO_REQUIRE_NETNS=1 but {problem}")
        pytest.skip(problem)
    c = MultiHostCluster(tmp_path, agents=2, slots=2)
    try:
        yield c
    finally:
        c.close()
        assert not c.left_behind, f"containers left behind: {c.left_behind}\n{c.logs()}"
        assert not c.killed_at_close, f"needed SIGKILL: {c.killed_at_close}\n{c.logs()}"
        assert not leftover_namespaces(), leftover_namespaces()


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
