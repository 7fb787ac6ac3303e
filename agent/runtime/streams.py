"""What a runtime streams itself: logs as they are written, and (where no supervisor
serves them: Docker images without Python) files of any size, listings and removals.
Each runtime's ``streams`` is one of these; the local runtime's files always go
through its supervisor, so it streams logs alone.

Every iterator here is pulled: a consumer that does not take the next item stops the
producer (a thread reading the engine's stream waits for room), so nothing is
buffered past a few chunks.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from agent.runtime.base import OutputChunk
from agent.supervisor import LOG_MAGIC, LOG_RECORD
from aviato._types import FileInfo
from aviato.exceptions import SandboxFileError

if TYPE_CHECKING:
    from agent.runtime.local import LocalRuntime

__all__ = ["LocalStreams", "RuntimeStreams", "TaggedLog", "thread_stream"]

T = TypeVar("T")
#: How often a followed log file is looked at for more.
POLL_SECONDS = 0.05
READ_BYTES = 1 << 20


class RuntimeStreams:
    """The interface; a runtime that cannot do one of these says so, typed."""

    def __init__(self, runtime_name: str) -> None:
        self.runtime_name = runtime_name

    def _cannot(self, sandbox_id: str, path: str) -> SandboxFileError:
        return SandboxFileError(
            f"the {self.runtime_name} runtime streams files only through the sandbox's "
            f"supervisor, and sandbox {sandbox_id} has none",
            filepath=path,
            sandbox_id=sandbox_id,
        )

    def follow_logs(self, sandbox_id: str, alive: Callable[[], bool]) -> AsyncIterator[OutputChunk]:
        """Its output so far (as ``logs``), then as it is written, until it ended
        (``alive()`` false, or the engine says so)."""
        raise NotImplementedError

    def read_stream(self, sandbox_id: str, path: str) -> AsyncIterator[bytes]:
        raise self._cannot(sandbox_id, path)

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
        """Write ``size`` bytes at ``path`` (through a temporary name), each chunk got
        from ``take(timeout)`` on a worker thread (None: none yet; it raises once the
        transfer failed); ``ready()`` once the target is known writable."""
        raise self._cannot(sandbox_id, path)

    async def list_files(self, sandbox_id: str, path: str) -> list[FileInfo]:
        raise self._cannot(sandbox_id, path)

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        raise self._cannot(sandbox_id, path)


async def thread_stream(
    pool: Executor, produce: Callable[[Callable[[T], bool]], None], room: int = 4
) -> AsyncIterator[T]:
    """What ``produce(emit)`` emits on a pool thread, as an async iterator. ``emit``
    waits while ``room`` items are untaken, and returns False once the consumer left
    (``produce`` then stops). ``produce``'s exception is raised here."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    slots = threading.Semaphore(room)
    left = threading.Event()

    def emit(item: T) -> bool:
        # (A loop closed under us, at an agent's exit, must not leave this thread
        # waiting: the interpreter joins pool threads before it exits.)
        while not slots.acquire(timeout=0.5):
            if left.is_set() or loop.is_closed():
                return False
        if left.is_set() or loop.is_closed():
            return False
        loop.call_soon_threadsafe(queue.put_nowait, (True, item))
        return True

    def run() -> None:
        try:
            produce(emit)
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, (False, exc))
            return
        loop.call_soon_threadsafe(queue.put_nowait, (False, None))

    done = loop.run_in_executor(pool, run)
    try:
        while True:
            is_item, value = await queue.get()
            if not is_item:
                if value is not None:
                    raise value
                return
            slots.release()
            yield value
    finally:
        left.set()  # the thread stops at its next emit (run() never raises: no result lost)
        del done


class TaggedLog:
    """The local runtime's log file (the supervisor's tagged records, see
    agent/supervisor.py) parsed as it grows: ``feed`` the bytes read, get the chunks
    of every whole record; bytes outside records are stderr (written before the
    supervisor ran, or as it died)."""

    def __init__(self, *, mid_record: bool = False) -> None:
        self.buf = bytearray()
        self.skip = mid_record  # a tail may start inside a record

    def feed(self, data: bytes) -> list[OutputChunk]:
        buf = self.buf
        buf += data
        out: list[OutputChunk] = []
        if self.skip:
            at = buf.find(LOG_MAGIC)
            if at < 0:
                del buf[: max(0, len(buf) - len(LOG_MAGIC))]
                return out
            del buf[:at]
            self.skip = False
        while buf:
            start = buf.find(LOG_MAGIC)
            loose = len(buf) - (len(LOG_MAGIC) - 1) if start < 0 else start
            if loose > 0:  # (the end may hold the start of a magic)
                out.append(OutputChunk(2, bytes(buf[:loose])))
                del buf[:loose]
                continue
            if start < 0 or len(buf) < LOG_RECORD.size:
                break
            _, fd, size = LOG_RECORD.unpack_from(buf, 0)
            if len(buf) < LOG_RECORD.size + size:
                break  # a record still being written
            out.append(
                OutputChunk(
                    2 if fd == 2 else 1, bytes(buf[LOG_RECORD.size : LOG_RECORD.size + size])
                )
            )
            del buf[: LOG_RECORD.size + size]
        return out


class LocalStreams(RuntimeStreams):
    """The local runtime: its log file followed (files go through the supervisor)."""

    def __init__(self, runtime: LocalRuntime) -> None:
        super().__init__(runtime.name)
        self.runtime = runtime

    async def follow_logs(
        self, sandbox_id: str, alive: Callable[[], bool]
    ) -> AsyncIterator[OutputChunk]:
        from agent.runtime.local import LOG_LIMIT

        home = self.runtime._find_dir(sandbox_id)
        try:
            log = open(home / "log", "rb") if home is not None else None  # noqa: ASYNC230
        except FileNotFoundError:
            log = None
        if log is None:  # ended and gone: what was kept
            for chunk in await self.runtime.logs(sandbox_id):
                yield chunk
            return
        with log:  # held open: a stop that removes the file leaves us its bytes
            start = max(0, os.fstat(log.fileno()).st_size - LOG_LIMIT)
            log.seek(start)
            parser = TaggedLog(mid_record=start > 0)
            ending = False
            while True:
                data = log.read(READ_BYTES)
                if data:
                    for chunk in parser.feed(data):
                        yield chunk
                    continue
                if ending:
                    return
                if not alive():
                    ending = True  # one more read: what it wrote as it ended
                    continue
                await asyncio.sleep(POLL_SECONDS)
