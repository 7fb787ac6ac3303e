"""The README's "reconnect backoff 100 ms to 5 s", checked where it lives: the options of
the client's and the agent's DEALER sockets (libzmq's reconnect), and the schedule of
the agent's own re-registration loop (``aviato._zmq.next_backoff``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import zmq

from agent.server import AgentServer
from aviato import _zmq
from aviato._connection import Connection

NOBODY = "tcp://127.0.0.1:9"  # nothing listens: the options are set before any connect


def _reconnect_ms(sock: Any) -> tuple[int, int]:
    return sock.getsockopt(zmq.RECONNECT_IVL), sock.getsockopt(zmq.RECONNECT_IVL_MAX)


def test_the_registration_backoff_doubles_from_100_ms_to_5_s() -> None:
    waits = [_zmq.BACKOFF_FIRST]
    for _ in range(8):
        waits.append(_zmq.next_backoff(waits[-1]))
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert _zmq.next_backoff(0.0) == 0.2  # never below the first step, never stuck at 0


async def test_the_clients_dealer_reconnects_from_100_ms_to_5_s() -> None:
    conn = Connection(NOBODY)
    try:
        assert _reconnect_ms(conn._sock) == (100, 5000)
    finally:
        conn.close()


async def test_the_agents_scheduler_dealer_reconnects_from_100_ms_to_5_s() -> None:
    # The scheduler link never touches the runtime (the agent asks it only where its
    # named volumes live, at construction).
    runtime: Any = SimpleNamespace(volume_store=lambda directory: None)
    agent = AgentServer(runtime, scheduler=NOBODY, agent_id="a-backoff", slots=1)
    try:
        assert _reconnect_ms(agent._new_scheduler_socket()) == (100, 5000)
    finally:
        if agent._sched is not None:
            agent._sched.close(linger=0)
        agent._ctx.term()
