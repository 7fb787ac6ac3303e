"""Remote functions: ``@session.function()`` and what a call gives back.

Calling a remote function queues the call at once and returns an asyncio future;
awaiting it gives a :class:`FunctionResult` whose ``.value`` is the return value,
or raises the function's own exception (with the remote traceback attached).
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import hashlib
import inspect
import json
import os
import pickle
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import cloudpickle

from aviato import _buffers, _objects, exceptions
from aviato._options import SandboxOptions
from aviato.exceptions import (
    AsyncFunctionError,
    ConfigurationError,
    FunctionError,
    FunctionSerializationError,
)

# How arguments and results travel: the link's enum, as it goes on the wire.
from aviato.link import Serialization as Serialization

if TYPE_CHECKING:
    from aviato._objects import ObjectRef
    from aviato._pool import FunctionPool, PoolStatistics
    from aviato._session import Session

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "FunctionOptions",
    "FunctionResult",
    "RemoteFunction",
    "Serialization",
    "Shipped",
    "by_value",
    "decode_value",
    "rebuild_error",
]

T = TypeVar("T")
#: Results above this are refused by the worker (PayloadTooLargeError), not shipped.
DEFAULT_MAX_RESULT_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FunctionResult(Generic[T]):
    """One call's outcome: ``value``, and where and how it ran."""

    value: T
    sandbox_id: str
    attempts: int
    seconds: float  # time the function itself ran, inside the sandbox


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    #: Its workers' sandbox options, merged over the session's defaults.
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)
    serialization: Serialization = Serialization.PICKLE
    retries: int = 2
    retry_on: tuple[type[BaseException], ...] = ()
    timeout_seconds: float | None = None
    max_workers: int | None = None
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    #: An actor instance's key: its pool is its own ("": calls share pools by shape).
    actor: str = ""
    #: An actor's calls its one worker may run at once (``@session.cls(max_concurrency=)``).
    max_concurrency: int = 1
    _pool_key: tuple[Any, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        # Made once: every call asks for it (per call it cost a fifth of the client's
        # time in a burst of no-op calls).
        key = self.sandbox.key()
        object.__setattr__(self, "_pool_key", (*key, self.actor) if self.actor else key)

    def pool_key(self) -> tuple[Any, ...]:
        """Calls whose sandboxes look the same share one pool of workers."""
        return self._pool_key


@dataclass(slots=True)
class Shipped:
    """A function pickled once: its bytes and their digest (the worker's cache key)."""

    blob: bytes
    digest: str
    name: str


class RemoteFunction(Generic[T]):
    """What ``@session.function()`` makes of a sync function."""

    def __init__(self, fn: Callable[..., T], session: Session, options: FunctionOptions) -> None:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise AsyncFunctionError(
                f"{fn.__qualname__} is an async def: @session.function() runs sync "
                "functions in worker processes; make it a plain def"
            )
        if not callable(fn):
            raise TypeError(f"@session.function() needs a function, got {type(fn).__name__}")
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._session = session
        self.options = options
        self._shipped: Shipped | None = None

    @property
    def name(self) -> str:
        return getattr(self._fn, "__qualname__", repr(self._fn))

    def __repr__(self) -> str:
        return f"<RemoteFunction {self.name}>"

    def shipped(self) -> Shipped:
        """Pickle the function once, at its first call."""
        if self._shipped is None:
            by_value(getattr(self._fn, "__module__", None))
            try:
                blob = cloudpickle.dumps(self._fn, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise FunctionSerializationError(
                    f"function {self._fn.__qualname__} cannot be pickled: {exc} "
                    "(it, or a global it uses, holds something like a lock or a socket)"
                ) from exc
            digest = hashlib.sha256(blob).hexdigest()[:24]
            self._shipped = Shipped(blob, digest, self._fn.__qualname__)
        return self._shipped

    def encode_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, _buffers.Frames]:
        name = self._fn.__qualname__
        if self.options.serialization is Serialization.JSON:
            try:
                return json.dumps([args, kwargs]).encode(), _buffers.Frames()
            except (TypeError, ValueError) as exc:
                raise FunctionSerializationError(
                    f"arguments of {name}() are not JSON ({exc}); use "
                    "serialization=Serialization.PICKLE for other types"
                ) from exc
        for value in (*args, *kwargs.values()):
            by_value(type(value).__module__)
        try:
            return _buffers.dumps_args(args, kwargs)
        except Exception as exc:
            raise FunctionSerializationError(
                f"{_culprit(args, kwargs)} of {name}() cannot be pickled: {exc}"
            ) from exc

    def __call__(self, *args: Any, **kwargs: Any) -> asyncio.Future[FunctionResult[T]]:
        """Queue one call now; await the returned future for its result. Large buffers
        in the arguments (numpy arrays, bytes, memoryviews) are sent without a copy when
        the call is: change none of them until it has been (awaiting it is enough)."""
        self.shipped()
        if not _objects.made_any:  # no ref exists: none can be among the arguments
            blob, frames = self.encode_args(args, kwargs)
            return self._pool().submit(self, blob, frames)
        with _objects.collecting() as refs:
            blob, frames = self.encode_args(args, kwargs)
        if refs:  # the worker's agent hands it their values
            return self._session._object_manager().call(self, blob, frames, refs)
        return self._pool().submit(self, blob, frames)

    def ref(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Start one call whose result stays in the cluster, on its worker's agent: an
        :class:`ObjectRef` to pass to other calls, or to ``await ref.get()``. Refs among
        the arguments may still be pending (``g.ref(f.ref(x))``)."""
        self.shipped()
        with _objects.collecting() as refs:
            blob, frames = self.encode_args(args, kwargs)
        return self._session._object_manager().call_ref(self, blob, frames, refs)

    def _pool(self) -> FunctionPool:
        return self._session._pool_for(self.options)

    def statistics(self) -> PoolStatistics:
        """Workers, queue and failures of this function's pool, right now."""
        return self._pool().statistics()

    async def map(
        self,
        iterable: Iterable[Any],
        *,
        return_exceptions: bool = False,
        ordered: bool = True,
        progress: bool = False,
    ) -> AsyncIterator[FunctionResult[T] | BaseException]:
        """Call once per item (an item that is a tuple is not unpacked). Yields results in
        input order, or as they complete with ``ordered=False``. With
        ``return_exceptions=True`` a failure is yielded in place instead of raised."""
        async for result in self._results(
            [self(item) for item in iterable], return_exceptions, ordered, progress
        ):
            yield result

    async def starmap(
        self,
        iterable: Iterable[Iterable[Any]],
        *,
        return_exceptions: bool = False,
        ordered: bool = True,
        progress: bool = False,
    ) -> AsyncIterator[FunctionResult[T] | BaseException]:
        """``map`` with each item unpacked as the arguments: ``starmap([(1, 2), (3, 4)])``
        calls ``f(1, 2)`` and ``f(3, 4)``."""
        futures: list[asyncio.Future[FunctionResult[T]]] = []
        for i, item in enumerate(iterable):
            if isinstance(item, str | bytes) or not isinstance(item, Iterable):
                for future in futures:
                    future.cancel()
                raise ConfigurationError(
                    f"starmap item {i} is a {type(item).__name__}, not a tuple of arguments:"
                    " use map() to pass each item as the one argument"
                )
            futures.append(self(*item))
        async for result in self._results(futures, return_exceptions, ordered, progress):
            yield result

    async def _results(
        self,
        futures: list[asyncio.Future[FunctionResult[T]]],
        return_exceptions: bool,
        ordered: bool,
        progress: bool,
    ) -> AsyncIterator[FunctionResult[T] | BaseException]:
        bar = _progress(len(futures), self._fn.__qualname__) if progress else None
        try:
            source = futures if ordered else asyncio.as_completed(futures)
            for pending in source:
                try:
                    result: FunctionResult[T] | BaseException = await pending
                except Exception as exc:
                    if not return_exceptions:
                        raise
                    result = exc
                if bar is not None:
                    bar.update(1)
                yield result
        finally:
            if bar is not None:
                bar.close()
            for future in futures:
                future.cancel()  # no-op for the finished ones; stops the rest if we left early


def decode_value(
    serialization: Serialization,
    blob: bytes | memoryview,
    buffers: Sequence[bytes | memoryview] = (),
) -> Any:
    """A result as the worker sent it, back into a value."""
    if serialization is Serialization.JSON:
        return json.loads(bytes(blob))
    return _buffers.loads(blob, buffers)


_LIBRARY_DIRS = tuple(
    {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
_by_value_checked: set[str] = set()


def by_value(module_name: str | None) -> None:
    """Pickle the user's own modules (a test file, a script's helpers) by value: the
    sandbox has the same Python but not the user's files. Installed libraries and the
    standard library stay by reference, to be imported in the sandbox."""
    if not module_name or module_name in _by_value_checked:
        return
    _by_value_checked.add(module_name)
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or path is None or module_name == "__main__":
        return  # builtins; __main__ is by value already
    if module_name.split(".")[0] in ("aviato", "cloudpickle"):
        return
    if os.path.abspath(path).startswith(_LIBRARY_DIRS):
        return
    cloudpickle.register_pickle_by_value(module)


def _progress(total: int, name: str) -> Any:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    return tqdm(total=total, desc=name, unit="call")


def _culprit(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Name the first argument that does not pickle."""
    items = [(f"argument {i}", v) for i, v in enumerate(args)]
    items += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in items:
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{label} (a {type(value).__name__})"
    return "the arguments"


def rebuild_error(blob: bytes | memoryview) -> BaseException:
    """The exception a remote call raised: the original type when it can be rebuilt,
    with the remote traceback as a note; else :class:`FunctionError`."""
    record = pickle.loads(blob)
    traceback_text = str(record.get("traceback", ""))
    type_name = str(record.get("type", "Exception"))
    message = str(record.get("message", ""))
    exc: BaseException | None = None
    dropped: list[str] = []
    if record.get("exception") is not None:
        try:
            exc = cloudpickle.loads(record["exception"])
        except Exception:
            exc = None
    if exc is None:
        exc, dropped = _rebuild_from_parts(record)
    if exc is None and type_name.startswith("aviato.exceptions."):
        ours = getattr(exceptions, type_name.rsplit(".", 1)[1], None)
        if isinstance(ours, type) and issubclass(ours, exceptions.SandboxError):
            return ours(message)
    if exc is None and type_name.startswith("builtins."):
        cls = getattr(builtins, type_name.removeprefix("builtins."), None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            try:
                exc = cls(message)
            except Exception:
                exc = None
    if exc is None or not isinstance(exc, BaseException):
        return FunctionError(
            f"remote function raised {type_name}: {message}",
            type_name=type_name,
            traceback_text=traceback_text,
        )
    if dropped:
        exc.add_note(f"(attributes that could not be brought back: {', '.join(dropped)})")
    exc.add_note(f"\nRemote traceback (in the sandbox):\n{traceback_text}")
    return exc


def _rebuild_from_parts(record: dict[str, Any]) -> tuple[BaseException | None, list[str]]:
    """Rebuild an exception from its class and ``args`` as pickle does (``cls(*args)``),
    then set each attribute that unpickles; returns it (None when its class, args or
    ``__init__`` do not allow it) and the names of the attributes left out."""
    if record.get("class") is None or record.get("args") is None:
        return None, []
    try:
        cls = cloudpickle.loads(record["class"])
        args = cloudpickle.loads(record["args"])
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            return None, []
        exc = cls(*args)
    except Exception:  # its __init__ wants other arguments than its args hold
        return None, []
    dropped = []
    state = record.get("state")
    for name, blob in (state if isinstance(state, dict) else {}).items():
        try:
            if blob is None:
                raise ValueError("not picklable")
            setattr(exc, name, cloudpickle.loads(blob))
        except Exception:
            dropped.append(str(name))
    return exc, dropped
