"""Actors: ``@session.cls()`` makes a class whose instances each live in a worker
sandbox of their own, built once, their method calls run there in the order sent::

    @session.cls(cpus=1)
    class Model:
        def __init__(self, path): self.m = load(path)   # once, in the instance's worker
        def predict(self, x): return self.m(x)

    m = Model("/models/a")        # a handle; the instance is being built meanwhile
    r = await m.predict(3)        # FunctionResult
    await m.close()               # also when the session ends

How: an instance is a function pool of its own (one worker) running one function,
a closure of the class and its constructor's arguments that builds the instance at
its first call in a worker and keeps it there; a method call is a call of it naming
the method. When the worker is lost, the calls under way fail with
``ActorLostError`` (the instance's state went with it). With ``max_restarts=N`` the
next call builds the instance again in a new worker (``__init__`` runs again), up
to N times; after that every call fails with ``ActorLostError`` at once.

``max_concurrency=N`` (N > 1): the pool keeps up to N calls running on the worker (and
N more queued there), and the worker runs them at once (agent/supervisor_concurrent.py):
sync methods on N threads, ``async def`` methods on the instance's one event loop. Its
calls then finish in any order; a lost worker fails every call it held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aviato._buffers import _Reduce
from aviato._function import FunctionOptions, FunctionResult, RemoteFunction, Serialization
from aviato.exceptions import (
    ActorLostError,
    ConfigurationError,
    FunctionSerializationError,
    SandboxTimeoutError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from aviato._session import Session

C = TypeVar("C")

#: The method name that only builds the instance (the handle's background start).
_BUILD = "__aviato_build__"
#: The worker's module whose ActorStub a handle unpickles as (agent/worker_actors.py,
#: mounted in every worker as this name).
WORKER_MODULE = "aviato_worker_actors"


class _Stub:
    """Pickles as the worker's ``aviato_worker_actors.ActorStub`` (pickle wants a
    callable in a reduction; this one is only ever called in a worker, as that class)."""

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError("an actor handle's stub is made in a worker only")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return getattr, (_Reduce(importlib.import_module, (WORKER_MODULE,)), "ActorStub")


_STUB = _Stub()


#: ``max_concurrency`` at most: each call running at once holds a thread of the worker,
#: under its sandbox's process limit (1024 by default).
MAX_CONCURRENCY = 512
#: The attribute of an actor's dispatch function that tells its worker how many of its
#: calls to run at once (agent/supervisor_concurrent.py reads it).
CONCURRENCY_ATTRIBUTE = "__aviato_max_concurrency__"


def check_max_concurrency(value: object) -> int:
    """``value`` if it is a valid ``max_concurrency``; a ConfigurationError if not."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigurationError(
            f"max_concurrency must be an int from 1 to {MAX_CONCURRENCY}, not {value!r}: 1 "
            "runs an instance's calls one at a time in the order sent; N runs up to N at "
            "once (sync methods on N threads, async def methods on one event loop)"
        )
    return value


def _dispatcher(
    cls: type, args: tuple[Any, ...], kwargs: dict[str, Any], key: str, max_concurrency: int
) -> Any:
    """The function an instance's worker runs: it builds the instance at its first
    call in that worker process and keeps it (under ``key``) for the calls after. An
    ``async def`` method runs on the instance's own event loop (a thread of the worker),
    so that with ``max_concurrency`` > 1 its calls run there at once. Self-contained:
    shipped by value to a sandbox that has no aviato package."""

    def dispatch(method: str, *call_args: Any, **call_kwargs: Any) -> Any:
        import sys
        import threading
        import types

        store = sys.modules.get("__aviato_actors__")
        if store is None:
            blank = types.ModuleType("__aviato_actors__")
            store = sys.modules.setdefault("__aviato_actors__", blank)
        # setdefault is atomic: two first calls on two threads get one state.
        state = store.__dict__.get(key) or store.__dict__.setdefault(
            key, {"lock": threading.Lock()}
        )
        if "instance" not in state:
            with state["lock"]:  # __init__ once, before any method (others wait here)
                if "instance" not in state:
                    state["instance"] = cls(*args, **kwargs)
        if method == _BUILD:
            return None
        out = getattr(state["instance"], method)(*call_args, **call_kwargs)
        if not isinstance(out, types.CoroutineType):
            return out
        import asyncio

        with state["lock"]:
            loop = state.get("loop")
            if loop is None:
                loop = state["loop"] = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name=key, daemon=True).start()
        return asyncio.run_coroutine_threadsafe(out, loop).result()

    dispatch.__qualname__ = f"{cls.__qualname__}.<actor>"
    # The class's module is what the sandbox may lack: shipped by value, as a
    # function's module is (RemoteFunction.shipped registers it by this name).
    dispatch.__module__ = cls.__module__
    setattr(dispatch, CONCURRENCY_ATTRIBUTE, max_concurrency)
    return dispatch


class ActorClass(Generic[C]):
    """What ``@session.cls()`` makes of a class: call it to make an instance (a handle)."""

    def __init__(
        self, cls: type[C], session: Session, options: FunctionOptions, max_restarts: int
    ) -> None:
        self._cls = cls
        self._session = session
        self._options = options
        self._max_restarts = max_restarts
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __repr__(self) -> str:
        return f"<ActorClass {self._cls.__qualname__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> ActorHandle[C]:
        key = f"{self._cls.__qualname__}-{uuid.uuid4().hex[:12]}"
        # A pool of its own: one worker, nothing retried (the state dies with it).
        options = dataclasses.replace(self._options, actor=key, max_workers=1, retries=0)
        dispatch = _dispatcher(self._cls, args, kwargs, key, options.max_concurrency)
        remote: RemoteFunction[Any] = RemoteFunction(dispatch, self._session, options)
        handle = ActorHandle(self._cls, remote, key, self._max_restarts)
        self._session._actor_relay().add(handle)  # reachable from the session's workers
        return handle


class ActorHandle(Generic[C]):
    """One instance: ``await handle.method(...)`` runs the method in its worker."""

    def __init__(
        self, cls: type[C], remote: RemoteFunction[Any], key: str, max_restarts: int
    ) -> None:
        self._cls = cls
        self._remote = remote
        self.actor_id = key
        self._restarts_left = max_restarts
        self._restarts = 0
        #: Bumped at each loss: the calls of an older generation failing later are
        #: of the same lost worker, not another loss.
        self._generation = 0
        self._lost: ActorLostError | None = None
        #: Calls sent and not settled: (what the caller holds, the pool's call).
        self._outstanding: set[tuple[asyncio.Future[Any], asyncio.Future[Any]]] = set()
        self._closed = False
        self._built = self._submit(_BUILD, (), {})  # the instance is being built now

    def __repr__(self) -> str:
        state = "closed" if self._closed else "lost" if self._lost else "live"
        return f"<ActorHandle {self.actor_id} {state}>"

    @property
    def restarts(self) -> int:
        """How many times the instance was built again after losing its worker."""
        return self._restarts

    async def ready(self) -> None:
        """Wait until the instance is built (its ``__init__``'s error, if it failed)."""
        await self._built

    def __getattr__(self, name: str) -> Callable[..., asyncio.Future[FunctionResult[Any]]]:
        if name.startswith("__") or not callable(getattr(self._cls, name, None)):
            raise AttributeError(f"{self._cls.__qualname__} has no method {name!r}")

        def method(*args: Any, **kwargs: Any) -> asyncio.Future[FunctionResult[Any]]:
            return self._submit(name, args, kwargs)

        method.__name__ = name
        return method

    def _submit(
        self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> asyncio.Future[FunctionResult[Any]]:
        return self._track(name, lambda: self._remote(name, *args, **kwargs))

    def _relay(self, name: str, blob: bytes) -> asyncio.Future[FunctionResult[Any]]:
        """A call from a worker of the session (aviato/_actor_relay.py): its arguments
        pickled there, run as they are; its value is ``(pickle, buffers)`` unopened, a
        method's error a ``RelayedError``. The same order and loss as any call here."""
        if name.startswith("__") or not callable(getattr(self._cls, name, None)):
            raise ConfigurationError(f"{self._cls.__qualname__} has no method {name!r}")
        remote = self._remote
        return self._track(name, lambda: remote._pool().submit(remote, blob, raw=True))

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Passed to a function or an actor: its worker gets a stub that calls this
        # instance through its agent and this session (agent/worker_actors.py).
        if self._closed:
            raise FunctionSerializationError(
                f"actor {self.actor_id} is closed: its handle cannot be passed any more"
            )
        methods = tuple(
            sorted(
                name
                for name in dir(self._cls)
                if not name.startswith("__") and callable(getattr(self._cls, name, None))
            )
        )
        json = self._remote.options.serialization is Serialization.JSON
        return _STUB, (self.actor_id, self._cls.__qualname__, methods, json)

    def _track(
        self, name: str, start: Callable[[], asyncio.Future[FunctionResult[Any]]]
    ) -> asyncio.Future[FunctionResult[Any]]:
        if self._closed:
            raise ConfigurationError(f"actor {self.actor_id} is closed")
        if self._lost is not None:
            failed: asyncio.Future[FunctionResult[Any]] = asyncio.get_running_loop().create_future()
            failed.set_exception(self._lost)
            return failed
        inner = start()
        generation = self._generation
        outer: asyncio.Future[FunctionResult[Any]] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[FunctionResult[Any]]) -> None:
            if outer.done():
                return
            if done.cancelled():
                outer.cancel()
                return
            exc = done.exception()
            if isinstance(exc, WorkerLostError):
                outer.set_exception(self._worker_lost(name, exc, generation))
            elif isinstance(exc, SandboxTimeoutError):
                # Its worker was replaced: the instance's state went with it too.
                self._worker_lost(name, exc, generation)
                outer.set_exception(exc)
            elif exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(done.result())

        def cancel_inner(done: asyncio.Future[FunctionResult[Any]]) -> None:
            if done.cancelled():
                inner.cancel()  # the caller gave up: so does the call

        pair = (outer, inner)
        self._outstanding.add(pair)
        inner.add_done_callback(settle)
        outer.add_done_callback(cancel_inner)
        outer.add_done_callback(lambda _: self._outstanding.discard(pair))
        return outer

    def _worker_lost(self, method: str, cause: BaseException, generation: int) -> ActorLostError:
        if generation == self._generation:  # the first news of this loss
            self._generation += 1
            if self._restarts_left > 0:
                self._restarts_left -= 1
                self._restarts += 1
                self._built = self._submit(_BUILD, (), {})
            else:
                self._lost = ActorLostError(
                    f"actor {self.actor_id} is gone: its worker was lost and no restarts "
                    f"are left (max_restarts)"
                )
                # The calls still queued would build a new instance: they fail instead.
                for outer, inner in list(self._outstanding):
                    if not outer.done():
                        outer.set_exception(self._lost)
                    inner.cancel()
        error = ActorLostError(
            f"actor {self.actor_id}: its worker was lost during {method}() ({cause}); "
            + (
                "no restarts left (max_restarts): the instance is gone"
                if self._lost is not None
                else "the next call builds the instance again (max_restarts)"
            )
        )
        error.__cause__ = cause
        return error

    async def close(self) -> None:
        """Stop the instance's worker (the session does it at its end otherwise)."""
        if self._closed:
            return
        self._closed = True
        session = self._remote._session
        if session._relay is not None:
            session._relay.handles.pop(self.actor_id, None)
        pool = session._drop_pool(self._remote.options)
        if pool is not None:
            await pool.close()
