"""``TaskGroup``, the owner of the client's background tasks (unit tests, no cluster)."""

from __future__ import annotations

import asyncio

import pytest

from aviato._tasks import TaskGroup


async def _fail(exc: BaseException) -> None:
    await asyncio.sleep(0)
    raise exc


async def _forever() -> None:
    await asyncio.Event().wait()


async def _settled(group: TaskGroup) -> None:
    async with asyncio.timeout(10):
        while group._tasks:
            await asyncio.sleep(0.01)


async def test_a_failure_nobody_takes_is_raised_by_close() -> None:
    group = TaskGroup("g")
    group.spawn(_fail(KeyError("bug")))
    await _settled(group)
    with pytest.raises(KeyError, match="bug"):
        await group.close()
    await group.close()  # raised once, not at every close


async def test_several_failures_are_raised_together() -> None:
    group = TaskGroup("g")
    group.spawn(_fail(KeyError("a")))
    group.spawn(_fail(ValueError("b")))
    await _settled(group)
    with pytest.raises(BaseExceptionGroup) as caught:
        await group.close()
    assert sorted(type(e).__name__ for e in caught.value.exceptions) == ["KeyError", "ValueError"]


async def test_on_error_takes_a_failure_and_may_raise_it_again() -> None:
    group = TaskGroup("g")
    taken: list[BaseException] = []
    group.spawn(_fail(KeyError("told")), on_error=taken.append)
    await _settled(group)
    assert [str(e) for e in taken] == ["'told'"]
    await group.close()  # taken: not raised again

    def again(exc: BaseException) -> None:
        taken.append(exc)
        raise exc

    group = TaskGroup("g")
    group.spawn(_fail(KeyError("both")), on_error=again)
    await _settled(group)
    with pytest.raises(KeyError, match="both"):
        await group.close()


async def test_close_cancels_and_waits_and_a_closed_group_starts_nothing() -> None:
    group = TaskGroup("g")
    task = group.spawn(_forever())
    await group.close()
    assert task.cancelled()
    late = group.spawn(_forever())  # (from a late reply's callback: must not raise)
    await asyncio.sleep(0)
    assert late.cancelled() or late.cancelling()
    await group.close()


async def test_a_child_closes_its_own_tasks_and_the_root_raises_its_failures() -> None:
    root = TaskGroup("session")
    pool = root.child("pool")
    mine = root.spawn(_forever())
    theirs = pool.spawn(_forever())
    pool.spawn(_fail(KeyError("in the pool")))
    await asyncio.sleep(0.05)
    await pool.close()  # its failure is the root's to raise
    assert theirs.cancelled() and not mine.done()
    with pytest.raises(KeyError, match="in the pool"):
        await root.close()
    assert mine.cancelled()


async def test_cancelled_tasks_are_no_failure() -> None:
    group = TaskGroup("g")
    task = group.spawn(_forever())
    await asyncio.sleep(0)
    task.cancel()
    await _settled(group)
    await group.close()


async def test_a_child_of_a_closed_group_starts_nothing() -> None:
    """A pool's group outlives its closed session's only on paper: what it is asked to
    start then (a late reply's callback) is cancelled at once."""
    root = TaskGroup("session")
    pool = root.child("pool")
    await root.close()
    late = pool.spawn(_forever())
    await asyncio.sleep(0)
    assert late.cancelled() or late.cancelling()
    await pool.close()
