"""The agent's Prometheus metrics: gauges read at scrape time (sandboxes running and
starting), histograms and counters fed by wrapping a few of the agent's own entry
points at start-up (``attach``), so that the servers carry no metrics code of their
own: the create, the exec handler, the exit handler, the worker hub's call relay.

Bounded labels: ``via`` (supervisor, runtime), ``cause`` (oom, killed, exit), ``op``
(create, exec): fixed sets. Only the CPU and memory gauges are per sandbox, for the
sandboxes running at the scrape (none for a gone one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.usage import sandbox_usage
from aviato._server.metrics import LATENCY_BUCKETS
from aviato.protocol import CallResults, Decoded, Exec, Message, RunCalls

if TYPE_CHECKING:
    from agent.runtime.base import SandboxExit
    from agent.server import AgentServer
    from agent.supervisor_hub import WorkerHub

__all__ = ["AgentMetrics", "exit_cause"]

#: Exit codes of a process killed by SIGKILL (a shell's 128+9, or the signal itself).
_KILLED_CODES = frozenset({137, -9})


def exit_cause(exit_code: int | None, oom_killed: bool) -> str:
    """Why a sandbox's main process (a function worker's) ended, as a bounded label."""
    if oom_killed:
        return "oom"
    if exit_code in _KILLED_CODES:
        return "killed"
    return "exit"


def _size(payload: Any) -> int:
    try:
        return len(payload)
    except TypeError:
        return 0


@dataclass(slots=True)
class CallTally:
    calls: int = 0
    results: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _AgentCollector(Collector):
    def __init__(self, server: AgentServer, tally: CallTally) -> None:
        self.server = server
        self.tally = tally

    def collect(self) -> Iterator[Metric]:
        server = self.server
        sandboxes = GaugeMetricFamily(
            "aviato_agent_sandboxes", "Sandboxes on this agent, by state", labels=["state"]
        )
        sandboxes.add_metric(["running"], len(server.sandboxes))
        sandboxes.add_metric(["creating"], len(server.creating))
        yield sandboxes
        yield GaugeMetricFamily("aviato_agent_slots", "Sandbox slots", value=server.slots)
        tally = self.tally
        yield CounterMetricFamily(
            "aviato_agent_calls_relayed", "Function calls relayed to workers", value=tally.calls
        )
        yield CounterMetricFamily(
            "aviato_agent_call_results_relayed",
            "Function call outcomes relayed back to clients",
            value=tally.results,
        )
        moved = CounterMetricFamily(
            "aviato_agent_call_bytes",
            "Function call payload bytes relayed, in (to workers) and out (to clients)",
            labels=["direction"],
        )
        moved.add_metric(["in"], tally.bytes_in)
        moved.add_metric(["out"], tally.bytes_out)
        yield moved
        # Per sandbox: the running ones only (a gone sandbox has no series).
        cpu = CounterMetricFamily(
            "aviato_agent_sandbox_cpu_seconds",
            "CPU time used by each running sandbox (its cgroup)",
            labels=["sandbox"],
        )
        memory = GaugeMetricFamily(
            "aviato_agent_sandbox_memory_bytes",
            "Memory used by each running sandbox (its cgroup)",
            labels=["sandbox"],
        )
        for sid in list(server.sandboxes):
            usage = sandbox_usage(server.runtime, sid)
            if usage is None:
                continue
            if usage[0] is not None:
                cpu.add_metric([sid], usage[0])
            if usage[1] is not None:
                memory.add_metric([sid], usage[1])
        yield cpu
        yield memory


class AgentMetrics:
    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.create_latency = Histogram(
            "aviato_agent_create_ready_seconds",
            "From a placement received to the sandbox ready (its worker or supervisor up)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.exec_latency = Histogram(
            "aviato_agent_exec_seconds",
            "Exec requests, from received to answered, by path",
            ["via"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        #: The call path's tallies: plain ints (no lock, no label lookup per batch),
        #: turned into counters at scrape time by the collector.
        self.tally = CallTally()
        r.register(_AgentCollector(server, self.tally))
        self.workers_lost = Counter(
            "aviato_agent_sandboxes_lost",
            "Sandboxes (function workers among them) whose main process ended, by cause",
            ["cause"],
            registry=r,
        )
        self.runtime_errors = Counter(
            "aviato_agent_runtime_errors",
            "Runtime operations that failed, by operation",
            ["op"],
            registry=r,
        )
        for via in ("supervisor", "runtime"):
            self.exec_latency.labels(via)
        for cause in ("oom", "killed", "exit"):
            self.workers_lost.labels(cause)
        for op in ("create", "exec"):
            self.runtime_errors.labels(op)

    def attach(self) -> None:
        """Wrap the server's entry points (before it serves)."""
        server = self.server
        create = server._create

        async def timed_create(sid: str, spec: Any, labels: dict[str, str]) -> None:
            started = time.monotonic()
            try:
                await create(sid, spec, labels)
            except Exception:
                self.runtime_errors.labels("create").inc()
                raise
            self.create_latency.observe(time.monotonic() - started)

        server._create = timed_create  # type: ignore[method-assign]

        handle_exit = server._handle_exit

        async def counted_exit(exit_: SandboxExit) -> None:
            if exit_.sandbox_id in server.sandboxes:
                self.workers_lost.labels(exit_cause(exit_.exit_code, exit_.oom_killed)).inc()
            await handle_exit(exit_)

        server._handle_exit = counted_exit  # type: ignore[method-assign]

        handlers = server.plane._handlers
        on_exec = handlers[Exec]

        async def timed_exec(identity: bytes, d: Decoded) -> None:
            hub = server.plane.hub
            msg = d.msg
            assert isinstance(msg, Exec)
            via = "supervisor" if hub is not None and hub.supervised(msg.sandbox_id) else "runtime"
            started = time.monotonic()
            try:
                await on_exec(identity, d)
            except Exception:
                self.runtime_errors.labels("exec").inc()
                raise
            finally:
                self.exec_latency.labels(via).observe(time.monotonic() - started)

        handlers[Exec] = timed_exec

    def attach_hub(self, hub: WorkerHub) -> None:
        """Count the calls the hub relays, and their bytes (the function-call path:
        one counter increment per batch, not per call)."""
        run_calls = hub.run_calls
        tally = self.tally

        def counted_run_calls(
            identity: bytes, request_id: int, msg: RunCalls, payloads: tuple[Any, ...]
        ) -> None:
            run_calls(identity, request_id, msg, payloads)
            tally.calls += len(msg.calls)
            tally.bytes_in += sum(map(_size, payloads))

        hub.run_calls = counted_run_calls  # type: ignore[method-assign]
        send: Callable[..., None] = hub._send

        def counted_send(
            identity: bytes, request_id: int, msg: Message, payloads: Sequence[Any] = ()
        ) -> None:
            if type(msg) is CallResults:
                assert isinstance(msg, CallResults)
                tally.results += len(msg.outcomes)
                tally.bytes_out += sum(map(_size, payloads))
            send(identity, request_id, msg, payloads)

        hub._send = counted_send
