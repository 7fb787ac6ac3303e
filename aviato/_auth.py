"""CURVE authentication: a cluster's key files, and who may say what.

``aviato keys DIR`` writes (each ``NAME.key`` public, ``NAME.key_secret`` mode 0600)::

    DIR/scheduler.key   DIR/scheduler.key_secret
    DIR/agents/agent-1.key   DIR/agents/agent-1.key_secret   ...
    DIR/clients/client-1.key DIR/clients/client-1.key_secret ...

Every host gets every public file and the secret of its own key only. The scheduler
serves CURVE with its keypair and admits the keys in ``agents/`` and ``clients/``;
each agent serves its data plane with its own keypair and admits client keys, and
agent keys for object fetches only (agent to agent, with the same keypair); clients
learn an agent's public key from the scheduler (``SandboxInfo``). What the daemons do
with theirs (ZAP, server keys): aviato/_server/auth.py.
"""

from __future__ import annotations

import enum
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.certs import create_certificates, load_certificate

from aviato.exceptions import UnauthorizedError

__all__ = [
    "CurveKeys",
    "Role",
    "client_keys",
    "create_cluster_keys",
    "handshake_refusal",
    "own_keypair",
    "read_key",
    "scheduler_public_key",
    "secret_key_names",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Role(enum.StrEnum):
    AGENT = "agent"
    CLIENT = "client"

    @property
    def folder(self) -> str:
        return f"{self.value}s"


def handshake_refusal(event: int, value: int, address: str, keyed: bool) -> str:
    """What a client tells its user when a handshake with ``address`` fails ("" when
    the event says nothing about credentials)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"{address} refused this client's key (ZAP status {value}): it is not one of "
            "the cluster's client keys; check AVIATO_KEYS and AVIATO_CLIENT_KEY"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        # Seen again and again (the caller counts): a CURVE server that cannot read our
        # hello, sealed for a server key that is not its own; or, to a client without
        # keys, one that hung up on its NULL greeting before it could read that the
        # server wants CURVE (a race: each retry is another draw, for seconds).
        if not keyed:
            return (
                f"{address} ends every handshake without a word: it requires CURVE keys "
                "(set AVIATO_KEYS, or SandboxDefaults(keys=...), to the cluster's key "
                "directory), or it is not an aviato daemon"
            )
        return (
            f"{address} does not accept this client's CURVE handshake: the scheduler.key "
            "in AVIATO_KEYS is not its public key (keys made by another `aviato keys` "
            "run?); use the cluster's key directory"
        )
    if event != zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return ""
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if keyed:
            return f"{address} does not use CURVE keys but this client does: unset AVIATO_KEYS"
        return (
            f"{address} requires CURVE keys: set AVIATO_KEYS (or SandboxDefaults(keys=...)) "
            "to the cluster's key directory"
        )
    if keyed:
        return (
            f"CURVE handshake with {address} failed (ZMTP error {value:#x}): is the "
            "scheduler.key in AVIATO_KEYS the scheduler's current public key?"
        )
    return ""


# --------------------------------------------------------------------------- key files


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A connecting socket's keys: its keypair and the server's public key (z85)."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


def create_cluster_keys(
    directory: str | os.PathLike[str], agents: int = 1, clients: int = 1, force: bool = False
) -> list[Path]:
    """Write a cluster's keys (the layout in this module's docstring); returns the files.
    Refuses to overwrite keys unless ``force``."""
    if agents < 1 or clients < 1:
        raise ValueError("a cluster needs at least one agent key and one client key")
    root = Path(directory)
    plan = [(root, "scheduler")]
    plan += [(root / Role.AGENT.folder, f"agent-{i}") for i in range(1, agents + 1)]
    plan += [(root / Role.CLIENT.folder, f"client-{i}") for i in range(1, clients + 1)]
    # Only our own layout: DIR may be a folder that holds other things too.
    patterns = ("scheduler.key*", f"{Role.AGENT.folder}/*.key*", f"{Role.CLIENT.folder}/*.key*")
    existing = sorted(str(p) for pattern in patterns for p in root.glob(pattern))
    if existing and not force:
        raise FileExistsError(
            f"{root} already holds keys ({len(existing)} files, e.g. {existing[0]}); "
            "pass --force to replace them all"
        )
    for stale in existing:
        os.unlink(stale)
    written: list[Path] = []
    created = [f for f in dict.fromkeys(f for f, _ in plan) if not f.exists()]
    old_umask = os.umask(0o077)  # no secret is ever readable by others, not even briefly
    try:
        for folder, name in plan:
            folder.mkdir(parents=True, exist_ok=True)
            public, secret = create_certificates(folder, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            written += [Path(public), Path(secret)]
        for folder in created:
            os.chmod(folder, 0o755)  # public files are meant to be read
    finally:
        os.umask(old_umask)
    return written


@functools.lru_cache(maxsize=256)
def _read_key_file(path: str) -> tuple[bytes, bytes | None]:
    return load_certificate(path)


def read_key(path: Path, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a key file; ``what`` it is names it in the error."""
    try:
        return _read_key_file(str(path))
    except (OSError, ValueError) as exc:
        raise UnauthorizedError(f"cannot read {what} from {path}: {exc}") from None


@functools.lru_cache(maxsize=64)
def own_keypair(directory: str, role: Role, name: str | None) -> tuple[str, bytes, bytes]:
    """(name, public, secret) of this host's key of ``role``: ``name``, else the only
    key of that role whose secret is in ``directory``."""
    folder = Path(directory) / role.folder
    if name is None:
        found = secret_key_names(directory, role)
        if len(found) != 1:
            flag = "--agent-key (AVIATO_AGENT_KEY)" if role is Role.AGENT else "AVIATO_CLIENT_KEY"
            why = (
                f"{len(found)} secret {role.value} keys ({', '.join(found)})"
                if found
                else (f"no secret {role.value} key")
            )
            raise UnauthorizedError(
                f"{folder} holds {why}: name this host's key with {flag}, or keep only "
                f"its own NAME.key_secret there"
            )
        name = found[0]
    if not _NAME.match(name):
        raise UnauthorizedError(f"bad key name {name!r}")
    public, secret = read_key(
        folder / f"{name}.key_secret", f"the secret {role.value} key {name!r}"
    )
    if secret is None:
        raise UnauthorizedError(f"{folder / (name + '.key_secret')} holds no secret key")
    return name, public, secret


def secret_key_names(directory: str, role: Role) -> list[str]:
    """Names of the ``role`` keys whose secret is in ``directory``, sorted."""
    folder = Path(directory) / role.folder
    return sorted(p.name.removesuffix(".key_secret") for p in folder.glob("*.key_secret"))


def scheduler_public_key(directory: str) -> bytes:
    return read_key(Path(directory) / "scheduler.key", "the scheduler's public key")[0]


def client_keys(directory: str, name: str | None, server: bytes | str) -> CurveKeys:
    _, public, secret = own_keypair(directory, Role.CLIENT, name)
    return CurveKeys(public, secret, server.encode() if isinstance(server, str) else server)
