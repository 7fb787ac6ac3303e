"""Sandbox processes started ahead of need, already in cgroups of their own.

Joining a cgroup costs the kernel an RCU grace period when none happened lately
(about 10 ms here, paid on every create, since creates are rarely back to back). So
the local runtime keeps a couple of processes "parked": each was started, joined fresh
cgroups, and now blocks reading its stdin. A create sets the limits on the parked
process's groups and sends it the sandbox's command; it execs it at once (the same
pid, so its exit is watched from the start). Taking one starts its replacement.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import marshal
import os
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from agent.runtime.cgroups import Cgroups

log = logging.getLogger("aviato.agent.parked")

#: The parked process: join the groups (argv), wait for (path, argv, env, log, cwd),
#: then become that command. EOF instead (the agent went away): just exit.
_PROGRAM = """\
import marshal, os, sys
for procs in sys.argv[1:]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
data = sys.stdin.buffer.read()
if not data:
    os._exit(0)
path, argv, env, log, cwd = marshal.loads(data)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.dup2(fd, 1)
os.dup2(fd, 2)
if cwd:
    os.chdir(cwd)
os.execve(path, argv, env)
"""


class Parked:
    def __init__(self, pid: int, group: str, stdin: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.group = group  # its cgroups' name (see Cgroups)
        self.stdin = stdin
        self.exited = exited

    def launch(
        self,
        path: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        logfile: str,
        cwd: str | None,
    ) -> None:
        """Become ``argv``: a short write to a pipe (well under its buffer size)."""
        try:
            os.write(self.stdin, marshal.dumps((path, list(argv), dict(env), logfile, cwd)))
        finally:
            os.close(self.stdin)


class ParkedPool:
    def __init__(
        self,
        cgroups: Cgroups,
        watch: Callable[[int], asyncio.Future[int]],
        size: int = 2,
    ) -> None:
        self.cgroups = cgroups
        self.watch = watch  # pid -> its exit code to come
        self.size = size
        self.ready: collections.deque[Parked] = collections.deque()
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def take(self) -> Parked | None:
        """A parked process still waiting (None if none is ready); starts more."""
        parked = None
        while self.ready and parked is None:
            candidate = self.ready.popleft()
            if not candidate.exited.done():
                parked = candidate
            else:  # it died while parked: its groups go, off the loop
                self._track(asyncio.to_thread(self.cgroups.remove, candidate.group))
        self.fill()
        return parked

    def fill(self) -> None:
        while not self.closed and len(self.ready) + self._starting < self.size:
            self._starting += 1
            self._track(self._park())

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _park(self) -> None:
        # Our pid in the name: a later agent removes the groups of a killed one.
        group = f"park-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            procs = await asyncio.to_thread(self.cgroups.create_all, group)
            read, write = os.pipe()
            try:
                pid = os.posix_spawn(  # noqa: ASYNC221 (vfork-like: returns at once)
                    sys.executable,
                    [sys.executable, "-S", "-I", "-c", _PROGRAM, *procs],
                    {},
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, read, 0),
                        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    ],
                    setsid=True,
                )
            except OSError:
                os.close(write)
                raise
            finally:
                os.close(read)
            parked = Parked(pid, group, write, self.watch(pid))
            if self.closed:
                self._discard(parked)
            else:
                self.ready.append(parked)
        except OSError as exc:
            log.warning("could not park a sandbox process: %s", exc)
            await asyncio.to_thread(self.cgroups.remove, group)
        finally:
            self._starting -= 1

    def _discard(self, parked: Parked) -> None:
        with contextlib.suppress(OSError):
            os.close(parked.stdin)  # it reads EOF and exits
        with contextlib.suppress(ProcessLookupError):
            os.kill(parked.pid, signal.SIGKILL)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self.ready:
            parked = self.ready.popleft()
            self._discard(parked)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(parked.exited)
            await asyncio.to_thread(self.cgroups.remove, parked.group)
