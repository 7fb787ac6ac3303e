"""``aviato.wait``: the first of many calls to finish, as ``ray.wait`` gives them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

from aviato._objects import ObjectRef
from aviato.exceptions import ConfigurationError

F = TypeVar("F", bound="asyncio.Future[Any] | ObjectRef")


async def wait(
    futures: Sequence[F], *, num_returns: int = 1, timeout: float | None = None
) -> tuple[list[F], list[F]]:
    """Wait until ``num_returns`` of ``futures`` are done (or ``timeout`` seconds
    passed) and return ``(done, pending)``, each in the order given, as ``ray.wait``
    does::

        futures = [work(i) for i in range(100)]
        done, pending = await aviato.wait(futures, num_returns=10, timeout=5)

    ``done`` holds at most ``num_returns`` (others may have finished meanwhile: they
    are in ``pending``, done, for the next call). A failed call counts as done: its
    error is raised when it is awaited. Nothing is cancelled. Object refs may be given
    too (``fn.ref(...)``): one is done once its call is (``await ref.get()`` then)."""
    given = list(futures)
    for item in given:
        if not isinstance(item, asyncio.Future | ObjectRef):
            raise ConfigurationError(
                f"aviato.wait takes futures (what calling a remote function returns) or "
                f"object refs, not {type(item).__name__}: wrap a coroutine in "
                "asyncio.ensure_future() first"
            )
    # A ref is done when where it is held is known (its call succeeded or failed).
    pending_on: list[asyncio.Future[Any]] = [
        i._ready if isinstance(i, ObjectRef) else i for i in given
    ]
    if len({id(f) for f in pending_on}) != len(pending_on):
        raise ConfigurationError("aviato.wait: the same future is given twice")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int):
        raise ConfigurationError(f"num_returns must be an int, not {num_returns!r}")
    if not 0 < num_returns <= len(pending_on):
        raise ConfigurationError(
            f"num_returns must be between 1 and the number of futures ({len(pending_on)}), "
            f"not {num_returns}"
        )
    if timeout is not None and not timeout >= 0:  # NaN fails this too
        raise ConfigurationError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    enough = asyncio.Event()

    def finished(_: object) -> None:
        if sum(f.done() for f in pending_on) >= num_returns:
            enough.set()

    finished(None)
    if not enough.is_set():
        for fut in pending_on:
            fut.add_done_callback(finished)
        try:
            await asyncio.wait_for(enough.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            for fut in pending_on:
                fut.remove_done_callback(finished)
    done: list[F] = []
    pending: list[F] = []
    for one, fut in zip(given, pending_on, strict=True):
        (done if fut.done() and len(done) < num_returns else pending).append(one)
    return done, pending
