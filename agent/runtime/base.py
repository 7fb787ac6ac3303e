"""The small interface every sandbox runtime implements.

The agent talks to sandboxes only through this. A runtime translates its own
errors into :mod:`aviato.exceptions` (``SandboxFailedError`` for a create that
cannot happen, ``SandboxNotRunningError`` for a sandbox that is gone,
``SandboxFileError`` for file trouble); nothing else escapes it. Every method may
block on I/O, so each is async: blocking work runs off the event loop.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

# Re-exported: runtimes and the agent take the labels with the interface.
from agent.runtime.labels import LABEL_AGENT as LABEL_AGENT
from agent.runtime.labels import LABEL_CREATED as LABEL_CREATED
from agent.runtime.labels import LABEL_MANAGED as LABEL_MANAGED
from agent.runtime.labels import LABEL_SANDBOX as LABEL_SANDBOX
from agent.runtime.labels import LABEL_SESSION as LABEL_SESSION
from agent.runtime.labels import LABEL_SPARE as LABEL_SPARE
from agent.runtime.labels import LABEL_SPEC as LABEL_SPEC
from agent.runtime.labels import sandbox_labels as sandbox_labels
from agent.runtime.labels import spec_from_labels as spec_from_labels
from aviato._types import OutputChunk as OutputChunk  # the runtimes speak it too
from aviato.protocol import MAX_PAYLOAD_BYTES, SandboxSpec

if TYPE_CHECKING:
    from agent.runtime.spare_claims import SpareClaims


@dataclass(frozen=True, slots=True)
class Mount:
    """A host directory made visible inside the sandbox."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class RuntimeSandbox:
    """One sandbox as the runtime sees it (from ``list``)."""

    sandbox_id: str
    labels: dict[str, str]
    running: bool
    exit_code: int | None = None


def join_chunks(chunks: Iterable[OutputChunk]) -> list[OutputChunk]:
    """``chunks`` with adjacent ones of one stream joined (and empty ones dropped)."""
    out: list[OutputChunk] = []
    for chunk in chunks:
        if not chunk.data:
            continue
        if out and out[-1].fd == chunk.fd:
            out[-1] = OutputChunk(chunk.fd, out[-1].data + chunk.data)
        else:
            out.append(chunk)
    return out


def tail_chunks(chunks: list[OutputChunk], limit: int) -> list[OutputChunk]:
    """The last ``limit`` bytes of ``chunks`` (the first kept one cut at its front)."""
    kept: list[OutputChunk] = []
    size = 0
    for chunk in reversed(chunks):
        if size + len(chunk.data) >= limit:
            kept.append(OutputChunk(chunk.fd, chunk.data[len(chunk.data) - (limit - size) :]))
            break
        kept.append(chunk)
        size += len(chunk.data)
    return [c for c in reversed(kept) if c.data]


@dataclass(frozen=True, slots=True)
class ExitStatus:
    returncode: int
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class ExecOutput:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class SandboxExit:
    """A sandbox's main process ended by itself (not through ``stop``)."""

    sandbox_id: str
    exit_code: int | None
    oom_killed: bool = False


class Runtime(abc.ABC):
    #: Shown in ``aviato status`` and on each sandbox (e.g. "docker", "local").
    name: str = "abstract"
    #: True when sandboxes are isolated from the host (containers, bubblewrap).
    isolated: bool = True
    #: True when the runtime runs every sandbox's command under the supervisor itself
    #: (so exec and files always go through it); else the agent starts one beside it.
    supervisor_is_main: bool = False
    #: True when the runtime can pre-start spares (``create_spare``/``claim_spare``).
    supports_spares: bool = False
    #: Where claims of spares are recorded (set by an agent; see spare_claims.py).
    claims: SpareClaims | None = None
    #: Isolation levels it offers, its default first (agent/runtime/isolation.py).
    isolations: tuple[str, ...] = ()
    #: What ``probe`` found at the agent's start (shown in ``aviato status``).
    probe_note: str = ""

    async def probe(self, image: str) -> str:
        """Run a probe sandbox of each offered isolation that needs one, at the agent's
        start; what it found ("" if nothing needs probing). Raises when one fails."""
        return ""

    @abc.abstractmethod
    async def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        """Create and start the sandbox, with ``mounts``; return once its command runs.

        Raises ``SandboxFailedError`` naming the image (and what to do) when it
        cannot start."""

    async def create_spare(
        self, spare_id: str, spec: SandboxSpec, labels: dict[str, str], mounts: Sequence[Mount]
    ) -> None:
        """Create and start a spare (``spec``: its parking command, with the shape it will
        serve); it is addressed by ``spare_id`` until claimed."""
        raise NotImplementedError(f"the {self.name} runtime keeps no spares")

    async def claim_spare(
        self, spare_id: str, sandbox_id: str, spec: SandboxSpec, created_at: float
    ) -> None:
        """Make spare ``spare_id`` the sandbox ``sandbox_id`` of ``spec``: recorded where a
        restarted agent's ``list`` finds it, addressed by ``sandbox_id`` from now on.
        ``SandboxFailedError`` (and the spare untouched) when ``spec``'s command is not in
        the image, as a fresh create would fail."""
        raise NotImplementedError(f"the {self.name} runtime keeps no spares")

    @abc.abstractmethod
    def exec_stream(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
        stdin: bytes | memoryview | None = None,
    ) -> AsyncIterator[OutputChunk | ExitStatus]:
        """Run ``argv``; yield output chunks as produced, then exactly one ExitStatus.

        ``stdin``: what the process reads, then EOF (None: an empty stdin). When
        ``timeout_seconds`` passes the process is killed and the ExitStatus has
        ``timed_out=True``."""

    async def exec(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
        stdin: bytes | memoryview | None = None,
    ) -> ExecOutput:
        out: list[bytes] = []
        err: list[bytes] = []
        status = ExitStatus(returncode=-1)
        async for event in self.exec_stream(
            sandbox_id, argv, cwd=cwd, env=env, timeout_seconds=timeout_seconds, stdin=stdin
        ):
            if isinstance(event, OutputChunk):
                (out if event.fd == 1 else err).append(event.data)
            else:
                status = event
        return ExecOutput(status.returncode, b"".join(out), b"".join(err), status.timed_out)

    async def start_sidecar(
        self, sandbox_id: str, argv: tuple[str, ...], env: Mapping[str, str]
    ) -> bool:
        """Start a helper process beside the sandbox's command (the supervisor);
        False when this runtime cannot."""
        return False

    @abc.abstractmethod
    async def read_file(
        self, sandbox_id: str, path: str, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> bytes:
        """The file's bytes; ``SandboxFileError`` (with ``.filepath``) when missing,
        ``PayloadTooLargeError`` past ``max_bytes``, found while reading (an endless
        file must not be read on). Cancelling the call stops the reading. A relative
        ``path`` is taken from the sandbox's working directory (exec's default)."""

    @abc.abstractmethod
    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | memoryview, mode: int = 0o644
    ) -> None:
        """Write ``data`` at ``path``, creating parent directories; a relative ``path``
        as for ``read_file``."""

    @abc.abstractmethod
    async def logs(
        self, sandbox_id: str, tail_lines: int | None = None
    ) -> builtins.list[OutputChunk]:
        """The main process's output so far, in the order written, each chunk tagged
        with its stream; ``tail_lines``: about that many of the last lines at most."""

    @abc.abstractmethod
    async def stop(self, sandbox_id: str) -> None:
        """Kill and remove the sandbox. Idempotent: an unknown id is not an error."""

    @abc.abstractmethod
    async def list(self, agent_id: str) -> list[RuntimeSandbox]:
        """Every sandbox labelled as belonging to ``agent_id``, running or not."""

    async def list_all(self) -> builtins.list[RuntimeSandbox]:
        """Every aviato sandbox this runtime can see, whatever its agent."""
        return []

    @abc.abstractmethod
    def exits(self) -> AsyncIterator[SandboxExit]:
        """Sandboxes whose main process ended, as they end (runs until ``close``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the runtime's resources (not its sandboxes)."""
