"""Lifecycle messages (issue 13, MsgType 140-159): state that outlives idleness.

- ``ExtendLifetime`` (client -> scheduler): push a sandbox's max lifetime out.
- ``PauseSandbox`` (client -> scheduler, then scheduler -> agent): freeze or thaw it.
  The scheduler owns the status (``PAUSED``), so the request goes through it.
- ``SandboxActivity`` (agent -> scheduler): the sandboxes that saw exec, process, file
  or call traffic since the last report, sent at most once per heartbeat: it resets
  their idle clocks.
- ``SnapshotSandbox``, ``ListSnapshots``, ``RemoveSnapshot`` (client -> agent): a
  snapshot lives on the agent that took it (see ``snapshot_agent_key``).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType

__all__ = [
    "SNAPSHOT_REPOSITORY",
    "EndedBy",
    "ExtendLifetime",
    "ListSnapshots",
    "PauseSandbox",
    "RemoveSnapshot",
    "SandboxActivity",
    "SnapshotInfo",
    "SnapshotListReply",
    "SnapshotReply",
    "SnapshotSandbox",
    "snapshot_agent_key",
    "snapshot_holder_key",
]

#: Every snapshot is an image ``aviato-snapshot:<agent key>-<sandbox id>-<n>``: the
#: agent key names the agent (host) that holds it, so that the scheduler places a
#: create from it there, and nowhere else, without remembering any snapshot.
SNAPSHOT_REPOSITORY = "aviato-snapshot"
#: The most sandbox ids one SandboxActivity carries (an agent splits a longer report).
MAX_ACTIVITY_IDS = 10_000


class EndedBy(enum.StrEnum):
    """Which limit (or who) ended a sandbox: ``SandboxInfo.ended_by`` and
    ``SandboxTerminatedError.ended_by``. "" while it runs, or when it ended by itself."""

    IDLE_TIMEOUT = "idle_timeout"
    MAX_LIFETIME = "max_lifetime"
    STOPPED = "stopped"
    SESSION = "session"


def snapshot_agent_key(agent_id: str) -> str:
    """The key naming ``agent_id`` in its snapshots' image names (lowercase hex, as
    image references need)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:12]


def snapshot_holder_key(image: str) -> str | None:
    """The agent key of a snapshot image name; None when ``image`` is not a snapshot."""
    repo, sep, tag = image.partition(":")
    if repo != SNAPSHOT_REPOSITORY or not sep:
        return None
    key = tag.partition("-")[0]
    return key if len(key) == 12 else ""


@dataclass(frozen=True, slots=True)
class ExtendLifetime(Message):
    """Push the sandbox's max-lifetime deadline ``seconds`` further out. Reply: its row."""

    TYPE = MsgType.EXTEND_LIFETIME
    sandbox_id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class PauseSandbox(Message):
    """``pause`` true freezes the sandbox's processes, false thaws them. To the client:
    its row (status ``paused`` or ``running``); the agent answers the scheduler OK."""

    TYPE = MsgType.PAUSE_SANDBOX
    sandbox_id: str
    pause: bool = True


@dataclass(frozen=True, slots=True)
class SandboxActivity(Message):
    """Agent -> scheduler: these sandboxes were busy since the last report."""

    TYPE = MsgType.SANDBOX_ACTIVITY
    agent_id: str
    sandbox_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A snapshot: ``image`` is what ``create(container_image=...)`` takes."""

    image: str
    agent_id: str
    sandbox_id: str
    base_image: str
    created_at: float
    size_bytes: int = 0
    runtime: str = ""


@dataclass(frozen=True, slots=True)
class SnapshotSandbox(Message):
    """Client -> agent: the sandbox's filesystem as a new image. Reply: SnapshotReply."""

    TYPE = MsgType.SNAPSHOT_SANDBOX
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class SnapshotReply(Message):
    TYPE = MsgType.SNAPSHOT_REPLY
    snapshot: SnapshotInfo


@dataclass(frozen=True, slots=True)
class ListSnapshots(Message):
    """Client -> agent: the snapshots it holds. Reply: SnapshotListReply."""

    TYPE = MsgType.LIST_SNAPSHOTS


@dataclass(frozen=True, slots=True)
class SnapshotListReply(Message):
    TYPE = MsgType.SNAPSHOT_LIST_REPLY
    snapshots: tuple[SnapshotInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveSnapshot(Message):
    """Client -> agent: remove a snapshot it holds. Reply: OK."""

    TYPE = MsgType.REMOVE_SNAPSHOT
    image: str
