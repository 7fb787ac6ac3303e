"""Isolation levels: which an agent offers (``--isolation``), which a sandbox gets,
and how the Docker runtime runs each.

- ``runc``: Docker's default runtime: namespaces and cgroups on the host's kernel.
- ``gvisor``: Docker with gVisor's ``runsc``: the sandbox's system calls are served
  by a user-space kernel, so a host kernel bug is no longer an escape. The engine
  must have two runtimes registered (``DAEMON_JSON``): runsc cannot share the root
  network namespace, so a sandbox with a network runs with ``--network=host`` (which
  is the container's own namespace) and one without with ``--network=none``; both
  with ``--host-uds=open``, so that the supervisor inside can connect to the agent's
  Unix socket on its bind mount.
- ``bwrap``: the local runtime's bubblewrap namespaces (it offers nothing else;
  ``none`` when bubblewrap is missing).

Pure helpers and the engine checks; the Docker SDK is only touched through the
client the Docker runtime passes in.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aviato._options import ISOLATIONS
from aviato.exceptions import ConfigurationError, IsolationUnavailableError
from aviato.protocol import SandboxSpec

__all__ = [
    "DAEMON_JSON",
    "DOCKER_LEVELS",
    "GVISOR_RUNTIMES",
    "check_engine",
    "docker_runtime_for",
    "isolation_of",
    "parse_isolations",
    "probe_gvisor",
    "refusal",
]

RUNC, GVISOR, BWRAP = "runc", "gvisor", "bwrap"
DOCKER_LEVELS = (RUNC, GVISOR)
#: The engine's runtime names gVisor sandboxes run under, by whether they have a network.
GVISOR_RUNTIMES = {"net": "runsc", "nonet": "runsc-nonet"}
#: What the engine's daemon.json needs for ``--isolation gvisor``.
DAEMON_JSON: dict[str, Any] = {
    "runtimes": {
        GVISOR_RUNTIMES["net"]: {
            "path": "/usr/bin/runsc",
            "runtimeArgs": ["--network=host", "--host-uds=open"],
        },
        GVISOR_RUNTIMES["nonet"]: {
            "path": "/usr/bin/runsc",
            "runtimeArgs": ["--network=none", "--host-uds=open"],
        },
    }
}
PROBE_SECONDS = 60.0


def parse_isolations(text: str | None, runtime: str) -> tuple[str, ...]:
    """``--isolation`` (comma-separated, the default first) for ``runtime`` ("docker" or
    "local"); ``ConfigurationError`` says what this runtime can offer instead."""
    if runtime == "local":
        if text not in (None, "", BWRAP):
            raise ConfigurationError(
                f"the local runtime offers isolation 'bwrap' only, not {text!r}: gVisor"
                " needs the Docker runtime with runsc registered (--runtime docker"
                " --isolation gvisor; see README)"
            )
        return (BWRAP,)
    levels = tuple(dict.fromkeys(p.strip() for p in (text or RUNC).split(",") if p.strip()))
    wrong = [level for level in levels if level not in DOCKER_LEVELS]
    if wrong or not levels:
        raise ConfigurationError(
            f"--isolation takes runc, gvisor or both (comma-separated, the default first)"
            f" for the Docker runtime, got {text!r}"
        )
    return levels


def isolation_of(spec: SandboxSpec, offered: Sequence[str]) -> str:
    """The level ``spec`` runs under here: its own, else the agent's default."""
    return spec.isolation or (offered[0] if offered else "")


def refusal(spec: SandboxSpec, offered: Sequence[str], agent_id: str) -> Exception | None:
    """Why this agent must not run ``spec`` (None: it may)."""
    if spec.isolation is None or spec.isolation in offered:
        return None
    if spec.isolation not in ISOLATIONS:
        return ConfigurationError(f"unknown isolation {spec.isolation!r}")
    return IsolationUnavailableError(
        f"agent {agent_id} offers isolation {', '.join(offered) or 'none'}, not"
        f" {spec.isolation!r}; it was started without --isolation {spec.isolation}"
    )


def docker_runtime_for(spec: SandboxSpec, offered: Sequence[str]) -> str | None:
    """The engine runtime a sandbox of ``spec`` is created with (None: the engine's
    default, runc)."""
    if isolation_of(spec, offered) != GVISOR:
        return None
    return GVISOR_RUNTIMES["nonet" if spec.network == "none" else "net"]


def check_engine(client: Any, levels: Sequence[str]) -> None:
    """The engine has the runtimes ``levels`` need, else ``ConfigurationError`` with the
    daemon.json that would give them. Blocking (an SDK call)."""
    if GVISOR not in levels:
        return
    registered = set((client.info().get("Runtimes") or {}).keys())
    missing = [name for name in GVISOR_RUNTIMES.values() if name not in registered]
    if missing:
        raise ConfigurationError(
            f"--isolation gvisor: the Docker engine has no runtime {', '.join(missing)}"
            f" (it has: {', '.join(sorted(registered))}). Install runsc (apt-get install"
            f" runsc) and add to the engine's daemon.json: {json.dumps(DAEMON_JSON)}"
        )


def probe_gvisor(client: Any, image: str) -> str:
    """Run a probe sandbox under gVisor (no network) and say what it found; raises
    ``ConfigurationError`` when it does not run. Blocking (SDK calls)."""
    name = f"aviato-probe-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    try:
        out = client.containers.run(
            image,
            ["uname", "-r"],
            name=name,
            runtime=GVISOR_RUNTIMES["nonet"],
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            labels={"aviato.probe": "1"},
            remove=True,
            stdout=True,
            stderr=True,
        )
    except Exception as exc:  # the SDK's errors, whichever: the agent must not start
        raise ConfigurationError(
            f"--isolation gvisor: a probe sandbox (image {image!r}, runtime"
            f" {GVISOR_RUNTIMES['nonet']}) did not run: {exc}. Check `runsc --version`,"
            " the engine's daemon.json runtimes, and that the image is on this host"
            " (--probe-image)"
        ) from exc
    finally:
        try:
            client.containers.get(name).remove(force=True)
        except Exception:  # already removed (remove=True): nothing left
            pass
    kernel = bytes(out).decode(errors="replace").strip()
    return f"gvisor ok ({time.monotonic() - t0:.1f} s probe, kernel {kernel})"
