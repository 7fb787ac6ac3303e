"""The agent daemon: registers with the scheduler, runs sandboxes through a Runtime,
and serves the data plane (exec, files, logs, function calls) to clients on its own
ROUTER socket, and to clients on its host over its local lane (agent/lane_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import zmq
import zmq.asyncio

from agent.data_plane import DataPlane, Running
from agent.identity import state_dir
from agent.kept_logs import KeptLogs
from agent.lane_server import LaneServer
from agent.lifecycle import AgentLifecycle
from agent.ports import PortService
from agent.resources import Capacity, gpu_ids_of, with_gpus
from agent.runtime.base import (
    LABEL_AGENT,
    Runtime,
    SandboxExit,
    sandbox_labels,
)
from agent.runtime.isolation import refusal
from agent.runtime.spare_claims import SpareClaims
from agent.spares import Shape, SparePool
from agent.storage import VolumeService
from agent.supervisor_hub import WorkerHub, remove_dead_agent_dir
from agent.supervisor_launch import supervisor_command
from aviato import _zmq
from aviato._auth import CurveKeys
from aviato._server import sockets
from aviato._server.auth import ServerKeys, ZapHandler, log_refused_handshakes
from aviato._server.daemon import warn_if_open
from aviato._server.errors import error_reply
from aviato.exceptions import (
    AgentIdInUseError,
    AviatoError,
    SandboxFailedError,
)
from aviato.protocol import (
    AgentHeartbeat,
    AgentSpares,
    DecodeError,
    DeregisterAgent,
    ErrorCode,
    ErrorReply,
    GetTunnels,
    HeartbeatReply,
    Message,
    OkReply,
    PauseSandbox,
    PlaceSandbox,
    RegisterAgent,
    RegisterReply,
    RemoveVolume,
    SandboxActivity,
    SandboxExited,
    SandboxInfo,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    SpareShape,
    StopSandbox,
    decode,
    encode,
)

__all__ = ["AgentServer"]

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics

log = logging.getLogger("aviato.agent")

#: Every this many heartbeats, one lists every sandbox (a resync); the others only
#: the sandboxes gone since the last one.
FULL_HEARTBEAT_EVERY = 20
#: How many ended sandbox ids to remember, to tell "not running" from "unknown".
ENDED_MEMORY = 4096
#: Agent ids of embedded clusters: this prefix and the owning process's pid.
EMBEDDED_PREFIX = "embedded-"
#: The last lines of an ended sandbox's output read to be kept (then cut to a MiB).
KEPT_LOG_LINES = 10_000
#: How long a function worker may take from container start to its hello.
WORKER_START_SECONDS = 60.0
#: While the scheduler does not answer, a warning this often (seconds).
SILENCE_WARN_SECONDS = 5.0
#: How long a stopping agent waits for the scheduler to take its deregistration.
DEREGISTER_SECONDS = 2.0
#: Between two sweeps for the sandboxes of agents the scheduler declared dead.
DEAD_SWEEP_SECONDS = 10.0


class AgentServer:
    def __init__(
        self,
        runtime: Runtime,
        *,
        scheduler: str,
        agent_id: str,
        slots: int,
        bind: str = "tcp://127.0.0.1:0",
        advertise_host: str | None = None,
        labels: dict[str, str] | None = None,
        token: str | None = None,
        keys: tuple[ServerKeys, CurveKeys] | None = None,
        register_timeout: float = 2.0,
        supervisor: bool = True,
        instance: str = "",
        replaces: str = "",
        warm: dict[Shape, int] | None = None,
        learn_spares: int = 0,
        state_directory: Path | None = None,
        allow_mounts: tuple[str, ...] = (),
        publish_host: str | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.runtime = runtime
        self.capacity = capacity or Capacity(0.0, 0, ())  # advertised (none: no limits)
        self.scheduler = scheduler
        self.agent_id = agent_id
        self.slots = slots
        self.bind = bind
        self.advertise_host = advertise_host
        self.labels = labels or {}
        self.token = token
        #: CURVE: the data plane's server keys (client keys only), the scheduler link's.
        self.keys = keys
        self.register_timeout = register_timeout
        #: This process's nonce, and the one of the id's previous holder on this host
        #: that died holding it (see RegisterAgent; agent/identity.py).
        self.instance = instance or uuid.uuid4().hex
        self.replaces = replaces
        #: The scheduler refused our id: we own nothing, so we stop nothing on exit.
        self._refused = False
        self._registered = False
        self._last_dead_sweep = 0.0
        self._last_heard = 0.0  # when the scheduler last sent us anything (monotonic)
        self._swept_dead: frozenset[str] = frozenset()
        #: Run exec and files through an in-sandbox supervisor when the image has Python.
        self.supervisor = supervisor
        self.address = ""
        self.ready = asyncio.Event()  # set once registered the first time
        self.sandboxes: dict[str, Running] = {}
        self.creating: set[str] = set()
        self._early_exits: dict[str, SandboxExit] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        #: Output of ended sandboxes (stopped or exited), for ``logs``.
        self.kept_logs = KeptLogs()
        self._stop = asyncio.Event()
        self._ctx = zmq.asyncio.Context()
        self._sched: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._next_id = 0
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Clients' requests, on the data socket and the lane (agent/data_plane.py).
        self.plane = DataPlane(
            runtime,
            agent_id=agent_id,
            token=token,
            sandboxes=self.sandboxes,
            creating=self.creating,
            ended=self.ended,
            kept_logs=self.kept_logs,
            start=self._spawn,
        )
        self._hub: WorkerHub | None = None
        self.plane.objects.fetcher.link(self._ask_scheduler, keys[1] if keys else None)
        self.lifecycle = AgentLifecycle(runtime, agent_id, self.sandboxes, lambda: self._hub)
        self.plane.use_lifecycle(self.lifecycle)
        #: Where clients on this host reach the data plane without ZeroMQ ("": nowhere).
        self.lane_address = ""
        #: Pre-started spares (agent/spares.py): per image wanted, learned at most.
        self.warm = warm or {}
        self.learn_spares = learn_spares
        self.spares: SparePool | None = None
        self.state_directory = state_directory or state_dir()
        self._spares_changed = asyncio.Event()
        #: Prometheus metrics (agent/metrics.py), when served (--metrics).
        self.metrics: AgentMetrics | None = None
        #: Host mounts only under these (resolved) roots; named volumes kept here.
        self.allow_mounts = allow_mounts
        volumes = runtime.volume_store(self.state_directory / "volumes")
        self.volumes = VolumeService(volumes, agent_id, self.sandboxes, self._ask_scheduler)
        self.plane.serve_also(RemoveVolume, functools.partial(self.volumes.on_remove, self.plane))
        #: Set once bound: the --publish-host, else our advertised data-plane host.
        self.ports = self.plane.ports = PortService(runtime, self.sandboxes, publish_host or "")
        self.plane.serve_also(GetTunnels, functools.partial(self.ports.on_get, self.plane))

    def stop(self) -> None:
        self._stop.set()

    def remove_socket_dir(self) -> None:
        """Remove the socket directory now (any thread): the last act of an agent whose
        shutdown is stuck, so that its exit leaves none behind."""
        if self._hub is not None:
            self._hub.remove_root()

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, *, cleanup_on_exit: bool = True) -> None:
        server_keys = self.keys[0] if self.keys is not None else None
        who = f"agent {self.agent_id}"
        # First: it locks our socket directory, refusing us (before we touch anything)
        # when a live agent on this host has our id.
        self._hub = hub = WorkerHub(self.plane.send_now, self._spawn, self.agent_id)
        self.plane.hub = hub
        if self.metrics is not None:
            self.metrics.attach_hub(hub)
        self._setup_spares(hub)
        zap = ZapHandler(self._ctx, server_keys, who) if server_keys is not None else None
        try:
            data, bound = sockets.router(self._ctx, self.bind, server_keys)
        except BaseException:
            if zap is not None:
                zap.close()
            await hub.close_all()
            raise
        self.plane.socket = data
        self.address = sockets.advertised(bound, self.advertise_host)
        self.ports.serving_at(self.address)
        log.info(
            "agent %s serving clients on %s (runtime %s)", self.agent_id, bound, self.runtime.name
        )
        warn_if_open(log, who, bound, self.token, server_keys.directory if server_keys else None)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._start_lane(hub)
                if zap is not None:
                    self._task(zap.run())
                    self._task(log_refused_handshakes(data, who))
                self._task(self.plane.serve(data))
                self._task(self._scheduler_link())
                self._task(self._exits_loop())
                self._task(self.volumes.report())
                if self.spares is not None:
                    self._task(self._report_spares())
                await self._stop.wait()
                for task in list(self._tasks):
                    task.cancel()
        finally:
            self.ports.close_all()
            if self._registered and not self._refused:
                # First: clients hear at once that our sandboxes end, and we are not
                # listed as dead (nor our kept sandboxes swept as a dead agent's).
                await self._deregister()
            if self.spares is not None:  # never kept: nothing would claim them
                await self.spares.close()
            if cleanup_on_exit and not self._refused:
                await self._stop_all()
            if self.plane.lane is not None:
                self.plane.lane.close()
            if self._hub is not None:
                await self._hub.close_all(detach=not cleanup_on_exit)
            await self.runtime.close()
            if zap is not None:
                zap.close()
            data.close(linger=0)
            if self._sched is not None:
                self._sched.close(linger=0)
            self._ctx.destroy(linger=0)  # term() would wait on any socket left open

    def _setup_spares(self, hub: WorkerHub) -> None:
        if not self.runtime.supports_spares:
            if self.warm or self.learn_spares:
                log.warning("the %s runtime keeps no spares: --warm ignored", self.runtime.name)
            return
        # Always: a predecessor's claimed spares are found through it, spares or not.
        key = hashlib.sha256(self.agent_id.encode()).hexdigest()[:16]
        self.runtime.claims = SpareClaims(self.state_directory / "spares" / key)
        if (self.warm or self.learn_spares) and self.supervisor:
            self.spares = SparePool(
                self.runtime,
                hub,
                self.agent_id,
                warm=self.warm,
                learn=self.learn_spares,
                room=lambda: self.slots - len(self.sandboxes) - len(self.creating),
                start_supervisor=self._spare_supervisor,
                changed=self._spares_changed.set,
            )

    async def _report_spares(self) -> None:
        """The scheduler sees how many of our free slots hold ready spares (AgentSpares;
        at most two more are starting, in free slots too)."""
        sent: tuple[SpareShape, ...] | None = None
        while True:
            await self._spares_changed.wait()
            self._spares_changed.clear()
            assert self.spares is not None
            shapes = self.spares.ready_shapes()
            if shapes != sent and self._registered:
                sent = shapes
                count = sum(s.ready for s in shapes)
                reply = await self._ask_scheduler(AgentSpares(self.agent_id, count, shapes), 2.0)
                if reply is None:
                    sent = None  # told again at the next change
            await asyncio.sleep(0.1)  # a burst of claims is one report

    def _start_lane(self, hub: WorkerHub) -> None:
        lane = LaneServer(hub.root / "lane", self.plane.on_message, self.plane.client_gone)
        try:
            lane.start()
        except OSError as exc:  # clients then use the ZeroMQ data plane, as remote ones do
            log.warning("agent %s: no local lane (%s)", self.agent_id, exc)
            return
        self.plane.lane = lane
        self.lane_address = lane.address

    async def _stop_all(self) -> None:
        """Stop everything of ours, including stops still under way when we were told to
        exit (their tasks were just cancelled): ask the runtime, not only our tables."""
        wanted = set(self.sandboxes) | self.creating
        try:
            async with asyncio.timeout(30):
                wanted |= {s.sandbox_id for s in await self.runtime.list(self.agent_id)}
        except Exception as exc:
            log.warning("could not list sandboxes to stop on exit: %s", exc)
        ids = sorted(wanted)
        if ids:
            log.info("agent %s stopping %d sandbox(es) on exit", self.agent_id, len(ids))
        results = await asyncio.gather(
            *(asyncio.wait_for(self.runtime.stop(s), 30) for s in ids), return_exceptions=True
        )
        for sid, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("could not stop %s on exit: %s", sid, result)

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` in the agent's task group; tracked so ``stop`` can cancel it."""
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        return self._task(self._guard(coro))

    @staticmethod
    async def _guard(coro: Awaitable[None]) -> None:
        # A failing request handler is logged; it must not take the task group down.
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent: request handler failed")

    # ------------------------------------------------------------------ scheduler link

    def _new_scheduler_socket(self) -> zmq.asyncio.Socket:
        if self._sched is not None:
            self._sched.close(linger=0)
        sock = _zmq.dealer(self._ctx, self.scheduler, self.keys[1] if self.keys else None)
        self._sched = sock
        return sock

    async def _scheduler_link(self) -> None:
        fresh = True
        backoff = _zmq.BACKOFF_FIRST
        sock = self._new_scheduler_socket()
        reader = self._task(self._scheduler_recv(sock))
        last_warned = self._last_heard = time.monotonic()
        while True:
            reply = await self._register(fresh)
            if reply is None:
                now = time.monotonic()
                silent = now - self._last_heard  # (a refusal is an answer, logged apart)
                if silent >= SILENCE_WARN_SECONDS and now - last_warned >= SILENCE_WARN_SECONDS:
                    last_warned = now
                    log.warning(
                        "agent %s: the scheduler at %s does not answer (for %.0f s); still "
                        "trying to register (is it running, and is the address right?)",
                        self.agent_id,
                        self.scheduler,
                        silent,
                    )
                await asyncio.sleep(backoff)
                backoff = _zmq.next_backoff(backoff)
                if backoff >= 1.6:
                    # A fresh socket drops whatever the old one had queued.
                    reader.cancel()
                    sock = self._new_scheduler_socket()
                    reader = self._task(self._scheduler_recv(sock))
                continue
            fresh, backoff = False, _zmq.BACKOFF_FIRST
            self._registered = True
            self.volumes.changed.set()  # a scheduler that (re)learns us learns our volumes
            self.ready.set()
            if self.spares is not None and not self.spares.running:
                self.spares.start()
            await self._heartbeat_until_lost(reply.heartbeat_interval)
            log.warning(
                "agent %s: the scheduler at %s stopped answering or restarted; registering again",
                self.agent_id,
                self.scheduler,
            )
            last_warned = time.monotonic()
            # On a fresh socket: once (under heavy load, seen in CI) the old one
            # stopped delivering replies, and registering on it failed for 10 s.
            reader.cancel()
            sock = self._new_scheduler_socket()
            reader = self._task(self._scheduler_recv(sock))

    async def _register(self, fresh: bool) -> RegisterReply | None:
        reported: list[SandboxInfo] = []
        leftovers: list[str] = []  # stopped once the id is ours (the scheduler agrees)
        if fresh:
            for found in await self.runtime.list(self.agent_id):
                run = Running.found(found.labels) if found.running else None
                if run is not None:
                    self.sandboxes.setdefault(found.sandbox_id, run)
                    if found.paused:  # still frozen: reported, and served, as paused
                        self.lifecycle.adopt_paused(found.sandbox_id)
                else:
                    leftovers.append(found.sandbox_id)
        for sid, run in self.sandboxes.items():
            status = self.lifecycle.status(sid)
            reported.append(run.report(sid, status))
        msg = RegisterAgent(
            agent_id=self.agent_id,
            address=self.address,
            slots=self.slots,
            runtime=self.runtime.name,
            fresh=fresh,
            labels=self.labels,
            sandboxes=tuple(reported),
            public_key=self.keys[0].public.decode() if self.keys is not None else "",
            lane=self.lane_address,
            instance=self.instance,
            replaces=self.replaces,
            spares=self.spares.ready_count if self.spares is not None else 0,
            spare_shapes=self.spares.ready_shapes() if self.spares is not None else (),
            isolations=self.runtime.isolations,
            probe=self.runtime.probe_note,
            userns=self.runtime.userns,
        )
        msg = self.capacity.advertised(msg)
        reply = await self._ask_scheduler(msg, self.register_timeout)
        if isinstance(reply, ErrorReply) and reply.code is ErrorCode.ID_IN_USE:
            # Another live agent has our id: taking it over would wreck it. Exit.
            self._refused = True
            raise AgentIdInUseError(reply.message)
        if not isinstance(reply, RegisterReply):
            if isinstance(reply, ErrorReply):
                log.error("scheduler refused registration: %s", reply.message)
            return None
        for sid in leftovers:
            await self.runtime.stop(sid)
        if fresh and self.agent_id.startswith(EMBEDDED_PREFIX):
            await self._reap_dead_embedded()
        for sid in reply.reap:
            log.info("reaping sandbox %s unknown to the scheduler", sid)
            self._forget(sid, "reaped: unknown to the scheduler")
            await self.runtime.stop(sid)
        log.info("agent %s registered with %s", self.agent_id, self.scheduler)
        return reply

    async def _reap_dead_embedded(self) -> None:
        """Embedded agents are named after their owner's pid, so one killed with its
        owner (kill -9 of both) would leave its sandboxes to nobody: the next embedded
        agent on this host removes those whose owner process is gone."""
        for found in await self.runtime.list_all():
            owner = found.labels.get(LABEL_AGENT, "")
            if not owner.startswith(EMBEDDED_PREFIX) or owner == self.agent_id:
                continue
            pid = owner.removeprefix(EMBEDDED_PREFIX)
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                log.info("reaping %s of dead embedded agent %s", found.sandbox_id, owner)
                await self.runtime.stop(found.sandbox_id)

    async def _heartbeat_until_lost(self, interval: float) -> None:
        misses = 0
        beats = 0
        #: What the scheduler last acknowledged we have (None: tell it in full).
        told: set[str] | None = None
        while True:
            await asyncio.sleep(interval)
            have = {*self.sandboxes, *self.creating}
            beats += 1
            if told is None or beats % FULL_HEARTBEAT_EVERY == 0:
                msg = AgentHeartbeat(self.agent_id, tuple(have))
            else:  # only what went (a lost one is sent again: told moves on a reply)
                msg = AgentHeartbeat(self.agent_id, full=False, gone=tuple(told - have))
            reply = await self._ask_scheduler(msg, max(1.0, 2 * interval))
            if isinstance(reply, HeartbeatReply):
                if not reply.registered:
                    return
                misses = 0
                told = have
                if reply.heartbeat_interval > 0:
                    interval = reply.heartbeat_interval
                if reply.dead_agents:
                    self._sweep_dead_soon(frozenset(reply.dead_agents))
                await self._report_activity()
            else:
                misses += 1
                if misses >= 3:
                    return

    def _sweep_dead_soon(self, dead: frozenset[str]) -> None:
        """Remove what agents the scheduler declared dead (past its grace) left on our
        engine, now and then: a killed agent that never returns leaves exited
        containers that nothing else would remove."""
        now = time.monotonic()
        if dead == self._swept_dead and now - self._last_dead_sweep < DEAD_SWEEP_SECONDS:
            return
        self._swept_dead, self._last_dead_sweep = dead, now
        self._spawn(self._sweep_dead(dead - {self.agent_id}))

    async def _sweep_dead(self, dead: frozenset[str]) -> None:
        for found in await self.runtime.list_all():
            owner = found.labels.get(LABEL_AGENT, "")
            if owner in dead:
                log.info("removing sandbox %s of dead agent %s", found.sandbox_id, owner)
                with contextlib.suppress(AviatoError):
                    await self.runtime.stop(found.sandbox_id)
        for agent_id in sorted(dead):  # and its socket directory, if it lived here
            if await asyncio.to_thread(remove_dead_agent_dir, agent_id):
                log.info("removed the socket directory of dead agent %s", agent_id)

    async def _deregister(self) -> None:
        """Tell the scheduler we leave (best effort, briefly: it may be gone too)."""
        sock = self._sched
        if sock is None:
            return
        self._next_id += 1
        request_id = self._next_id
        msg = DeregisterAgent(self.agent_id, self.instance)
        try:
            await sock.send_multipart(encode(msg, request_id, token=self.token))
            async with asyncio.timeout(DEREGISTER_SECONDS):
                while True:  # the link's reader is stopped by now: read the reply here
                    frames = await sock.recv_multipart()
                    with contextlib.suppress(DecodeError):
                        if decode(frames).request_id == request_id:
                            log.info("agent %s left the cluster", self.agent_id)
                            return
        except (TimeoutError, zmq.ZMQError):
            log.info("agent %s: the scheduler did not take its deregistration", self.agent_id)

    async def _ask_scheduler(self, msg: Message, timeout: float) -> Message | None:
        """A request to the scheduler; None when it does not answer in time."""
        sock = self._sched
        assert sock is not None
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await sock.send_multipart(encode(msg, request_id, token=self.token))
            return await asyncio.wait_for(future, timeout)
        except (TimeoutError, zmq.ZMQError):
            return None
        finally:
            self._pending.pop(request_id, None)

    async def _scheduler_recv(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._last_heard = time.monotonic()
            try:
                decoded = decode(frames)
            except DecodeError as exc:
                log.warning("agent: undecodable message from the scheduler: %s", exc)
                continue
            msg = decoded.msg
            if isinstance(msg, PlaceSandbox):
                self._spawn(self._on_place(sock, decoded.request_id, msg.sandbox))
            elif isinstance(msg, StopSandbox):
                self._spawn(self._on_stop(sock, decoded.request_id, msg))
            elif isinstance(msg, PauseSandbox):
                self._spawn(self._on_pause(sock, decoded.request_id, msg))
            else:
                future = self._pending.get(decoded.request_id)
                if future is not None and not future.done():
                    future.set_result(msg)

    async def _reply_scheduler(
        self, sock: zmq.asyncio.Socket, request_id: int, msg: Message
    ) -> None:
        try:
            await sock.send_multipart(encode(msg, request_id, token=self.token))
        except zmq.ZMQError as exc:
            log.warning("could not answer the scheduler: %s", exc)

    async def _on_place(self, sock: zmq.asyncio.Socket, request_id: int, info: SandboxInfo) -> None:
        sid = info.sandbox_id
        if sid not in self.sandboxes:
            self.creating.add(sid)
            labels = sandbox_labels(sid, self.agent_id, info.spec, info.created_at, info.gpu_ids)
            spare = False
            try:
                if self.spares is not None:
                    spare = await self.spares.claim(sid, info.spec, info.created_at)
                    if not spare:
                        await self.spares.make_room()
                if not spare:
                    await self._create(sid, info.spec, labels)
            except Exception as exc:
                self._early_exits.pop(sid, None)
                log.info("create of %s failed: %s", sid, exc)
                if self.spares is not None:
                    self.spares.room_freed()
                    await self._resend_spares(sock)
                await self._reply_scheduler(sock, request_id, error_reply(exc))
                return
            finally:
                self.creating.discard(sid)
            if self.spares is not None and not spare:
                await self._resend_spares(sock)
            self.sandboxes[sid] = Running(info.spec, info.created_at, spare, info.gpu_ids)
        running = dataclasses.replace(info, status=SandboxStatus.RUNNING)
        await self._reply_scheduler(sock, request_id, SandboxReply(running))
        early = self._early_exits.pop(sid, None)
        if early is not None:
            await self._handle_exit(early)

    async def _resend_spares(self, sock: zmq.asyncio.Socket) -> None:
        """The scheduler counted the create it placed here as taking a spare of its
        shape; it took none (made afresh, or failed): our count, sent before the
        create's reply on the same socket, so that it arrives first. Its answer is
        not waited for."""
        assert self.spares is not None
        shapes = self.spares.ready_shapes()
        self._next_id += 1
        msg = AgentSpares(self.agent_id, sum(s.ready for s in shapes), shapes)
        with contextlib.suppress(zmq.ZMQError):
            await sock.send_multipart(encode(msg, self._next_id, token=self.token))

    async def _create(self, sid: str, spec: SandboxSpec, labels: dict[str, str]) -> None:
        """Create the sandbox with the supervisor's socket and library mounted in. A
        function worker's main command is the supervisor; any other sandbox gets one
        started beside its command, when the image has a Python (else exec and files
        go through the runtime, transparently)."""
        refused = refusal(spec, self.runtime.isolations, self.agent_id)
        if refused is not None:
            raise refused
        hub = self._hub
        assert hub is not None
        mounts = await hub.prepare(sid)
        try:
            # After the supervisor's: the local runtime finds those first.
            mounts += await self.volumes.mounts(sid, spec, self.allow_mounts)
            if spec.function_worker:
                command, args = supervisor_command()
                env = {**spec.env, **hub.worker_env()}
                spec = dataclasses.replace(spec, command=command, args=args, env=env)
            spec = with_gpus(spec, gpu_ids_of(labels), self.capacity.gpus)
            await self.runtime.create(sid, spec, labels, mounts)
            if spec.function_worker or self.runtime.supervisor_is_main:
                try:
                    await hub.wait_ready(sid, WORKER_START_SECONDS)
                except SandboxFailedError as exc:
                    output = b"".join(c.data for c in await self.runtime.logs(sid))
                    tail = output[-2000:].decode(errors="replace")
                    if tail.strip():
                        raise SandboxFailedError(
                            f"{exc}\n--- sandbox output:\n{tail}", sandbox_id=sid
                        ) from exc
                    raise
            await self.ports.open(sid, spec)  # once it runs: in its own namespace by now
        except BaseException:
            self.ports.close(sid)
            await hub.close(sid, "failed to start")
            await self.runtime.stop(sid)
            raise
        if not spec.function_worker and self.supervisor and not self.runtime.supervisor_is_main:
            self._spawn(self._supervise(sid))

    async def _supervise(self, sid: str) -> None:
        await self._start_supervisor(sid)

    async def _start_supervisor(self, sid: str) -> bool:
        """True once it said hello."""
        assert self._hub is not None
        command, args = supervisor_command("python3", functions=False)
        # A sidecar is its container's watchdog: it stops the container if we vanish.
        env = {**self._hub.worker_env(), "AVIATO_WATCHDOG": "container"}
        if await self.runtime.start_sidecar(sid, (command, *args), env):
            with contextlib.suppress(AviatoError):
                hello = await self._hub.wait_ready(sid, WORKER_START_SECONDS)
                log.debug("supervisor up in %s (python %s)", sid, hello.python)
                return hello.error is None
        self._hub.no_supervisor(sid, "no supervisor started (no python3 in the image?)")
        return False

    async def _spare_supervisor(self, sid: str) -> bool:
        """A spare's supervisor, up and connected: started beside its parker, or (a
        runtime whose supervisor is the main process) awaited."""
        if not self.runtime.supervisor_is_main:
            return await self._start_supervisor(sid)
        assert self._hub is not None
        with contextlib.suppress(AviatoError):
            hello = await self._hub.wait_ready(sid, WORKER_START_SECONDS)
            return hello.error is None
        return False

    async def _on_stop(self, sock: zmq.asyncio.Socket, request_id: int, msg: StopSandbox) -> None:
        was_running = msg.sandbox_id in self.sandboxes
        self._forget(msg.sandbox_id, msg.reason)
        if was_running:
            await self._keep_logs(msg.sandbox_id)
        try:
            # The runtime first: it kills the sandbox's whole process tree while the
            # supervisor still holds it together.
            await self.runtime.stop(msg.sandbox_id)
        except Exception as exc:
            await self._reply_scheduler(sock, request_id, error_reply(exc))
            return
        finally:
            if self._hub is not None:
                await self._hub.close(msg.sandbox_id, msg.reason)
        await self._reply_scheduler(sock, request_id, OkReply())

    async def _keep_logs(self, sandbox_id: str) -> None:
        """Its output, read before the runtime removes it: ``logs`` still answers."""
        try:
            async with asyncio.timeout(10):
                chunks = await self.runtime.logs(sandbox_id, tail_lines=KEPT_LOG_LINES)
                self.kept_logs.keep(sandbox_id, chunks)
        except Exception as exc:  # a stop goes on without them
            log.info("could not keep the logs of %s: %s", sandbox_id, exc)

    def _forget(self, sandbox_id: str, reason: str) -> None:
        self.lifecycle.forget(sandbox_id)
        self.ports.close(sandbox_id)
        if self.sandboxes.pop(sandbox_id, None) is not None and self.spares is not None:
            self.spares.room_freed()
        self.ended[sandbox_id] = reason
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)

    async def _exits_loop(self) -> None:
        async for exit_ in self.runtime.exits():
            if self.spares is not None:
                self.spares.on_exit(exit_.sandbox_id)
            if exit_.sandbox_id in self.creating:
                # Ended while starting: handled once its create is answered (the
                # scheduler must hear "running" before "exited"); a create still
                # waiting for the supervisor's hello fails now instead of timing out.
                self._early_exits[exit_.sandbox_id] = exit_
                if self._hub is not None and not self._hub.supervised(exit_.sandbox_id):
                    await self._hub.close(exit_.sandbox_id, f"exited with code {exit_.exit_code}")
                continue
            await self._handle_exit(exit_)

    async def _handle_exit(self, exit_: SandboxExit) -> None:
        if exit_.sandbox_id not in self.sandboxes:
            return
        reason = ""
        if exit_.oom_killed:
            reason = "killed: out of memory (raise memory_bytes)"
        how = reason or f"exited with code {exit_.exit_code}"
        self._forget(exit_.sandbox_id, how)
        await self._keep_logs(exit_.sandbox_id)  # the runtime kept them for the moment
        if self._hub is not None:
            await self._hub.close(exit_.sandbox_id, how)
        log.info(
            "sandbox %s exited (%s, oom=%s)", exit_.sandbox_id, exit_.exit_code, exit_.oom_killed
        )
        if self._sched is not None:
            # Best effort: a lost report is caught by the heartbeat's running list.
            await self._ask_scheduler(SandboxExited(exit_.sandbox_id, exit_.exit_code, reason), 2.0)

    # ------------------------------------------------------------------ lifecycle

    async def _report_activity(self) -> None:
        """The sandboxes busy since the last heartbeat (their idle clocks restart), in
        one message; its answer is not waited for (the next report repeats the busy)."""
        ids = self.lifecycle.take_activity()
        sock = self._sched
        if ids and sock is not None:
            self._next_id += 1
            msg = SandboxActivity(self.agent_id, ids)
            with contextlib.suppress(zmq.ZMQError):
                await sock.send_multipart(encode(msg, self._next_id, token=self.token))

    async def _on_pause(self, sock: zmq.asyncio.Socket, request_id: int, msg: PauseSandbox) -> None:
        try:
            await self.lifecycle.on_pause(msg)
        except Exception as exc:
            if not isinstance(exc, AviatoError):
                log.exception("agent: %s of %s failed", type(msg).__name__, msg.sandbox_id)
            await self._reply_scheduler(sock, request_id, error_reply(exc))
            return
        await self._reply_scheduler(sock, request_id, OkReply())
