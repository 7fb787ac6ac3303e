"""``Session``: shared defaults, a lease the scheduler watches, and cleanup at exit.

A session owns its channels (a :class:`Connections`) and its tasks (a
:class:`TaskGroup`): its sandboxes and pools use them, and closing it closes those
alone, never another session's on the same loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aviato._actor import ActorClass, check_max_concurrency
from aviato._actor_relay import ActorRelay
from aviato._connection import Connections
from aviato._defaults import SandboxDefaults
from aviato._function import (
    DEFAULT_MAX_RESULT_BYTES,
    FunctionOptions,
    RemoteFunction,
    Serialization,
)
from aviato._objects import ObjectManager, ObjectRef
from aviato._options import SandboxOptions
from aviato._output import OutputPrinter
from aviato._pool import FunctionPool
from aviato._sandbox import Sandbox, scheduler_connection
from aviato._tasks import TaskGroup
from aviato.exceptions import AviatoError, ConfigurationError, SandboxError
from aviato.protocol import PoolFigures, SessionClose, SessionKeepalive

__all__ = [
    "Session",
]


log = logging.getLogger("aviato.session")
T = TypeVar("T")
C = TypeVar("C")


class Session:
    """Made by ``Sandbox.session(defaults)``; use it as ``async with``."""

    def __init__(self, defaults: SandboxDefaults | None = None) -> None:
        self.defaults = defaults or SandboxDefaults()
        self.session_id = "ses-" + uuid.uuid4().hex[:16]
        self._sandboxes: list[Sandbox] = []
        self._closed = False
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._pools: dict[tuple[Any, ...], FunctionPool] = {}
        #: (pool, function name) -> (when, calls) at the last keepalive, for its rate.
        self._last_figures: dict[tuple[int, str], tuple[float, int]] = {}
        self._connections = Connections(f"the connections of session {self.session_id}")
        self._tasks = TaskGroup(f"session {self.session_id}")
        #: Its object refs (aviato/_objects.py), from the first put or fn.ref.
        self._objects: ObjectManager | None = None
        self._printer: OutputPrinter | None = None  # made at the first worker's output
        #: Its actors, reachable from its workers (aviato/_actor_relay.py): from the first.
        self._relay: ActorRelay | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Session {self.session_id} {state} sandboxes={self.sandbox_count}>"

    # ------------------------------------------------------------------ sandboxes

    def create(
        self,
        *,
        command: str | None = None,
        args: Sequence[str] | None = None,
        container_image: str | None = None,
        tags: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_lifetime_seconds: float | None = None,
        **kwargs: Any,
    ) -> Sandbox:
        """An unstarted sandbox inheriting this session's defaults (tags are combined)."""
        self._check_open()
        sandbox = Sandbox(
            command=command,
            args=args,
            container_image=container_image,
            tags=tags,
            env=env,
            max_lifetime_seconds=max_lifetime_seconds,
            _session=self,
            **kwargs,
        )
        self._sandboxes.append(sandbox)
        return sandbox

    @property
    def sandbox_count(self) -> int:
        """Sandboxes of this session that are started and not known to have ended."""
        return sum(1 for sb in self._sandboxes if _live(sb))

    def function(
        self,
        *,
        container_image: str | None = None,
        env: Mapping[str, str] | None = None,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        gpus: int | None = None,
        agent_labels: Mapping[str, str] | None = None,
        placement: str | None = None,
        network: str | None = None,
        serialization: Serialization = Serialization.PICKLE,
        retries: int = 2,
        retry_on: tuple[type[BaseException], ...] = (),
        timeout_seconds: float | None = None,
        max_workers: int | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> Callable[[Callable[..., T]], RemoteFunction[T]]:
        """Run a sync function in this session's pool of worker sandboxes::

            @session.function()
            def square(n): return n * n
            results = await asyncio.gather(*(square(i) for i in range(100)))
            values = [r.value for r in results]

        ``retries`` re-runs a call whose worker died (user exceptions are not retried
        unless their type is in ``retry_on``); ``timeout_seconds`` bounds each call;
        ``max_workers`` bounds the pool (default: the cluster's free slots);
        a result above ``max_result_bytes`` raises PayloadTooLargeError. Each worker
        sandbox asks for ``cpus``, ``memory_bytes``, ``gpus`` and ``agent_labels`` (see
        ``Sandbox``): a call runs on a worker placed where those fit."""
        self._check_open()
        if retries < 0:
            raise ValueError("retries must be >= 0")
        options = FunctionOptions(
            sandbox=self._worker_sandbox(
                container_image, env, memory_bytes, cpus, gpus, agent_labels, placement, network
            ),
            serialization=Serialization(serialization),
            retries=retries,
            retry_on=tuple(retry_on),
            timeout_seconds=timeout_seconds,
            max_workers=max_workers,
            max_result_bytes=max_result_bytes,
        )

        def decorate(fn: Callable[..., T]) -> RemoteFunction[T]:
            return RemoteFunction(fn, self, options)

        return decorate

    def cls(
        self,
        *,
        container_image: str | None = None,
        env: Mapping[str, str] | None = None,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        gpus: int | None = None,
        agent_labels: Mapping[str, str] | None = None,
        placement: str | None = None,
        network: str | None = None,
        serialization: Serialization = Serialization.PICKLE,
        timeout_seconds: float | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        max_restarts: int = 0,
        max_concurrency: int = 1,
    ) -> Callable[[type[C]], ActorClass[C]]:
        """An actor class: each instance lives in a worker sandbox of its own, built
        once (``__init__`` runs there), its method calls run in the order sent::

            @session.cls(cpus=1)
            class Model:
                def __init__(self, path): self.m = load(path)
                def predict(self, x): return self.m(x)
            m = Model("/models/a")          # a handle; building starts now
            r = await m.predict(3)          # FunctionResult

        A lost worker fails the calls under way with ``ActorLostError``; with
        ``max_restarts=N`` the next call builds the instance again (N times at most).
        ``max_concurrency=N`` (N > 1) runs up to N calls of an instance at once: sync
        methods on N threads of its worker, ``async def`` ones on one event loop there.
        See aviato/_actor.py."""
        self._check_open()
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ConfigurationError(f"max_restarts must be an int >= 0, not {max_restarts!r}")
        check_max_concurrency(max_concurrency)
        options = FunctionOptions(
            sandbox=self._worker_sandbox(
                container_image, env, memory_bytes, cpus, gpus, agent_labels, placement, network
            ),
            serialization=Serialization(serialization),
            retries=0,
            timeout_seconds=timeout_seconds,
            max_workers=1,
            max_result_bytes=max_result_bytes,
            max_concurrency=max_concurrency,
        )

        def decorate(cls: type[C]) -> ActorClass[C]:
            if not isinstance(cls, type):
                raise ConfigurationError(
                    f"@session.cls() needs a class, got {type(cls).__name__}: use "
                    "@session.function() for a function"
                )
            return ActorClass(cls, self, options, max_restarts)

        return decorate

    def _worker_sandbox(
        self,
        image: str | None,
        env: Mapping[str, str] | None,
        memory_bytes: int | None,
        cpus: float | None,
        gpus: int | None,
        agent_labels: Mapping[str, str] | None,
        placement: str | None,
        network: str | None,
    ) -> SandboxOptions:
        """The sandbox options of a function's (or an actor's) workers: what its
        decorator asked for, over the session's defaults."""
        mine = SandboxOptions(
            image=image,
            env=dict(env or {}),
            memory_bytes=memory_bytes,
            cpus=cpus,
            gpus=gpus,
            agent_labels=dict(agent_labels or {}),
            placement=placement,
            network=network,
        )
        return mine.over(self.defaults.options())

    def _output(self) -> OutputPrinter:
        """Where its workers' output is shown (aviato/_output.py)."""
        if self._printer is None:
            self._printer = OutputPrinter()
        return self._printer

    def _actor_relay(self) -> ActorRelay:
        """Made at the first actor: from then on the session's workers can call its
        actors through handles passed to them."""
        if self._relay is None:
            self._relay = ActorRelay(self)
            self._relay.start()
        return self._relay

    def _drop_pool(self, options: FunctionOptions) -> FunctionPool | None:
        """Forget the pool of ``options`` (an actor's, closed by its handle)."""
        return self._pools.pop(options.pool_key(), None)

    def _pool_for(self, options: FunctionOptions) -> FunctionPool:
        self._check_open()
        key = options.pool_key()
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = FunctionPool(self, options)
        elif options.max_workers is not None and (
            pool.max_workers is None or options.max_workers > pool.max_workers
        ):
            pool.max_workers = options.max_workers
        return pool

    async def put(self, value: Any) -> ObjectRef:
        """Keep ``value`` in the cluster: pickled once, held by an agent (the one this
        session's workers are on). Pass the ref to remote functions in place of the
        value; ``await ref.get()`` brings it back; ``ref.release()`` frees it."""
        return await self._object_manager().put(value)

    def _object_manager(self) -> ObjectManager:
        self._check_open()
        if self._objects is None:
            self._objects = ObjectManager(self)
        return self._objects

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError(
                f"session {self.session_id} is closed: create sandboxes inside "
                "`async with Sandbox.session(...)`"
            )

    async def _ensure_open(self) -> None:
        self._check_open()
        async with self._open_lock:
            if self._opened:
                return
            await self._renew()
            self._opened = True
            self._keepalive = self._tasks.spawn(self._keepalive_loop())

    async def _renew(self) -> None:
        conn = await scheduler_connection(self.defaults, self._connections)
        await conn.request(
            SessionKeepalive(self.session_id, self.defaults.lease_seconds, self._figures()),
            timeout=self.defaults.request_timeout_seconds,
        )

    def _figures(self) -> tuple[PoolFigures, ...]:
        """The session's functions for the dashboard, each with its calls per second
        since the last keepalive."""
        now = time.monotonic()
        out = []
        seen: dict[tuple[int, str], tuple[float, int]] = {}
        for pool in list(self._pools.values()):
            for f in pool.figures():
                key = (id(pool), f.name)
                at, calls = self._last_figures.get(key, (now, f.calls))
                rate = (f.calls - calls) / (now - at) if now > at else 0.0
                out.append(dataclasses.replace(f, calls_per_second=round(rate, 2)))
                seen[key] = (now, f.calls)
        self._last_figures = seen
        return tuple(out)

    async def _keepalive_loop(self) -> None:
        interval = max(0.05, self.defaults.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
            except AviatoError as exc:
                log.warning("session %s: keepalive failed: %s", self.session_id, exc)

    async def __aenter__(self) -> Session:
        try:
            await self._ensure_open()
        except BaseException:
            await self.close()  # no __aexit__ comes: its channels must not stay open
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every sandbox this session started that is still running, concurrently."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.gather(*(pool.close() for pool in self._pools.values()))
            if self._objects is not None:  # after the pools: no call keeps a result now
                await self._objects.close()
            results = await asyncio.gather(
                *(sb.stop() for sb in self._sandboxes if _live(sb) or sb._starting is not None),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, AviatoError):
                    log.warning(
                        "session %s: stopping a sandbox failed: %r", self.session_id, result
                    )
            if self._keepalive is not None:
                self._keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._keepalive
            if self._opened:
                # The scheduler also stops anything of ours we did not know about.
                with contextlib.suppress(AviatoError):
                    conn = await scheduler_connection(self.defaults, self._connections)
                    await conn.request(
                        SessionClose(self.session_id),
                        timeout=self.defaults.request_timeout_seconds,
                    )
        finally:
            try:
                # Raises what failed in a task of ours with no one else to tell.
                await self._tasks.close()
            finally:
                self._connections.close()
                if self._printer is not None:  # what its workers printed, all shown
                    await asyncio.to_thread(self._printer.close)


def _live(sb: Sandbox) -> bool:
    info = sb.info
    return info is not None and not sb._stopped_by_us and not info.status.is_terminal
