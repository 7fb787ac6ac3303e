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
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

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
from agent.runtime.volumes import DirectoryVolumes, VolumeStore
from aviato._types import OutputChunk as OutputChunk  # the runtimes speak it too
from aviato.exceptions import SandboxNotFoundError, UnsupportedOperationError
from aviato.protocol import MAX_PAYLOAD_BYTES, SandboxSpec

if TYPE_CHECKING:
    from agent.runtime.spare_claims import SpareClaims
    from agent.runtime.streams import RuntimeStreams
    from aviato.link import Header, ProcReply


class ProcessBackend(Protocol):
    """Kept processes in sandboxes with no supervisor: answers the supervisor's process
    requests (aviato/link.py's Proc*) the way its process table does."""

    async def serve(
        self, sandbox_id: str, header: Header, blobs: list[bytes]
    ) -> tuple[ProcReply, list[bytes]]: ...


@dataclass(frozen=True, slots=True)
class Mount:
    """A host directory made visible inside the sandbox."""

    source: str
    target: str
    read_only: bool = True
    #: "bind": ``source`` is a host path; "volume": the engine's volume of that name.
    kind: str = "bind"


@dataclass(frozen=True, slots=True)
class RuntimeSandbox:
    """One sandbox as the runtime sees it (from ``list``)."""

    sandbox_id: str
    labels: dict[str, str]
    running: bool
    exit_code: int | None = None
    #: Frozen by ``pause`` (and still running): adopted as paused after an agent restart.
    paused: bool = False


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
class RuntimeSnapshot:
    """A snapshot a runtime holds: an image name a create can take, its labels
    (``aviato.snapshot.*``: agent, sandbox, base image, created) and its size."""

    image: str
    labels: dict[str, str]
    size_bytes: int = 0


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
    #: Logs as they are written, and streamed files where no supervisor serves them
    #: (agent/runtime/streams.py); None: neither.
    streams: RuntimeStreams | None = None

    def process_backend(self) -> ProcessBackend | None:
        """Where processes go in a sandbox without a supervisor (None: nowhere)."""
        return None

    #: True when the engine publishes a sandbox's ports itself (``published_ports``);
    #: else the agent forwards them into the sandbox's own network namespace
    #: (``netns_pid``; agent/ports.py).
    publishes_ports: bool = False
    #: The host address published ports are bound to (set by the agent).
    publish_host: str = "127.0.0.1"

    async def published_ports(self, sandbox_id: str) -> dict[int, int]:
        """In-sandbox port -> the host port the engine published it on."""
        return {}

    def netns_pid(self, sandbox_id: str) -> int | None:
        """A process in the sandbox's own network namespace (None: it has none)."""
        return None

    #: Isolation levels it offers, its default first (agent/runtime/isolation.py).
    isolations: tuple[str, ...] = ()
    #: What ``probe`` found at the agent's start (shown in ``aviato status``).
    probe_note: str = ""
    #: Where root inside its sandboxes is on the host, when a user namespace makes it
    #: unprivileged there ("" when root inside is the host's root).
    userns: str = ""

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

    def volume_store(self, directory: Path) -> VolumeStore:
        """Where this runtime keeps named volumes (``directory``: the agent's own, under
        its state directory; a runtime with volumes of its own ignores it)."""
        return DirectoryVolumes(directory)

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

    # Lifecycle (issue 13). A runtime that cannot do one raises
    # UnsupportedOperationError naming itself and why.

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox (memory kept, no CPU used)."""
        raise UnsupportedOperationError(
            f"the {self.name} runtime cannot pause sandboxes", sandbox_id=sandbox_id
        )

    async def resume(self, sandbox_id: str) -> None:
        """Thaw what ``pause`` froze."""
        raise UnsupportedOperationError(
            f"the {self.name} runtime cannot pause or resume sandboxes", sandbox_id=sandbox_id
        )

    async def snapshot(self, sandbox_id: str, image: str, labels: dict[str, str]) -> int:
        """Keep the sandbox's filesystem as ``image`` (a create from that image starts
        with the same files), labelled ``labels``; returns its size in bytes."""
        raise UnsupportedOperationError(
            f"the {self.name} runtime cannot snapshot sandboxes", sandbox_id=sandbox_id
        )

    async def list_snapshots(self, agent_id: str) -> builtins.list[RuntimeSnapshot]:
        """The snapshots ``agent_id`` took that this runtime holds."""
        return []

    async def remove_snapshot(self, image: str) -> None:
        """Remove a snapshot; ``SandboxNotFoundError`` when there is none of that name."""
        raise SandboxNotFoundError(f"no snapshot {image!r} on this {self.name} runtime")

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
