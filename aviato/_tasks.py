"""``TaskGroup``: the owner of background tasks (a session's, a pool's, a connection's).

Every task the client starts belongs to one: it is cancelled and awaited when its
owner closes, and its failure goes somewhere. Either to ``on_error``, given when the
task is started (a connection fails its waiting requests, a sandbox's start raises
to those awaiting it), or, as trio's nurseries do, out of the owner's ``close()``:
a bug in a background task surfaces where the session ends, not only in a log.
asyncio's own ``TaskGroup`` does not fit: it lives inside one ``async with`` block
and cancels every sibling when one task fails.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["TaskGroup", "default_tasks"]

log = logging.getLogger("aviato.tasks")
T = TypeVar("T")


class TaskGroup:
    """Tasks of one owner. ``child()`` makes a group whose tasks its parent also owns
    (a pool's, inside its session's): closing the child ends its own tasks; a failure
    with no ``on_error`` is raised by the root group's ``close()``."""

    def __init__(self, name: str, parent: TaskGroup | None = None) -> None:
        self.name = name
        self._parent = parent
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Failures no ``on_error`` took, for ``close()`` to raise (the root's only).
        self._failures: list[BaseException] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"<TaskGroup {self.name} tasks={len(self._tasks)}>"

    def child(self, name: str) -> TaskGroup:
        return TaskGroup(name, self)

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[T]:
        """Start ``coro`` as a task of this group. ``on_error`` gets its exception if it
        fails (not if it is cancelled), and may raise it again to leave it to ``close()``
        as well; without one, ``close()`` raises it. In a closed
        group the task is cancelled at once (a late reply's callback may still ask for
        one; it must not raise there)."""
        task = asyncio.get_running_loop().create_task(coro)
        if any(group.closed for group in self._lineage()):  # (a pool's, its session's)
            task.cancel()
        for group in self._lineage():
            group._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, on_error))
        return task

    def _lineage(self) -> list[TaskGroup]:
        groups: list[TaskGroup] = []
        group: TaskGroup | None = self
        while group is not None:
            groups.append(group)
            group = group._parent
        return groups

    def _done(
        self, on_error: Callable[[BaseException], None] | None, task: asyncio.Task[Any]
    ) -> None:
        lineage = self._lineage()
        for group in lineage:
            group._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        if on_error is not None:
            try:
                on_error(exc)
                return
            except BaseException as raised:  # raised again (or its own bug): for close()
                exc = raised
        log.error("%s: a task failed", self.name, exc_info=exc)
        lineage[-1]._failures.append(exc)

    def cancel(self) -> None:
        """Cancel every task of this group (for owners that close without awaiting)."""
        self.closed = True
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Cancel every task of this group and wait for them to end; then a root group
        raises what failed in its tasks without an ``on_error`` (an ``ExceptionGroup``
        when more than one did)."""
        self.cancel()
        while self._tasks:  # (a task ending may have started another before we closed)
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._parent is not None or not self._failures:
            return
        failures, self._failures = self._failures, []
        if len(failures) == 1:
            raise failures[0]
        raise BaseExceptionGroup(f"{self.name}: {len(failures)} tasks failed", failures)


_default: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TaskGroup] = (
    weakref.WeakKeyDictionary()
)


def default_tasks() -> TaskGroup:
    """The running loop's owner of tasks started outside any session (a sandbox's
    start); they end with their loop."""
    loop = asyncio.get_running_loop()
    group = _default.get(loop)
    if group is None:
        group = _default[loop] = TaskGroup("tasks outside a session")
    return group
