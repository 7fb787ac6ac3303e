"""A sandbox's lifecycle beyond start and stop (a mixin of ``Sandbox``): its max
lifetime pushed out, pause and resume, snapshots; and the snapshots of a cluster, for
``aviato snapshot ls|rm``.

Decisions, documented here once:

- **Idle timeout** (``idle_timeout_seconds``): the sandbox is stopped after that long
  with no exec, process, file or function-call activity as its agent sees it (a
  request arriving, or one still under way: a long exec or call keeps it alive; its
  main command's own work does not count). The scheduler holds the clock; agents
  report activity once per heartbeat, so it is precise to about a heartbeat.
- **A paused sandbox** holds its slot; its idle clock does not run (pausing is asking
  to keep it), and starts afresh at ``resume()``; its max lifetime does run.
- **Exec (files, calls) on a paused sandbox** raises ``SandboxPausedError`` at once:
  it is not resumed behind your back (a pause is often to stop it using CPU), and the
  request would otherwise wait on frozen processes. ``logs()`` and ``snapshot()``
  work while paused.
- **Snapshots live on the host of the agent that took them** (Docker: a local image
  ``aviato-snapshot:...`` labelled ``aviato.snapshot.*``; local runtime: an archive of
  the sandbox's ``/tmp`` in the agent's state directory). The image name names that
  agent: a create from it is placed there and waits for its room, and is refused
  (``SandboxFailedError``) if that agent is not alive. Snapshots are never copied
  between hosts.
"""

from __future__ import annotations

import builtins
import math
from typing import TYPE_CHECKING

from aviato._connection import (
    Channel,
    Connections,
    agent_connection,
    default_connections,
)
from aviato._defaults import SandboxDefaults
from aviato.exceptions import SandboxNotFoundError
from aviato.protocol import (
    ClusterStatus,
    ClusterStatusReply,
    ExtendLifetime,
    ListSnapshots,
    OkReply,
    PauseSandbox,
    RemoveSnapshot,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    SnapshotInfo,
    SnapshotListReply,
    SnapshotReply,
    SnapshotSandbox,
    snapshot_agent_key,
    snapshot_holder_key,
)

__all__ = ["SandboxLifecycle", "list_snapshots", "remove_snapshot"]

#: A snapshot copies a whole filesystem: its deadline, past the request timeout.
SNAPSHOT_SECONDS = 600.0


class SandboxLifecycle:
    """``Sandbox``'s lifecycle methods (see this module's docstring for the rules)."""

    if TYPE_CHECKING:
        _defaults: SandboxDefaults
        _info: SandboxInfo | None
        _spec: SandboxSpec

        def _require_started(self) -> SandboxInfo: ...
        def _agent(self) -> tuple[SandboxInfo, Channel]: ...
        def _connections(self) -> Connections: ...

    @property
    def ended_by(self) -> str:
        """Which limit (or who) ended the sandbox, as last seen: "idle_timeout",
        "max_lifetime", "stopped", "session" (``aviato.EndedBy``); "" while it runs,
        or when its command ended by itself."""
        return self._info.ended_by if self._info else ""

    @property
    def idle_timeout_seconds(self) -> float | None:
        return self._spec.idle_timeout_seconds

    async def _control(self, msg: ExtendLifetime | PauseSandbox) -> SandboxInfo:
        from aviato._sandbox import scheduler_connection

        conn = await scheduler_connection(self._defaults, self._connections())
        reply = await conn.request(msg, timeout=self._defaults.request_timeout_seconds)
        assert isinstance(reply.msg, SandboxReply)
        self._info = reply.msg.sandbox
        return self._info

    async def extend_lifetime(self, seconds: float) -> float | None:
        """Push the max lifetime ``seconds`` further out; returns the new deadline (a
        Unix time; None: the sandbox has no max lifetime, and keeps none). Raises
        ``ValueError`` for seconds that are not positive and finite, and
        ``SandboxNotRunningError`` once the sandbox has ended."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError(f"extend_lifetime takes seconds as a number, got {seconds!r}")
        if not 0 < seconds < math.inf:
            raise ValueError(
                f"extend_lifetime takes a positive, finite number of seconds, got {seconds}"
            )
        info = self._require_started()
        return (await self._control(ExtendLifetime(info.sandbox_id, float(seconds)))).deadline

    async def pause(self) -> None:
        """Freeze every process of the sandbox: memory kept, no CPU used, its slot held,
        its idle clock stopped. Docker: ``docker pause``; local runtime: the cgroup
        freezer (``UnsupportedOperationError`` where the agent cannot write cgroups).
        While paused, exec, files and calls raise ``SandboxPausedError``; a second
        pause raises it too. Resume with :meth:`resume`."""
        info = self._require_started()
        await self._control(PauseSandbox(info.sandbox_id, True))

    async def resume(self) -> None:
        """Thaw what :meth:`pause` froze (its idle clock starts afresh).
        ``SandboxNotPausedError`` when it is not paused."""
        info = self._require_started()
        await self._control(PauseSandbox(info.sandbox_id, False))

    async def snapshot(self) -> str:
        """The sandbox's filesystem as a new image name, for ``create(container_image=
        ...)``: a sandbox made from it starts with the same files. Running or paused
        sandboxes only (``SandboxNotRunningError`` once ended). Docker: the container
        committed to a local image (paused while copied); local runtime: its ``/tmp``
        (the only place it can write) archived, frozen while copied. The snapshot lives
        on this sandbox's agent only (see this module's docstring); ``aviato snapshot
        ls|rm`` lists and removes snapshots."""
        info, conn = self._agent()
        reply = await conn.request(
            SnapshotSandbox(info.sandbox_id),
            timeout=SNAPSHOT_SECONDS + self._defaults.request_timeout_seconds,
        )
        assert isinstance(reply.msg, SnapshotReply)
        return reply.msg.snapshot.image


def _agent_infos(reply: ClusterStatusReply) -> list[SandboxInfo]:
    """Each live agent as a row ``agent_connection`` can reach."""
    return [
        SandboxInfo(
            sandbox_id="",
            spec=SandboxSpec(image="-", command="-"),
            status=SandboxStatus.RUNNING,
            agent_id=a.agent_id,
            agent_address=a.address,
            agent_public_key=a.public_key,
            agent_lane=a.lane,
        )
        for a in reply.agents
        if a.alive
    ]


async def _agents(defaults: SandboxDefaults) -> list[SandboxInfo]:
    from aviato._sandbox import scheduler_connection

    conn = await scheduler_connection(defaults)
    found: list[SandboxInfo] = []
    cursor = ""
    while True:
        reply = await conn.request(
            ClusterStatus(cursor=cursor), timeout=defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, ClusterStatusReply)
        found += _agent_infos(reply.msg)
        cursor = reply.msg.next_cursor
        if not cursor:
            return found


async def list_snapshots(defaults: SandboxDefaults | None = None) -> builtins.list[SnapshotInfo]:
    """Every snapshot the live agents of the cluster hold, newest first."""
    defaults = defaults or SandboxDefaults()
    found: list[SnapshotInfo] = []
    conns = default_connections()
    for info in await _agents(defaults):
        conn = agent_connection(info, defaults, conns)
        reply = await conn.request(ListSnapshots(), timeout=defaults.request_timeout_seconds)
        assert isinstance(reply.msg, SnapshotListReply)
        found += reply.msg.snapshots
    return sorted(found, key=lambda s: -s.created_at)


async def remove_snapshot(image: str, defaults: SandboxDefaults | None = None) -> None:
    """Remove a snapshot from the agent that holds it. ``SandboxNotFoundError`` when no
    live agent holds one of that name."""
    defaults = defaults or SandboxDefaults()
    key = snapshot_holder_key(image)
    if not key:
        raise SandboxNotFoundError(
            f"{image!r} is not a snapshot name (aviato-snapshot:...; see `aviato snapshot ls`)"
        )
    for info in await _agents(defaults):
        if info.agent_id and snapshot_agent_key(info.agent_id) == key:
            conn = agent_connection(info, defaults, default_connections())
            reply = await conn.request(
                RemoveSnapshot(image), timeout=defaults.request_timeout_seconds
            )
            assert isinstance(reply.msg, OkReply)
            return
    raise SandboxNotFoundError(
        f"no live agent holds snapshot {image}: the agent that took it has left the cluster"
    )
