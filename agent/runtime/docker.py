"""Sandboxes as Docker containers, through the Docker SDK: create, spares, files and
logs, stop, list, and the exits the engine reports; exec without a supervisor is
:mod:`agent.runtime.docker_exec`'s.

Every SDK call blocks, so each runs on a dedicated thread pool; the loop only
awaits futures. ``docker`` is imported by the docker runtime's modules alone, and
every error it raises is translated to :mod:`aviato.exceptions` before it leaves them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
import logging
import posixpath
import tarfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import docker
import docker.errors

from agent.runtime import docker_gvisor, docker_userns
from agent.runtime.base import (
    LABEL_AGENT,
    LABEL_MANAGED,
    LABEL_SANDBOX,
    LABEL_SPARE,
    ExecOutput,
    ExitStatus,
    Mount,
    OutputChunk,
    Runtime,
    RuntimeSandbox,
    SandboxExit,
    spec_from_labels,
    tail_chunks,
)
from agent.runtime.docker_bytes import CHUNK, cut, order_log_entries, read_capped, too_large
from agent.runtime.docker_errors import DockerError, explain, http_status
from agent.runtime.docker_exec import DockerExec
from agent.runtime.docker_gpus import gpu_requests
from agent.runtime.docker_lifecycle import DockerLifecycle, is_snapshot
from agent.runtime.docker_network import DockerNetworks
from agent.runtime.docker_ports import publish_ip, published
from agent.runtime.docker_procs import DockerProcesses
from agent.runtime.docker_streams import DockerStreams
from agent.runtime.docker_volumes import DockerVolumes
from agent.runtime.isolation import (
    GVISOR,
    check_engine,
    docker_runtime_for,
    isolation_of,
    probe_gvisor,
)
from agent.runtime.volumes import VolumeStore
from aviato.exceptions import (
    SandboxError,
    SandboxFailedError,
    SandboxFileError,
    SandboxNotFoundError,
    SandboxNotRunningError,
)
from aviato.protocol import MAX_PAYLOAD_BYTES, SandboxSpec

__all__ = ["DockerRuntime", "docker_available"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

THREADS = 32  # pool threads == HTTP connections, so concurrent calls never wait for a socket
#: None by default: sandboxes run untrusted code, so even their root has no effective
#: capability (it still owns what root owns). Operators may add some (--cap-add).
CAPS: tuple[str, ...] = ()
EXIT_LOG_BYTES = 1024 * 1024  # logs kept per sandbox that exited by itself
EXIT_LOG_SANDBOXES = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DIR_BIT = 1 << 31  # Go's os.ModeDir, in the archive stat header
#: Tar headers (PAX ones for long names), padding and end blocks around a file's data.
_TAR_SLACK = 1 << 20


def docker_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout`` seconds."""
    try:
        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class DockerRuntime(DockerLifecycle, Runtime):
    name = "docker"
    supports_spares = True
    publishes_ports = True

    def __init__(
        self,
        *,
        pids_limit: int = 1024,
        pull: str = "missing",
        client: docker.DockerClient | None = None,
        cap_add: Sequence[str] = CAPS,
        isolations: Sequence[str] = ("runc",),
    ) -> None:
        if pull not in ("missing", "never"):
            raise ValueError(f"pull must be 'missing' or 'never', not {pull!r}")
        self.pids_limit = pids_limit
        self.cap_add = [c.upper().removeprefix("CAP_") for c in cap_add]
        self.pull = pull
        self.isolations = tuple(isolations)
        self._gvisor: set[str] = set()  # sandbox ids under gVisor (agent/runtime/docker_gvisor.py)
        self._remap: tuple[int, int] | None = None  # the engine's userns-remap ids
        self._owns_client = client is None
        self._client_obj: Any = client
        self._client_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="aviato-docker")
        # sandbox id -> container id; exec/files address containers without a lookup.
        self._ids: dict[str, str] = {}
        self._workdirs: dict[str, str] = {}
        self._commands_found: set[tuple[str, str, str | None]] = set()
        # _lock orders the events thread's claim of an exit against create and stop.
        self._lock = threading.Lock()
        self._starting: set[str] = set()
        self._early: dict[str, dict[str, Any]] = {}  # die events that came during start
        self._removing: set[str] = set()
        self._oom: set[str] = set()
        self._last_logs: OrderedDict[str, list[OutputChunk]] = OrderedDict()
        self._exit_q: asyncio.Queue[SandboxExit | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: Any = None
        self._events_lock = asyncio.Lock()
        self._watcher: threading.Thread | None = None
        self._closed = threading.Event()
        #: Claimed spares: container id -> the sandbox id it became (its label names
        #: the spare).
        self._claimed: dict[str, str] = {}
        self._spare_env: dict[str, dict[str, str]] = {}  # claimed spare -> its spec's env
        self._exec = DockerExec(lambda: self._api, self._pool, self._engine_error)
        self._procs = DockerProcesses(lambda: self._api, self._exec_target)
        self.streams = DockerStreams(self)  # logs as written; files without a supervisor
        self._networks = DockerNetworks(lambda: self._api)  # internal, allow-lists

    # ------------------------------------------------------------------ plumbing

    @property
    def _client(self) -> Any:
        # Built lazily, on a pool thread: from_env asks the engine for its API version.
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = docker.from_env(max_pool_size=THREADS, timeout=120)
            return self._client_obj

    @property
    def _api(self) -> Any:
        return self._client.api

    async def _run(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _target(self, sandbox_id: str) -> str:
        return self._ids.get(sandbox_id) or f"aviato-{sandbox_id}"

    def _path_sync(self, sandbox_id: str, path: str) -> str:
        """``path`` made absolute: a relative one is taken from the sandbox's working
        directory, where exec runs by default (its working_dir, else the image's WORKDIR,
        else /); the image's is asked of the engine once, when first needed."""
        if not path.startswith("/"):
            base = self._workdirs.get(sandbox_id)
            if base is None:
                try:
                    config = self._api.inspect_container(self._target(sandbox_id))["Config"]
                except DockerError as exc:
                    what = "finding its working directory"
                    raise self._engine_error(sandbox_id, what, exc) from exc
                base = self._workdirs[sandbox_id] = config.get("WorkingDir") or "/"
            path = posixpath.join(base, path)
        return "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"

    def _gone(self, sandbox_id: str, exc: BaseException) -> SandboxError | None:
        """The error for a sandbox whose container is missing or stopped, else None."""
        why = explain(exc)
        if http_status(exc) == 409 or "no such container" in why.lower():
            return SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running ({why})", sandbox_id=sandbox_id
            )
        return None

    def _engine_error(self, sandbox_id: str, what: str, exc: BaseException) -> SandboxError:
        return self._gone(sandbox_id, exc) or SandboxFailedError(
            f"{what} in sandbox {sandbox_id} failed: {explain(exc)}"
            " (is the Docker engine healthy?)",
            sandbox_id=sandbox_id,
        )

    async def published_ports(self, sandbox_id: str) -> dict[int, int]:
        def ports() -> dict[int, int]:
            try:
                return published(self._api.inspect_container(self._target(sandbox_id)))
            except DockerError as exc:
                raise self._engine_error(sandbox_id, "reading its ports", exc) from exc

        return await self._run(ports)

    def volume_store(self, directory: Path) -> VolumeStore:
        return DockerVolumes(lambda: self._client)  # the engine's volumes, not a directory

    # ------------------------------------------------------------------ create

    async def create(
        self,
        sandbox_id: str,
        spec: SandboxSpec,
        labels: dict[str, str],
        mounts: Sequence[Mount] = (),
    ) -> None:
        await self._ensure_events()
        await self._run(self._create_sync, sandbox_id, spec, labels, mounts)

    def _create_sync(
        self, sandbox_id: str, spec: SandboxSpec, labels: dict[str, str], mounts: Sequence[Mount]
    ) -> None:
        api, image = self._api, spec.image
        if self._remap is not None:  # its root must write to the socket directory
            docker_userns.grant_mounts(self._remap, mounts)
        host_config = api.create_host_config(
            # Mounts, not binds: Docker creates a missing bind source, and a create that
            # raced its sandbox's stop (or the agent's exit) would remake our socket
            # directory after we removed it. A missing source now fails the create.
            mounts=[
                docker.types.Mount(m.target, m.source, type=m.kind, read_only=m.read_only)
                for m in mounts
            ]
            or None,
            init=True,  # docker-init reaps zombies and forwards signals
            security_opt=["no-new-privileges"],
            cap_drop=["ALL"],
            cap_add=self.cap_add,
            pids_limit=spec.pids_limit or self.pids_limit,
            mem_limit=spec.memory_bytes,
            # Memory + swap: the same, so no swap beyond the limit (unset, Docker lets a
            # container swap as much again on a host with swap).
            memswap_limit=spec.memory_bytes,
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            network_mode=self._networks.mode(spec, labels),
            # The engine picks a free host port for each, on the agent's publish address.
            port_bindings={p: (publish_ip(self.publish_host), None) for p in spec.ports} or None,
            runtime=docker_runtime_for(spec, self.isolations),
            device_requests=gpu_requests(self._client, labels),
        )
        kwargs: dict[str, Any] = dict(
            name=f"aviato-{sandbox_id}",
            entrypoint=[spec.command],  # also drops the image's CMD
            command=list(spec.args),
            environment=docker_gvisor.link_env(spec.env)
            if isolation_of(spec, self.isolations) == GVISOR
            else dict(spec.env),
            working_dir=spec.working_dir,
            labels=labels,
            ports=list(spec.ports) or None,
            host_config=host_config,
            detach=True,
        )

        def fail(msg: str) -> SandboxFailedError:
            return SandboxFailedError(msg, sandbox_id=sandbox_id)

        try:
            try:
                cid: str = self._networks.create_container(sandbox_id, spec, image, kwargs)["Id"]
            except docker.errors.ImageNotFound as exc:
                if self.pull == "never" or is_snapshot(image):
                    reason = "pull='never'" if self.pull == "never" else "snapshots never are"
                else:
                    try:
                        self._client.images.pull(image)
                        reason = ""
                    except DockerError as pull_exc:
                        reason = explain(pull_exc)
                if reason:
                    raise fail(
                        f"image {image!r} is not on this host and no registry could provide it"
                        f" ({reason}). Build it locally with scripts/build-image.sh (for"
                        f" python:3.11), or `docker pull {image}` on a machine with registry"
                        " access and `docker save | docker load` it here."
                    ) from exc
                cid = self._networks.create_container(sandbox_id, spec, image, kwargs)["Id"]
        except DockerError as exc:
            if http_status(exc) == 409:
                raise fail(
                    f"a container named aviato-{sandbox_id} already exists; remove it with"
                    f" `docker rm -f aviato-{sandbox_id}` or use another sandbox id"
                ) from exc
            raise fail(f"could not create sandbox from image {image!r}: {explain(exc)}") from exc
        with self._lock:
            self._ids[sandbox_id] = cid
            self._starting.add(sandbox_id)
        if isolation_of(spec, self.isolations) == GVISOR:
            self._gvisor.add(sandbox_id)
        if spec.working_dir:  # else the image's, asked for when a relative path needs it
            self._workdirs[sandbox_id] = spec.working_dir
        try:
            # docker-init (init=True) hides a missing command until after start (the
            # sandbox just exits 127): look it up first so that create fails instead.
            if not self._command_known(cid, spec):
                raise fail(
                    f"command {spec.command!r} was not found in image {image!r}: give a"
                    " program that exists in the image (or its full path)"
                )
            self._networks.start(cid, spec)  # an allow-list's rules go in first
        except (SandboxFailedError, *DockerError) as exc:
            with self._lock:
                self._starting.discard(sandbox_id)
                self._ids.pop(sandbox_id, None)
                self._early.pop(cid, None)
            self._workdirs.pop(sandbox_id, None)
            self._gvisor.discard(sandbox_id)
            with contextlib.suppress(*DockerError):
                api.remove_container(cid, force=True)
            self._networks.released(sandbox_id)
            if isinstance(exc, SandboxFailedError):
                raise
            raise fail(f"sandbox could not start from image {image!r}: {explain(exc)}") from exc
        with self._lock:
            self._starting.discard(sandbox_id)
            early = self._early.pop(cid, None)
        if early is not None:  # the command ended before start() even returned
            self._on_event(early)

    async def probe(self, image: str) -> str:
        """Check the engine runs every offered isolation (see agent/runtime/isolation.py),
        and whether it remaps root (agent/runtime/docker_userns.py)."""
        await self._run(check_engine, self._client, self.isolations)
        self._remap = await self._run(docker_userns.engine_remap, self._client)
        self.userns = docker_userns.describe(self._remap)
        if "gvisor" not in self.isolations:
            return ""
        return await self._run(probe_gvisor, self._client, image)

    # ------------------------------------------------------------------ spares

    async def create_spare(
        self, spare_id: str, spec: SandboxSpec, labels: dict[str, str], mounts: Sequence[Mount]
    ) -> None:
        await self._ensure_events()
        await self._run(self._create_sync, spare_id, spec, labels, mounts)

    async def claim_spare(
        self, spare_id: str, sandbox_id: str, spec: SandboxSpec, created_at: float
    ) -> None:
        cid = self._ids.get(spare_id)
        if cid is None:
            raise SandboxNotRunningError(f"spare {spare_id} is gone", sandbox_id=spare_id)
        await self._run(self._claim_sync, cid, sandbox_id, spec)
        if self.claims is not None:
            self.claims.record(spare_id, sandbox_id, spec, created_at)
        with self._lock:
            self._ids.pop(spare_id, None)
            self._ids[sandbox_id] = cid
            self._claimed[cid] = sandbox_id
        if spare_id in self._gvisor:
            self._gvisor.discard(spare_id)
            self._gvisor.add(sandbox_id)
        if spec.env:
            self._spare_env[sandbox_id] = dict(spec.env)
        if spec.working_dir:
            self._workdirs[sandbox_id] = spec.working_dir

    def _claim_sync(self, cid: str, sandbox_id: str, spec: SandboxSpec) -> None:
        """Fail as a fresh create would (the spare untouched): a command the image lacks,
        a name taken. The container takes the sandbox's name (``docker ps``, ``docker
        logs aviato-ID`` as for any sandbox; ~2 ms)."""

        def fail(msg: str) -> SandboxFailedError:
            return SandboxFailedError(msg, sandbox_id=sandbox_id)

        try:
            if not self._command_known(cid, spec):
                raise fail(
                    f"command {spec.command!r} was not found in image {spec.image!r}: give"
                    " a program that exists in the image (or its full path)"
                )
            self._api.rename(cid, f"aviato-{sandbox_id}")
        except DockerError as exc:
            if http_status(exc) == 404:
                raise SandboxNotRunningError(
                    f"spare for {sandbox_id} is gone", sandbox_id=sandbox_id
                ) from exc
            if http_status(exc) == 409:
                raise fail(
                    f"a container named aviato-{sandbox_id} already exists; remove it with"
                    f" `docker rm -f aviato-{sandbox_id}` or use another sandbox id"
                ) from exc
            raise fail(f"could not claim a spare for {sandbox_id}: {explain(exc)}") from exc

    def _release(self, sandbox_id: str, cid: str | None) -> None:
        self._spare_env.pop(sandbox_id, None)
        if cid is not None:
            self._claimed.pop(cid, None)
        if self.claims is not None:
            self.claims.release(sandbox_id)

    def _command_known(self, cid: str, spec: SandboxSpec) -> bool:
        """Whether the command exists in the image; a found one is remembered per image,
        so only a sandbox's first create of an image pays the lookup (~20 ms)."""
        key = (spec.image, spec.command, spec.working_dir)
        if key in self._commands_found:
            return True
        found = self._has_command(cid, spec)
        if found:
            self._commands_found.add(key)
        return found

    def _has_command(self, cid: str, spec: SandboxSpec) -> bool:
        api, cmd = self._api, spec.command
        if "/" in cmd:
            paths = [posixpath.join(spec.working_dir or "/", cmd)]
        else:  # search the container's PATH, as runc will
            env = api.inspect_container(cid)["Config"]["Env"] or []
            path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
            paths = [posixpath.join(d, cmd) for d in path.split(":") if d.startswith("/")]
        url = api._url("/containers/{0}/archive", cid)  # HEAD: a stat, no archive
        for p in paths:
            if api.head(url, params={"path": p}, timeout=30).status_code != 404:
                return True  # found, or cannot tell: start() will say
        return False

    async def start_sidecar(
        self, sandbox_id: str, argv: tuple[str, ...], env: Mapping[str, str]
    ) -> bool:
        return await self._run(self._sidecar_sync, sandbox_id, argv, dict(env))

    def _sidecar_sync(self, sandbox_id: str, argv: tuple[str, ...], env: dict[str, str]) -> bool:
        api = self._api
        try:
            made = api.exec_create(
                self._target(sandbox_id),
                list(argv),
                environment=docker_gvisor.link_env(env) if self._is_gvisor(sandbox_id) else env,
                stdout=False,
                stderr=False,
            )
            api.exec_start(made["Id"], detach=True)
        except DockerError as exc:
            log.info("no sidecar in %s: %s", sandbox_id, explain(exc))
            return False
        return True

    # ------------------------------------------------------------------ exec

    def _exec_target(
        self, sandbox_id: str, env: Mapping[str, str] | None
    ) -> tuple[str, Mapping[str, str] | None]:
        """The container to exec in, and the env: a claimed spare's container env lacks
        its spec's, so it is added under the request's own, as a fresh one's would be."""
        spare_env = self._spare_env.get(sandbox_id)
        if spare_env:
            env = {**spare_env, **(env or {})}
        if self._is_gvisor(sandbox_id):
            env = docker_gvisor.tag_env(env)
        return self._target(sandbox_id), env

    def _is_gvisor(self, sandbox_id: str) -> bool:
        # (one this process did not create: an adopted one runs the default)
        return sandbox_id in self._gvisor or (
            sandbox_id not in self._ids and self.isolations[:1] == (GVISOR,)
        )

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
        target, env = self._exec_target(sandbox_id, env)
        return await self._exec.run(
            sandbox_id, target, argv, cwd=cwd, env=env, timeout_seconds=timeout_seconds, stdin=stdin
        )

    async def exec_stream(
        self,
        sandbox_id: str,
        argv: tuple[str, ...],
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: float | None = None,
        stdin: bytes | memoryview | None = None,
    ) -> AsyncIterator[OutputChunk | ExitStatus]:
        target, env = self._exec_target(sandbox_id, env)
        stream = self._exec.stream(
            sandbox_id, target, argv, cwd=cwd, env=env, timeout_seconds=timeout_seconds, stdin=stdin
        )
        async with contextlib.aclosing(stream):  # a consumer that leaves stops the command
            async for event in stream:
                yield event

    # ------------------------------------------------------------------ files and logs

    async def write_file(
        self, sandbox_id: str, path: str, data: bytes | memoryview, mode: int = 0o644
    ) -> None:
        if self._is_gvisor(sandbox_id):
            full = await self._run(self._path_sync, sandbox_id, path)
            await docker_gvisor.write_file(self.exec, sandbox_id, path, full, data, mode)
            return
        await self._run(self._write_sync, sandbox_id, path, data, mode)

    def _write_sync(self, sandbox_id: str, path: str, data: bytes | memoryview, mode: int) -> None:
        full = self._path_sync(sandbox_id, path)
        if full == "/":
            raise SandboxFileError("cannot write to '/'", filepath=path, sandbox_id=sandbox_id)
        # One member named by the full path: docker creates the missing parent dirs.
        # Sent as a chunked stream of slices: no 64 MiB copy holding the GIL.
        info = tarfile.TarInfo(full.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        view = memoryview(data).cast("B")
        archive: list[bytes | memoryview] = [info.tobuf(format=tarfile.PAX_FORMAT)]
        archive += [view[i : i + CHUNK] for i in range(0, len(view), CHUNK)]
        archive.append(b"\0" * ((-len(view)) % 512 + 1024))  # padding + end-of-archive
        try:
            self._api.put_archive(self._target(sandbox_id), "/", iter(archive))
        except DockerError as exc:
            raise self._gone(sandbox_id, exc) or SandboxFileError(
                f"cannot write {path} in sandbox {sandbox_id}: {explain(exc)}",
                filepath=path,
                sandbox_id=sandbox_id,
            ) from exc

    async def read_file(
        self, sandbox_id: str, path: str, max_bytes: int = MAX_PAYLOAD_BYTES
    ) -> bytes:
        if self._is_gvisor(sandbox_id):
            full = await self._run(self._path_sync, sandbox_id, path)
            return await docker_gvisor.read_file(self.exec, sandbox_id, path, full, max_bytes)
        cancelled = threading.Event()
        try:
            return await self._run(self._read_sync, sandbox_id, path, max_bytes, cancelled)
        finally:
            cancelled.set()  # we were cancelled (or are done): the thread stops reading

    def _read_sync(
        self, sandbox_id: str, path: str, max_bytes: int, cancelled: threading.Event
    ) -> bytes:
        def fail(msg: str) -> SandboxFileError:
            return SandboxFileError(
                f"{msg} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id
            )

        where = self._path_sync(sandbox_id, path)
        for _ in range(8):  # follow a few symlinks
            try:
                stream, stat = self._api.get_archive(self._target(sandbox_id), where)
                if stat and stat.get("mode", 0) & _DIR_BIT:
                    raise fail(f"{path} is a directory, not a file")  # don't tar it all
                if stat and not stat.get("linkTarget") and int(stat.get("size") or 0) > max_bytes:
                    raise too_large(sandbox_id, path, max_bytes)
                chunks = read_capped(stream, max_bytes + _TAR_SLACK, cancelled)
                if chunks is None:
                    raise too_large(sandbox_id, path, max_bytes)
                if cancelled.is_set():
                    raise fail(f"reading {path} was cancelled")
            except DockerError as exc:
                gone = self._gone(sandbox_id, exc)
                if gone is not None:
                    raise gone from exc
                if http_status(exc) == 404:
                    raise fail(f"no such file: {path}") from exc
                raise fail(f"cannot read {path}: {explain(exc)}") from exc
            head, n = b"", 0
            while len(head) < 65536 and n < len(chunks):  # enough for the (PAX) headers
                head, n = head + chunks[n][:65536], n + 1
            with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
                member = tar.next()
            if member is not None and member.issym():
                target = (stat or {}).get("linkTarget") or member.linkname
                where = posixpath.join(posixpath.dirname(where), target)
                continue
            if member is None or not member.isreg():
                raise fail(f"{path} is not a regular file")
            if member.size > max_bytes:
                raise too_large(sandbox_id, path, max_bytes)
            return cut(chunks, member.offset_data, member.offset_data + member.size)
        raise fail(f"{path}: too many levels of symbolic links")

    async def logs(
        self, sandbox_id: str, tail_lines: int | None = None
    ) -> builtins.list[OutputChunk]:
        return await self._run(self._logs_sync, sandbox_id, tail_lines)

    def _logs_sync(self, sandbox_id: str, tail_lines: int | None) -> builtins.list[OutputChunk]:
        kept = self._last_logs.get(sandbox_id)
        if kept is not None and sandbox_id not in self._ids:
            return kept
        try:
            return self._ordered_logs(self._target(sandbox_id), tail_lines)
        except DockerError as exc:
            if kept is not None:
                return kept
            if http_status(exc) == 404:
                raise SandboxNotFoundError(
                    f"no sandbox {sandbox_id} on this host (and no logs kept for it)",
                    sandbox_id=sandbox_id,
                ) from exc
            raise self._engine_error(sandbox_id, "reading logs", exc) from exc

    def _ordered_logs(self, target: str, tail: int | None = None) -> builtins.list[OutputChunk]:
        """The container's output in the order written. The engine returns each stream
        whole, one after the other: entries are put back in order by their timestamps."""
        api = self._api
        params: dict[str, Any] = {"stdout": 1, "stderr": 1, "timestamps": 1}
        if tail is not None:
            params["tail"] = tail
        res = api._get(api._url("/containers/{0}/logs", target), params=params)
        api._raise_for_status(res)
        return order_log_entries(res.content)

    # ------------------------------------------------------------------ stop and list

    def process_backend(self) -> DockerProcesses:
        return self._procs  # kept processes through the exec API

    async def stop(self, sandbox_id: str) -> None:
        self._procs.forget(sandbox_id)
        await self._thaw_before_stop(sandbox_id)  # paused: docker rm -f would hang
        with self._lock:  # claimed here, so the events thread won't report it as an exit
            cid = self._ids.pop(sandbox_id, None)
            self._removing.add(sandbox_id)
        self._gvisor.discard(sandbox_id)
        try:
            await self._run(self._remove_sync, sandbox_id, cid or f"aviato-{sandbox_id}")
        finally:
            self._removing.discard(sandbox_id)
            self._workdirs.pop(sandbox_id, None)
        self._release(sandbox_id, cid)

    def _remove_sync(self, sandbox_id: str, target: str) -> None:
        try:
            self._api.remove_container(target, force=True)
            self._networks.released(sandbox_id)
        except DockerError as exc:
            if http_status(exc) == 409:  # a removal is already under way: wait for it to finish
                self._wait_removed(sandbox_id, target)
            elif http_status(exc) != 404:
                raise SandboxFailedError(
                    f"could not remove sandbox {sandbox_id}: {explain(exc)}", sandbox_id=sandbox_id
                ) from exc

    def _wait_removed(self, sandbox_id: str, target: str, timeout: float = 25) -> None:
        """Return once ``target`` is gone: "stopped" must mean gone from ``docker ps -a``
        (an agent exits right after stopping everything; a half-removed container would
        be left to nobody)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._api.inspect_container(target)
            except DockerError as exc:
                if http_status(exc) == 404:
                    return
            time.sleep(0.05)
        raise SandboxFailedError(
            f"sandbox {sandbox_id} still exists {timeout:.0f} s after its removal began",
            sandbox_id=sandbox_id,
        )

    async def list(self, agent_id: str) -> list[RuntimeSandbox]:
        await self._ensure_events()
        return await self._run(self._list_sync, agent_id)

    async def list_all(self) -> builtins.list[RuntimeSandbox]:
        def everything() -> builtins.list[RuntimeSandbox]:
            rows = self._api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=1"})
            found = []
            for row in rows:
                labels: dict[str, str] = row.get("Labels") or {}
                if labels.get(LABEL_SANDBOX):
                    if labels.get(LABEL_SPARE) and row["Id"] not in self._claimed:
                        with self._lock:  # renamed when claimed: stop finds it by id
                            self._ids.setdefault(labels[LABEL_SANDBOX], row["Id"])
                    running, paused = self._listed_state(labels[LABEL_SANDBOX], row)
                    found.append(
                        RuntimeSandbox(labels[LABEL_SANDBOX], labels, running, None, paused)
                    )
            return found

        try:
            return await self._run(everything)
        except DockerError as exc:
            log.warning("could not list all aviato containers: %s", explain(exc))
            return []

    def _list_sync(self, agent_id: str) -> builtins.list[RuntimeSandbox]:
        api = self._api
        try:
            rows = api.containers(all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"})
            if self.claims is not None:  # records of spares no longer there go
                spares = {(r.get("Labels") or {}).get(LABEL_SANDBOX, "") for r in rows}
                self.claims.prune(spares)
            found = []
            for row in rows:
                labels: dict[str, str] = row.get("Labels") or {}
                if labels.get(LABEL_SPARE) and self.claims is not None:
                    # A claimed spare is listed as the sandbox it became; an unclaimed
                    # one as itself, with no spec: a leftover.
                    claim = self.claims.labels(labels.get(LABEL_SANDBOX, ""))
                    if claim is not None:
                        labels = {**labels, **claim}
                        with self._lock:
                            self._claimed[row["Id"]] = claim[LABEL_SANDBOX]
                sid = labels.get(LABEL_SANDBOX)
                with self._lock:  # a sandbox being stopped must not come back
                    if not sid or sid in self._removing:
                        continue
                    self._ids[sid] = row["Id"]
                running, paused = self._listed_state(sid, row)
                code = None if running else api.inspect_container(row["Id"])["State"]["ExitCode"]
                spec = spec_from_labels(labels)
                if spec is not None and spec.working_dir:
                    self._workdirs[sid] = spec.working_dir
                if spec is not None and spec.env and labels.get(LABEL_SPARE):
                    self._spare_env[sid] = dict(spec.env)
                found.append(RuntimeSandbox(sid, labels, running, code, paused))
            return found
        except DockerError as exc:
            if http_status(exc) == 404:  # removed between the listing and its inspect: retry
                return self._list_sync(agent_id)
            raise SandboxFailedError(f"could not list sandboxes: {explain(exc)}") from exc

    # ------------------------------------------------------------------ exits

    async def exits(self) -> AsyncIterator[SandboxExit]:
        await self._ensure_events()
        while not self._closed.is_set():
            item = await self._exit_q.get()
            if item is None:
                self._exit_q.put_nowait(None)  # for any other consumer
                return
            yield item

    async def _ensure_events(self) -> None:
        # Subscribed before the first create returns, so no exit can slip by.
        async with self._events_lock:
            if self._watcher is not None or self._closed.is_set():
                return
            self._loop = asyncio.get_running_loop()
            self._events = await self._run(self._subscribe, None)
            self._watcher = threading.Thread(
                target=self._watch, name="aviato-docker-events", daemon=True
            )
            self._watcher.start()

    def _subscribe(self, since: int | None) -> Any:
        try:
            return self._client.events(
                decode=True,
                since=since,
                filters={
                    "type": "container",
                    "event": ["die", "oom"],
                    "label": [f"{LABEL_MANAGED}=1"],
                },
            )
        except DockerError as exc:
            raise SandboxFailedError(f"cannot watch Docker events: {explain(exc)}") from exc

    def _watch(self) -> None:
        since: int | None = None
        while not self._closed.is_set():
            try:
                if self._events is None:
                    self._events = self._subscribe(since)
                    if self._closed.is_set():
                        break
                for event in self._events:  # ends when close() shuts the stream
                    since = event.get("time", since)
                    self._on_event(event)
            except Exception:
                log.warning("docker events stream failed; reconnecting", exc_info=True)
            self._events = None
            self._closed.wait(1.0)
        self._emit(None)

    def _emit(self, item: SandboxExit | None) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._exit_q.put_nowait, item)

    def _on_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attrs: dict[str, str] = actor.get("Attributes") or {}
        cid = str(actor.get("ID") or event.get("id") or "")
        sid, action = attrs.get(LABEL_SANDBOX), event.get("Action") or event.get("status")
        sid = self._claimed.get(cid, sid)  # a spare's label names the spare
        if action == "oom":
            self._oom.add(cid)
            return
        if action != "die" or not sid:
            return
        with self._lock:
            if self._ids.get(sid) != cid:  # stopped, or not ours (another agent's)
                self._oom.discard(cid)
                return
            if sid in self._starting:
                self._early[cid] = event
                return
            del self._ids[sid]  # claimed: stop() won't touch it now
            self._removing.add(sid)
        try:
            code: int | None = int(attrs["exitCode"])
        except (KeyError, ValueError):
            code = None
        self._finish_exit(sid, cid, code)

    def _finish_exit(self, sid: str, cid: str, code: int | None) -> None:
        api = self._api
        oom = cid in self._oom
        self._oom.discard(cid)
        with contextlib.suppress(*DockerError):
            if not oom and code == 137:  # the oom event is not guaranteed
                oom = bool(api.inspect_container(cid)["State"].get("OOMKilled"))
        logs: list[OutputChunk] = []
        with contextlib.suppress(*DockerError):  # tail bounds the memory a chatty one costs
            logs = tail_chunks(self._ordered_logs(cid, tail=10_000), EXIT_LOG_BYTES)
        with self._lock:
            self._last_logs[sid] = logs
            while len(self._last_logs) > EXIT_LOG_SANDBOXES:
                self._last_logs.popitem(last=False)
        self._emit(SandboxExit(sid, code, oom))
        try:
            api.remove_container(cid, force=True)
        except DockerError as exc:
            if http_status(exc) not in (404, 409):
                log.warning("could not remove exited sandbox %s: %s", sid, explain(exc))
        self._networks.released(sid)
        self._workdirs.pop(sid, None)
        self._removing.discard(sid)
        self._release(sid, cid)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(Exception):
            self._events.close()  # wakes the events thread, which then ends
        self._exit_q.put_nowait(None)
        if self._watcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._watcher.join, 5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._procs.close()
        if self._owns_client and self._client_obj is not None:
            with contextlib.suppress(Exception):
                self._client_obj.close()
