"""What every runtime's snapshots share: their labels and names.

A snapshot is an image named ``aviato-snapshot:<agent key>-<sandbox id>-<n>`` (see
aviato/protocol/lifecycle.py): Docker commits the container to it; the local runtime
keeps the sandbox's writable directory as an archive of that name. Either way it
lives on the host of the agent that took it, and nowhere else.
"""

from __future__ import annotations

import time

from aviato.protocol import SNAPSHOT_REPOSITORY, snapshot_agent_key

__all__ = [
    "LABEL_SNAPSHOT",
    "LABEL_SNAPSHOT_AGENT",
    "LABEL_SNAPSHOT_BASE",
    "LABEL_SNAPSHOT_CREATED",
    "LABEL_SNAPSHOT_OF",
    "is_snapshot",
    "snapshot_labels",
    "snapshot_name",
]

LABEL_SNAPSHOT = "aviato.snapshot"
LABEL_SNAPSHOT_AGENT = "aviato.snapshot.agent"
LABEL_SNAPSHOT_OF = "aviato.snapshot.of"
LABEL_SNAPSHOT_BASE = "aviato.snapshot.base"
LABEL_SNAPSHOT_CREATED = "aviato.snapshot.created"


def is_snapshot(image: str) -> bool:
    return image.startswith(SNAPSHOT_REPOSITORY + ":")


def snapshot_name(agent_id: str, sandbox_id: str) -> str:
    """A new snapshot's image name (unique: the time in microseconds)."""
    stamp = time.time_ns() // 1000
    return f"{SNAPSHOT_REPOSITORY}:{snapshot_agent_key(agent_id)}-{sandbox_id}-{stamp}"


def snapshot_labels(agent_id: str, sandbox_id: str, base_image: str) -> dict[str, str]:
    """A snapshot's labels. ``base_image``: the image its sandbox started from (a
    snapshot of a snapshot names the first image: what the local runtime runs)."""
    return {
        LABEL_SNAPSHOT: "1",
        LABEL_SNAPSHOT_AGENT: agent_id,
        LABEL_SNAPSHOT_OF: sandbox_id,
        LABEL_SNAPSHOT_BASE: base_image,
        LABEL_SNAPSHOT_CREATED: repr(time.time()),
    }
