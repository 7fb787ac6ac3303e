"""How the Docker runtime reads the engine's errors: what any SDK call may raise, its
explanation and its HTTP status (each caller turns them into :mod:`aviato.exceptions`)."""

from __future__ import annotations

import docker.errors

__all__ = ["DockerError", "explain", "http_status"]

DockerError = (docker.errors.DockerException, OSError)  # requests' errors are OSErrors


def explain(exc: BaseException) -> str:
    """The engine's own explanation of ``exc``, else its text."""
    return str(getattr(exc, "explanation", None) or exc)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status the engine answered with (None: no answer, e.g. a socket error)."""
    return getattr(exc, "status_code", None)
