"""The scheduler's Prometheus metrics: gauges read from its tables at scrape time
(agents, slots, sandboxes by state, the queue), counters and histograms fed by a few
hook calls in scheduler/server.py (creates, stops, placements, refusals, deaths).

Bounded labels: ``agent`` only for the agents the scheduler lists now (a dead one is
forgotten after --forget-dead-after), ``state``/``code`` from fixed enums. Nothing is
labelled by sandbox, session or client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aviato._server.metrics import LATENCY_BUCKETS
from aviato.protocol import (
    CreateSandbox,
    ErrorCode,
    ErrorReply,
    Message,
    PlaceSandbox,
    SandboxStatus,
    StopSandbox,
)
from scheduler.records import Action, AgentDeclaredDead, Reply, ReplyKey, SendToAgent
from scheduler.state import SchedulerState

__all__ = ["SchedulerMetrics"]

#: Create arrivals remembered for the queue-wait histogram at most (each is dropped
#: when its create is placed or answered; junk that is neither is cleared in bulk).
MAX_ARRIVALS = 100_000


class _StateCollector(Collector):
    """Gauges computed from the state when scraped (O(agents), not O(sandboxes))."""

    def __init__(self, state: SchedulerState, clock: Callable[[], float]) -> None:
        self.state = state
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        state = self.state
        now = self.clock()
        agents = GaugeMetricFamily("aviato_scheduler_agents", "Agents by state", labels=["state"])
        alive = sum(1 for a in state.agents.values() if a.alive)
        agents.add_metric(["alive"], alive)
        agents.add_metric(["dead"], len(state.agents) - alive)
        yield agents
        slots = GaugeMetricFamily(
            "aviato_scheduler_agent_slots",
            "Sandbox slots per agent, used or free",
            labels=["agent", "kind"],
        )
        spares = GaugeMetricFamily(
            "aviato_scheduler_agent_spares", "Ready spares per agent", labels=["agent"]
        )
        age = GaugeMetricFamily(
            "aviato_scheduler_agent_heartbeat_age_seconds",
            "Seconds since each agent's last heartbeat",
            labels=["agent"],
        )
        up = GaugeMetricFamily(
            "aviato_scheduler_agent_alive", "1 if the agent is alive, 0 if dead", labels=["agent"]
        )
        for agent in state.agents.values():
            used = len(agent.active)
            slots.add_metric([agent.agent_id, "used"], used)
            slots.add_metric([agent.agent_id, "free"], max(0, agent.slots - used))
            spares.add_metric([agent.agent_id], agent.spares)
            age.add_metric([agent.agent_id], max(0.0, now - agent.last_seen))
            up.add_metric([agent.agent_id], 1 if agent.alive else 0)
        yield from (slots, spares, age, up)
        sandboxes = GaugeMetricFamily(
            "aviato_scheduler_sandboxes",
            "Sandboxes by state (ended ones while still listed)",
            labels=["state"],
        )
        for status in SandboxStatus:
            sandboxes.add_metric([status.value], state.counts.get(status, 0))
        yield sandboxes
        yield GaugeMetricFamily(
            "aviato_scheduler_queue_depth",
            "Creates waiting for a free slot",
            value=len(state.pending),
        )
        yield GaugeMetricFamily(
            "aviato_scheduler_sessions", "Sessions holding a lease", value=len(state.sessions)
        )
        yield GaugeMetricFamily(
            "aviato_scheduler_leases_expired",
            "Session leases that expired (their client went away)",
            value=state.leases_expired,
        )


class SchedulerMetrics:
    """One scheduler's metrics, in a registry of their own."""

    def __init__(self, state: SchedulerState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(state, clock))
        r = self.registry
        self.creates = Counter("aviato_scheduler_creates", "Create requests received", registry=r)
        self.stops = Counter("aviato_scheduler_stops", "Stop requests received", registry=r)
        self.placements = Counter(
            "aviato_scheduler_placements", "Sandboxes placed on an agent", registry=r
        )
        self.placement_failures = Counter(
            "aviato_scheduler_placement_failures",
            "Placements the agent refused or failed",
            registry=r,
        )
        self.queue_wait = Histogram(
            "aviato_scheduler_queue_wait_seconds",
            "From a create's arrival to its placement (time queued for a slot)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.placement_latency = Histogram(
            "aviato_scheduler_placement_latency_seconds",
            "From a placement sent to the agent's answer (the sandbox started, or failed)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.agents_dead = Counter(
            "aviato_scheduler_agents_declared_dead", "Agents declared dead", registry=r
        )
        self.errors = Counter(
            "aviato_scheduler_error_replies",
            "Requests answered with an error, by code (unauthorized and bad_request: refused)",
            ["code"],
            registry=r,
        )
        for code in ErrorCode:  # every series from the start: rate() sees the first one
            self.errors.labels(code.name.lower())
        self._arrivals: dict[ReplyKey, float] = {}
        #: Running totals as plain ints, for the dashboard's rates.
        self.created = 0
        self.placed = 0

    # ------------------------------------------------------------------ hooks

    def on_request(self, key: ReplyKey, msg: Message, now: float) -> None:
        """A request passed the token check (before its handler)."""
        kind = type(msg)
        if kind is CreateSandbox:
            self.created += 1
            self.creates.inc()
            if len(self._arrivals) >= MAX_ARRIVALS:
                self._arrivals.clear()
            self._arrivals[key] = now
        elif kind is StopSandbox:
            self.stops.inc()

    def on_actions(self, actions: Iterable[Action], now: float) -> None:
        for action in actions:
            kind = type(action)
            if kind is Reply:
                assert isinstance(action, Reply)
                if self._arrivals:
                    self._arrivals.pop(action.to, None)
            elif kind is SendToAgent:
                assert isinstance(action, SendToAgent)
                if type(action.msg) is PlaceSandbox:
                    self._placed(action.msg, now)
            elif kind is AgentDeclaredDead:
                self.agents_dead.inc()

    def _placed(self, msg: PlaceSandbox, now: float) -> None:
        self.placed += 1
        self.placements.inc()
        rec = self.state.sandboxes.get(msg.sandbox.sandbox_id)
        if rec is not None and rec.creator is not None:
            arrived = self._arrivals.pop(rec.creator, None)
            if arrived is not None:
                self.queue_wait.observe(max(0.0, now - arrived))

    def on_placement_answer(self, seconds: float, failed: bool) -> None:
        self.placement_latency.observe(max(0.0, seconds))
        if failed:
            self.placement_failures.inc()

    def on_error(self, code: ErrorCode | str) -> None:
        name = code.name.lower() if isinstance(code, ErrorCode) else code
        self.errors.labels(name).inc()

    def on_error_reply(self, msg: Message) -> None:
        if type(msg) is ErrorReply:
            assert isinstance(msg, ErrorReply)
            self.on_error(msg.code)
