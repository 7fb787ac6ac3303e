"""``Sandbox``: one isolated container somewhere in the cluster."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aviato import _local
from aviato._connection import (
    FIRST_CONTACT_SECONDS,
    Channel,
    Connections,
    agent_connection,
    default_connections,
)
from aviato._defaults import SandboxDefaults
from aviato._exec import ExecStream
from aviato._exec import exec_argv as _argv
from aviato._exec import stdin_payloads as _stdin_payloads
from aviato._files import SandboxFiles
from aviato._lifecycle import SandboxLifecycle
from aviato._options import SandboxOptions, as_args
from aviato._process import Process, ProcessInfo, attach, list_processes
from aviato._process import spawn as _spawn
from aviato._storage import Mount, Tunnel
from aviato._tasks import TaskGroup, default_tasks
from aviato._types import ExecResult, OutputChunk
from aviato.exceptions import (
    AviatoError,
    ClusterUnavailableError,
    SandboxError,
    SandboxExecutionError,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from aviato.protocol import (
    MAX_PAYLOAD_BYTES,
    CreateSandbox,
    Exec,
    ExecReply,
    FileReply,
    GetLogs,
    GetSandbox,
    ListSandboxes,
    LogsReply,
    ReadFile,
    SandboxInfo,
    SandboxListReply,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    StopSandbox,
    WaitSandbox,
    WriteFile,
)

__all__ = [
    "OUTAGE_SECONDS",
    "Sandbox",
    "SandboxPage",
    "scheduler_connection",
]


if TYPE_CHECKING:
    from aviato._session import Session


def _list_request(
    tags: Sequence[str],
    status: Sequence[SandboxStatus | str] | None,
    session_id: str | None,
    agent_id: str | None,
    limit: int | None,
    cursor: str,
) -> ListSandboxes:
    statuses = (
        (SandboxStatus.CREATING, SandboxStatus.RUNNING, SandboxStatus.PAUSED)
        if status is None
        else tuple(SandboxStatus(s) for s in status)
    )
    return ListSandboxes(
        tags=tuple(tags),
        statuses=statuses,
        session_id=session_id,
        agent_id=agent_id,
        limit=max(0, limit or 0),
        cursor=cursor,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class SandboxPage:
    """One page of a listing (``Sandbox.page``): its sandboxes, and the cursor that
    asks for the next page ("" after the last)."""

    sandboxes: list[Sandbox]
    cursor: str


#: Longest single long-poll of ``wait``; the loop re-asks until its own deadline.
#: How long ``wait`` rides out a scheduler that does not answer (or, just after, does
#: not know the sandbox yet) before it raises.
OUTAGE_SECONDS = 30.0
_WAIT_POLL_SECONDS = 5.0  # short: a poll lost in a scheduler restart is re-sent soon
#: Deadline for an exec given no timeout of its own (a day: "forever", but bounded).
_EXEC_NO_TIMEOUT_SECONDS = 24 * 3600.0


async def scheduler_connection(
    defaults: SandboxDefaults, conns: Connections | None = None
) -> Channel:
    """The channel to the scheduler, of ``conns`` (by default the loop's default owner)."""
    conns = conns or default_connections()
    address = defaults.scheduler_address()
    if address is None:
        # The embedded cluster is private to this process and never uses keys.
        return conns.get(await _local.ensure_cluster(), defaults.cluster_token())
    # Nothing listening at a configured address fails in seconds, not at the deadline.
    return conns.get(
        address,
        defaults.cluster_token(),
        defaults.scheduler_curve(),
        first_contact=FIRST_CONTACT_SECONDS,
    )


class Sandbox(SandboxFiles, SandboxLifecycle):
    """A sandbox: create it (``start()`` or ``async with``), run commands, stop it.

    ``Sandbox(command="sleep", args=["infinity"])`` describes one; nothing runs
    until ``await sb.start()``.
    """

    def __init__(
        self,
        *,
        command: str | None = None,
        args: Sequence[str] | None = None,
        container_image: str | None = None,
        tags: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        max_lifetime_seconds: float | None = None,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        network: str | None = None,
        working_dir: str | None = None,
        mounts: Sequence[Mount] = (),
        volumes: Mapping[str, str] | None = None,
        ports: Sequence[int] = (),
        defaults: SandboxDefaults | None = None,
        _session: Session | None = None,
        _function_worker: bool = False,
        _merged: SandboxOptions | None = None,
        idle_timeout_seconds: float | None = None,
        gpus: int | None = None,
        agent_labels: Mapping[str, str] | None = None,
        placement: str | None = None,
        network_allow: Sequence[str] | None = None,
    ) -> None:
        """``_merged``: options merged over the defaults already (a function worker's),
        used instead of the arguments. ``cpus``, ``memory_bytes``, ``gpus`` and
        ``agent_labels`` are placed where they fit (``placement="pack"``: on the
        fullest such agent; by default the emptiest)."""
        self._defaults = defaults or (_session.defaults if _session else SandboxDefaults())
        self._session = _session
        if _merged is None:
            mine = SandboxOptions(
                image=container_image,
                command=command,
                args=as_args(args),
                env=dict(env or {}),
                tags=tuple(tags or ()),
                max_lifetime_seconds=max_lifetime_seconds,
                memory_bytes=memory_bytes,
                cpus=cpus,
                network=network,
                working_dir=working_dir,
                idle_timeout_seconds=idle_timeout_seconds,
                mounts=tuple(mounts),
                volumes=dict(volumes or {}),
                ports=tuple(ports),
                gpus=gpus,
                agent_labels=dict(agent_labels or {}),
                placement=placement,
                network_allow=network_allow,  # type: ignore[arg-type]  # made a tuple there
            )
            _merged = mine.over(self._defaults.options())
        self._spec: SandboxSpec = SandboxSpec.of(
            _merged,
            session_id=_session.session_id if _session else None,
            function_worker=_function_worker,
        )
        self._info: SandboxInfo | None = None
        self._starting: asyncio.Task[str] | None = None
        self._stopped_by_us = False
        #: Chosen here, not by the scheduler: a stop during the start can name it.
        self._pending_id = _new_id()
        self._stop_requested = False

    # ------------------------------------------------------------------ constructors

    @classmethod
    async def create(cls, *command_and_args: str, **kwargs: Any) -> Sandbox:
        """Create and start a sandbox: ``await Sandbox.create("sleep", "infinity")``."""
        if command_and_args:
            kwargs.setdefault("command", command_and_args[0])
            kwargs.setdefault("args", list(command_and_args[1:]))
        sandbox = cls(**kwargs)
        await sandbox.start()
        return sandbox

    @staticmethod
    def session(defaults: SandboxDefaults | None = None) -> Session:
        """A session: shared defaults, and cleanup of every sandbox it made."""
        from aviato._session import Session

        return Session(defaults)

    @classmethod
    def _attached(cls, info: SandboxInfo, defaults: SandboxDefaults) -> Sandbox:
        sandbox = cls.__new__(cls)
        sandbox._defaults = defaults
        sandbox._session = None
        sandbox._spec = info.spec
        sandbox._info = info
        sandbox._starting = None
        sandbox._stopped_by_us = False
        sandbox._pending_id = info.sandbox_id
        sandbox._stop_requested = False
        return sandbox

    @classmethod
    async def from_id(cls, sandbox_id: str, *, defaults: SandboxDefaults | None = None) -> Sandbox:
        """Reconnect to a sandbox by id (from this process or any other)."""
        defaults = defaults or SandboxDefaults()
        conn = await scheduler_connection(defaults)
        reply = await conn.request(GetSandbox(sandbox_id), timeout=defaults.request_timeout_seconds)
        assert isinstance(reply.msg, SandboxReply)
        return cls._attached(reply.msg.sandbox, defaults)

    @classmethod
    async def list(
        cls,
        *,
        tags: Sequence[str] = (),
        status: Sequence[SandboxStatus | str] | None = None,
        session_id: str | None = None,
        agent_id: str | None = None,
        limit: int | None = None,
        defaults: SandboxDefaults | None = None,
    ) -> builtins.list[Sandbox]:
        """Sandboxes carrying every tag in ``tags``; by default the live ones. Every one
        (gathered a page at a time), or the first ``limit``. For a big cluster,
        ``Sandbox.iterate`` yields them as pages arrive, and ``Sandbox.page`` fetches
        one page at a time from a cursor."""
        if limit is None:
            return [
                sandbox
                async for sandbox in cls.iterate(
                    tags=tags,
                    status=status,
                    session_id=session_id,
                    agent_id=agent_id,
                    defaults=defaults,
                )
            ]
        found: builtins.list[Sandbox] = []
        cursor = ""
        while len(found) < limit:
            page = await cls.page(
                tags=tags,
                status=status,
                session_id=session_id,
                agent_id=agent_id,
                limit=limit - len(found),
                cursor=cursor,
                defaults=defaults,
            )
            found += page.sandboxes
            if not page.cursor:
                break
            cursor = page.cursor
        return found

    @classmethod
    async def iterate(
        cls,
        *,
        tags: Sequence[str] = (),
        status: Sequence[SandboxStatus | str] | None = None,
        session_id: str | None = None,
        agent_id: str | None = None,
        page_size: int | None = None,
        defaults: SandboxDefaults | None = None,
    ) -> AsyncIterator[Sandbox]:
        """``Sandbox.list``'s rows as an async iterator, one page (``page_size`` rows,
        by default the scheduler's) fetched at a time: ``async for sb in
        Sandbox.iterate(): ...``."""
        defaults = defaults or SandboxDefaults()
        conn = await scheduler_connection(defaults)
        request = _list_request(tags, status, session_id, agent_id, page_size, "")
        # The scheduler streams every page to this one request: the next page is made
        # while this one is decoded. (No reply type ends it: the last page has no cursor.)
        replies = conn.stream(
            dataclasses.replace(request, stream=True),
            idle_timeout=defaults.request_timeout_seconds,
            is_last=SandboxReply,
        )
        try:
            async for reply in replies:
                assert isinstance(reply.msg, SandboxListReply)
                for info in reply.msg.sandboxes:
                    yield cls._attached(info, defaults)
                if not reply.msg.next_cursor:
                    return
        finally:
            await replies.aclose()  # type: ignore[attr-defined]

    @classmethod
    async def page(
        cls,
        *,
        tags: Sequence[str] = (),
        status: Sequence[SandboxStatus | str] | None = None,
        session_id: str | None = None,
        agent_id: str | None = None,
        limit: int | None = None,
        cursor: str = "",
        defaults: SandboxDefaults | None = None,
    ) -> SandboxPage:
        """One page of ``Sandbox.list``, from after ``cursor`` ("" for the first): at
        most ``limit`` sandboxes, and the cursor of the next page ("" after the last).
        The scheduler filters; a page may be short, even empty, before the last."""
        defaults = defaults or SandboxDefaults()
        conn = await scheduler_connection(defaults)
        reply = await conn.request(
            _list_request(tags, status, session_id, agent_id, limit, cursor),
            timeout=defaults.request_timeout_seconds,
        )
        assert isinstance(reply.msg, SandboxListReply)
        sandboxes = [cls._attached(info, defaults) for info in reply.msg.sandboxes]
        return SandboxPage(sandboxes, reply.msg.next_cursor)

    # ------------------------------------------------------------------ properties

    @property
    def sandbox_id(self) -> str | None:
        return self._info.sandbox_id if self._info else None

    @property
    def returncode(self) -> int | None:
        """The main command's exit code, once it is known to have exited."""
        return self._info.exit_code if self._info else None

    @property
    def tags(self) -> tuple[str, ...]:
        return self._spec.tags

    @property
    def container_image(self) -> str:
        return self._spec.image

    @property
    def runtime(self) -> str:
        """The runtime the sandbox runs in ("docker"), once started."""
        return self._info.runtime if self._info else ""

    @property
    def isolation(self) -> str:
        """The isolation it runs under ("runc", "gvisor", "bwrap"; "runc+userns" etc.
        where a user namespace makes its root unprivileged on the host), once started."""
        return self._info.isolation if self._info else ""

    @property
    def info(self) -> SandboxInfo | None:
        """The last row the scheduler reported for this sandbox."""
        return self._info

    def __repr__(self) -> str:
        state = self._info.status.value if self._info else "not started"
        return f"<Sandbox {self.sandbox_id or '-'} {self._spec.image} {state}>"

    # ------------------------------------------------------------------ owner

    def _connections(self) -> Connections:
        """Its session's channels; outside a session (or once it closed), those of the
        loop's default owner."""
        session = self._session
        if session is not None and not session._connections.closed:
            return session._connections
        return default_connections()

    def _tasks(self) -> TaskGroup:
        session = self._session
        if session is not None:
            return session._tasks
        return default_tasks()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        """Create the sandbox in the cluster; returns its id. Starting twice starts one."""
        if self._info is not None:
            return self._info.sandbox_id
        if self._starting is None:
            if self._session is not None:
                self._session._check_open()
            # Shielded: a caller that gives up (cancelled, or a failed sibling in a
            # TaskGroup) leaves the create running, and its failure, if any, to no one;
            # those still awaiting get it raised.
            self._starting = self._tasks().spawn(self._start(), on_error=_raised_to_awaiters)
        starting = self._starting
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            if self._stop_requested and starting.cancelled():  # stop(), not our caller
                raise SandboxTerminatedError(
                    f"sandbox {self._pending_id} was stopped while starting",
                    sandbox_id=self._pending_id,
                ) from None
            raise

    async def _start(self) -> str:
        if self._session is not None:
            await self._session._ensure_open()
        conn = await scheduler_connection(self._defaults, self._connections())
        wait = self._defaults.start_timeout_seconds
        # Our own id: a create we give up on may still arrive (queued in the socket
        # across an outage); the stop sent after it, in order, then cancels it.
        sandbox_id = self._pending_id
        try:
            reply = await conn.request_probed(
                CreateSandbox(self._spec, wait, sandbox_id),
                timeout=wait + self._defaults.request_timeout_seconds + 120.0,
                probe=self._defaults.request_timeout_seconds,
            )
        except BaseException as exc:
            if not isinstance(exc, SandboxFailedError):  # else the scheduler dropped it
                with contextlib.suppress(AviatoError):
                    stop = StopSandbox(sandbox_id, "its creator gave up waiting")
                    conn.forget(conn.send_nowait(stop, (), lambda _: None))
            if self._stop_requested:
                # stop() cancelled us: the start fails as the sandbox's would have.
                raise SandboxTerminatedError(
                    f"sandbox {sandbox_id} was stopped while starting", sandbox_id=sandbox_id
                ) from None
            if isinstance(exc, SandboxError) and not exc.sandbox_id:
                exc.sandbox_id = sandbox_id  # the id the daemons' logs name it by
            if isinstance(exc, AviatoError):
                self._starting = None  # a later start() may try again, with a new id
                self._pending_id = _new_id()
            raise
        assert isinstance(reply.msg, SandboxReply)
        self._info = reply.msg.sandbox
        return self._info.sandbox_id

    async def stop(self) -> None:
        """Stop and remove the sandbox. Idempotent; a never-started sandbox is a no-op."""
        if self._starting is not None and self._info is None:
            if not self._starting.done():
                # Still queued for a slot, or starting: give up on it; start() raises
                # SandboxTerminatedError. The create may have reached the scheduler (or
                # an agent): stopping its id, in order after it, ends it there too.
                self._stop_requested = True
                self._starting.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._starting
                conn = await scheduler_connection(self._defaults, self._connections())
                with contextlib.suppress(SandboxNotFoundError):
                    await conn.request(
                        StopSandbox(self._pending_id, "stopped while starting"),
                        timeout=self._defaults.request_timeout_seconds,
                    )
                return
            try:
                await self._starting
            except (Exception, asyncio.CancelledError):
                return
        if self._info is None or self._stopped_by_us:
            return
        self._stopped_by_us = True
        conn = await scheduler_connection(self._defaults, self._connections())
        reply = await conn.request(
            StopSandbox(self._info.sandbox_id), timeout=self._defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, SandboxReply)
        self._info = reply.msg.sandbox

    async def status(self) -> SandboxStatus:
        """Ask the scheduler for the sandbox's current status."""
        info = await self._refresh()
        return info.status

    async def _refresh(self) -> SandboxInfo:
        info = self._require_started()
        conn = await scheduler_connection(self._defaults, self._connections())
        reply = await conn.request(
            GetSandbox(info.sandbox_id), timeout=self._defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, SandboxReply)
        self._info = reply.msg.sandbox
        return self._info

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the main command to end; returns its exit code.

        Raises ``SandboxFailedError`` when it could not run to the end (agent lost,
        out of memory), ``SandboxTerminatedError`` when something else stopped it,
        ``SandboxTimeoutError`` when ``timeout`` passes first. It rides out a scheduler
        restart (until its agent reports the sandbox again); after ``OUTAGE_SECONDS``
        of no scheduler it raises ``ClusterUnavailableError``."""
        info = self._require_started()
        conn = await scheduler_connection(self._defaults, self._connections())
        deadline = None if timeout is None else time.monotonic() + timeout
        outage_since: float | None = None
        while not info.status.is_terminal:
            left = _WAIT_POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise SandboxTimeoutError(
                    f"sandbox {info.sandbox_id} still {info.status.value} after {timeout:g}s",
                    sandbox_id=info.sandbox_id,
                )
            poll = min(left, _WAIT_POLL_SECONDS)
            try:
                # A small slack: a poll lost with a restarted scheduler is noticed soon.
                reply = await conn.request(
                    WaitSandbox(info.sandbox_id, poll),
                    timeout=poll + min(5.0, self._defaults.request_timeout_seconds),
                )
            except (ClusterUnavailableError, SandboxNotFoundError) as exc:
                # Not found is "not yet" only just after the scheduler went away: a
                # restarted one learns the sandbox when its agent registers again.
                now = time.monotonic()
                if isinstance(exc, SandboxNotFoundError) and outage_since is None:
                    raise
                outage_since = outage_since or now
                if now - outage_since > OUTAGE_SECONDS:
                    raise
                await asyncio.sleep(0.5)
                continue
            outage_since = None
            assert isinstance(reply.msg, SandboxReply)
            info = self._info = reply.msg.sandbox
        if info.status is SandboxStatus.FAILED:
            raise SandboxFailedError(
                f"sandbox {info.sandbox_id} failed: {info.reason}", sandbox_id=info.sandbox_id
            )
        if info.status is SandboxStatus.TERMINATED and not self._stopped_by_us:
            raise SandboxTerminatedError(
                f"sandbox {info.sandbox_id} was terminated: {info.reason}",
                sandbox_id=info.sandbox_id,
                ended_by=info.ended_by,
            )
        return info.exit_code

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ data plane

    def _require_started(self) -> SandboxInfo:
        if self._info is None:
            raise SandboxNotRunningError(
                "sandbox is not started: call `await sb.start()` or use `async with sb:`"
            )
        return self._info

    async def tunnels(self) -> dict[int, Tunnel]:
        """Where each of its ``ports`` is reached from outside: ``{8000: Tunnel(host,
        port)}``; ``tunnel.url`` is ``http://host:port``. Starts it first if need be."""
        from aviato._volumes import tunnels_of  # it imports this module

        await self.start()
        info, _ = self._agent()
        return await tunnels_of(info, self._defaults, self._connections())

    def _agent(self) -> tuple[SandboxInfo, Channel]:
        info = self._require_started()
        if self._stopped_by_us:
            raise SandboxNotRunningError(
                f"sandbox {info.sandbox_id} was stopped", sandbox_id=info.sandbox_id
            )
        return info, agent_connection(info, self._defaults, self._connections())

    def _exec_deadline(self, timeout_seconds: float | None) -> float:
        slack = self._defaults.request_timeout_seconds
        if timeout_seconds is not None:
            return timeout_seconds + slack
        if self._info is not None and self._info.deadline is not None:
            return max(0.0, self._info.deadline - time.time()) + slack
        return _EXEC_NO_TIMEOUT_SECONDS

    async def exec(
        self,
        command: Sequence[str],
        *,
        check: bool = False,
        timeout_seconds: float | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | bytearray | memoryview | str | None = None,
    ) -> ExecResult:
        """Run ``command`` (an argv list) in the sandbox and return its output as bytes.

        ``stdin``: what the command reads on its standard input (a str as UTF-8), then
        end of file; by default its stdin is empty. At most the payload limit
        (``PayloadTooLargeError`` beyond it, nothing sent)."""
        argv = _argv(command)
        payloads = _stdin_payloads(stdin)
        info, conn = self._agent()
        reply = await conn.request(
            Exec(info.sandbox_id, argv, cwd, dict(env or {}), timeout_seconds),
            payloads,
            timeout=self._exec_deadline(timeout_seconds),
            cancel_at_source=True,
        )
        assert isinstance(reply.msg, ExecReply)
        stdout, stderr = (bytes(p) for p in reply.payloads[:2])
        result = ExecResult(stdout, stderr, reply.msg.returncode, argv)
        return self._judge(result, reply.msg.timed_out, check, timeout_seconds)

    def _judge(
        self, result: ExecResult, timed_out: bool, check: bool, timeout_seconds: float | None
    ) -> ExecResult:
        if timed_out:
            raise SandboxTimeoutError(
                f"{' '.join(result.command)!r} did not finish within {timeout_seconds:g}s "
                "and was killed (partial output on .exec_result)",
                sandbox_id=self.sandbox_id,
                exec_result=result,
            )
        if check and result.returncode != 0:
            raise SandboxExecutionError(
                f"{' '.join(result.command)!r} exited with code {result.returncode}: "
                f"{result.stderr[-500:].decode(errors='replace').strip()}",
                exec_result=result,
                sandbox_id=self.sandbox_id,
            )
        return result

    def exec_stream(
        self,
        command: Sequence[str],
        *,
        check: bool = False,
        timeout_seconds: float | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | bytearray | memoryview | str | None = None,
    ) -> ExecStream:
        """Run ``command`` and yield its output as it is produced::

        stream = sb.exec_stream(["sh", "-c", "echo a; sleep 1; echo b"])
        async for chunk in stream:
            print(chunk.stream, chunk.data)
        print(stream.returncode)

        ``stdin`` as for :meth:`exec`: sent whole with the request, then end of file.
        """
        return ExecStream(
            self._agent,
            self._exec_deadline(timeout_seconds),
            self._judge,
            _argv(command),
            check,
            timeout_seconds,
            cwd,
            dict(env or {}),
            _stdin_payloads(stdin),
        )

    async def spawn(
        self,
        command: Sequence[str],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """Start ``command`` and keep it: a :class:`~aviato.Process` to write its stdin,
        read its output, signal, resize (``pty=True``: a terminal of ``rows`` x ``cols``)
        and wait for. It runs until it ends or the sandbox does, whoever is attached."""
        timeout = self._defaults.request_timeout_seconds
        return await _spawn(
            self._agent, timeout, command, cwd=cwd, env=env, pty=pty, rows=rows, cols=cols
        )

    async def process(self, process_id: str) -> Process:
        """The process ``process_id`` spawned in this sandbox (by any client), to read,
        write and signal; ``ProcessNotFoundError`` if it has none such."""
        return await attach(self._agent, self._defaults.request_timeout_seconds, process_id)

    async def processes(self) -> builtins.list[ProcessInfo]:
        """Every process spawned in this sandbox, running or ended (the last 64 ended)."""
        return await list_processes(self._agent, self._defaults.request_timeout_seconds)

    async def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """The file at ``path`` (a missing one raises ``SandboxFileError``). A relative
        path is taken from the sandbox's working directory, where ``exec`` runs by
        default: its ``working_dir``, else the image's ``WORKDIR``, else ``/`` (under the
        local runtime, ``/tmp``). A file larger than ``max_bytes`` (by default the payload
        limit, 512 MiB) raises ``PayloadTooLargeError``: the sandbox stops reading it
        there, so an endless file (``/dev/zero``) costs no more than that."""
        if max_bytes is not None and (
            isinstance(max_bytes, bool)
            or not isinstance(max_bytes, int)
            or not 0 < max_bytes <= MAX_PAYLOAD_BYTES
        ):
            raise ValueError(
                f"max_bytes must be an int from 1 to {MAX_PAYLOAD_BYTES} (the payload "
                f"limit), got {max_bytes!r}"
            )
        info, conn = self._agent()
        reply = await conn.request(
            ReadFile(info.sandbox_id, path, max_bytes or 0),
            timeout=self._defaults.request_timeout_seconds,
            cancel_at_source=True,
        )
        assert isinstance(reply.msg, FileReply)
        return bytes(reply.payloads[0]) if reply.payloads else b""

    async def write_file(
        self, path: str, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644
    ) -> None:
        """Write ``data`` (bytes; a str is written as UTF-8) at ``path``, replacing any
        file there, with ``mode``. Missing parent directories are created. A relative path
        is taken from the sandbox's working directory, as for :meth:`read_file`."""
        if isinstance(data, str):
            data = data.encode()
        payload = data if isinstance(data, bytes | memoryview) else bytes(data)
        info, conn = self._agent()
        await conn.request(
            WriteFile(info.sandbox_id, path, mode),
            (payload,),
            timeout=self._defaults.request_timeout_seconds,
            cancel_at_source=True,
        )

    async def logs(self) -> bytes:
        """The main command's output so far, stdout and stderr together in the order
        they were written (as ``docker logs`` shows them with ``2>&1``). Still there
        after the sandbox stopped or exited, while its agent keeps them (the last MiB of
        each; the oldest sandboxes' go first)."""
        return b"".join(chunk.data for chunk in await self.log_chunks())

    async def log_chunks(self) -> builtins.list[OutputChunk]:
        """``logs`` as chunks in the order written, each with its stream
        (``chunk.stream`` is "stdout" or "stderr"), as ``exec_stream`` yields them."""
        info = self._require_started()
        if info.agent_address is None:
            return []
        conn = agent_connection(info, self._defaults, self._connections())
        reply = await conn.request(
            GetLogs(info.sandbox_id), timeout=self._defaults.request_timeout_seconds
        )
        assert isinstance(reply.msg, LogsReply)
        fds = reply.msg.fds or (1,) * len(reply.payloads)  # an older agent: one blob
        return [
            OutputChunk(2 if fd == 2 else 1, bytes(data))
            for fd, data in zip(fds, reply.payloads, strict=False)
        ]


def _new_id() -> str:
    return "sb-" + uuid.uuid4().hex[:16]


def _raised_to_awaiters(exc: BaseException) -> None:
    """A start's failure is raised to those awaiting ``start()`` (if none still are,
    no one asked for it any more)."""
