"""The Docker runtime's streams (agent/runtime/streams.py): logs followed from the
engine, and, for images without Python (no supervisor), files streamed through the
engine's archive API: a download cut from ``get_archive``'s tar as it arrives, an
upload sent to ``put_archive`` as a tar made on the fly under a temporary name, then
moved into place by ``mv`` (the sandbox's own; without one, a typed error).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import posixpath
import struct
import tarfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from agent.runtime.base import ExecOutput, OutputChunk
from agent.runtime.docker_errors import DockerError, explain, http_status
from agent.runtime.streams import RuntimeStreams, thread_stream
from aviato._types import FileInfo
from aviato.exceptions import (
    SandboxFileError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotRunningError,
)

if TYPE_CHECKING:
    from agent.runtime.docker import DockerRuntime

__all__ = ["DockerStreams"]

CHUNK = 1 << 20
_DIR_BIT = 1 << 31  # Go's os.ModeDir, in the archive stat header
_LINK_BIT = 1 << 27  # os.ModeSymlink
#: Go's ModeDevice, ModeNamedPipe, ModeSocket, ModeCharDevice, ModeIrregular.
_NOT_REGULAR = (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)
#: Chunks one ``dd`` of a download reads (the agent holds them while they go out).
READ_WINDOW = 4
#: An upload's bytes put through the engine at once (the agent holds them meanwhile).
PIECE_BYTES = 16 << 20
_MUX_HEADER = struct.Struct(">BxxxL")


class DockerStreams(RuntimeStreams):
    def __init__(self, runtime: DockerRuntime) -> None:
        super().__init__(runtime.name)
        self.rt = runtime

    # ------------------------------------------------------------------ helpers

    def _stat(self, sandbox_id: str, path: str) -> dict[str, Any] | None:
        """The engine's stat of ``path`` (a symlink's own), None when missing."""
        api = self.rt._api
        url = api._url("/containers/{0}/archive", self.rt._target(sandbox_id))
        try:
            res = api.head(url, params={"path": path}, timeout=30)
        except Exception as exc:  # the engine unreachable (requests' errors)
            raise SandboxFileError(
                f"{path}: {exc} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id
            ) from exc
        if res.status_code == 404:  # (a HEAD has no body to say what is missing)
            return None
        if res.status_code == 409:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is not running", sandbox_id=sandbox_id
            )
        if res.status_code >= 400:
            raise SandboxFileError(
                f"{path}: the engine says {res.status_code} (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        header = res.headers.get("X-Docker-Container-Path-Stat", "")
        return json.loads(base64.b64decode(header)) if header else {}

    async def _existing(self, sandbox_id: str, path: str, named: str = "") -> dict[str, Any]:
        """``path``'s stat; SandboxFileNotFoundError (naming ``named``, by default the
        path itself) when there is nothing there."""
        loop = asyncio.get_running_loop()
        stat = await loop.run_in_executor(self.rt._pool, self._stat, sandbox_id, path)
        if stat is None:
            shown = named or path
            raise SandboxFileNotFoundError(
                f"{shown}: no such file or directory (sandbox {sandbox_id})",
                filepath=shown,
                sandbox_id=sandbox_id,
            )
        return stat

    def _error(self, sandbox_id: str, path: str, exc: BaseException) -> Exception:
        if http_status(exc) == 404 and "no such container" not in explain(exc).lower():
            return SandboxFileNotFoundError(
                f"{path}: no such file or directory (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        return self.rt._gone(sandbox_id, exc) or SandboxFileError(
            f"{path}: {explain(exc)} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id
        )

    async def _sh(self, sandbox_id: str, path: str, argv: tuple[str, ...]) -> str:
        return (await self._run(sandbox_id, path, argv)).stdout.decode(errors="surrogateescape")

    async def _run(self, sandbox_id: str, path: str, argv: tuple[str, ...]) -> ExecOutput:
        out = await self.rt.exec(sandbox_id, argv, timeout_seconds=300)
        if out.returncode != 0:
            why = out.stderr.decode(errors="replace").strip()[-300:] or f"exit {out.returncode}"
            if out.returncode in (126, 127):
                why = f"the image has no {argv[0]!r} (and no Python for the supervisor): {why}"
            raise SandboxFileError(
                f"{path}: {why} (sandbox {sandbox_id})", filepath=path, sandbox_id=sandbox_id
            )
        return out

    # ------------------------------------------------------------------ download

    async def read_stream(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        """The file a window at a time, each read by a ``dd`` of its own: the engine's
        archive API would hold the container's lock while a slow client reads (every
        exec and stop in the sandbox waiting on it), and a read here holds it only
        for one window."""
        where = path
        for _ in range(8):  # the type of what a symlink points at
            stat = await self._existing(sandbox_id, where, path)
            mode = int(stat.get("mode", 0))
            if not mode & _LINK_BIT:
                break
            where = posixpath.join(posixpath.dirname(where), str(stat.get("linkTarget", "")))
        else:
            raise SandboxFileError(
                f"{path}: too many levels of symbolic links", filepath=path, sandbox_id=sandbox_id
            )
        if mode & _DIR_BIT:
            raise SandboxIsADirectoryError(
                f"{path}: is a directory (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        if mode & _NOT_REGULAR:
            raise SandboxFileError(
                f"{path}: not a regular file (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        block = 0
        while True:
            argv = ("dd", f"if={path}", f"bs={CHUNK}", f"skip={block}", f"count={READ_WINDOW}")
            data = (await self._run(sandbox_id, path, argv)).stdout
            for at in range(0, len(data), CHUNK):
                yield data[at : at + CHUNK]
            block += READ_WINDOW
            if len(data) < READ_WINDOW * CHUNK:
                return

    # ------------------------------------------------------------------ upload

    async def write_stream(
        self,
        sandbox_id: str,
        path: str,
        size: int,
        mode: int,
        take: Callable[[float], Any],
        *,
        ready: Callable[[], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        parent, name = posixpath.split(path)
        parent = parent or "/"
        stat = await loop.run_in_executor(self.rt._pool, self._stat, sandbox_id, parent)
        if stat is None:
            raise SandboxFileNotFoundError(
                f"no such directory: {parent} (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        if not int(stat.get("mode", 0)) & _DIR_BIT:
            raise SandboxNotADirectoryError(
                f"not a directory: {parent} (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        target = await loop.run_in_executor(self.rt._pool, self._stat, sandbox_id, path)
        if target is not None and int(target.get("mode", 0)) & _DIR_BIT:
            raise SandboxIsADirectoryError(
                f"{path}: is a directory (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        temp = posixpath.join(parent, f".{name[:180]}.aviato-{uuid.uuid4().hex[:12]}.part")
        piece = temp + ".piece"
        abort = threading.Event()

        def collect(want: int) -> list[Any]:
            """The next ``want`` bytes of chunks (on a pool thread: take() waits)."""
            got: list[Any] = []
            have = 0
            while have < want:
                if abort.is_set():
                    raise SandboxFileError("the upload was given up", filepath=path)
                chunk = take(0.5)
                if chunk is not None:
                    got.append(chunk)
                    have += len(chunk)
            return got

        def put_piece(chunks: list[Any], size: int) -> None:
            info = tarfile.TarInfo(posixpath.basename(piece))
            info.size, info.mode, info.mtime = size, mode, int(time.time())
            archive = [info.tobuf(format=tarfile.PAX_FORMAT), *chunks]
            archive.append(b"\0" * ((-size) % 512 + 1024))  # padding + end-of-archive
            try:
                self.rt._api.put_archive(self.rt._target(sandbox_id), parent, iter(archive))
            except DockerError as exc:
                raise self._error(sandbox_id, path, exc) from exc

        ready()
        placed = False
        current: asyncio.Future[Any] | None = None  # the engine call under way
        try:
            # A piece at a time, each put whole (the engine's lock on the container held
            # for one piece, not for as long as a slow client takes), then appended.
            sent = 0
            while sent < size or sent == 0:
                current = loop.run_in_executor(
                    self.rt._pool, collect, min(PIECE_BYTES, size - sent)
                )
                chunks = await current
                got = sum(len(c) for c in chunks)
                current = loop.run_in_executor(self.rt._pool, put_piece, chunks, got)
                await current
                del chunks
                if sent == 0:
                    await self._sh(sandbox_id, path, ("mv", "-f", "--", piece, temp))
                else:
                    append = 'cat -- "$1" >> "$2" && rm -f -- "$1"'
                    await self._sh(sandbox_id, path, ("sh", "-c", append, "sh", piece, temp))
                sent += got
                if size == 0:
                    break
            await self._sh(sandbox_id, path, ("mv", "-f", "--", temp, path))
            placed = True
        finally:
            if not placed:  # (best effort: the sandbox may be gone, and they with it)
                abort.set()
                with contextlib.suppress(BaseException):
                    if current is not None:  # a piece being put must land before the rm
                        await asyncio.wait_for(asyncio.shield(current), 30)
                with contextlib.suppress(Exception):
                    rm = ("rm", "-f", "--", temp, piece)
                    await asyncio.shield(self.rt.exec(sandbox_id, rm, timeout_seconds=60))

    # ------------------------------------------------------------------ list, remove

    async def list_files(self, sandbox_id: str, path: str) -> list[FileInfo]:
        stat = await self._existing(sandbox_id, path)
        if not int(stat.get("mode", 0)) & (_DIR_BIT | _LINK_BIT):
            raise SandboxNotADirectoryError(
                f"{path}: not a directory (sandbox {sandbox_id})",
                filepath=path,
                sandbox_id=sandbox_id,
            )
        text = await self._sh(
            sandbox_id,
            path,
            (
                "find",
                "-L",
                path + "/",
                "-mindepth",
                "1",
                "-maxdepth",
                "1",
                "-printf",
                r"%Y %s %T@ %f\0",
            ),
        )
        entries = []
        for record in text.split("\0"):
            if not record:
                continue
            kind, size, mtime, name = record.split(" ", 3)
            is_dir = kind == "d"
            entries.append(FileInfo(name, 0 if is_dir else int(size), is_dir, float(mtime)))
        return sorted(entries, key=lambda e: e.name)

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        stat = await self._existing(sandbox_id, path)
        mode = int(stat.get("mode", 0))
        if mode & _DIR_BIT and not mode & _LINK_BIT and not recursive:
            try:
                await self._sh(sandbox_id, path, ("rmdir", "--", path))
            except SandboxFileError as exc:
                raise SandboxIsADirectoryError(
                    f"{path}: directory not empty (pass recursive=True) (sandbox {sandbox_id})",
                    filepath=path,
                    sandbox_id=sandbox_id,
                ) from exc
            return
        await self._sh(sandbox_id, path, ("rm", "-rf" if recursive else "-f", "--", path))

    # ------------------------------------------------------------------ logs

    def follow_logs(self, sandbox_id: str, alive: Callable[[], bool]) -> AsyncIterator[OutputChunk]:
        return thread_stream(self.rt._pool, lambda emit: self._follow_sync(sandbox_id, emit))

    def _follow_sync(self, sandbox_id: str, emit: Callable[[OutputChunk], bool]) -> None:
        """The engine's follow stream, as written (it ends when the container stops).
        Across streams the order is the engine's: it reads stdout and stderr apart."""
        api = self.rt._api
        url = api._url("/containers/{0}/logs", self.rt._target(sandbox_id))
        params = {"stdout": 1, "stderr": 1, "follow": 1}
        try:
            res = api._get(url, params=params, stream=True, timeout=None)
            api._raise_for_status(res)
        except DockerError as exc:
            raise self.rt._engine_error(sandbox_id, "following logs", exc) from exc
        raw = res.raw
        try:
            while True:
                head = raw.read(_MUX_HEADER.size)
                if len(head) < _MUX_HEADER.size:
                    return
                fd, length = _MUX_HEADER.unpack(head)
                data = raw.read(length)
                if not emit(OutputChunk(2 if fd == 2 else 1, data)):
                    return
        except Exception as exc:  # the container removed under us: its stream ends
            if "closed" not in str(exc).lower():
                raise SandboxFileError(f"following logs: {exc}", filepath="") from exc
        finally:
            res.close()
