"""``network="internal"`` on the local runtime: the sandboxes of one session on this
agent share one network namespace of their own, with loopback only.

The first of them gets a new namespace from bubblewrap (``--unshare-net``); each later
one is started inside the namespace of a live one (``nsenter --net``), and bubblewrap
then makes none. They reach each other on 127.0.0.1 (one port space, as the
containers of a Kubernetes pod share one), and nothing else: no route leaves the
namespace. It lives while any of them does.

Docker gives each sandbox an address of its own on a network per session instead
(agent/runtime/docker_network.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from agent.runtime.labels import spec_from_labels
from aviato.exceptions import SandboxFailedError
from aviato.protocol import SandboxSpec

__all__ = ["SessionLocks", "check", "join", "peer_pid", "wait_netns"]


def check(runtime: str, sandbox_id: str, spec: SandboxSpec, bwrap: bool) -> None:
    """``SandboxFailedError`` for a network the local runtime cannot give."""
    if spec.network_allow is None and (spec.network != "internal" or bwrap):
        return
    what = "network_allow" if spec.network_allow is not None else "network='internal'"
    raise SandboxFailedError(
        f"the {runtime} runtime cannot honour {what}: a sandbox here has the host's"
        " network, or a namespace with loopback only (shared by its session's internal"
        " sandboxes, with bubblewrap); use network='none' or 'internal', or an agent with"
        " the docker runtime",
        sandbox_id=sandbox_id,
    )


def peer_pid(
    spec: SandboxSpec,
    live: Iterable[str],
    home_of: Callable[[str], Path | None],
    netns_pid: Callable[[str], int | None],
) -> int | None:
    """A process in the namespace of a live internal sandbox of ``spec``'s session
    (None: it is the first, and makes the namespace)."""
    if spec.network != "internal" or spec.session_id is None:
        return None
    for sandbox_id in list(live):
        home = home_of(sandbox_id)
        if home is None:
            continue
        with contextlib.suppress(OSError, ValueError):
            other = spec_from_labels(json.loads((home / "labels.json").read_text()))
            if other and other.network == "internal" and other.session_id == spec.session_id:
                pid = netns_pid(sandbox_id)
                if pid is not None:
                    return pid
    return None


def join(cmd: list[str], pid: int) -> list[str]:
    """``cmd`` (bubblewrap's) started in the network namespace of ``pid``, bubblewrap
    making none of its own (the first ``--unshare-net`` is bubblewrap's: the sandbox's
    own command comes after its options)."""
    inner = list(cmd)
    inner.remove("--unshare-net")
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--", *inner]


async def wait_netns(find: Callable[[], int | None], timeout: float = 10.0) -> None:
    """Until the sandbox just started is in its namespace (bubblewrap unshares it a few
    milliseconds in), so that the next of its session finds it; gives up quietly at
    the deadline (that one then makes a namespace of its own)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Polled: no event tells when another process has unshared (a few ms).
    while find() is None and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


class SessionLocks:
    """One lock per session, dropped when no create holds or waits for it: a session's
    internal sandboxes are made one at a time, each finding the namespace of those
    before it."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
