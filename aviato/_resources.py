"""How many sandboxes of some options an agent has room for now, from its row in
``aviato status`` (``AgentInfo``): a function pool sizes itself by it, so that a pool
of GPU workers does not queue more workers than there are GPUs. The scheduler's own
rule is scheduler/placement.py; this is the client's estimate of it."""

from __future__ import annotations

from aviato._options import SandboxOptions
from aviato.protocol import AgentInfo

__all__ = ["room_for"]


def room_for(agent: AgentInfo, options: SandboxOptions) -> int:
    """Sandboxes of ``options`` that fit ``agent`` beside what it runs (0: none)."""
    if not agent.alive:
        return 0
    if any(agent.labels.get(k) != v for k, v in options.agent_labels.items()):
        return 0
    room = agent.slots - agent.used
    if options.gpus:
        room = min(room, (len(agent.gpus) - len(agent.gpus_used)) // options.gpus)
    if options.cpus and agent.cpus:
        room = min(room, int((agent.cpus - agent.cpus_used + 1e-9) // options.cpus))
    if options.memory_bytes and agent.memory_bytes:
        room = min(room, (agent.memory_bytes - agent.memory_used) // options.memory_bytes)
    return max(0, room)
