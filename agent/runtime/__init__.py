"""Sandbox runtimes: the :class:`Runtime` interface and a factory for the built-in ones."""

from __future__ import annotations

from typing import Any

from agent.runtime.base import (
    ExecOutput,
    ExitStatus,
    OutputChunk,
    Runtime,
    RuntimeSandbox,
    SandboxExit,
)
from aviato.exceptions import SandboxFailedError

__all__ = [
    "ExecOutput",
    "ExitStatus",
    "OutputChunk",
    "Runtime",
    "RuntimeSandbox",
    "SandboxExit",
    "make_runtime",
]


def make_runtime(name: str, **kwargs: Any) -> Runtime:
    """The runtime called ``name`` ("docker", "local" or "auto"), built with ``kwargs``."""
    if name in ("docker", "auto"):
        # Imported here so importing the agent never needs the docker SDK.
        from agent.runtime.docker import DockerRuntime, docker_available

        if name == "auto" and not docker_available():
            raise SandboxFailedError(
                "no Docker engine answers on this host: start dockerd (or set DOCKER_HOST to"
                " one that runs), then start the agent again"
            )
        return DockerRuntime(**kwargs)
    if name == "local":
        raise ValueError("the local runtime is not built yet")
    raise ValueError(f"unknown runtime {name!r}: expected 'docker', 'local' or 'auto'")
