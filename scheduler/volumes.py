"""Which agent holds which named volume: a pure index (no sockets, no clock), and the
placement preference it gives. A volume lives on one agent's host; a create naming it
goes to an agent that holds it when one has a free slot, else wherever there is room
(where the volume is made afresh, empty: volumes are per host, never copied)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from aviato.protocol import VolumeInfo
from scheduler.records import AgentRecord

__all__ = ["VolumeIndex"]


class VolumeIndex:
    def __init__(self) -> None:
        self._by_agent: dict[str, frozenset[str]] = {}
        self._holders: dict[str, set[str]] = {}

    def set(self, agent_id: str, names: Iterable[str]) -> None:
        """``agent_id``'s host holds exactly ``names`` now."""
        self.drop(agent_id)
        held = frozenset(names)
        if held:
            self._by_agent[agent_id] = held
            for name in held:
                self._holders.setdefault(name, set()).add(agent_id)

    def drop(self, agent_id: str) -> None:
        for name in self._by_agent.pop(agent_id, ()):
            holders = self._holders[name]
            holders.discard(agent_id)
            if not holders:
                del self._holders[name]

    def prefer(
        self, names: Iterable[str], usable: Callable[[str], AgentRecord | None]
    ) -> AgentRecord | None:
        """Of the agents holding any of ``names`` that ``usable`` returns (alive, with a
        free slot), the one holding the most of them (then the most free slots, then the
        smallest id); None when none is usable."""
        wanted = set(names)
        counts: dict[str, int] = {}
        for name in wanted:
            for agent_id in self._holders.get(name, ()):
                counts[agent_id] = counts.get(agent_id, 0) + 1
        best: tuple[int, int, str] | None = None
        found: AgentRecord | None = None
        for agent_id, held in counts.items():
            agent = usable(agent_id)
            if agent is None:
                continue
            key = (-held, -agent.free, agent_id)
            if best is None or key < best:
                best, found = key, agent
        return found

    def listing(self, agents: Mapping[str, AgentRecord]) -> tuple[VolumeInfo, ...]:
        """Every volume of a live agent, by name then agent."""
        rows = [
            VolumeInfo(name, a.agent_id, a.address, a.public_key, a.lane)
            for agent_id, names in self._by_agent.items()
            if (a := agents.get(agent_id)) is not None and a.alive
            for name in names
        ]
        return tuple(sorted(rows, key=lambda v: (v.name, v.agent_id)))
