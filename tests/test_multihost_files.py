"""Streamed files and logs across hosts: a client in a network namespace of its own
follows a sandbox's logs and uploads and downloads a file on an agent on another
host, over ZeroMQ (never the local lane)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._netns import MultiHostCluster, netns_cluster

pytestmark = pytest.mark.netns

SIZE_MIB = 48


@pytest.fixture
def mh(tmp_path: Path) -> Iterator[MultiHostCluster]:
    yield from netns_cluster(lambda: MultiHostCluster(tmp_path, agents=1, slots=2))


def test_stream_logs_and_files_from_another_host(mh: MultiHostCluster) -> None:
    run = mh.client("_mh_files_client.py", str(SIZE_MIB))
    try:
        summary = run.result(300)
    finally:
        run.close()
    assert summary["channel"] == "Connection", summary  # ZeroMQ between hosts
    joined = "".join(f"{stream}:{text}" for stream, text in summary["logs"])
    assert joined.replace("\n", "|") == (
        "stdout:out1|stderr:err1|stdout:out2|stderr:err2|stdout:out3|stderr:err3|"
    ), summary["logs"]
    assert summary["whole"] is True
    assert ["model.bin", SIZE_MIB << 20] in summary["listed"]
