"""A DockerRuntime whose every create takes a spare made for it, the way an agent's
spare pool does (agent/spares.py): a parked container of the spec's shape, claimed
(the claim recorded), then sent its command. The runtime conformance suite runs
against it too: a spare-backed sandbox must behave exactly like a fresh one."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.runtime.base import (
    LABEL_AGENT,
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    LABEL_SPARE,
    Mount,
)
from agent.runtime.docker import DockerRuntime
from agent.runtime.spare_claims import SpareClaims
from agent.spares import CLAIM_FIFO, Shape, launch, make_fifo, wait_parked
from agent.supervisor_launch import SOCKET_DIR
from aviato.protocol import SandboxSpec


class SpareBackedDocker(DockerRuntime):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._dirs: list[Path] = []
        self._claims_dir = Path(tempfile.mkdtemp(prefix="avclaims-"))
        self.claims = SpareClaims(self._claims_dir)

    async def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        spare_id = f"spare-{uuid.uuid4().hex[:12]}"
        directory = Path(tempfile.mkdtemp(prefix="avsp-"))
        directory.chmod(0o755)
        self._dirs.append(directory)
        fifo = directory / CLAIM_FIFO
        make_fifo(fifo)
        spare_labels = {
            LABEL_MANAGED: "1",
            LABEL_SANDBOX: spare_id,
            LABEL_AGENT: labels[LABEL_AGENT],
            LABEL_SPARE: "1",
        }
        parking = Shape.of(spec).parking_spec()
        mounts = [*mounts, Mount(str(directory), SOCKET_DIR, read_only=False)]
        await self.create_spare(spare_id, parking, spare_labels, mounts)
        try:
            assert await wait_parked(fifo), "the spare's parker never waited on its FIFO"
            created = float(labels.get(LABEL_CREATED, "0"))
            await self.claim_spare(spare_id, sandbox_id, spec, created)
        except BaseException:
            await self.stop(spare_id)
            raise
        await launch(fifo, spec)

    async def close(self) -> None:
        await super().close()
        for directory in [*self._dirs, self._claims_dir]:
            shutil.rmtree(directory, ignore_errors=True)
