"""Actors with ``max_concurrency`` (issue 14 part 4): up to N calls of one instance at
once in its worker (sync methods on N threads, ``async def`` methods on one event
loop), strictly in order with N = 1; on Docker and on the local runtime."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest

from aviato import ActorLostError, ConfigurationError, Sandbox, SandboxDefaults
from tests.conftest import IMAGE, Cluster, wait_until
from tests.test_local_runtime import _leftovers, _local_cluster


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("local-actors"), agents=1)


@pytest.fixture(params=["docker", "local"])
def either(request: pytest.FixtureRequest) -> Iterator[SandboxDefaults]:
    """Defaults for a cluster of each runtime."""
    if request.param == "docker":
        yield request.getfixturevalue("defaults")
        return
    local: Cluster = request.getfixturevalue("local")
    yield SandboxDefaults(container_image=IMAGE, scheduler=local.address, lease_seconds=5)
    wait_until(lambda: not _leftovers(local), 15, 0.2, "the test's sandboxes to be removed")


async def test_n_sync_calls_run_at_once_on_threads(either: SandboxDefaults) -> None:
    async with Sandbox.session(either) as session:

        @session.cls(max_concurrency=4)
        class Meeting:
            def __init__(self) -> None:
                import threading

                self.barrier = threading.Barrier(4)

            def meet(self, i: int) -> tuple[int, str]:
                import threading

                # Only four calls running at once pass: one at a time would break it.
                self.barrier.wait(timeout=60)
                return i, threading.current_thread().name

        m = Meeting()
        results = await asyncio.wait_for(asyncio.gather(*(m.meet(i) for i in range(4))), 120)
        assert sorted(r.value[0] for r in results) == [0, 1, 2, 3]
        assert len({r.value[1] for r in results}) == 4  # four threads
        assert len({r.sandbox_id for r in results}) == 1  # of one worker
        # More calls than threads: all run, four at a time, on the same instance.
        more = await asyncio.wait_for(asyncio.gather(*(m.meet(i) for i in range(8))), 120)
        assert sorted(r.value[0] for r in more) == list(range(8))
        await m.close()


async def test_n_async_calls_run_at_once_on_one_loop(either: SandboxDefaults) -> None:
    async with Sandbox.session(either) as session:

        @session.cls(max_concurrency=4)
        class Gather:
            def __init__(self) -> None:
                self.arrived = 0
                self.event: asyncio.Event | None = None

            async def meet(self, i: int) -> tuple[int, int]:
                import asyncio
                import threading

                if self.event is None:
                    self.event = asyncio.Event()
                self.arrived += 1
                if self.arrived == 4:
                    self.event.set()
                await asyncio.wait_for(self.event.wait(), 60)  # all four wait together
                return i, threading.get_ident()

        g = Gather()
        results = await asyncio.wait_for(asyncio.gather(*(g.meet(i) for i in range(4))), 120)
        assert sorted(r.value[0] for r in results) == [0, 1, 2, 3]
        assert len({r.value[1] for r in results}) == 1  # one event loop, one thread


async def test_one_at_a_time_keeps_the_order_sent(either: SandboxDefaults) -> None:
    async with Sandbox.session(either) as session:

        @session.cls()  # max_concurrency=1
        class Log:
            def __init__(self) -> None:
                self.seen: list[int] = []

            def add(self, i: int) -> None:
                import time

                time.sleep(0.001 * (i % 3))  # uneven: out of order if run at once
                self.seen.append(i)

            async def add_async(self, i: int) -> None:
                import asyncio

                await asyncio.sleep(0.001 * (i % 3))
                self.seen.append(i)

            def all(self) -> list[int]:
                return self.seen

        log = Log()
        calls = [log.add(i) if i % 2 else log.add_async(i) for i in range(40)]
        await asyncio.wait_for(asyncio.gather(*calls), 120)
        assert (await log.all()).value == list(range(40))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", True, None, 100_000])
async def test_a_bad_max_concurrency_is_refused_clearly(
    defaults: SandboxDefaults, bad: object
) -> None:
    async with Sandbox.session(defaults) as session:
        with pytest.raises(ConfigurationError, match="max_concurrency must be an int from 1 to"):
            session.cls(max_concurrency=bad)  # type: ignore[arg-type]


async def test_a_lost_concurrent_worker_fails_every_call_running(
    defaults: SandboxDefaults,
) -> None:
    async with Sandbox.session(defaults) as session:

        @session.cls(max_concurrency=3)
        class Naps:
            def nap(self, seconds: float) -> None:
                import time

                time.sleep(seconds)

            def ping(self) -> str:
                return "pong"

        n = Naps()
        where = (await n.ping()).sandbox_id
        naps = [n.nap(120) for _ in range(3)]
        pool = n._remote._pool()
        await asyncio.to_thread(
            wait_until,
            lambda: sum(len(w.inflight) for w in pool.workers) == 3,
            30,
            0.02,
            "three calls to be on the worker",
        )
        subprocess.run(
            ["docker", "kill", f"aviato-{where}"], check=True, capture_output=True, timeout=30
        )
        for nap in naps:  # none runs again, unasked, on a new instance
            with pytest.raises(ActorLostError, match="no restarts"):
                await asyncio.wait_for(nap, 120)
