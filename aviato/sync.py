"""The blocking API, for scripts and notebooks: the async API's twin, call for call::

    from aviato import sync
    with sync.session(SandboxDefaults(container_image="python:3.11")) as s:
        sb = s.create(command="sleep", args=["infinity"])     # started
        print(sb.exec(["echo", "hi"]).stdout)                  # b'hi\\n'
        square = s.function()(lambda n: n * n)
        print([r.value for r in square.map(range(10))])
        ref = s.put(big_value)                                 # a SyncObjectRef
        out = square.ref(ref)                                  # kept in the cluster
        print(out.get())

A session runs the async API on an event loop of its own, in a thread of its own, so
it works where a loop already runs in the caller's thread (Jupyter) and in plain
scripts alike. Each call blocks until its result is there. Ctrl-C cancels the call in
flight (what it started is stopped, as a cancelled async call's is) and, leaving the
``with`` block, the session stops every sandbox it made.

Methods named here are typed twins of the async ones. Any other coroutine method of
a sandbox (or of what one returns) is reached the same way, blocking, through
:class:`Blocking`, and an async iterator becomes a plain one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from types import TracebackType
from typing import Any, Generic, TypeVar

from aviato._actor import ActorClass, ActorHandle
from aviato._connection import close_all
from aviato._defaults import SandboxDefaults
from aviato._function import FunctionResult, RemoteFunction
from aviato._objects import ObjectRef
from aviato._sandbox import Sandbox
from aviato._session import Session
from aviato._types import ExecResult, OutputChunk
from aviato.exceptions import ConfigurationError, SandboxTimeoutError
from aviato.protocol import ObjectSource, SandboxStatus

__all__ = [
    "Blocking",
    "Portal",
    "SyncActor",
    "SyncActorClass",
    "SyncFunction",
    "SyncObjectRef",
    "SyncSandbox",
    "SyncSession",
    "session",
    "wait",
]

T = TypeVar("T")
R = TypeVar("R")

#: How long a cancelled call (Ctrl-C) gets to clean up before the caller moves on.
CANCEL_GRACE = 30.0
#: How long closing a session's loop thread may take once the session is closed.
THREAD_EXIT = 10.0


class Portal:
    """An event loop in a thread of its own, and blocking calls into it."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    @property
    def closed(self) -> bool:
        return self._loop.is_closed() or not self._thread.is_alive()

    def call(self, work: Awaitable[R], timeout: float | None = None) -> R:
        """Run ``work`` on the loop and block for its result (its error, raised here).
        Ctrl-C (or any interrupt) while waiting cancels it, waits for it to finish
        cleaning up (at most CANCEL_GRACE), and re-raises."""
        if threading.current_thread() is self._thread or self.closed:
            if inspect.iscoroutine(work):
                work.close()  # never to run: no "never awaited" warning
            if self.closed:
                raise ConfigurationError("this sync session is closed: open a new one")
            raise RuntimeError("a blocking aviato call from inside the session's own loop")
        finished = threading.Event()

        async def run() -> R:
            try:
                return await work
            finally:
                finished.set()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            finished.wait(CANCEL_GRACE)
            raise SandboxTimeoutError(f"no result within {timeout} s (cancelled)") from None
        except BaseException:
            # KeyboardInterrupt and the like: the call is ours to cancel, not to orphan.
            future.cancel()
            finished.wait(CANCEL_GRACE)
            raise

    def submit(self, work: Coroutine[Any, Any, R]) -> concurrent.futures.Future[R]:
        """Start ``work`` on the loop; a future to block on (or to pass to :func:`wait`)."""
        if self.closed:
            raise ConfigurationError("this sync session is closed: open a new one")
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def iterate(self, source: AsyncIterator[R]) -> Iterator[R]:
        """An async iterator as a blocking one (closed with it, also when left early)."""
        try:
            while True:
                try:
                    yield self.call(anext(source))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None and not self.closed:
                self.call(aclose())

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(THREAD_EXIT)


def _blocking(portal: Portal, value: Any) -> Any:
    """What an async call returned, as the sync API hands it back."""
    if isinstance(value, Sandbox):
        return SyncSandbox(portal, value)
    if isinstance(value, list):
        return [_blocking(portal, v) for v in value]
    if isinstance(value, AsyncIterator):
        return portal.iterate(value)
    if type(value).__module__.startswith("aviato.") and any(
        inspect.iscoroutinefunction(getattr(type(value), n, None)) for n in dir(type(value))
    ):
        return Blocking(portal, value)
    return value


class Blocking:
    """Any aviato object with coroutine methods, its methods made blocking: a coroutine
    method returns its result, an async iterator method returns a plain iterator."""

    def __init__(self, portal: Portal, target: Any) -> None:
        self._portal = portal
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if inspect.iscoroutinefunction(attr):

            def call(*args: Any, **kwargs: Any) -> Any:
                return _blocking(self._portal, self._portal.call(attr(*args, **kwargs)))

            return call
        if inspect.isasyncgenfunction(attr):

            def iterate(*args: Any, **kwargs: Any) -> Any:
                return self._portal.iterate(attr(*args, **kwargs))

            return iterate
        return attr

    def __repr__(self) -> str:
        return f"<blocking {self._target!r}>"


class SyncSandbox(Blocking):
    """A sandbox, blocking: ``sb.exec([...])`` returns the ``ExecResult``."""

    _target: Sandbox

    def __init__(self, portal: Portal, sandbox: Sandbox) -> None:
        super().__init__(portal, sandbox)

    @property
    def sandbox(self) -> Sandbox:
        """The async sandbox behind it (use it only on the session's loop)."""
        return self._target

    @property
    def sandbox_id(self) -> str | None:
        return self._target.sandbox_id

    def start(self) -> str:
        return self._portal.call(self._target.start())

    def stop(self) -> None:
        self._portal.call(self._target.stop())

    def status(self) -> SandboxStatus:
        return self._portal.call(self._target.status())

    def wait(self, timeout: float | None = None) -> int | None:
        return self._portal.call(self._target.wait(timeout))

    def exec(self, command: Sequence[str], **kwargs: Any) -> ExecResult:
        return self._portal.call(self._target.exec(command, **kwargs))

    def exec_stream(self, command: Sequence[str], **kwargs: Any) -> Iterator[OutputChunk]:
        """The command's output as it comes (its result: ``exec``)."""
        return self._portal.iterate(aiter(self._target.exec_stream(command, **kwargs)))

    def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        return self._portal.call(self._target.read_file(path, max_bytes=max_bytes))

    def write_file(self, path: str, data: bytes, **kwargs: Any) -> None:
        self._portal.call(self._target.write_file(path, data, **kwargs))

    def logs(self) -> bytes:
        return self._portal.call(self._target.logs())

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SyncFunction(Generic[T]):
    """A remote function, blocking: ``f(x)`` returns its ``FunctionResult``;
    ``f.submit(x)`` starts the call and returns a future; ``map``/``starmap`` yield
    results as the async ones do."""

    def __init__(self, portal: Portal, remote: RemoteFunction[T]) -> None:
        self._portal = portal
        self.remote = remote

    def __repr__(self) -> str:
        return f"<sync {self.remote!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> FunctionResult[T]:
        return self._portal.call(self._call(args, kwargs))

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[FunctionResult[T]]:
        """Start one call; block on ``.result()`` when you want it (see :func:`wait`)."""
        return self._portal.submit(self._call(args, kwargs))

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FunctionResult[T]:
        return await self.remote(*args, **kwargs)

    def ref(self, *args: Any, **kwargs: Any) -> SyncObjectRef:
        """Start one call whose result stays in the cluster (``RemoteFunction.ref``)."""

        async def make() -> ObjectRef:  # on the loop: the ref's call starts there
            return self.remote.ref(*args, **kwargs)

        return SyncObjectRef(self._portal, self._portal.call(make()))

    def map(
        self, iterable: Iterable[Any], **kwargs: Any
    ) -> Iterator[FunctionResult[T] | BaseException]:
        return self._portal.iterate(self.remote.map(iterable, **kwargs))

    def starmap(
        self, iterable: Iterable[Iterable[Any]], **kwargs: Any
    ) -> Iterator[FunctionResult[T] | BaseException]:
        return self._portal.iterate(self.remote.starmap(iterable, **kwargs))

    def statistics(self) -> Any:
        return self.remote.statistics()


class SyncObjectRef:
    """An object ref, blocking (``SyncSession.put``, ``SyncFunction.ref``): pass it to
    remote functions in place of the value; ``ref.get()`` returns the value;
    ``ref.release()`` frees it (the session's close frees the rest)."""

    __slots__ = ("_portal", "ref")

    def __init__(self, portal: Portal, ref: ObjectRef) -> None:
        self._portal = portal
        #: The async ref behind it (use it only on the session's loop).
        self.ref = ref

    def __repr__(self) -> str:
        return f"<sync {self.ref!r}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Among a call's arguments (pickled on the session's loop): the ref it wraps.
        return self.ref.__reduce_ex__(protocol)

    @property
    def object_id(self) -> str:
        return self.ref.object_id

    @property
    def source(self) -> ObjectSource | None:
        """The agent holding it, once known."""
        return self.ref.source

    def get(self, *, timeout: float | None = None) -> Any:
        """The value (a ``fn.ref``'s: once its call is done; its error if it failed)."""
        return self._portal.call(self.ref.get(timeout=timeout))

    def release(self) -> None:
        """Free the value where it is held. Idempotent; nothing to do once the session
        is closed (its close freed it)."""
        if self._portal.closed:
            return

        async def release() -> None:  # on the loop: the release is a task of the session's
            self.ref.release()

        self._portal.call(release())


class SyncActorClass(Generic[T]):
    """An actor class, blocking: calling it makes a :class:`SyncActor`."""

    def __init__(self, portal: Portal, actor_class: ActorClass[T]) -> None:
        self._portal = portal
        self.actor_class = actor_class

    def __call__(self, *args: Any, **kwargs: Any) -> SyncActor[T]:
        async def make() -> ActorHandle[T]:  # on the loop: the handle starts the build
            return self.actor_class(*args, **kwargs)

        return SyncActor(self._portal, self._portal.call(make()))


class SyncActor(Generic[T]):
    """An actor instance, blocking: ``m.predict(3)`` returns the ``FunctionResult``."""

    def __init__(self, portal: Portal, handle: ActorHandle[T]) -> None:
        self._portal = portal
        self.handle = handle

    def __repr__(self) -> str:
        return f"<sync {self.handle!r}>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.handle.__reduce_ex__(protocol)  # passed to a function: as its handle

    def __getattr__(self, name: str) -> Callable[..., FunctionResult[Any]]:
        # AttributeError for what the class lacks
        method: Callable[..., asyncio.Future[FunctionResult[Any]]] = getattr(self.handle, name)

        def call(*args: Any, **kwargs: Any) -> FunctionResult[Any]:
            async def run() -> FunctionResult[Any]:
                return await method(*args, **kwargs)

            return self._portal.call(run())

        return call

    def ready(self) -> None:
        self._portal.call(self.handle.ready())

    def close(self) -> None:
        self._portal.call(self.handle.close())


class SyncSession:
    """A session, blocking (see the module's docstring). Use it as ``with``."""

    def __init__(self, defaults: SandboxDefaults | None = None) -> None:
        self.defaults = defaults or SandboxDefaults()
        self._portal: Portal | None = None
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        """The async session behind it."""
        if self._session is None:
            raise ConfigurationError("the sync session is not open: use it as `with`")
        return self._session

    @property
    def portal(self) -> Portal:
        if self._portal is None:
            raise ConfigurationError("the sync session is not open: use it as `with`")
        return self._portal

    def __enter__(self) -> SyncSession:
        portal = Portal("aviato-sync")
        try:
            session = Session(self.defaults)
            portal.call(session.__aenter__())
        except BaseException:
            portal.close()
            raise
        self._portal, self._session = portal, session
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every sandbox of the session, then its loop thread."""
        portal, session = self._portal, self._session
        if portal is None or session is None:
            return
        self._portal = self._session = None
        try:
            portal.call(session.close())
            portal.call(_close_defaults())
        finally:
            portal.close()

    @property
    def sandbox_count(self) -> int:
        """Sandboxes of this session that are started and not known to have ended."""
        return self.session.sandbox_count

    def create(self, *, start: bool = True, **kwargs: Any) -> SyncSandbox:
        """A sandbox of this session (as ``Session.create``), started unless
        ``start=False``."""
        sandbox = SyncSandbox(self.portal, self.session.create(**kwargs))
        if start:
            sandbox.start()
        return sandbox

    def function(self, **options: Any) -> Callable[[Callable[..., T]], SyncFunction[T]]:
        """``Session.function``, blocking: ``s.function()(fn)(x)`` returns the result."""
        decorate = self.session.function(**options)

        def wrap(fn: Callable[..., T]) -> SyncFunction[T]:
            return SyncFunction(self.portal, decorate(fn))

        return wrap

    def cls(self, **options: Any) -> Callable[[type[T]], SyncActorClass[T]]:
        """``Session.cls``, blocking: ``s.cls()(Model)("/models/a").predict(3)``."""
        decorate = self.session.cls(**options)

        def wrap(cls: type[T]) -> SyncActorClass[T]:
            return SyncActorClass(self.portal, decorate(cls))

        return wrap

    def put(self, value: Any) -> SyncObjectRef:
        """``Session.put``, blocking: ``value`` kept in the cluster, as a ref."""
        return SyncObjectRef(self.portal, self.portal.call(self.session.put(value)))

    def from_id(self, sandbox_id: str) -> SyncSandbox:
        """Reconnect to a sandbox by id, with this session's defaults."""
        found = self.portal.call(Sandbox.from_id(sandbox_id, defaults=self.defaults))
        return SyncSandbox(self.portal, found)

    def list(self, **kwargs: Any) -> list[SyncSandbox]:
        """``Sandbox.list`` with this session's defaults."""
        kwargs.setdefault("defaults", self.defaults)
        found = self.portal.call(Sandbox.list(**kwargs))
        return [SyncSandbox(self.portal, sb) for sb in found]

    def run(self, work: Awaitable[R]) -> R:
        """Any awaitable of the async API, on this session's loop (an escape hatch)."""
        return self.portal.call(work)


async def _close_defaults() -> None:
    close_all()  # the loop's own connections (from_id, list), on the loop


def session(defaults: SandboxDefaults | None = None) -> SyncSession:
    """A blocking session: ``with sync.session(defaults) as s: ...``."""
    return SyncSession(defaults)


W = TypeVar("W", bound="concurrent.futures.Future[Any] | SyncObjectRef")


def wait(
    futures: Sequence[W],
    *,
    num_returns: int = 1,
    timeout: float | None = None,
) -> tuple[list[W], list[W]]:
    """``aviato.wait`` for the futures ``SyncFunction.submit`` returns and for object
    refs (one is done once its call is): ``(done, pending)``, each in the order given,
    ``done`` at most ``num_returns`` long."""
    given = list(futures)
    if len({id(f) for f in given}) != len(given):
        raise ConfigurationError("wait: the same future is given twice")
    if isinstance(num_returns, bool) or not 0 < num_returns <= len(given):
        raise ConfigurationError(
            f"num_returns must be between 1 and the number of futures ({len(given)}), "
            f"not {num_returns!r}"
        )
    if timeout is not None and not timeout >= 0:
        raise ConfigurationError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    watched = [_settles(f) for f in given]
    gate = threading.Condition()

    def finished(_: object) -> None:
        with gate:
            gate.notify_all()

    try:
        for f in watched:
            f.add_done_callback(finished)
        with gate:
            gate.wait_for(lambda: sum(f.done() for f in watched) >= num_returns, timeout)
        settled = [f.done() for f in watched]
    finally:
        for item, f in zip(given, watched, strict=True):
            if f is not item:
                f.cancel()  # a ref's watcher, on its session's loop: not left behind
    done: list[W] = []
    pending: list[W] = []
    for item, is_done in zip(given, settled, strict=True):
        (done if is_done and len(done) < num_returns else pending).append(item)
    return done, pending


def _settles(
    item: concurrent.futures.Future[Any] | SyncObjectRef,
) -> concurrent.futures.Future[Any]:
    """What is done when ``item`` is: itself, or for a ref a watcher of where it is held."""
    if not isinstance(item, SyncObjectRef):
        return item

    async def settled() -> None:
        await asyncio.wait([item.ref._ready])

    return item._portal.submit(settled())
