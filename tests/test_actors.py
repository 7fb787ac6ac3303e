"""Actors (``@session.cls()``) on a real cluster: one worker sandbox per instance,
``__init__`` once, calls in order, loss and restart after a real ``docker kill``."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from aviato import (
    ActorLostError,
    ConfigurationError,
    Sandbox,
    SandboxDefaults,
    WorkerLostError,
)
from tests.conftest import containers_of, wait_until


class Boom(Exception):
    pass


async def test_the_issue_snippet_state_order_and_one_sandbox_each(
    defaults: SandboxDefaults,
) -> None:
    async with Sandbox.session(defaults) as session:

        @session.cls()
        class Counter:
            def __init__(self, start: int) -> None:
                import os

                self.n = start
                self.pid = os.getpid()
                self.inits = 1

            def add(self, k: int) -> int:
                self.n += k
                return self.n

            def where(self) -> tuple[int, int]:
                return self.pid, self.inits

            def fail(self) -> None:
                raise Boom("in a method")

        a, b = Counter(100), Counter(0)
        # Calls on one instance run in the order sent, on its state.
        results = await asyncio.gather(*(a.add(1) for _ in range(20)))
        assert [r.value for r in results] == list(range(101, 121))
        assert (await b.add(5)).value == 5  # another instance, its own state
        assert len({r.sandbox_id for r in results}) == 1
        (b_where,) = [await b.where()]
        assert b_where.sandbox_id != results[0].sandbox_id  # a sandbox of its own
        pid, inits = (await a.where()).value
        assert inits == 1 and (await a.where()).value == (pid, 1)  # built once
        # A method's error: the same type, with the remote traceback.
        with pytest.raises(Boom, match="in a method"):
            await a.fail()
        assert (await a.add(0)).value == 120  # the state survives a method's error
        with pytest.raises(AttributeError, match="Counter has no method 'nope'"):
            a.nope  # noqa: B018
        await a.close()
        with pytest.raises(ConfigurationError, match="is closed"):
            await a.add(1)
        assert (await b.add(1)).value == 6


async def test_a_failing_init_fails_the_calls_clearly(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:

        @session.cls()
        class Broken:
            def __init__(self) -> None:
                raise Boom("no model at /models/a")

            def predict(self) -> int:
                return 1

        m = Broken()
        with pytest.raises(Boom, match="no model"):
            await m.ready()
        with pytest.raises(Boom, match="no model"):
            await m.predict()


async def test_a_killed_actor_worker_is_lost_then_restarted(
    defaults: SandboxDefaults,
) -> None:
    async with Sandbox.session(defaults) as session:

        @session.cls(max_restarts=1)
        class Slow:
            def __init__(self) -> None:
                self.calls = 0

            def count(self) -> int:
                self.calls += 1
                return self.calls

            def nap(self, seconds: float) -> None:
                import time

                time.sleep(seconds)

        s = Slow()
        assert (await s.count()).value == 1
        first = (await s.count()).sandbox_id
        napping, behind = s.nap(120), s.count()  # one batch: both on the worker at once
        pool = s._remote._pool()
        await asyncio.to_thread(
            wait_until,
            lambda: sum(len(w.inflight) for w in pool.workers) == 2,
            30,
            0.02,
            "both calls to be on the worker",
        )
        subprocess.run(
            ["docker", "kill", f"aviato-{first}"], check=True, capture_output=True, timeout=30
        )
        with pytest.raises(ActorLostError, match="builds the instance again") as info:
            await asyncio.wait_for(napping, 120)
        assert isinstance(info.value, WorkerLostError)
        # The call that had not started runs on the instance built again in a new
        # worker (__init__ ran again: its state is fresh); one loss, one restart.
        again = await asyncio.wait_for(behind, 120)
        assert again.value == 1 and again.sandbox_id != first and s.restarts == 1
        assert (await s.count()).value == 2
        # Lost again, with no restarts left: the call running and the one behind it
        # fail, and later calls at once.
        napping, behind = s.nap(120), s.count()
        await asyncio.to_thread(
            wait_until,
            lambda: sum(len(w.inflight) for w in pool.workers) == 2,
            30,
            0.02,
            "both calls to be on the new worker",
        )
        subprocess.run(
            ["docker", "kill", f"aviato-{again.sandbox_id}"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        for lost in (napping, behind):
            with pytest.raises(ActorLostError, match="no restarts"):
                await asyncio.wait_for(lost, 120)
        with pytest.raises(ActorLostError, match="no restarts are left"):
            await s.count()
        assert s.restarts == 1


async def test_bad_actor_options_are_refused(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:
        with pytest.raises(ConfigurationError, match="max_restarts"):
            session.cls(max_restarts=-1)
        with pytest.raises(ConfigurationError, match="max_concurrency"):
            session.cls(max_concurrency=0)
        with pytest.raises(ConfigurationError, match="needs a class"):
            session.cls()(len)  # type: ignore[arg-type]


async def test_the_session_end_stops_its_actors(defaults: SandboxDefaults, cluster) -> None:  # type: ignore[no-untyped-def]
    async with Sandbox.session(defaults) as session:

        @session.cls()
        class Idle:
            def ping(self) -> str:
                return "pong"

        handles = [Idle() for _ in range(2)]
        assert [(await h.ping()).value for h in handles] == ["pong", "pong"]
        assert len(containers_of(cluster.agent_ids)) >= 2
    # Closed with the session: the defaults fixture waits for their containers to go.
