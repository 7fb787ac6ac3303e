"""Agent ids: unique by default, stable across restarts, held by one process at a time.

Everything an agent owns on its host is keyed by its id: its containers' labels, its
socket directory, its local-runtime state. Two agents with one id on a host wreck each
other, so an agent first *claims* its id: an exclusive ``flock`` on a lock file in the
state directory, held for the process's lifetime (the kernel drops it when the process
dies, even by ``kill -9``). A second agent asking for a held id is refused before it
touches anything.

With no ``--agent-id``, the id is the hostname plus a random suffix, remembered in the
state directory under the agent's scheduler and bind address: the same command line
started again gets the same id (and so finds and reaps what its killed predecessor
left), while agents with other bind addresses get ids of their own. Agents started
with the same command line at once (``--bind ...:0``) take the next remembered id whose
lock is free.

The state directory is ``$AVIATO_STATE_DIR``, else ``$XDG_STATE_HOME/aviato``, else
``~/.local/state/aviato``: per user, and kept across reboots (containers are too).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from aviato.exceptions import AgentIdInUseError

#: How many agents with one command line (scheduler and bind address) a host may run.
MAX_SAME_COMMAND_LINE = 64


def state_dir() -> Path:
    explicit = os.environ.get("AVIATO_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg or Path.home() / ".local" / "state") / "aviato"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Identity:
    """A claimed agent id. ``instance`` is this process's nonce; ``replaces`` the nonce
    of the previous holder of the id on this host, if it died without releasing it
    (the scheduler lets us take the id over from it at once: see RegisterAgent)."""

    agent_id: str
    instance: str
    replaces: str
    path: Path
    fd: int

    def note_address(self, address: str) -> None:
        """Record where we serve, for the message that refuses a second claimant."""
        _write(self.fd, {"pid": os.getpid(), "instance": self.instance, "address": address})

    def release(self) -> None:
        """On a clean exit: nothing of ours is left to take over."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _write(fd: int, record: dict[str, object]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(fd: int) -> dict[str, object]:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def claim(agent_id: str, directory: Path | None = None) -> Identity:
    """Hold ``agent_id`` for this process; ``AgentIdInUseError`` naming the holder when
    a live agent on this host has it."""
    locks = (directory or state_dir()) / "agents"
    locks.mkdir(parents=True, exist_ok=True)
    path = locks / f"{_key(agent_id)}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            where = holder.get("address") or "an address not bound yet"
            raise AgentIdInUseError(
                f"agent id {agent_id!r} is held by a live agent on this host (pid "
                f"{holder.get('pid', '?')}, at {where}); give this agent another "
                "--agent-id, or leave it unset for a unique one"
            ) from None
        # A holder that exited cleanly unlinks the file after we opened it: our lock is
        # then on a file nobody else will open. Try again on the path's current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read(fd)
        instance = uuid.uuid4().hex
        replaces = str(previous.get("instance") or "")
        _write(fd, {"pid": os.getpid(), "instance": instance, "address": ""})
        return Identity(agent_id, instance, replaces, path, fd)


def default_agent_id(scheduler: str, bind: str, directory: Path | None = None) -> Identity:
    """Claim this command line's remembered id (hostname plus a suffix), or the next one
    whose lock is free, making and remembering a new one when none is."""
    root = directory or state_dir()
    ids = root / "ids"
    ids.mkdir(parents=True, exist_ok=True)
    key = _key(f"{scheduler} {bind}")
    for n in range(MAX_SAME_COMMAND_LINE):
        slot = ids / f"{key}-{n}"
        if not slot.exists():
            # Written aside, then linked in: two agents starting at once agree on one id.
            fresh = f"{socket.gethostname()}-{secrets.token_hex(3)}"
            aside = ids / f".{key}-{n}.{os.getpid()}"
            aside.write_text(fresh)
            with contextlib.suppress(FileExistsError):
                os.link(aside, slot)
            aside.unlink()
        agent_id = slot.read_text().strip()
        with contextlib.suppress(AgentIdInUseError):
            return claim(agent_id, root)
    raise AgentIdInUseError(
        f"{MAX_SAME_COMMAND_LINE} agents with this scheduler and bind address already run "
        "on this host; give this one an --agent-id"
    )
