"""Output forwarding (issue 14 part 1): what functions and actors print in their
worker sandboxes shows on the client's stdout and stderr, live, each line prefixed
``(name sb-xxxx)``, over the local lane and over ZeroMQ, on Docker and on the local
runtime; bounded when a function floods; off with ``forward_output=False``.

The client is a process of its own (tests/_output_client.py) whose stdout and stderr
are read here as a user's terminal would show them.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.output_relay import HOLD_BYTES, OutputRelay
from agent.supervisor_output import BURST, RATE, Budget, function_name
from aviato._output import OutputPrinter, prefix
from aviato.link import WorkerOutput
from aviato.protocol import FunctionOutput
from tests._netns import ClientRun
from tests.conftest import ROOT, Cluster, wait_until
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
        (7, FunctionOutput("sb-1", 1, "work", 0), b"early\n")
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
    assert isinstance(last, FunctionOutput)
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


def _client(c: Cluster, mode: str, via: str) -> ClientRun:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_output_client.py"), c.address, mode, via],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return ClientRun(proc)


def _run(c: Cluster, mode: str, via: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """The client's summary, and its stdout and stderr lines."""
    run = _client(c, mode, via)
    try:
        summary = run.result(300)
    finally:
        run.close()
    return summary, run.seen[:-1], run.stderr.splitlines()


def _prints_arrive_prefixed_and_in_order(c: Cluster, via: str) -> None:
    summary, out, err = _run(c, "order", via)
    assert summary["channels"] == ["LaneConnection" if via == "lane" else "Connection"]
    [worker] = summary["workers"]
    head = prefix("work", worker)
    assert out == [f"{head}{w} {i}" for i in range(3) for w in ("out-1", "sub-out", "out-2")]
    mine = [line for line in err if line.startswith(head)]
    assert mine == [f"{head}{w} {i}" for i in range(3) for w in ("err-1", "log-1", "sub-err")]


@pytest.mark.parametrize("via", ["lane", "zmq"])
def test_prints_arrive_prefixed_and_in_order(cluster: Cluster, via: str) -> None:
    _prints_arrive_prefixed_and_in_order(cluster, via)


def test_output_is_live_and_an_unfinished_line_shows(cluster: Cluster) -> None:
    run = _client(cluster, "live", "lane")
    try:
        started = run.wait_line("(slow sb-", 120)
        seen_at = time.monotonic()
        progress = run.wait_line("(slow sb-", 30)
        shown_at = time.monotonic()
        run.wait_line("call-done", 60)
        done_at = time.monotonic()
        summary = run.result(60)
    finally:
        run.close()
    head = prefix("slow", summary["worker"])
    assert (started, progress) == (f"{head}started", f"{head}progress")
    assert shown_at - seen_at < 5  # the unfinished line, in PARTIAL_SECONDS (0.2 s)
    assert done_at - shown_at > 2  # while the call still ran (it sleeps 8 s after)
    # Ahead of the call's outcome all the way: shown (by the printer's thread) even
    # though the client closed its session at once.
    assert f"{head} done" in run.seen


def test_forward_output_false_leaves_it_in_the_sandbox_log(cluster: Cluster) -> None:
    summary, out, err = _run(cluster, "off", "lane")
    assert summary["in_log"] is True
    assert not [line for line in out + err if "marker-not-forwarded" in line]


@pytest.mark.parametrize("via", ["lane", "zmq"])
def test_a_flood_is_bounded_and_the_drop_reported(cluster: Cluster, via: str) -> None:
    summary, out, err = _run(cluster, "flood", via)
    forwarded = sum(1 for line in out if line.endswith("f" * 1023))
    notice = re.compile(r"(\d+) bytes of stdout dropped")
    dropped = sum(int(n) for line in err for n in notice.findall(line))
    # At most the burst and a second's worth for each second it ran (and the client's
    # queue), far from the 200 MiB written; all of the rest said to be dropped.
    assert forwarded * 1024 < BURST + RATE * (summary["took"] + 2) + (8 << 20)
    assert dropped + forwarded * 1024 >= 199 << 20
    assert any(line.endswith("flood-end 0") for line in out)


def test_actors_forward_too(cluster: Cluster) -> None:
    summary, out, err = _run(cluster, "actor", "zmq")
    head = prefix("Model", summary["worker"])
    assert f"{head}init a" in out
    assert f"{head}predict 3" in err


# --------------------------------------------------------------------------- local runtime


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _local_cluster(tmp_path_factory.mktemp("local-output"), agents=1)


@pytest.mark.parametrize("via", ["lane", "zmq"])
def test_the_local_runtime_forwards_too(local: Cluster, via: str) -> None:
    _prints_arrive_prefixed_and_in_order(local, via)


# --------------------------------------------------------------------------- the worker's side

_WORKER_PROBE = r"""
import json, os, sys, time
from agent import supervisor_output
from agent.supervisor_link import Outbox
from aviato import link

sent = []

def record(header, frames):
    sent.append((json.loads(header), [bytes(f).decode() for f in frames]))

class Supervisor:
    def __init__(self):
        self.functions = {"d1": work}
        self.base_env = {"AVIATO_FORWARD_OUTPUT": "1", "HOME": "/"}
        self.outbox = Outbox(record, 0.002)
    def run_one(self, call, *args):
        os.write(1, b"from the call\n")
        os.write(2, b"partial")
        return link.CallOutcome(7, link.CallStatus.OK), [b"result"]

def work():
    pass

class Call:
    digest = "d1"

sup = Supervisor()
os.environ["AVIATO_FORWARD_OUTPUT"] = "1"
supervisor_output.forward(sup, link)
assert "AVIATO_FORWARD_OUTPUT" not in sup.base_env
sup.outbox.begin(1)
sup.outbox.add(*sup.run_one(Call()))
sup.outbox.end()
now = list(sent)  # as the outcome went
deadline = time.monotonic() + 30
while not any(h.get("dropped") for h, _ in sent) and time.monotonic() < deadline:
    os.write(1, b"x" * 65536)  # a flood: dropped past the burst, and said
    time.sleep(0.001)
time.sleep(0.3)
with open(sys.argv[1], "w") as f:
    json.dump([now, list(sent)], f)
"""


def test_the_worker_sends_a_calls_output_before_its_outcome_and_bounds_a_flood(
    tmp_path: Path,
) -> None:
    """In a process of its own (its descriptors 1 and 2 become pipes), with the real
    outbox: a call's output goes ahead of its outcome, named after the function; a
    flood is cut at the budget and the drop said."""
    report = tmp_path / "sent.json"
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER_PROBE, str(report)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    now, sent = json.loads(report.read_text())
    # The call's output went ahead of its outcome (then the results message).
    assert [h["op"] for h, _ in now] == ["worker-out", "worker-out", "results"]
    assert {(h["fd"], h["name"], body[0]) for h, body in now[:2]} == {
        (1, "work", "from the call\n"),
        (2, "work", "partial"),
    }
    out = [(h, body) for h, body in sent if h["op"] == "worker-out" and h["fd"] == 1]
    forwarded = sum(len(body[0]) for h, body in out)
    dropped = sum(h["dropped"] for h, _ in out)
    assert dropped > 0 and forwarded < BURST + RATE * 60
