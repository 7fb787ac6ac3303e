"""The blocking API (aviato.sync), starmap and aviato.wait, on a real cluster."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import threading

import pytest

import aviato
from aviato import ConfigurationError, Sandbox, SandboxDefaults, sync
from tests.conftest import ROOT, Cluster, containers_of, wait_until


def test_the_issue_snippet_runs_as_written(defaults: SandboxDefaults) -> None:
    with sync.session(defaults) as s:
        sb = s.create(command="sleep", args=["infinity"])  # started
        assert sb.exec(["echo", "hi"]).stdout == b"hi\n"
        square = s.function()(lambda n: n * n)
        assert [r.value for r in square.map(range(10))] == [n * n for n in range(10)]
        sid = sb.sandbox_id
        assert sid and sb.status() is aviato.SandboxStatus.RUNNING
    # Leaving the block stopped the sandbox and the function's workers.
    with sync.session(defaults) as s2:
        assert s2.from_id(sid).status().is_terminal


def test_files_streams_and_any_other_coroutine_method(defaults: SandboxDefaults) -> None:
    with sync.session(defaults) as s:
        sb = s.create(command="sleep", args=["infinity"])
        sb.write_file("/tmp/x", b"payload")
        assert sb.read_file("/tmp/x") == b"payload"
        chunks = list(sb.exec_stream(["sh", "-c", "echo a; echo b >&2"]))
        assert {c.stream for c in chunks} == {"stdout", "stderr"}
        # Not named in SyncSandbox: reached through Blocking, still blocking.
        assert isinstance(sb.log_chunks(), list)
        listed = s.list(tags=[])
        assert sb.sandbox_id in {x.sandbox_id for x in listed}
        sb.stop()
        assert sb.wait(timeout=30) is not None or sb.status().is_terminal


def test_submit_wait_and_starmap(defaults: SandboxDefaults) -> None:
    with sync.session(defaults) as s:

        @s.function()
        def nap(seconds: float, tag: str) -> str:
            import time

            time.sleep(seconds)
            return tag

        fast = [nap.submit(0.0, f"fast{i}") for i in range(3)]
        slow = nap.submit(60.0, "slow")
        done, pending = sync.wait([slow, *fast], num_returns=3, timeout=60)
        assert [f.result().value for f in done] == ["fast0", "fast1", "fast2"]
        assert pending == [slow]
        done, pending = sync.wait([slow], num_returns=1, timeout=0.2)
        assert (done, pending) == ([], [slow])
        slow.cancel()
        assert [r.value for r in nap.starmap([(0, "a"), (0, "b")])] == ["a", "b"]
        with pytest.raises(ConfigurationError, match="between 1 and the number of futures"):
            sync.wait(fast, num_returns=4)


def test_driven_from_a_thread_whose_loop_runs(defaults: SandboxDefaults) -> None:
    """As in Jupyter: the caller's thread runs an event loop; the sync API blocks it,
    and still works, on its own loop thread."""

    async def notebook_cell() -> bytes:
        asyncio.get_running_loop()  # a loop runs here
        with sync.session(defaults) as s:
            return s.create(command="sleep", args=["infinity"]).exec(["echo", "cell"]).stdout

    assert asyncio.run(notebook_cell()) == b"cell\n"


def test_a_closed_sync_session_refuses_clearly(defaults: SandboxDefaults) -> None:
    s = sync.session(defaults)
    with pytest.raises(ConfigurationError, match="not open"):
        s.create(command="true")
    with s:
        pass
    with pytest.raises(ConfigurationError, match="not open"):
        s.function()


CTRL_C_SCRIPT = """
import sys
import time
from aviato import SandboxDefaults, sync

d = SandboxDefaults(container_image=sys.argv[1], scheduler=sys.argv[2], lease_seconds=5)
with sync.session(d) as s:
    sb = s.create(command="sleep", args=["infinity"])
    print("started", sb.sandbox_id, flush=True)
    try:
        sb.exec(["sleep", "600"])  # Ctrl-C arrives while this blocks
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    # As in a notebook after an interrupted cell: the session and its sandbox live on,
    # and the interrupted command is gone from it.
    # (its kill reaches the sandbox a moment later: poll, with a deadline)
    deadline = time.monotonic() + 20
    while b"sleep 600" in sb.exec(["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\\\0' ' '"]).stdout:
        if time.monotonic() > deadline:
            print("still running", flush=True)
            break
        time.sleep(0.1)
    else:
        print("cancelled", flush=True)
"""


def test_ctrl_c_cancels_the_call_in_flight_and_leaves_nothing(cluster: Cluster) -> None:
    from tests.conftest import IMAGE

    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, IMAGE, cluster.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("started sb-"), line + (proc.stderr.read() if proc.stderr else "")
        wait_until(lambda: _running(cluster, "sleep 600"), 30, 0.1, "the exec to be under way")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.split() == ["interrupted", "cancelled"], out + err
    assert proc.returncode == 0, err
    # The `with` block's exit stopped the session's sandbox: nothing is left.
    wait_until(lambda: not containers_of(cluster.agent_ids), 30, 0.2, "the sandbox to be removed")


def _running(cluster: Cluster, command: str) -> bool:
    """Whether ``command`` runs in one of the cluster's containers (read from /proc:
    the image has no ps)."""
    for name in containers_of(cluster.agent_ids):
        out = subprocess.run(
            ["docker", "exec", name, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        if command in out:
            return True
    return False


async def test_aviato_wait_and_starmap_on_the_async_api(defaults: SandboxDefaults) -> None:
    async with Sandbox.session(defaults) as session:

        @session.function()
        def add(a: int, b: int) -> int:
            return a + b

        assert [r.value async for r in add.starmap([(1, 2), (3, 4)])] == [3, 7]
        with pytest.raises(ConfigurationError, match="starmap item 1 is a int"):
            async for _ in add.starmap([(1, 2), 5]):  # type: ignore[list-item]
                pass

        gate = asyncio.get_running_loop().create_future()
        futures = [add(i, i) for i in range(4)]
        done, pending = await aviato.wait([*futures, gate], num_returns=4, timeout=60)
        assert done == futures and pending == [gate]
        done, pending = await aviato.wait([gate], timeout=0.1)
        assert (done, pending) == ([], [gate])
        gate.set_result(None)
        done, _ = await aviato.wait([gate, *futures], num_returns=2)
        assert done == [gate, futures[0]]  # the order given, at most num_returns

        for bad, message in (
            ({"num_returns": 0}, "between 1 and"),
            ({"num_returns": 9}, "between 1 and"),
            ({"timeout": -1}, "timeout must be"),
            ({"timeout": math.nan}, "timeout must be"),
        ):
            with pytest.raises(ConfigurationError, match=message):
                await aviato.wait(futures, **bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="given twice"):
            await aviato.wait([futures[0], futures[0]])
        coro = asyncio.sleep(0)
        with pytest.raises(ConfigurationError, match="ensure_future"):
            await aviato.wait([coro])  # type: ignore[list-item]
        coro.close()


async def test_a_slow_call_does_not_hold_back_its_batch_neighbours(
    defaults: SandboxDefaults,
) -> None:
    """Quick so far, so the pool sends a function's calls to its one worker in one batch;
    the slow one among them must not hold the quick ones' results back."""
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=1)
        def nap(seconds: float, tag: str) -> str:
            import time

            time.sleep(seconds)
            return tag

        assert (await nap(0.0, "warm")).value == "warm"  # now known as quick: batched
        fast = [nap(0.0, f"fast{i}") for i in range(3)]
        slow = nap(120.0, "slow")
        done, pending = await aviato.wait([slow, *fast], num_returns=3, timeout=60)
        assert [f.result().value for f in done] == ["fast0", "fast1", "fast2"]
        assert pending == [slow]
        slow.cancel()


def test_one_thread_per_sync_session_and_none_left() -> None:
    before = {t.name for t in threading.enumerate()}
    portal = sync.Portal("aviato-sync-test")
    assert portal.call(asyncio.sleep(0, "x")) == "x"
    portal.close()
    assert portal.closed
    assert {t.name for t in threading.enumerate()} == before
    with pytest.raises(ConfigurationError, match="closed"):
        portal.call(asyncio.sleep(0))


def test_actors_on_the_blocking_api(defaults: SandboxDefaults) -> None:
    with sync.session(defaults) as s:

        @s.cls()
        class Tally:
            def __init__(self, start: int) -> None:
                self.n = start

            def add(self, k: int) -> int:
                self.n += k
                return self.n

        t = Tally(10)
        t.ready()
        assert [t.add(1).value for _ in range(3)] == [11, 12, 13]
        with pytest.raises(AttributeError, match="no method 'nope'"):
            t.nope  # noqa: B018
        t.close()


def _size(data: bytes) -> int:
    return len(data)


def _total(parts: dict[str, list[bytes]]) -> int:
    return sum(len(p) for ps in parts.values() for p in ps)


def _double(data: bytes) -> bytes:
    return data + data


def _refuse(data: bytes) -> bytes:
    raise ValueError(f"refused {len(data)} bytes")


def _nap_then(seconds: float) -> bytes:
    import time

    time.sleep(seconds)
    return b"late"


def test_object_refs_on_the_blocking_api(defaults: SandboxDefaults) -> None:
    """``put`` and ``fn.ref`` through aviato.sync, as the async ones (tests/test_objects.py):
    refs passed (nested too), kept results, ``get``, ``wait`` on refs, ``release``."""
    with sync.session(defaults) as s:
        size, total, double = (s.function()(f) for f in (_size, _total, _double))
        value = os.urandom(1 << 20)
        ref = s.put(value)
        assert isinstance(ref, sync.SyncObjectRef) and ref.source is not None
        assert size(ref).value == len(value)
        assert total({"a": [ref, ref], "b": [ref]}).value == 3 * len(value)
        out = double.ref(double.ref(ref))  # pending refs as arguments, held in the cluster
        assert isinstance(out, sync.SyncObjectRef)
        assert size(out).value == 4 * len(value)
        assert out.get() == value * 4
        refs = [double.ref(b"ab") for _ in range(3)]
        done, pending = sync.wait(refs, num_returns=3, timeout=120)
        assert (done, pending) == (refs, [])
        assert [r.get() for r in done] == [b"abab"] * 3
        slow = s.function()(_nap_then).ref(60.0)
        done, pending = sync.wait([slow, refs[0]], num_returns=2, timeout=0.5)
        assert (done, pending) == ([refs[0]], [slow])
        with pytest.raises(ValueError, match="refused"):
            s.function()(_refuse).ref(ref).get()
        ref.release()
        ref.release()  # idempotent
        with pytest.raises(aviato.ObjectLostError, match="released"):
            ref.get()
        with pytest.raises(aviato.FunctionSerializationError, match="released"):
            size(ref)
    out.release()  # after the close: nothing left to free, no error
