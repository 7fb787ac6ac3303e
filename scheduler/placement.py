"""Placement: which agent a create goes to (``choose_agent``), why none can take it
(no agents, an isolation none offers, resources none could hold), and the resources
it holds there: CPUs, memory and GPU ids per agent, agent labels, spread or pack.
Pure, as state.py: no sockets, no clock.

An agent advertises its capacity when it registers (``RegisterAgent.cpus``,
``memory_bytes``, ``gpus``; 0 or empty: not advertised, so not limited). A sandbox
holds what its spec asks for while it is active (``cpus``, ``memory_bytes``: counted
against the capacity; ``gpus``: that many of the agent's GPU ids, each held by one
sandbox at a time). A sandbox that asks for nothing holds nothing but its slot, and is
placed as before (``choose_agent``'s fast path, from the indexes); one that asks is
placed by a walk of the live agents (O(agents), a few thousand at most):

- it fits an agent when that agent is alive, has a free slot, offers its isolation,
  carries each of its ``agent_labels``, and has the CPUs, memory and GPUs free;
- spread (the default): of those, the one with the most free slots, then the most
  free CPUs, then the smallest id; pack: the one with the fewest free slots, then the
  fewest free CPUs, then the smallest id (whole agents stay free for big requests);
- a create that no live agent could hold even empty fails at once
  (``RESOURCES_UNAVAILABLE``: the message names the largest agent); one that could
  waits in the queue, as creates wait for a slot;
- a queued create that fits nowhere now is passed over (later ones are placed), but
  once it has waited ``Config.reserve_after_seconds`` it reserves an agent that could
  hold it (``reserve_for``: the nearest to fitting it): later creates in the queue are
  not placed there, so what that agent's sandboxes free is left for it, and it is
  placed once they have freed enough (smaller creates cannot starve it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aviato.protocol import (
    ErrorCode,
    ErrorReply,
    RegisterAgent,
    SandboxSpec,
    spare_key,
)
from scheduler.lifecycle import LifecycleState
from scheduler.records import AgentRecord, PendingCreate, SandboxRecord

__all__ = [
    "PlacementState",
    "could_hold",
    "fits_now",
    "largest",
    "milli",
    "never_fits",
    "pick",
    "reserve_for",
    "resourced",
]

GIB = 1 << 30


def milli(cpus: float | None) -> int:
    """CPUs in thousandths, as the agent's tallies keep them."""
    return round((cpus or 0) * 1000)


def resourced(spec: SandboxSpec) -> bool:
    """Whether ``spec`` asks for more than a slot (and so takes the walk)."""
    return (
        bool(spec.cpus or spec.memory_bytes or spec.gpus or spec.agent_labels)
        or spec.placement == "pack"
    )


def _labels_match(agent: AgentRecord, spec: SandboxSpec) -> bool:
    labels = agent.labels
    return all(labels.get(k) == v for k, v in spec.agent_labels.items())


def could_hold(agent: AgentRecord, spec: SandboxSpec) -> bool:
    """Whether ``agent`` could hold ``spec`` with nothing else on it (alive or not)."""
    if spec.isolation is not None and spec.isolation not in agent.isolations:
        return False
    if not _labels_match(agent, spec):
        return False
    if agent.cpus_milli and milli(spec.cpus) > agent.cpus_milli:
        return False
    if agent.memory_bytes and (spec.memory_bytes or 0) > agent.memory_bytes:
        return False
    return (spec.gpus or 0) <= len(agent.gpus)


def fits_now(agent: AgentRecord, spec: SandboxSpec) -> bool:
    """Whether ``agent`` can take ``spec`` now: alive, a free slot, and what it asks
    for free."""
    if not agent.alive or agent.free <= 0 or not could_hold(agent, spec):
        return False
    if agent.cpus_milli and agent.cpus_used_milli + milli(spec.cpus) > agent.cpus_milli:
        return False
    if agent.memory_bytes and agent.memory_used + (spec.memory_bytes or 0) > agent.memory_bytes:
        return False
    return (spec.gpus or 0) <= len(agent.gpus) - len(agent.gpu_holders)


def _free_cpus(agent: AgentRecord) -> int:
    return agent.cpus_milli - agent.cpus_used_milli if agent.cpus_milli else 1 << 62


def pick(candidates: Iterable[AgentRecord], spec: SandboxSpec) -> AgentRecord | None:
    """Of the agents ``spec`` fits now, the one its placement chooses (see above)."""
    sign = 1 if spec.placement == "pack" else -1
    best: tuple[int, int, str] | None = None
    found = None
    for agent in candidates:
        if not fits_now(agent, spec):
            continue
        key = (sign * agent.free, sign * _free_cpus(agent), agent.agent_id)
        if best is None or key < best:
            best, found = key, agent
    return found


def _shortfall(agent: AgentRecord, spec: SandboxSpec) -> tuple[int, int, int, int]:
    """What ``agent`` lacks now to take ``spec``: GPUs, CPUs (milli), memory, a slot."""
    gpus = (spec.gpus or 0) - (len(agent.gpus) - len(agent.gpu_holders))
    cpus = milli(spec.cpus) - _free_cpus(agent)
    memory = (spec.memory_bytes or 0) - (
        agent.memory_bytes - agent.memory_used if agent.memory_bytes else 1 << 62
    )
    return max(0, gpus), max(0, cpus), max(0, memory), 0 if agent.free > 0 else 1


def reserve_for(
    agents: Iterable[AgentRecord], spec: SandboxSpec, reserved: set[str]
) -> AgentRecord | None:
    """The agent a starved create reserves: of the live ones not reserved already that
    could hold it, the one that lacks the least of it now (GPUs, then CPUs, then
    memory, then a slot; ties by id). None: every such agent is reserved."""
    best: tuple[tuple[int, int, int, int], str] | None = None
    found = None
    for agent in agents:
        if not agent.alive or agent.agent_id in reserved or not could_hold(agent, spec):
            continue
        key = (_shortfall(agent, spec), agent.agent_id)
        if best is None or key < best:
            best, found = key, agent
    return found


def _capacity(agent: AgentRecord) -> str:
    cpus = f"{agent.cpus_milli / 1000:g} CPUs" if agent.cpus_milli else "CPUs not advertised"
    memory = (
        f"{agent.memory_bytes / GIB:.1f} GiB memory"
        if agent.memory_bytes
        else "memory not advertised"
    )
    gpus = f"GPUs {','.join(agent.gpus)}" if agent.gpus else "no GPUs"
    labels = ",".join(f"{k}={v}" for k, v in sorted(agent.labels.items())) or "none"
    return f"{agent.agent_id} ({cpus}, {memory}, {gpus}; labels: {labels})"


def largest(agents: Iterable[AgentRecord]) -> AgentRecord | None:
    """The live agent with the most GPUs, then CPUs, then memory (ties: smallest id)."""
    live = [a for a in agents if a.alive]
    if not live:
        return None
    return min(live, key=lambda a: (-len(a.gpus), -a.cpus_milli, -a.memory_bytes, a.agent_id))


def _asked(spec: SandboxSpec) -> str:
    parts = []
    if spec.cpus:
        parts.append(f"cpus={spec.cpus:g}")
    if spec.memory_bytes:
        parts.append(f"memory_bytes={spec.memory_bytes} ({spec.memory_bytes / GIB:.1f} GiB)")
    if spec.gpus:
        parts.append(f"gpus={spec.gpus}")
    if spec.agent_labels:
        labels = ",".join(f"{k}={v}" for k, v in sorted(spec.agent_labels.items()))
        parts.append(f"agent_labels {labels}")
    if spec.isolation:
        parts.append(f"isolation {spec.isolation}")
    return ", ".join(parts)


def never_fits(agents: Iterable[AgentRecord], spec: SandboxSpec) -> str:
    """Why no live agent could ever hold ``spec`` ("" when one could)."""
    live = [a for a in agents if a.alive]
    if not live or any(could_hold(a, spec) for a in live):
        return ""
    labelled = [a for a in live if _labels_match(a, spec)]
    big = largest(labelled or live)
    assert big is not None
    if not labelled:
        return (
            f"no live agent could ever hold {_asked(spec)}: none carries those labels "
            f"(the largest is {_capacity(big)}); start an agent with "
            "--label KEY=VALUE, or ask for labels an agent has"
        )
    return (
        f"no live agent could ever hold {_asked(spec)}: the largest is {_capacity(big)}; "
        "ask for less, or add an agent with more (python -m agent --gpus 0,1 for GPUs)"
    )


class PlacementState(LifecycleState):
    """The resource half of placement, over the tables: capacity from registrations,
    what each active sandbox holds, and the walk for creates that ask for resources."""

    #: Live agents (or their capacity) changed since the queue was last checked for
    #: creates no agent could hold any more (see ``_unplaceable``).
    _capacity_changed: bool = True

    def _set_alive(self, agent: AgentRecord, alive: bool) -> None:
        super()._set_alive(agent, alive)
        self._capacity_changed = True

    def _set_capacity(self, agent: AgentRecord, msg: RegisterAgent) -> None:
        """``agent`` advertises ``msg``'s capacity (a re-registration may change it: a
        GPU it no longer has is dropped from its holders)."""
        agent.cpus_milli = max(0, milli(msg.cpus))
        agent.memory_bytes = max(0, msg.memory_bytes)
        agent.gpus = tuple(dict.fromkeys(msg.gpus))
        kept = set(agent.gpus)
        agent.gpu_holders = {g: s for g, s in agent.gpu_holders.items() if g in kept}
        self._capacity_changed = True

    def _no_agents(self, now: float) -> str:
        """Why a create cannot even wait for a slot ("" if it can): no live agent, past
        the start-up grace (in which agents register, again after a restart)."""
        if self._alive_count > 0:
            return ""
        if now - self.started_at < self.config.startup_grace_seconds:
            return ""
        if not self.agents:
            return (
                "no agents registered with this scheduler: start one on each worker host "
                "(python -m agent --scheduler tcp://SCHEDULER:PORT)"
            )
        lost = ", ".join(sorted(self.agents))
        return (
            f"no agents registered that are alive (lost: {lost}); restart them or start "
            "another (python -m agent --scheduler tcp://SCHEDULER:PORT)"
        )

    def _no_isolation(self, spec: SandboxSpec, now: float) -> str:
        """Why no live agent can run ``spec``'s isolation ("" if one can, or agents may
        still register: the start-up grace)."""
        level = spec.isolation
        if level is None or self._offering.get(level):
            return ""
        if now - self.started_at < self.config.startup_grace_seconds:
            return ""
        offered = sorted({lv for lv, ids in self._offering.items() if ids})
        return (
            f"no live agent offers isolation {level!r} (they offer: "
            f"{', '.join(offered) or 'nothing'}); start an agent with --isolation {level}"
            " (gvisor: Docker with the runsc runtimes registered, see README), or ask"
            " for one of those"
        )

    def choose_agent(self, spec: SandboxSpec | None = None) -> AgentRecord | None:
        """A snapshot's create goes to the agent holding it, or waits for it; else an
        agent holding ``spec``'s named volumes, with a free slot (see
        scheduler/volumes.py); else one holding a ready spare of ``spec``'s shape (the most
        of them; ties by id), so that the create is ready in milliseconds; else spread:
        the live agent with the most free slots (ties by id, for determinism). From the
        indexes. A spec that asks for resources: see scheduler/placement.py. Before all
        of these, a session's internal sandboxes stay together (``_internal_agent``)."""
        if spec is not None and spec.network == "internal" and spec.session_id:
            pinned, keeper = self._internal_agent(spec)
            if pinned:
                return keeper
        if spec is not None and resourced(spec):
            return self._choose_fitting(spec)
        if spec is not None and self._snapshot_keys:
            snapshot, keeper = self.snapshot_agent(spec)  # its agent, or none yet
            if snapshot:
                return keeper
        if spec is not None and spec.volumes:
            keeper = self._volumes.prefer(spec.volumes.values(), self._usable)
            if keeper is not None:
                return keeper
        if spec is not None and self._spares:
            key = spare_key(spec)
            holder = self._spares.best(key) if key is not None else None
            if holder is not None:
                return self.agents[holder]
        if spec is not None and spec.isolation is not None:
            best = self._by_isolation.best(spec.isolation)
            return self.agents[best] if best is not None else None
        best = self._free.best()
        return self.agents[best] if best is not None else None

    def _internal_agent(self, spec: SandboxSpec) -> tuple[bool, AgentRecord | None]:
        """A session's ``network="internal"`` sandboxes meet on one agent's network
        only (sandboxes on two agents do not reach each other), so they share an agent:
        (True, that agent when it can take ``spec`` now, else None: the create waits
        for it) while one of them is active there; (False, None) when none is.
        O(the session's active sandboxes)."""
        for sid in self._by_session.get(spec.session_id or "", ()):
            rec = self.live.get(sid)
            if rec is None or rec.spec.network != "internal" or rec.agent_id is None:
                continue
            agent = self.agents.get(rec.agent_id)
            if agent is None or not agent.alive:
                continue
            return True, agent if fits_now(agent, spec) else None
        return False, None

    def _usable(self, agent_id: str) -> AgentRecord | None:
        agent = self.agents.get(agent_id)
        return agent if agent is not None and agent.alive and agent.free > 0 else None

    def _took_spare(self, agent: AgentRecord, spec: SandboxSpec) -> None:
        """A create of a shape the agent holds spares of: it will take one (until it
        says otherwise), so the next such create may go elsewhere."""
        key = spare_key(spec)
        ready = agent.spare_shapes.get(key, 0) if key is not None else 0
        if ready > 0:
            assert key is not None
            agent.spares = max(0, agent.spares - 1)
            if ready > 1:
                agent.spare_shapes[key] = ready - 1
            else:
                del agent.spare_shapes[key]
                self._spares.set(agent.agent_id, key, 0)

    def _hold(self, agent: AgentRecord, rec: SandboxRecord, want: Iterable[str] = ()) -> None:
        """``rec`` becomes active on ``agent``: its slot, CPUs, memory and GPUs are
        held. ``want``: the GPU ids it already has (a sandbox reported by its agent),
        kept where free; the rest are the agent's first free ones."""
        agent.active.add(rec.sandbox_id)
        spec = rec.spec
        agent.cpus_used_milli += milli(spec.cpus)
        agent.memory_used += spec.memory_bytes or 0
        n = spec.gpus or 0
        if not n or not agent.gpus:
            return
        holders = agent.gpu_holders
        mine = [g for g in want if g in agent.gpus and g not in holders][:n]
        mine += [g for g in agent.gpus if g not in holders and g not in mine][: n - len(mine)]
        for g in mine:
            holders[g] = rec.sandbox_id
        rec.gpu_ids = tuple(mine)

    def _release(self, agent: AgentRecord, rec: SandboxRecord) -> None:
        """``rec`` is no longer active on ``agent``: what it held is free again."""
        if rec.sandbox_id not in agent.active:
            return
        agent.active.discard(rec.sandbox_id)
        spec = rec.spec
        agent.cpus_used_milli = max(0, agent.cpus_used_milli - milli(spec.cpus))
        agent.memory_used = max(0, agent.memory_used - (spec.memory_bytes or 0))
        for g in rec.gpu_ids:
            if agent.gpu_holders.get(g) == rec.sandbox_id:
                del agent.gpu_holders[g]

    def _choose_fitting(self, spec: SandboxSpec) -> AgentRecord | None:
        """``choose_agent`` for a spec that asks for resources: a snapshot's agent if it
        fits; else a volume's holder that fits; else one holding a spare of its shape
        that fits; else ``pick`` over the live agents."""
        if self._snapshot_keys:
            snapshot, keeper = self.snapshot_agent(spec)
            if snapshot:
                return keeper if keeper is not None and fits_now(keeper, spec) else None
        if spec.volumes:
            keeper = self._volumes.prefer(spec.volumes.values(), self._fitting(spec))
            if keeper is not None:
                return keeper
        key = spare_key(spec) if self._spares else None
        holder = self.agents.get(self._spares.best(key) or "") if key is not None else None
        if holder is not None and fits_now(holder, spec):
            return holder
        return pick(self.agents.values(), spec)

    def _choose_around(self, spec: SandboxSpec, reserved: set[str]) -> AgentRecord | None:
        """``choose_agent``, but never a ``reserved`` agent (held for a starved create
        earlier in the queue): the walk over the others when the choice was one."""
        agent = self.choose_agent(spec)
        if agent is None or agent.agent_id not in reserved:
            return agent
        if self._snapshot_keys and self.snapshot_agent(spec)[0]:
            return None  # a snapshot's create goes to its agent only: it waits
        return pick((a for a in self.agents.values() if a.agent_id not in reserved), spec)

    def _reserve(self, req: PendingCreate, now: float, reserved: set[str]) -> None:
        """``req`` fits nowhere now: past the bound, it reserves an agent (``reserved``
        grows; it holds for the rest of this pass, and is found again on the next)."""
        if now - req.queued_at < self.config.reserve_after_seconds or not resourced(req.spec):
            return
        agent = reserve_for(self.agents.values(), req.spec, reserved)
        if agent is not None:
            reserved.add(agent.agent_id)

    def _fitting(self, spec: SandboxSpec) -> Callable[[str], AgentRecord | None]:
        def usable(agent_id: str) -> AgentRecord | None:
            agent = self.agents.get(agent_id)
            return agent if agent is not None and fits_now(agent, spec) else None

        return usable

    def _never_fits(self, spec: SandboxSpec, now: float) -> str:
        """Why no live agent could ever hold ``spec`` ("" if one could, or agents may
        still register: the start-up grace)."""
        if not resourced(spec) or now - self.started_at < self.config.startup_grace_seconds:
            return ""
        return never_fits(self.agents.values(), spec)

    def _unplaceable(self, now: float) -> list[tuple[PendingCreate, str]]:
        """Queued creates that no live agent could hold any longer (one left, or none
        came in the start-up grace), with why: refused rather than left to time out.
        O(queued), only after agents changed."""
        if not self._capacity_changed or not self.pending:
            return []
        if now - self.started_at >= self.config.startup_grace_seconds:
            self._capacity_changed = False
        out: list[tuple[PendingCreate, str]] = []
        for req in self.pending:
            why = self._never_fits(req.spec, now)
            if why:
                out.append((req, why))
        return out

    def _refusal(self, why: str) -> ErrorReply:
        return ErrorReply(ErrorCode.RESOURCES_UNAVAILABLE, why)
