"""How a sandbox starts its supervisor: where the agent mounts its socket directory
and the supervisor's read-only library, and the command line that runs it. Shared by
the hub (which lays the library out), the runtimes and the spares, none of which need
the hub itself for it."""

from __future__ import annotations

__all__ = ["LIB_DIR", "SOCKET_DIR", "WORKER_ENTRY", "supervisor_command"]

#: Where the sandbox sees its socket directory (the supervisor's link to the agent).
SOCKET_DIR = "/run/aviato"
#: Where the sandbox sees the supervisor's modules and cloudpickle, read-only.
LIB_DIR = "/run/aviato-lib"
#: Imported rather than run as a script, so that its compiled bytecode is used.
WORKER_ENTRY = (
    f"import sys; sys.path.insert(0, {LIB_DIR!r}); import aviato_supervisor; "
    "sys.exit(aviato_supervisor.main())"
)


def supervisor_command(
    python: str = "python", *, functions: bool = True
) -> tuple[str, tuple[str, ...]]:
    """A function worker needs site-packages (user code imports libraries); a plain
    supervisor starts faster without them (-S)."""
    flags = ("-u", "-B") if functions else ("-u", "-B", "-S")
    return python, (*flags, "-c", WORKER_ENTRY)
