"""Actor handles passed to functions and to other actors (issue 14 part 4), as Ray's
can be: the handle used inside a worker sandbox calls the same instance (through its
worker's agent and the session that owns both), on Docker and on the local runtime."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aviato import Sandbox, SandboxDefaults
from tests.test_actors_concurrency import either, local  # noqa: F401  (fixtures)


class Boom(Exception):
    pass


async def test_a_function_and_an_actor_call_the_instance_through_its_handle(
    either: SandboxDefaults,  # noqa: F811
) -> None:
    async with Sandbox.session(either) as session:

        @session.cls()
        class Counter:
            def __init__(self) -> None:
                self.n = 0

            def add(self, k: int) -> int:
                self.n += k
                return self.n

            def fail(self) -> None:
                raise Boom("in the counter")

        @session.function()
        def bump(counter: Any, k: int) -> tuple[int, str]:
            result = counter.add(k)  # blocks; a Result, as the sync API's
            return result.value, result.sandbox_id

        @session.function()
        def catch(counter: Any) -> str:
            try:
                counter.fail()
            except Exception as exc:  # the method's own error, rebuilt here
                return f"{type(exc).__name__}: {exc}"
            return "no error"

        @session.cls()
        class Caller:
            def __init__(self, counter: Any) -> None:
                self.counter = counter  # another actor's handle, kept

            def bump_twice(self, k: int) -> list[int]:
                return [self.counter.add(k).value, self.counter.add(k).value]

        c = Counter()
        assert (await c.add(1)).value == 1
        value, where = (await bump(c, 10)).value
        assert value == 11  # the same instance: its state is shared
        assert where == (await c.add(0)).sandbox_id  # ran in the actor's own worker
        caller = Caller(c)
        assert (await caller.bump_twice(100)).value == [111, 211]
        assert (await c.add(0)).value == 211
        # Many at once from a function's pool, in one instance: nothing lost.
        results = await asyncio.wait_for(asyncio.gather(*(bump(c, 1) for _ in range(10))), 120)
        assert sorted(r.value[0] for r in results) == list(range(212, 222))
        assert (await catch(c)).value.startswith("Boom: in the counter")


async def test_a_closed_actor_handle_cannot_be_passed(defaults: SandboxDefaults) -> None:
    from aviato import FunctionSerializationError

    async with Sandbox.session(defaults) as session:

        @session.cls()
        class Idle:
            def ping(self) -> str:
                return "pong"

        @session.function()
        def use(h: Any) -> str:
            return str(h.ping().value)

        h = Idle()
        assert (await use(h)).value == "pong"
        await h.close()
        with pytest.raises(FunctionSerializationError, match="is closed"):
            await use(h)
