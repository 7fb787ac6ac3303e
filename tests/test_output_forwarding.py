"""Output forwarding (issue 14 part 1): what functions and actors print in their
worker sandboxes shows on the client's stdout and stderr, live, each line prefixed
``(name sb-xxxx)``, over the local lane and over ZeroMQ, on Docker and on the local
runtime; bounded when a function floods; off with ``forward_output=False``.

The client's output is read with ``capfd`` (its descriptors 1 and 2), as a user sees it.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.output_relay import HOLD_BYTES, OutputRelay
from agent.supervisor_output import BURST, RATE, Budget, function_name
from aviato import Sandbox, SandboxDefaults
from aviato._output import OutputPrinter, prefix
from aviato.link import WorkerOutput
from aviato.protocol import OutputChunk
from tests.conftest import Cluster, wait_until
from tests.test_local_runtime import _local_cluster

# --------------------------------------------------------------------------- units


def _printed(chunks: list[tuple[str, int, str, bytes, int]]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    printer = OutputPrinter(out, err)
    for chunk in chunks:
        printer.put(*chunk)
    printer.close()
    return out.getvalue(), err.getvalue()


def test_lines_are_prefixed_split_and_joined_across_chunks() -> None:
    sid = "sb-3f2a0000aaaa"
    out, err = _printed(
        [
            (sid, 1, "work", b"step 1\nstep", 0),
            (sid, 1, "work", b" 2\n", 0),
            (sid, 2, "work", b"oops\n", 0),
            ("sb-99990000", 1, "other", b"x\n", 0),
        ]
    )
    assert out == "(work sb-3f2a) step 1\n(work sb-3f2a) step 2\n(other sb-9999) x\n"
    assert err == "(work sb-3f2a) oops\n"
    assert prefix("", "sb-1234abcd") == "(worker sb-1234) "


def test_an_unfinished_line_is_shown_after_a_moment() -> None:
    out = io.StringIO()
    printer = OutputPrinter(out, io.StringIO())
    try:
        printer.put("sb-12345678", 1, "work", b"progress...", 0)
        wait_until(lambda: "progress..." in out.getvalue(), 10, 0.02, "the partial line")
        assert out.getvalue() == "(work sb-1234) progress...\n"
    finally:
        printer.close()


def test_drops_are_said_on_stderr_and_the_queue_is_bounded() -> None:
    out, err = _printed(
        [("sb-12345678", 1, "work", b"", 12345), ("sb-12345678", 1, "w", b"a\n", 0)]
    )
    assert "12345 bytes of stdout dropped" in err and err.startswith("(work sb-1234) ")
    assert out == "(w sb-1234) a\n"

    class Stuck(io.StringIO):
        """A terminal nobody reads: the printer's thread blocks on it."""

        def __init__(self) -> None:
            super().__init__()
            self.gate = threading.Event()

        def write(self, s: str) -> int:
            self.gate.wait(30)
            return super().write(s)

    stuck, err2 = Stuck(), io.StringIO()
    printer = OutputPrinter(stuck, err2)
    line = b"y" * 1023 + b"\n"
    for _ in range(20_000):  # 20 MiB queued at once: most of it must be dropped
        printer.put("sb-12345678", 1, "flood", line, 0)
    assert printer._queued <= 8 << 20
    stuck.gate.set()
    printer.close(30)
    assert len(stuck.getvalue()) < 9 << 20
    assert re.search(r"\d+ bytes of stdout dropped", err2.getvalue())


def test_the_agent_holds_early_output_and_limits_a_worker_that_ignores_its_budget() -> None:
    sent: list[tuple[bytes, int, Any, tuple[Any, ...]]] = []
    now = [0.0]
    relay = OutputRelay(lambda *a: sent.append(a), clock=lambda: now[0])
    relay.relay("sb-1", WorkerOutput(1, "work"), [b"early\n"])  # before the watch
    assert not sent
    relay.watch("sb-1", b"client", 7)
    assert [(a[1], a[2], bytes(a[3][0])) for a in sent] == [
        (7, OutputChunk("sb-1", 1, "work", 0), b"early\n")
    ]
    sent.clear()
    chunk = b"z" * 65536
    for _ in range(1000):  # 64 MiB at once from a worker that ignores its own budget
        relay.relay("sb-1", WorkerOutput(1, "work"), [chunk])
    passed = sum(len(a[3][0]) for a in sent)
    assert passed <= 2 * BURST
    now[0] += 1.0  # a second later: the next chunk says what was dropped
    relay.relay("sb-1", WorkerOutput(1, "work", dropped=5), [b"after\n"])
    last = sent[-1][2]
    assert isinstance(last, OutputChunk)
    assert last.dropped == 5 + 1000 * 65536 - passed
    relay.relay("sb-1", WorkerOutput(3, "work"), [b"bad fd\n"])  # malformed: dropped
    relay.relay("sb-2", WorkerOutput(1, "w"), [b"x" * (HOLD_BYTES + 1)])  # too much held
    relay.watch("sb-2", b"client", 8)
    assert sent[-1][2] is last
    relay.forget("sb-1")
    relay.forget("sb-2")


def test_budget_and_names() -> None:
    budget = Budget(RATE, BURST, 0.0)
    assert budget.take(BURST, 0.0) and not budget.take(1, 0.0)
    assert budget.take(RATE // 2, 0.5) and not budget.take(RATE // 2, 0.5)

    def work() -> None: ...

    def dispatch() -> None: ...

    dispatch.__qualname__ = "Outer.Model.<actor>"
    assert function_name(work) == "work" and function_name(dispatch) == "Model"


# --------------------------------------------------------------------------- real clusters


def _work(x: int) -> int:
    import logging
    import subprocess
    import sys

    print("out-1", x)
    print("err-1", x, file=sys.stderr)
    logging.getLogger("t").warning("log-1 %s", x)
    subprocess.run(["sh", "-c", f"echo sub-out {x}; echo sub-err {x} >&2"], check=True)
    print("out-2", x)
    return x


def _lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.fullmatch(pattern, line)]


class Captured:
    """The client's stdout and stderr as captured so far (capfd), kept across reads."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.out = ""
        self.err = ""

    def read(self) -> Captured:
        out, err = self.capfd.readouterr()
        self.out += out
        self.err += err
        return self

    async def wait_for(self, text: str, stream: str = "out", timeout: float = 30) -> None:
        """Until ``text`` shows on the client's std``stream`` (the loop runs meanwhile:
        it is what reads the agent's chunks)."""
        deadline = time.monotonic() + timeout
        while text not in getattr(self.read(), stream):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {text!r} on std{stream}"
                )
            await asyncio.sleep(0.02)


async def _prints_arrive_prefixed_and_in_order(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    seen = Captured(capfd)
    async with Sandbox.session(defaults) as session:
        work = session.function()(_work)
        results = [await work(i) for i in range(3)]  # one worker, calls in order
        sid = results[0].sandbox_id
        head = re.escape(prefix("_work", sid))
        for i in range(3):
            await seen.wait_for(f"out-2 {i}")
            await seen.wait_for(f"sub-err {i}", "err")
    assert _lines(seen.out, head + r".*") == [
        line
        for i in range(3)
        for line in (f"{prefix('_work', sid)}{w} {i}" for w in ("out-1", "sub-out", "out-2"))
    ]
    assert _lines(seen.err, head + r".*") == [
        line
        for i in range(3)
        for line in (f"{prefix('_work', sid)}{w} {i}" for w in ("err-1", "log-1", "sub-err"))
    ]


async def test_prints_arrive_prefixed_in_order_over_the_lane(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    await _prints_arrive_prefixed_and_in_order(defaults, capfd)


async def test_prints_arrive_prefixed_in_order_over_zeromq(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    await _prints_arrive_prefixed_and_in_order(defaults.replace(local_lane=False), capfd)


async def test_output_is_live_and_partial_lines_show(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    seen = Captured(capfd)
    async with Sandbox.session(defaults) as session:

        @session.function()
        def slow() -> str:
            import time

            print("started")
            print("progress", end="", flush=True)
            time.sleep(60)
            return "done"

        call = slow()
        await seen.wait_for("started", timeout=60)  # the worker's start, then the line
        printed = time.monotonic()
        await seen.wait_for("progress")
        # The unfinished line shows within the printer's PARTIAL_SECONDS, long before
        # the call ends.
        assert time.monotonic() - printed < 5 and not call.done()
        call.cancel()
    assert re.search(r"^\(slow sb-[0-9a-f]{4}\) progress$", seen.out, re.M)


async def test_forward_output_false_leaves_it_in_the_sandbox_log(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    seen = Captured(capfd)
    async with Sandbox.session(defaults.replace(forward_output=False)) as session:

        @session.function()
        def quiet() -> None:
            print("marker-not-forwarded")

        result = await quiet()
        worker = await Sandbox.from_id(result.sandbox_id, defaults=defaults)
        wait_until_async = time.monotonic() + 30
        while b"marker-not-forwarded" not in await worker.logs():
            assert time.monotonic() < wait_until_async, "the print never reached the log"
            await asyncio.sleep(0.1)
    assert "marker-not-forwarded" not in seen.read().out + seen.err


async def test_a_flood_is_bounded_and_the_drop_reported(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    seen = Captured(capfd)
    async with Sandbox.session(defaults) as session:

        @session.function()
        def flood(mib: int) -> int:
            import os

            line = b"f" * 1023 + b"\n"
            block = line * 1024
            for _ in range(mib):  # straight to the descriptor, as fast as it goes
                os.write(1, block)
            print("flood-end", mib)
            return mib

        started = time.monotonic()
        assert (await flood(200)).value == 200
        took = time.monotonic() - started
        await seen.wait_for("bytes of stdout dropped", "err")
        assert (await flood(0)).value == 0  # the worker (and agent) serve on
        await seen.wait_for("flood-end 0")
    seen.read()  # all of it now: the session's end shows what was held back
    forwarded = seen.out.count("f" * 1023)
    # At most the burst plus a second's worth per second it ran (and the client's
    # queue bound), far from the 200 MiB written.
    assert forwarded * 1024 < BURST + RATE * (took + 2) + (8 << 20)
    dropped = sum(int(n) for n in re.findall(r"(\d+) bytes of stdout dropped", seen.err))
    assert dropped + forwarded * 1024 >= 150 << 20


async def test_actors_forward_too(
    defaults: SandboxDefaults, capfd: pytest.CaptureFixture[str]
) -> None:
    seen = Captured(capfd)
    async with Sandbox.session(defaults) as session:

        @session.cls()
        class Model:
            def __init__(self, name: str) -> None:
                print("init", name)

            def predict(self, x: int) -> int:
                import sys

                print("predict", x, file=sys.stderr)
                return x

        m = Model("a")
        r = await m.predict(3)
        head = prefix("Model", r.sandbox_id)
        await seen.wait_for(f"{head}init a")
        await seen.wait_for(f"{head}predict 3", "err")
        await m.close()


# --------------------------------------------------------------------------- local runtime


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("local-output"), agents=1)


async def test_the_local_runtime_forwards_too(
    local: Cluster, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ldefaults = SandboxDefaults(
        container_image="python:3.11", scheduler=local.address, lease_seconds=5
    )
    await _prints_arrive_prefixed_and_in_order(ldefaults, capfd)
    await _prints_arrive_prefixed_and_in_order(ldefaults.replace(local_lane=False), capfd)
