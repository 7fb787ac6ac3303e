"""Volumes and ports (issue 13; MsgType 160-179): agents report the named volumes they
hold, clients list them (scheduler) and remove one (on its agent), and ask an agent
where a sandbox's ports are published."""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """A named volume and the agent whose host holds it (the data-plane address that
    removes it, as ``SandboxInfo`` gives a sandbox's)."""

    name: str
    agent_id: str
    agent_address: str
    agent_public_key: str = ""
    agent_lane: str = ""


@dataclass(frozen=True, slots=True)
class PortTunnel:
    """In-sandbox ``port`` reached at ``host:host_port``."""

    port: int
    host: str
    host_port: int


@dataclass(frozen=True, slots=True)
class AgentVolumes(Message):
    """Agent -> scheduler: every named volume on its host, sent after registering and
    when they change; placement prefers an agent that holds a create's volumes."""

    TYPE = MsgType.AGENT_VOLUMES
    agent_id: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListVolumes(Message):
    """Client -> scheduler: the volumes live agents hold (``VolumeListReply``)."""

    TYPE = MsgType.LIST_VOLUMES


@dataclass(frozen=True, slots=True)
class VolumeListReply(Message):
    TYPE = MsgType.VOLUME_LIST_REPLY
    volumes: tuple[VolumeInfo, ...] = ()


@dataclass(frozen=True, slots=True)
class RemoveVolume(Message):
    """Client -> agent: remove the volume ``name`` from its host (``OkReply``); refused
    while a sandbox mounts it."""

    TYPE = MsgType.REMOVE_VOLUME
    name: str


@dataclass(frozen=True, slots=True)
class GetTunnels(Message):
    """Client -> agent: where the sandbox's ports are published (``TunnelsReply``)."""

    TYPE = MsgType.GET_TUNNELS
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class TunnelsReply(Message):
    TYPE = MsgType.TUNNELS_REPLY
    tunnels: tuple[PortTunnel, ...] = ()
