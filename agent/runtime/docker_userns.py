"""User namespaces on Docker (issue 16): the engine's ``userns-remap``.

With ``"userns-remap"`` in the engine's daemon.json (and the remap user's ranges in
/etc/subuid and /etc/subgid), every container gets a user namespace whose root is an
unprivileged uid on the host. It is the engine's setting, not a container's, so the
agent does not choose it: it finds it at start (``docker info``: ``SecurityOptions``
holds ``name=userns``; the engine's data root then ends in ``/<uid>.<gid>``, the ids
its containers' root maps to), reports it (isolation ``runc+userns`` in ``aviato
ps``), and hands that uid what it mounts into a sandbox for the sandbox to write:
the supervisor's socket directory. Host directories mounted in (``--allow-mount``)
are not handed over: the sandbox writes there only where the host's permissions let
the remapped uid write, and what it makes there is owned by that uid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.runtime.base import Mount
from agent.supervisor_launch import SOCKET_DIR
from aviato.exceptions import ConfigurationError

__all__ = ["describe", "engine_remap", "grant", "grant_mounts", "remapped_root"]

_IDS = re.compile(r"/(\d+)\.(\d+)/?$")


def remapped_root(info: Mapping[str, Any]) -> tuple[int, int] | None:
    """The host (uid, gid) the engine maps its containers' root to (None: it does not
    remap). ``info`` is the engine's ``docker info``; ``ValueError`` if it says it
    remaps but not to which ids."""
    if not any("name=userns" in str(opt) for opt in info.get("SecurityOptions") or ()):
        return None
    found = _IDS.search(str(info.get("DockerRootDir") or ""))
    if found is None:
        raise ValueError(
            "the Docker engine remaps user namespaces (userns-remap) but its data root"
            f" {info.get('DockerRootDir')!r} does not name the remapped ids"
        )
    return int(found[1]), int(found[2])


def engine_remap(client: Any) -> tuple[int, int] | None:
    """``remapped_root`` of the engine ``client`` talks to; ``ConfigurationError`` when
    its ids cannot be read. Blocking (an SDK call)."""
    try:
        return remapped_root(client.info())
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc


def describe(ids: tuple[int, int] | None) -> str:
    """What ``aviato status`` shows for it ("" when the engine does not remap)."""
    return f"root is uid {ids[0]} on the host" if ids else ""


def grant(ids: tuple[int, int], directory: str) -> None:
    """Hand ``directory`` (a sandbox's socket directory) and what is in it to the
    remapped root, which must create and connect to sockets there."""
    uid, gid = ids
    top = Path(directory)
    for path in (top, *top.rglob("*")):
        os.lchown(path, uid, gid)


def grant_mounts(ids: tuple[int, int], mounts: Sequence[Mount]) -> None:
    """``grant`` the socket directory among a sandbox's ``mounts`` (if it has one)."""
    for mount in mounts:
        if mount.target == SOCKET_DIR and mount.kind == "bind":
            grant(ids, mount.source)
