"""The agent's part of the lifecycle (issue 13): activity for idle timeouts, pause and
resume, snapshots.

- Activity: every data-plane request naming a sandbox marks it busy; so does a request
  or a function call still under way. ``take_activity`` gives, once per heartbeat, the
  sandboxes with an idle timeout that were busy since the last one; the agent sends
  them in one SandboxActivity (the scheduler holds the idle clocks).
- Pause: the scheduler asks (it owns the status); the runtime freezes the sandbox.
  While paused, every request on it but logs and snapshot is refused with
  SandboxPausedError: it would wait on frozen processes (its supervisor among them).
- Snapshots: taken by the runtime; named after this agent (see
  aviato/protocol/lifecycle.py), so that the scheduler places a create from one here.
- Restart: a sandbox found frozen at this agent's start (paused before a kill -9 and
  back within the scheduler's liveness window) is adopted as paused. Its supervisor
  was frozen with it and missed its agent's end: Docker kills it before thawing (the
  engine then serves exec); on the local runtime it is the main process, so resume is
  refused there (snapshot, then stop).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from agent.runtime.base import Runtime, RuntimeSnapshot
from agent.runtime.snapshots import (
    LABEL_SNAPSHOT_BASE,
    LABEL_SNAPSHOT_CREATED,
    LABEL_SNAPSHOT_OF,
    snapshot_labels,
    snapshot_name,
)
from aviato.exceptions import SandboxNotRunningError, UnsupportedOperationError
from aviato.protocol import (
    Decoded,
    ErrorCode,
    ErrorReply,
    GetLogs,
    ListSnapshots,
    Message,
    OkReply,
    PauseSandbox,
    RemoveSnapshot,
    SandboxStatus,
    SnapshotInfo,
    SnapshotListReply,
    SnapshotReply,
    SnapshotSandbox,
)

if TYPE_CHECKING:
    from agent.data_plane import Running
    from agent.supervisor_hub import WorkerHub

__all__ = ["AgentLifecycle", "data_handlers"]

#: Requests served on a paused sandbox (they do not need its processes).
#: How long a pause or snapshot waits for a supervisor still starting (then goes on).
SUPERVISOR_WAIT = 10.0
_WHILE_PAUSED: frozenset[type[Message]] = frozenset({GetLogs, SnapshotSandbox})


class AgentLifecycle:
    def __init__(
        self,
        runtime: Runtime,
        agent_id: str,
        sandboxes: Mapping[str, Running],
        hub: Callable[[], WorkerHub | None],
    ) -> None:
        self.runtime = runtime
        self.agent_id = agent_id
        self.sandboxes = sandboxes
        self._hub = hub
        self.paused: set[str] = set()
        #: Found paused at a restart: their supervisor's link died with our predecessor.
        self.orphaned: set[str] = set()
        self._touched: set[str] = set()
        #: Data-plane requests under way, per sandbox.
        self._busy: dict[str, int] = {}

    # ------------------------------------------------------------------ activity

    def on_request(self, msg: Message) -> ErrorReply | None:
        """A data-plane request: marks its sandbox busy; the refusal to send when the
        sandbox is paused (None: serve it)."""
        sid = getattr(msg, "sandbox_id", None)
        if type(sid) is not str:
            return None
        self._touched.add(sid)
        if sid in self.paused and type(msg) not in _WHILE_PAUSED:
            why = (
                f"sandbox {sid} is paused (its processes are frozen): `await sb.resume()` "
                "(or `aviato resume`) first"
            )
            return ErrorReply(ErrorCode.PAUSED, why, {"sandbox_id": sid})
        return None

    @contextmanager
    def serving(self, msg: Message) -> Iterator[None]:
        """Around a request's handler: its sandbox stays busy while it runs."""
        sid = getattr(msg, "sandbox_id", None)
        if type(sid) is not str:
            yield
            return
        self._busy[sid] = self._busy.get(sid, 0) + 1
        try:
            yield
        finally:
            left = self._busy[sid] - 1
            if left:
                self._busy[sid] = left
            else:
                del self._busy[sid]
            self._touched.add(sid)

    def take_activity(self) -> tuple[str, ...]:
        """The sandboxes with an idle timeout busy since the last call (requests seen,
        or under way: a long exec or call keeps its sandbox alive)."""
        touched, self._touched = self._touched, set()
        hub = self._hub()
        busy = set(self._busy)
        if hub is not None:
            busy |= {
                sid
                for sid, run in self.sandboxes.items()
                if run.spec.idle_timeout_seconds is not None and hub.busy(sid)
            }
        return tuple(
            sid
            for sid in sorted(touched | busy)
            if (run := self.sandboxes.get(sid)) is not None
            and run.spec.idle_timeout_seconds is not None
        )

    def status(self, sandbox_id: str) -> SandboxStatus:
        """As reported to a scheduler (that restarted)."""
        return SandboxStatus.PAUSED if sandbox_id in self.paused else SandboxStatus.RUNNING

    def adopt_paused(self, sandbox_id: str) -> None:
        """A sandbox found frozen at this agent's start: reported, and served, as paused."""
        self.paused.add(sandbox_id)
        self.orphaned.add(sandbox_id)

    def forget(self, sandbox_id: str) -> None:
        self.paused.discard(sandbox_id)
        self.orphaned.discard(sandbox_id)
        self._touched.discard(sandbox_id)

    # ------------------------------------------------------------------ pause

    async def on_pause(self, msg: PauseSandbox) -> None:
        """The scheduler's PauseSandbox (it checked the status); raises what went wrong."""
        sid = msg.sandbox_id
        if sid not in self.sandboxes:
            raise SandboxNotRunningError(
                f"sandbox {sid} is not running on agent {self.agent_id}", sandbox_id=sid
            )
        if msg.pause:
            await self._settled(sid)
            await self.runtime.pause(sid)
            self.paused.add(sid)
        else:
            if sid in self.orphaned and self.runtime.supervisor_is_main:
                raise UnsupportedOperationError(
                    f"sandbox {sid} was paused before agent {self.agent_id} restarted: on the "
                    f"{self.runtime.name} runtime its supervisor is its main process, and it "
                    "ends everything once thawed (its link to the old agent is gone). It "
                    "stays paused: `sb.snapshot()` keeps its files for a new sandbox; stop it",
                    sandbox_id=sid,
                )
            await self.runtime.resume(sid)
            self.paused.discard(sid)
            self.orphaned.discard(sid)
            self._touched.add(sid)

    async def _settled(self, sandbox_id: str) -> None:
        """Wait (bounded) for a supervisor that is still starting beside the sandbox's
        command: frozen half-way through its ``docker exec``, the engine never finished
        the pause (or a commit's pause), and a paused container cannot be removed."""
        hub = self._hub()
        if hub is not None:
            await hub.supervisor_ready(sandbox_id, SUPERVISOR_WAIT)

    # ------------------------------------------------------------------ snapshots

    async def on_snapshot(self, msg: SnapshotSandbox) -> SnapshotInfo:
        sid = msg.sandbox_id
        run = self.sandboxes.get(sid)
        if run is None:
            raise SandboxNotRunningError(
                f"sandbox {sid} is not running on agent {self.agent_id}: a snapshot is "
                "taken of a live sandbox (running or paused)",
                sandbox_id=sid,
            )
        image = snapshot_name(self.agent_id, sid)
        labels = snapshot_labels(self.agent_id, sid, run.spec.image)
        await self._settled(sid)
        started = time.time()
        size = await self.runtime.snapshot(sid, image, labels)
        return SnapshotInfo(
            image, self.agent_id, sid, run.spec.image, started, size, self.runtime.name
        )

    async def on_list(self, msg: ListSnapshots) -> tuple[SnapshotInfo, ...]:
        found = await self.runtime.list_snapshots(self.agent_id)
        return tuple(self._info(s) for s in found)

    async def on_remove(self, msg: RemoveSnapshot) -> None:
        await self.runtime.remove_snapshot(msg.image)

    def _info(self, snap: RuntimeSnapshot) -> SnapshotInfo:
        labels = snap.labels
        try:
            created = float(labels.get(LABEL_SNAPSHOT_CREATED, "0"))
        except ValueError:
            created = 0.0
        return SnapshotInfo(
            snap.image,
            self.agent_id,
            labels.get(LABEL_SNAPSHOT_OF, ""),
            labels.get(LABEL_SNAPSHOT_BASE, ""),
            created,
            snap.size_bytes,
            self.runtime.name,
        )


Handler = Callable[[bytes, Decoded], Awaitable[None]]
Send = Callable[[bytes, int, Message], None]


def data_handlers(life: AgentLifecycle, send: Send) -> dict[type[Message], Handler]:
    """The data-plane requests of this part, for the agent's DataPlane."""

    async def snapshot(identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, SnapshotSandbox)
        send(identity, d.request_id, SnapshotReply(await life.on_snapshot(d.msg)))

    async def listing(identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, ListSnapshots)
        send(identity, d.request_id, SnapshotListReply(await life.on_list(d.msg)))

    async def remove(identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, RemoveSnapshot)
        await life.on_remove(d.msg)
        send(identity, d.request_id, OkReply())

    return {SnapshotSandbox: snapshot, ListSnapshots: listing, RemoveSnapshot: remove}
