"""Output forwarding (issue 14 part 1, MsgType 200-219): what a function or actor
prints in its worker sandbox, shown live by the client that owns the worker.

- ``WatchOutput`` (client -> agent): send me the output of the worker in
  ``sandbox_id``. Sent once per worker, before its first calls, on the channel that
  carries them; never answered but by ``FunctionOutput``s echoing its request id, for as
  long as the worker lives (a later watch of the same worker takes its place).
- ``FunctionOutput`` (agent -> client): a piece of the worker's stdout (``fd`` 1) or
  stderr (2), the payload ``[data]``; ``name`` is the function it ran when that was
  read; ``dropped`` bytes of that stream were dropped before it (over the rate limit
  at the worker or the agent), its data then possibly empty.

This travels on requests of its own, beside the calls' CallResults: never on the
results path.
"""

from __future__ import annotations

from dataclasses import dataclass

from aviato.protocol.records import Message, MsgType

__all__ = ["FunctionOutput", "WatchOutput"]


@dataclass(frozen=True, slots=True)
class WatchOutput(Message):
    TYPE = MsgType.WATCH_OUTPUT
    sandbox_id: str


@dataclass(frozen=True, slots=True)
class FunctionOutput(Message):
    """Payload ``[data]``."""

    TYPE = MsgType.FUNCTION_OUTPUT
    sandbox_id: str
    fd: int
    name: str = ""
    dropped: int = 0
