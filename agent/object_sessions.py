"""The objects of sessions that ended without their client saying so (issue 14 part 3).

A client frees its session's objects when it closes the session. One that dies first
(SIGKILL, a lost host) never does; its lease lapses at the scheduler instead. While
this agent holds objects of any session, it asks the scheduler every ``EVERY`` seconds
which of those sessions ended (closed, or lease expired) and frees their objects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from agent.object_fetch import AskScheduler
from agent.object_store import ObjectStore
from aviato.protocol import MAX_OBJECT_SESSIONS, ObjectSessions, ObjectSessionsEnded

__all__ = ["EVERY", "SessionWatch"]

log = logging.getLogger("aviato.agent")

#: How often the scheduler is asked, while objects are held (a lapsed lease frees its
#: objects within its lease and this).
EVERY = 2.0
#: How long one question may take (unanswered: asked again next time).
ASK_TIMEOUT = 10.0


class SessionWatch:
    """Runs while the store holds objects of a session; started again by ``ensure``."""

    def __init__(
        self,
        agent_id: str,
        store: ObjectStore,
        ask: Callable[[], AskScheduler | None],
        free: Callable[[str], None],
        start: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.agent_id = agent_id
        self.store = store
        self._ask = ask
        self._free = free
        self._start = start
        self._running = False
        #: Questions answered since the agent started (for tests and logs).
        self.asked = 0

    def ensure(self) -> None:
        """An object was stored: watch its session (if not watching already)."""
        if not self._running:
            self._running = True
            self._start(self._run())

    async def _run(self) -> None:
        try:
            while True:
                await asyncio.sleep(EVERY)
                held = sorted(self.store.sessions())
                if not held:
                    return  # nothing to watch: the next object stored starts us again
                ask = self._ask()
                if ask is None:
                    continue
                msg = ObjectSessions(self.agent_id, tuple(held[:MAX_OBJECT_SESSIONS]))
                reply = await ask(msg, ASK_TIMEOUT)
                if not isinstance(reply, ObjectSessionsEnded):
                    continue  # the scheduler is away: its answer will come later
                self.asked += 1
                for session_id in set(reply.session_ids) & set(held):
                    self._free(session_id)
        finally:
            self._running = False
