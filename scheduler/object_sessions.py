"""Which sessions an agent holds objects of have ended (pure: no sockets, no clock).

An agent frees a session's objects when its client closes it; a client that dies
without closing leaves them, so agents ask now and then (``ObjectSessions``) and free
the objects of the sessions named here: closed, or whose lease expired. A session the
scheduler does not know (it restarted since) gets a lease of its own, as a sandbox's
session adopted after a restart does: its client renews it if alive, else it expires."""

from __future__ import annotations

from collections.abc import Sequence

from aviato.protocol import MAX_OBJECT_SESSIONS
from scheduler.state import SchedulerState

__all__ = ["ended_sessions"]


def ended_sessions(
    state: SchedulerState, session_ids: Sequence[str], now: float
) -> tuple[str, ...]:
    """Those of ``session_ids`` that ended; unknown ones are adopted (see above)."""
    ended: list[str] = []
    for session_id in session_ids[:MAX_OBJECT_SESSIONS]:
        if not isinstance(session_id, str) or not session_id:
            continue
        if session_id in state.closed_sessions:
            ended.append(session_id)
        elif session_id not in state.sessions:
            state.session_keepalive(session_id, state.config.adopted_lease_seconds, now)
    return tuple(ended)
