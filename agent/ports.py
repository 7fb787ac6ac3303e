"""Published ports: where a client reaches a server inside a sandbox.

A runtime whose engine publishes ports (Docker) reports the host port it chose. Under
a runtime that does not (the local one), a sandbox with ports gets a network namespace
of its own, loopback only, and the agent forwards: it listens on its publish address
(a port the kernel picks) and carries each connection to 127.0.0.1:PORT inside the
sandbox's namespace, through a socket made there (``setns`` on one thread, which
needs the agent to be root, as bubblewrap's namespaces do here).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
from collections.abc import Mapping

from agent.data_plane import DataPlane, Running
from agent.runtime.base import Runtime
from aviato.exceptions import SandboxFailedError, SandboxNotFoundError
from aviato.protocol import Decoded, GetTunnels, PortTunnel, SandboxSpec, TunnelsReply

__all__ = ["PortService"]

log = logging.getLogger("aviato.agent.ports")

CLONE_NEWNET = 0x40000000
CONNECT_SECONDS = 10.0
CHUNK = 64 * 1024


def _socket_in(netns: int) -> socket.socket:
    """A TCP socket of the network namespace open at fd ``netns`` (runs on a worker
    thread: ``setns`` moves only the calling thread, which moves back before returning)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.setns(netns, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the sandbox's network namespace: {os.strerror(err)}")
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # a thread left elsewhere must not live on
                os._exit(70)
    finally:
        os.close(own)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()  # back-pressure: a slow peer slows the other side
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class _Forward:
    """One sandbox port's listener and its connections (each owned here)."""

    def __init__(self, netns: int, port: int) -> None:
        #: An fd of the sandbox's namespace, held (not its pid's path, which a new
        #: process could take once the sandbox ends): the same namespace, or none.
        self.netns, self.port = os.dup(netns), port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._serve, host, 0)
        bound: int = self.server.sockets[0].getsockname()[1]
        return bound

    def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._carry(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner_writer = None
        sock: socket.socket | None = None
        try:
            netns = os.dup(self.netns)  # its own: a close() meanwhile cannot pull it away
            try:
                sock = await asyncio.to_thread(_socket_in, netns)
            finally:
                os.close(netns)
            sock.setblocking(False)
            async with asyncio.timeout(CONNECT_SECONDS):
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
            inner_reader, inner_writer = await asyncio.open_connection(sock=sock)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pipe(reader, inner_writer))
                tg.create_task(_pipe(inner_reader, writer))
        except (OSError, TimeoutError) as exc:
            log.debug("port %d: connection not carried: %s", self.port, exc)
        finally:
            for w in (writer, inner_writer):
                if w is not None:
                    w.close()
            if inner_writer is None and sock is not None:
                sock.close()  # never handed to a stream

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.netns >= 0:
            os.close(self.netns)
            self.netns = -1


class PortService:
    """Every sandbox's published ports on this agent, and ``GetTunnels``."""

    def __init__(self, runtime: Runtime, sandboxes: Mapping[str, Running], host: str) -> None:
        self.runtime = runtime
        self.sandboxes = sandboxes
        #: Where clients reach published ports: the agent's advertised host.
        self.host = host
        self._forwards: dict[str, list[tuple[_Forward, int]]] = {}

    def serving_at(self, address: str) -> None:
        """The agent serves clients at ``address`` (tcp://HOST:PORT): without a publish
        host of its own, ports are published on HOST, and the runtime is told."""
        if not self.host:
            self.host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
        self.runtime.publish_host = self.host

    async def open(self, sandbox_id: str, spec: SandboxSpec) -> None:
        """After the sandbox started: forward its ports when its runtime does not."""
        if not spec.ports or self.runtime.publishes_ports:
            return
        pid = self.runtime.netns_pid(sandbox_id)
        if pid is None:
            raise SandboxFailedError(
                f"the {self.runtime.name} runtime gave sandbox {sandbox_id} no network"
                " namespace of its own to forward its ports into",
                sandbox_id=sandbox_id,
            )
        opened: list[tuple[_Forward, int]] = []
        self._forwards[sandbox_id] = opened
        try:
            netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                for port in spec.ports:
                    forward = _Forward(netns, port)
                    opened.append((forward, 0))
                    opened[-1] = (forward, await forward.start(self.host))
            finally:
                os.close(netns)
        except OSError as exc:
            self.close(sandbox_id)
            raise SandboxFailedError(
                f"could not listen on {self.host} to forward ports {list(spec.ports)}: {exc}",
                sandbox_id=sandbox_id,
            ) from exc

    def close(self, sandbox_id: str) -> None:
        for forward, _ in self._forwards.pop(sandbox_id, ()):
            forward.close()

    def close_all(self) -> None:
        for sandbox_id in list(self._forwards):
            self.close(sandbox_id)

    async def tunnels(self, sandbox_id: str) -> tuple[PortTunnel, ...]:
        run = self.sandboxes.get(sandbox_id)
        if run is None:
            raise SandboxNotFoundError(
                f"sandbox {sandbox_id} is not running on this agent", sandbox_id=sandbox_id
            )
        if self.runtime.publishes_ports:
            published = await self.runtime.published_ports(sandbox_id)
        else:
            published = {f.port: bound for f, bound in self._forwards.get(sandbox_id, ())}
        ports = run.spec.ports
        return tuple(PortTunnel(p, self.host, published[p]) for p in ports if p in published)

    async def on_get(self, plane: DataPlane, identity: bytes, d: Decoded) -> None:
        assert isinstance(d.msg, GetTunnels)
        plane.send_now(identity, d.request_id, TunnelsReply(await self.tunnels(d.msg.sandbox_id)))
