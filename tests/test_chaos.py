"""Remote functions under failure: an agent killed mid-run, a poison task in a map,
hostile limits inside the sandbox (pids, memory, network)."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from aviato import Sandbox, SandboxDefaults, WorkerLostError
from aviato._connection import LaneConnection
from tests._tally import Tally
from tests.conftest import IMAGE, Cluster, containers_of, wait_until


async def test_agent_killed_mid_run_loses_no_result(fresh_cluster: Cluster) -> None:
    c = fresh_cluster
    d = SandboxDefaults(container_image=IMAGE, scheduler=c.address, lease_seconds=5)
    killed: list[str] = []
    try:
        await _kill_an_agent_mid_run(d, c, killed)
    finally:
        for victim in killed:
            c.start_agent(victim)  # it comes back and reaps what it left
    await asyncio.to_thread(
        wait_until,
        lambda: not containers_of(c.agent_ids),
        30,
        0.2,
        "the killed agent's containers to be reaped",
    )


async def _kill_an_agent_mid_run(d: SandboxDefaults, c: Cluster, killed: list[str]) -> None:
    with Tally() as tally:  # counts executions where they happen, in the workers
        address = tally.address
        async with Sandbox.session(d) as session:

            @session.function(max_workers=4, retries=3)
            def slow_id(i: int) -> int:
                import socket
                import time

                with socket.create_connection(address, 10) as s:
                    s.sendall(b"%d\n" % i)
                time.sleep(0.01)
                return i

            deadline = time.monotonic() + 30
            while True:  # warm up until the pool has grown onto both agents (load varies)
                warm = await asyncio.gather(*(slow_id(i) for i in range(40)))
                assert sorted(r.value for r in warm) == list(range(40))
                pool = next(iter(session._pools.values()))
                agents = {w.sandbox.info.agent_id for w in pool.workers if w.sandbox.info}
                if len(agents) == 2:
                    # On the agents' host: calls and their loss travel the local lanes.
                    assert all(isinstance(w.conn, LaneConnection) for w in pool.workers)
                    break
                assert time.monotonic() < deadline, "workers should be spread over both agents"
            before = tally.counts()
            futures = [slow_id(i) for i in range(1000)]
            victim = sorted(agents)[0]

            def running_on_victim() -> bool:
                started = sum((tally.counts() - before).values())
                on_victim = [w for w in pool.workers if w.sandbox.info.agent_id == victim]
                return started >= 50 and any(w.inflight for w in on_victim)

            deadline = time.monotonic() + 60
            while not running_on_victim():  # the calls run, and some on the victim
                assert time.monotonic() < deadline, "calls never ran on the victim's workers"
                await asyncio.sleep(0.01)
            c.kill(victim)  # kill -9 with calls in flight on it
            # (it comes back below, also when an assert fails: else its leftovers stay)
            killed.append(victim)
            results = await asyncio.wait_for(asyncio.gather(*futures), 180)
            assert [r.value for r in results] == list(range(1000))  # each correct, in order
            stats = slow_id.statistics()
            assert stats.workers_lost >= 1 and stats.calls_retried >= 1, stats  # really ran again
            assert stats.duplicate_results == 0, stats  # each delivered exactly once
            assert all(f.done() and not f.cancelled() for f in futures)
            # At least once: every call ran in a worker (reports may trail the results).
            await asyncio.to_thread(
                wait_until,
                lambda: set(map(str, range(1000))) <= set(tally.counts() - before),
                30,
                0.1,
                "every call's execution to be counted",
            )
            ran = tally.counts() - before
            print(f"{sum(ran.values())} executions for 1000 calls; {stats}")


async def test_poison_call_in_a_map_fails_alone(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=2, retries=1)
        def maybe_die(i: int) -> int:
            import os

            if i == 103:
                os._exit(9)
            return i * 10

        # Fast calls first: the pool then sends them in batches, so the poison call
        # dies with others in flight on its worker.
        assert [r.value for r in await asyncio.gather(*(maybe_die(i) for i in range(100)))] == [
            i * 10 for i in range(100)
        ]
        out = [r async for r in maybe_die.map(range(100, 300), return_exceptions=True)]
        assert isinstance(out[3], WorkerLostError)
        assert "gave up after 2 attempt" in str(out[3]) and "code 9" in str(out[3])
        assert [r.value for i, r in enumerate(out) if i != 3] == [
            i * 10 for i in range(100, 300) if i != 103
        ]
        stats = maybe_die.statistics()
        # The worker notes which call it runs: only the poison call is charged, and it
        # destroys at most retries + 1 sandboxes.
        assert stats.workers_lost <= 1 + 1, stats


async def test_hostile_code_inside_a_container(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        r = await sb.exec(["sh", "-c", "grep -E 'CapEff|NoNewPrivs' /proc/self/status"])
        status = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
        assert int(status["CapEff"].strip(), 16) == 0  # root, but no capability at all
        assert status["NoNewPrivs"].strip() == "1"
        r = await sb.exec(["id", "-u"])
        assert r.stdout == b"0\n"
        r = await sb.exec(["sh", "-c", "ls /var/run/docker.sock /run/docker.sock 2>&1; true"])
        assert b"No such file" in r.stdout
        # a fork bomb stops at the pids limit, and the sandbox (and host) stay usable
        t0 = time.monotonic()
        bomb = "i=0; while [ $i -lt 3000 ]; do sleep 30 & i=$((i+1)); done 2>&1 | tail -1"
        r = await sb.exec(["sh", "-c", bomb], timeout_seconds=60)
        assert b"fork" in r.stdout.lower() or b"resource" in r.stdout.lower()
        assert time.monotonic() - t0 < 60
        # The host still starts processes (the bound only catches a hang: 10x ~1 s).
        subprocess.run(["true"], check=True, timeout=10)
        await sb.exec(["sh", "-c", "pkill sleep; true"])
    await network_none_reaches_nothing(defaults)


async def network_none_reaches_nothing(defaults: SandboxDefaults) -> None:
    """A listener on a host address that is not loopback: a bridged sandbox reaches it
    (so the probe can succeed), one with network="none" does not."""
    with Tally() as tally:
        host, port = tally.address
        probe = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(({host!r}, {port}), 5).sendall(b'probe\\n')\n"
            "except OSError as exc:\n"
            "    print(type(exc).__name__, exc)\n"
            "else:\n"
            "    print('reached')\n"
        )
        async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
            r = await sb.exec(["python", "-c", probe])
            assert r.stdout == b"reached\n", r
            await asyncio.to_thread(
                wait_until, lambda: tally.counts()["probe"] == 1, 10, 0.05, "the probe to land"
            )
        async with Sandbox(
            command="sleep", args=["infinity"], network="none", defaults=defaults
        ) as sb:
            r = await sb.exec(["python", "-c", probe])
            assert r.returncode == 0 and b"unreachable" in r.stdout.lower(), r
            r = await sb.exec(["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1"])
            assert r.stdout.split() == [b"lo"]
        assert tally.connections == 1, "network='none' reached the host"


async def test_memory_hog_is_oom_killed_and_reported_as_such(defaults) -> None:
    hog = "x = bytearray(400 * 1024 * 1024); import time; time.sleep(5)"
    sb = await Sandbox.create("python", "-c", hog, defaults=defaults, memory_bytes=64 * 1024 * 1024)
    with pytest.raises(Exception, match="out of memory") as info:
        await sb.wait(timeout=60)
    assert type(info.value).__name__ == "SandboxFailedError"
    assert sb.returncode == 137


async def test_big_results_are_refused_at_the_limit(defaults: SandboxDefaults) -> None:
    from aviato import PayloadTooLargeError

    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1, max_result_bytes=1024 * 1024)
        def make(n: int) -> bytes:
            return b"x" * n

        assert len((await make(1000)).value) == 1000
        too_big = r"result is 83886\d\d bytes, above its max_result_bytes of 1048576"
        with pytest.raises(PayloadTooLargeError, match=too_big):
            await make(8 * 1024 * 1024)
        assert len((await make(10)).value) == 10  # the worker is fine afterwards
        assert make.statistics().workers_lost == 0


async def test_a_1gb_result_is_refused_and_no_daemon_holds_it(
    cluster: Cluster, defaults: SandboxDefaults
) -> None:
    """The default max_result_bytes (256 MiB) refuses it in the worker: neither the agent
    nor the scheduler ever holds the gigabyte (sampled while the call runs)."""
    import threading

    import psutil

    from aviato import PayloadTooLargeError

    daemons = [psutil.Process(p.pid) for p in cluster.procs.values()]
    base = {d.pid: d.memory_info().rss for d in daemons}
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for d in daemons:
                peak[d.pid] = max(peak[d.pid], d.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        async with Sandbox.session(defaults) as session:

            @session.function(max_workers=1)
            def gigabyte() -> bytes:
                return b"x" * (1 << 30)

            with pytest.raises(PayloadTooLargeError, match="above its max_result_bytes"):
                await asyncio.wait_for(gigabyte(), 120)
    finally:
        done.set()
        sampler.join()
    growth = {pid: (peak[pid] - base[pid]) >> 20 for pid in base}
    assert max(growth.values()) < 100, f"daemon RSS growth in MiB: {growth}"


async def test_a_call_that_never_returns_ends_with_the_session_lifetime(defaults) -> None:
    d = defaults.replace(max_lifetime_seconds=2.0)
    async with Sandbox.session(d) as session:

        @session.function(max_workers=1, retries=0)
        def forever() -> None:
            import time

            while True:
                time.sleep(1)

        t0 = time.monotonic()
        with pytest.raises(WorkerLostError, match="max lifetime"):
            await asyncio.wait_for(forever(), 60)
        assert time.monotonic() - t0 < 30
