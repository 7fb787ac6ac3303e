"""Named volumes and published ports, from the client: ``list_volumes``,
``remove_volume`` (``aviato volume ls|rm``) and a sandbox's tunnels (``Sandbox.tunnels``).

A volume lives on one agent's host: the scheduler knows which agents hold which
(``ListVolumes``); removing one asks each agent holding it, on its data plane."""

from __future__ import annotations

from aviato._auth import client_keys
from aviato._connection import Channel, Connections, agent_connection, default_connections
from aviato._defaults import SandboxDefaults
from aviato._sandbox import scheduler_connection
from aviato._storage import Tunnel, volume_problems
from aviato.exceptions import ConfigurationError, SandboxNotFoundError
from aviato.protocol import (
    GetTunnels,
    ListVolumes,
    RemoveVolume,
    SandboxInfo,
    TunnelsReply,
    VolumeInfo,
    VolumeListReply,
)

__all__ = ["list_volumes", "remove_volume", "tunnels_of"]


async def list_volumes(defaults: SandboxDefaults | None = None) -> list[VolumeInfo]:
    """Every named volume the cluster's live agents hold, by name then agent."""
    defaults = defaults or SandboxDefaults()
    conn = await scheduler_connection(defaults)
    reply = await conn.request(ListVolumes(), timeout=defaults.request_timeout_seconds)
    assert isinstance(reply.msg, VolumeListReply)
    return list(reply.msg.volumes)


def _agent_channel(row: VolumeInfo, defaults: SandboxDefaults) -> Channel:
    directory = defaults.key_dir()
    curve = None
    if directory is not None and row.agent_public_key:
        curve = client_keys(directory, defaults._client_key_name(), row.agent_public_key)
    lane = row.agent_lane if defaults.lane_enabled() else ""
    return default_connections().get(row.agent_address, defaults.cluster_token(), curve, lane)


async def remove_volume(
    name: str, *, agent_id: str | None = None, defaults: SandboxDefaults | None = None
) -> list[str]:
    """Remove the volume ``name`` from every agent holding it (or from ``agent_id``'s
    host only); returns those agents' ids. ``SandboxNotFoundError`` when none holds it;
    ``SandboxFailedError`` while a sandbox mounts it."""
    problem = volume_problems(name)
    if problem:
        raise ConfigurationError(problem)
    defaults = defaults or SandboxDefaults()
    rows = [
        v
        for v in await list_volumes(defaults)
        if v.name == name and (agent_id is None or v.agent_id == agent_id)
    ]
    if not rows:
        where = f" on agent {agent_id}" if agent_id else ""
        raise SandboxNotFoundError(f"no volume {name!r}{where}: `aviato volume ls` lists them")
    removed: list[str] = []
    missing: SandboxNotFoundError | None = None
    for row in rows:
        conn = _agent_channel(row, defaults)
        try:
            await conn.request(RemoveVolume(name), timeout=defaults.request_timeout_seconds)
        except SandboxNotFoundError as exc:
            # Agents sharing one Docker engine share its volumes: one removal serves all.
            missing = exc
            continue
        removed.append(row.agent_id)
    if not removed and missing is not None:
        raise missing
    return removed


async def tunnels_of(
    info: SandboxInfo, defaults: SandboxDefaults, conns: Connections | None = None
) -> dict[int, Tunnel]:
    """Where ``info``'s sandbox's ports are reached: in-sandbox port -> ``Tunnel``."""
    if not info.spec.ports:
        return {}
    conn = agent_connection(info, defaults, conns)
    reply = await conn.request(
        GetTunnels(info.sandbox_id), timeout=defaults.request_timeout_seconds
    )
    assert isinstance(reply.msg, TunnelsReply)
    return {t.port: Tunnel(t.host, t.host_port) for t in reply.msg.tunnels}
