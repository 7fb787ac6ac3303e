"""User namespaces for the local runtime (issue 16): root inside a sandbox is an
unprivileged uid on the host.

Off by default; the agent's ``--userns-uid BASE`` (or ``$AVIATO_USERNS_UID``) turns it
on. bubblewrap is then started as a uid of its own, ``BASE`` plus a number taken from
the sandbox id (one of ``SPAN``), with ``--unshare-user --uid 0 --gid 0``: inside the
sandbox its processes are root, owning a user namespace that maps that one uid, and
on the host they are that uid, with no capability anywhere outside. A uid per sandbox
rather than one for all: the host's per-user limits (RLIMIT_NPROC without cgroups) and
signals then do not cross between sandboxes.

What the sandbox must reach is handed to its uid: its own directory (``/tmp``, the
seccomp filter, its interpreter links) and the agent's socket directory for it.
Host directories mounted in (``--allow-mount``) and named volumes are not: the
sandbox writes there only where the host's permissions let that uid write, and what
it creates there is owned by that uid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SPAN", "confine", "grant", "parse_base", "reachable", "sandbox_uid"]

#: How many uids sandboxes of one agent spread over, from its base.
SPAN = 65536
#: Bases below this would hand sandboxes the host's system and login users.
MIN_BASE = 100_000


def parse_base(value: str | None) -> int | None:
    """``--userns-uid`` as given (None or "": off); ``ValueError`` says what is wrong."""
    if value is None or not value.strip():
        return None
    if not value.strip().isdigit():
        raise ValueError(f"--userns-uid must be a number, got {value!r}")
    base = int(value)
    if not MIN_BASE <= base <= 2**32 - 2 - SPAN:
        raise ValueError(
            f"--userns-uid must be at least {MIN_BASE} (below, sandboxes would be the"
            f" host's own users) and leave room for {SPAN} uids, got {base}"
        )
    if shutil.which("setpriv") is None:
        raise ValueError("--userns-uid needs setpriv (util-linux) on the agent's host")
    return base


def sandbox_uid(base: int, sandbox_id: str) -> int:
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    return base + int.from_bytes(digest[:4], "big") % SPAN


def confine(cmd: list[str], bwrap: str, uid: int) -> list[str]:
    """``cmd`` (bubblewrap's, perhaps behind the seccomp shell) started as ``uid``, with
    bubblewrap making the user namespace where that uid is root."""
    at = cmd.index(bwrap) + 1
    userns = ["--unshare-user", "--uid", "0", "--gid", "0"]
    inner = [*cmd[:at], *userns, *cmd[at:]]
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *inner]


def grant(uid: int, home: Path, sockets: Iterable[str]) -> None:
    """Hand the sandbox's own directory and its socket directories to ``uid``."""
    for top in (home, *(Path(s) for s in sockets)):
        os.lchown(top, uid, uid)
        for path in top.rglob("*"):
            os.lchown(path, uid, uid)


def reachable(path: str) -> bool:
    """Whether any user can run ``path``: it and every directory above it are open to
    others (an interpreter under root's 0700 home is not, for a sandbox's uid)."""
    current = Path(path).resolve()
    try:
        if not current.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in current.parents)
    except OSError:
        return False
