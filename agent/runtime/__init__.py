"""Sandbox runtimes: the :class:`Runtime` interface and a factory for the built-in ones."""

from __future__ import annotations

import logging
from typing import Any

from agent.runtime.base import (
    ExecOutput,
    ExitStatus,
    OutputChunk,
    Runtime,
    RuntimeSandbox,
    SandboxExit,
)

log = logging.getLogger("aviato.agent")

__all__ = [
    "ExecOutput",
    "ExitStatus",
    "OutputChunk",
    "Runtime",
    "RuntimeSandbox",
    "SandboxExit",
    "make_runtime",
]


def make_runtime(name: str, isolation: str | None = None, **kwargs: Any) -> Runtime:
    """The runtime called ``name``: "docker", "local", or "auto" (Docker when an engine
    answers, else local), built with ``kwargs``, offering the isolation levels of
    ``isolation`` (``--isolation``; None: the runtime's default)."""
    from agent.runtime.isolation import parse_isolations

    if name == "auto":
        # Imported here so importing the agent never needs the docker SDK.
        from agent.runtime.docker import docker_available

        name = "docker" if docker_available() else "local"
        log.info(
            "runtime auto: %s",
            "a Docker engine answers"
            if name == "docker"
            else "no Docker engine answers, using the local runtime",
        )
    if name == "docker":
        from agent.runtime.docker import DockerRuntime

        return DockerRuntime(isolations=parse_isolations(isolation, "docker"), **kwargs)
    if name == "local":
        from agent.runtime.local import LocalRuntime

        parse_isolations(isolation, "local")  # refuses what it cannot offer
        runtime = LocalRuntime(**kwargs)
        runtime.isolations = ("bwrap",) if runtime.isolated else ("none",)
        if runtime.userns_base is not None:  # --userns-uid (agent/runtime/local_userns.py)
            runtime.userns = (
                f"root is a uid from {runtime.userns_base} on the host (one per sandbox)"
            )
        if not runtime.isolated:
            log.warning("local runtime WITHOUT isolation: bubblewrap (bwrap) is not installed")
        return runtime
    raise ValueError(f"unknown runtime {name!r}: expected 'docker', 'local' or 'auto'")
