"""The soak's chaos: every so often, kill a worker container, an agent or the scheduler
(at most a few faults outstanding), restart what was killed, and time each recovery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from aviato import RemoteFunction

from ._common import sh
from ._soak_cluster import SoakCluster
from ._soak_load import Load

log = logging.getLogger("soak.chaos")
KINDS = ("container", "agent", "scheduler")


@dataclass(frozen=True)
class ChaosConfig:
    interval: float = 20.0  # mean seconds between faults (each wait is 0.75-1.25x this)
    kinds: tuple[str, ...] = KINDS
    max_outstanding: int = 2
    agent_down: float = 4.0  # seconds a killed agent stays down before its restart
    scheduler_down: float = 1.0
    #: A fault not recovered within this long is recorded as such and stops counting.
    recovery_timeout: float = 90.0


@dataclass(eq=False)
class Fault:
    kind: str
    victim: str
    at: float  # monotonic
    lost_before: int  # the pool's workers_lost when it was injected
    old_address: str = ""  # a killed agent's data-plane address
    restarted_at: float | None = None
    seen_dead: bool = False  # the scheduler was seen counting the killed agent dead
    agents_back_at: float | None = None  # every agent alive (the victim re-registered)
    back_at: float | None = None  # ... and a call completed after that
    pool_full_at: float | None = None  # ... and the pool at its full size again
    gave_up_at: float | None = None

    @property
    def outstanding(self) -> bool:
        return self.gave_up_at is None and self.pool_full_at is None

    def seconds(self, t: float | None) -> float | None:
        return None if t is None else t - self.at


class Chaos:
    def __init__(
        self,
        cluster: SoakCluster,
        load: Load,
        fn: RemoteFunction[tuple[int, str]],
        target_workers: int,
        config: ChaosConfig,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self.load = load
        self.fn = fn
        self.target_workers = target_workers
        self.config = config
        self.rng = rng
        self.faults: list[Fault] = []
        self.notes: list[str] = []  # faults that found nothing to kill, odd sightings
        self._vanished: set[tuple[str, int]] = set()
        #: Pool workers the faults killed: a killed container, an agent's containers.
        self.workers_killed = 0

    def outstanding(self) -> list[Fault]:
        return [f for f in self.faults if f.outstanding]

    def _down(self) -> set[str]:
        """Victims killed and not yet restarted."""
        return {f.victim for f in self.faults if f.kind != "container" and f.restarted_at is None}

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Inject faults until ``stop``; then wait (bounded) for the outstanding ones to
        recover. Restarts and the recovery monitor are owned by one task group."""
        monitor_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._monitor(monitor_stop))
            while not stop.is_set():
                wait = self.config.interval * self.rng.uniform(0.75, 1.25)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
                if stop.is_set():
                    break
                if len(self.outstanding()) >= self.config.max_outstanding:
                    log.info("fault skipped: %d outstanding", len(self.outstanding()))
                    continue
                await self._inject(tg)
            deadline = time.monotonic() + self.config.recovery_timeout + 5
            while self.outstanding() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            monitor_stop.set()

    async def _inject(self, tg: asyncio.TaskGroup) -> None:
        kinds = list(self.config.kinds)
        self.rng.shuffle(kinds)
        down = self._down()
        for kind in kinds:
            if kind == "scheduler" and "scheduler" not in down:
                await self._kill_scheduler(tg)
                return
            if kind == "agent":
                alive = [a for a in self.cluster.agent_ids if a not in down]
                if alive:
                    await self._kill_agent(tg, self.rng.choice(alive))
                    return
            if kind == "container" and await self._kill_container():
                return
        self.notes.append(f"a fault found nothing to kill among {kinds}")

    def _new_fault(self, kind: str, victim: str) -> Fault:
        fault = Fault(kind, victim, time.monotonic(), self.fn.statistics().workers_lost)
        self.faults.append(fault)
        log.warning("fault %d: %s %s", len(self.faults), kind, victim)
        return fault

    async def _kill_container(self) -> bool:
        names = await self.cluster.containers(running_only=True)
        if not names:
            return False
        name = self.rng.choice(sorted(names))
        fault = self._new_fault("container", name)
        self.workers_killed += 1
        try:
            await sh("docker", "kill", name, timeout=30)
        except RuntimeError as exc:  # it ended by itself in between: still a fault
            log.warning("docker kill %s: %s", name, exc)
        fault.restarted_at = fault.at
        return True

    async def _kill_agent(self, tg: asyncio.TaskGroup, agent_id: str) -> None:
        alive = await self.cluster.alive_agents()
        fault = self._new_fault("agent", agent_id)
        fault.old_address = alive.get(agent_id, "")
        self.workers_killed += len(await self.cluster.containers(agent_id, running_only=True))
        await self.cluster.kill(self.cluster.agents[agent_id])

        async def restart() -> None:
            await asyncio.sleep(self.config.agent_down)
            self.cluster.start_agent(agent_id)  # same id: it reaps its orphans at start
            fault.restarted_at = time.monotonic()

        tg.create_task(restart())

    async def _kill_scheduler(self, tg: asyncio.TaskGroup) -> None:
        fault = self._new_fault("scheduler", "scheduler")
        await self.cluster.kill(self.cluster.scheduler)

        async def restart() -> None:
            await asyncio.sleep(self.config.scheduler_down)
            await self.cluster.start_scheduler()  # on the same port
            fault.restarted_at = time.monotonic()

        tg.create_task(restart())

    # ------------------------------------------------------------------ recovery

    async def _monitor(self, stop: asyncio.Event) -> None:
        """Every 0.2 s: ask the scheduler which agents are alive, look at the pool, and
        move each outstanding fault through its recovery stages."""
        while not stop.is_set():
            asked_at = time.monotonic()
            status = await self.cluster.status(timeout=1.0)
            alive = (
                {} if status is None else {a.agent_id: a.address for a in status.agents if a.alive}
            )
            stats = self.fn.statistics()
            now = time.monotonic()
            for fault in self.outstanding():
                self._advance(
                    fault,
                    asked_at,
                    now,
                    status is not None,
                    alive,
                    stats.workers,
                    stats.workers_lost,
                )
            for agent_id, n in self.cluster.vanished_socket_dirs():
                if (agent_id, n) not in self._vanished:
                    self._vanished.add((agent_id, n))
                    note = (
                        f"{agent_id} (process #{n}) runs without its socket directory "
                        f"{self.cluster.socket_dir(agent_id)}: removed by someone else?"
                    )
                    log.error(note)
                    self.notes.append(note)
            await asyncio.sleep(0.2)

    def _advance(
        self,
        fault: Fault,
        asked_at: float,
        now: float,
        answered: bool,
        alive: dict[str, str],
        workers: int,
        workers_lost: int,
    ) -> None:
        if answered and fault.kind == "agent" and fault.victim not in alive:
            fault.seen_dead = True
        if fault.agents_back_at is None and self._agents_back(fault, asked_at, answered, alive):
            fault.agents_back_at = now
        if fault.agents_back_at is not None and fault.back_at is None:
            fault.back_at = self.load.first_completion_after(fault.agents_back_at)
        if fault.back_at is not None and workers >= self.target_workers:
            # A killed worker or agent counts as replaced only once the pool noticed it.
            if fault.kind == "scheduler" or workers_lost > fault.lost_before:
                fault.pool_full_at = now
        if fault.outstanding and now - fault.at > self.config.recovery_timeout:
            fault.gave_up_at = now
            log.error(
                "fault %s %s: not recovered after %.0f s (agents back %s, calls %s, pool %d/%d)",
                fault.kind,
                fault.victim,
                now - fault.at,
                fault.seconds(fault.agents_back_at),
                fault.seconds(fault.back_at),
                workers,
                self.target_workers,
            )

    def _agents_back(
        self, fault: Fault, asked_at: float, answered: bool, alive: dict[str, str]
    ) -> bool:
        if not answered or set(alive) != set(self.cluster.agent_ids):
            return False
        if fault.restarted_at is None or asked_at < fault.restarted_at:
            return False
        if fault.kind == "agent":
            # Alive again means registered again, not yet declared dead.
            return fault.seen_dead or alive[fault.victim] != fault.old_address
        return True
