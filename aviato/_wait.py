"""``aviato.wait``: the first of many calls to finish, as ``ray.wait`` gives them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeVar

from aviato.exceptions import ConfigurationError

F = TypeVar("F", bound="asyncio.Future[Any]")


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
    error is raised when it is awaited. Nothing is cancelled."""
    futures = list(futures)
    for f in futures:
        if not isinstance(f, asyncio.Future):
            raise ConfigurationError(
                f"aviato.wait takes futures (what calling a remote function returns), not "
                f"{type(f).__name__}: wrap a coroutine in asyncio.ensure_future() first"
            )
    if len({id(f) for f in futures}) != len(futures):
        raise ConfigurationError("aviato.wait: the same future is given twice")
    if isinstance(num_returns, bool) or not isinstance(num_returns, int):
        raise ConfigurationError(f"num_returns must be an int, not {num_returns!r}")
    if not 0 < num_returns <= len(futures):
        raise ConfigurationError(
            f"num_returns must be between 1 and the number of futures ({len(futures)}), "
            f"not {num_returns}"
        )
    if timeout is not None and not timeout >= 0:  # NaN fails this too
        raise ConfigurationError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
    enough = asyncio.Event()

    def finished(_: object) -> None:
        if sum(f.done() for f in futures) >= num_returns:
            enough.set()

    finished(None)
    if not enough.is_set():
        for f in futures:
            f.add_done_callback(finished)
        try:
            await asyncio.wait_for(enough.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            for f in futures:
                f.remove_done_callback(finished)
    done: list[F] = []
    pending: list[F] = []
    for f in futures:
        (done if f.done() and len(done) < num_returns else pending).append(f)
    return done, pending
