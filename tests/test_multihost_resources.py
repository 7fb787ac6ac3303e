"""Resources across hosts: a scheduler and two agents, each in a network namespace of
its own (tests/_netns.py), advertising GPUs (``--gpus``; ids are per host: both have a
GPU 0) and labels. GPU creates go where their GPUs are free, each GPU to one sandbox,
labels pick the host, and a create waits until a sandbox on another host stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._netns import MultiHostCluster, netns_cluster

pytestmark = pytest.mark.netns

#: Per agent (by index): its flags.
AGENT_FLAGS = [
    ["--gpus", "0", "--label", "zone=a"],
    ["--gpus", "0,1", "--label", "zone=b"],
]


class ResourcesCluster(MultiHostCluster):
    def agent_args(self, agent_id: str) -> list[str]:
        flags = AGENT_FLAGS[self.agent_ids.index(agent_id)]
        return ["--state-dir", str(self.tmp / f"state-{agent_id}"), *flags]


@pytest.fixture
def rmh(tmp_path: Path) -> Iterator[ResourcesCluster]:
    yield from netns_cluster(lambda: ResourcesCluster(tmp_path, agents=len(AGENT_FLAGS), slots=3))


async def test_gpus_and_labels_place_sandboxes_across_hosts(rmh: ResourcesCluster) -> None:
    from aviato import ResourcesUnavailableError, Sandbox, SandboxDefaults

    host_a, host_b = rmh.agent_ids
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=rmh.address)

    async def gpus_of(sb: Sandbox) -> str:
        out = await sb.exec(["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], check=True)
        return out.stdout.decode().strip()

    async with Sandbox.session(defaults) as session:
        both = session.create(command="sleep", args=["infinity"], gpus=2)
        await both.start()
        assert both.info is not None and both.info.agent_id == host_b  # only b has two
        assert await gpus_of(both) == "0,1"
        one = session.create(command="sleep", args=["infinity"], gpus=1)
        await one.start()
        assert one.info is not None and one.info.agent_id == host_a  # b's are taken
        assert await gpus_of(one) == "0"
        # Every GPU in the cluster is held: the next waits, for b's when they free up.
        waiting = session.create(command="sleep", args=["infinity"], gpus=1)
        starting = asyncio.ensure_future(waiting.start())
        deadline = time.monotonic() + 30
        while rmh.status().sandbox_counts.get("queued", 0) < 1:
            assert time.monotonic() < deadline, "the create never queued"
            await asyncio.sleep(0.1)
        await both.stop()
        await asyncio.wait_for(starting, 60)
        assert waiting.info is not None and waiting.info.agent_id == host_b
        assert await gpus_of(waiting) == "0"  # b's GPU 0: not a's, which one holds
        # Labels pick the host; a label no host carries fails at once.
        zoned = session.create(command="sleep", args=["infinity"], agent_labels={"zone": "a"})
        await zoned.start()
        assert zoned.info is not None and zoned.info.agent_id == host_a
        with pytest.raises(ResourcesUnavailableError, match="GPUs 0,1"):
            await session.create(command="sleep", args=["infinity"], gpus=4).start()
