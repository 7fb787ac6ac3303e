"""``aviato exec -i/-t``: a command spawned as a Process, our stdin streamed to it as
typed (``-i``), on a terminal of our terminal's size (``-t``) with ours in raw mode
and every resize (SIGWINCH) passed on, as ``docker exec -it`` does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence

from aviato._process import Process
from aviato._sandbox import Sandbox

__all__ = ["run_interactive"]

#: Bytes read from our stdin at a time (a paste arrives in pieces of this).
_READ = 65536


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return max(size.lines, 1), max(size.columns, 1)


@contextlib.contextmanager
def _raw(fd: int, enabled: bool) -> Iterator[None]:
    """Our terminal in raw mode (keys go through as typed: ^C to the sandbox's job, not
    to us), restored however we leave."""
    if not enabled:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _feed(p: Process, fd: int) -> None:
    """Our stdin to the process as it comes; at its end, the process's stdin ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)  # bounded: a paste waits

    def readable() -> None:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if queue.full():  # the sandbox reads slower than we are fed: stop reading
            loop.remove_reader(fd)
            loop.create_task(queue.put(data)).add_done_callback(
                lambda _: data and loop.add_reader(fd, readable)
            )
            return
        queue.put_nowait(data)
        if not data:
            loop.remove_reader(fd)

    loop.add_reader(fd, readable)
    try:
        while data := await queue.get():
            await p.write(data)
        await p.close_stdin()
    finally:
        loop.remove_reader(fd)


async def _show(p: Process) -> None:
    for_fd = {1: sys.stdout.fileno(), 2: sys.stderr.fileno()}
    async for chunk in p.output():
        view = memoryview(chunk.data)
        while view:
            try:
                view = view[os.write(for_fd[chunk.fd], view) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)


async def run_interactive(
    sb: Sandbox, command: Sequence[str], *, interactive: bool, tty: bool
) -> int:
    """Run ``command`` in ``sb``; its exit status (128+N for signal N)."""
    stdin_fd = sys.stdin.fileno()
    local_tty = tty and os.isatty(stdin_fd)
    rows, cols = _terminal_size(stdin_fd if local_tty else sys.stdout.fileno())
    p = await sb.spawn(command, pty=tty, rows=rows, cols=cols)
    loop = asyncio.get_running_loop()
    resizes: set[asyncio.Task[None]] = set()

    def on_resize() -> None:
        rows, cols = _terminal_size(stdin_fd)
        task = loop.create_task(p.resize(rows=rows, cols=cols))
        resizes.add(task)
        task.add_done_callback(resizes.discard)

    feeding: asyncio.Task[None] | None = None
    with _raw(stdin_fd, local_tty):
        if local_tty:
            loop.add_signal_handler(signal.SIGWINCH, on_resize)
        try:
            if interactive:
                os.set_blocking(stdin_fd, False)
                feeding = loop.create_task(_feed(p, stdin_fd))
            else:
                await p.close_stdin()
            await _show(p)
            return await p.wait()
        finally:
            if local_tty:
                loop.remove_signal_handler(signal.SIGWINCH)
            if feeding is not None:
                feeding.cancel()
                with contextlib.suppress(BaseException):
                    await feeding
                os.set_blocking(stdin_fd, True)
            for task in list(resizes):
                task.cancel()
            if p.info.running:  # we leave first (^C on a non-tty, an error): hang it up
                with contextlib.suppress(Exception):
                    await p.signal(signal.SIGHUP)
