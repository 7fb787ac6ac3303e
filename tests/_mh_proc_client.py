"""A client for tests/test_multihost_processes.py, run on the client's own host
(namespace): one run spawns a process and leaves, another finds it again.

    python tests/_mh_proc_client.py SCHEDULER spawn
    python tests/_mh_proc_client.py SCHEDULER attach SANDBOX PROCESS

``spawn`` starts a sandbox (no session: it outlives this client), spawns an echoing
loop, feeds it a line, reads the echo, and prints ``summary {json}`` with the ids.
``attach`` finds the process by id, reads its backlog, feeds it a second line, reads
that echo, kills it, stops the sandbox, and prints its ``summary``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aviato import Process, Sandbox, SandboxDefaults


async def _until(p: Process, want: bytes) -> bytes:
    seen = b""
    async for chunk in p.output():
        seen += chunk.data
        if want in seen:
            break
    return seen


async def spawn(defaults: SandboxDefaults) -> dict[str, object]:
    sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults)
    await sb.start()
    p = await sb.spawn(["sh", "-c", "while read l; do echo echo:$l; done"])
    await p.write(b"first\n")
    seen = await asyncio.wait_for(_until(p, b"echo:first\n"), 120)
    channel = type(sb._agent()[1]).__name__
    return {"sandbox": sb.sandbox_id, "process": p.id, "seen": seen.decode(), "channel": channel}


async def attach(defaults: SandboxDefaults, sandbox_id: str, process_id: str) -> dict[str, object]:
    sb = await Sandbox.from_id(sandbox_id, defaults=defaults)
    again = await sb.process(process_id)
    running = again.info.running
    await again.write(b"second\n")
    seen = await asyncio.wait_for(_until(again, b"echo:second\n"), 120)
    await again.kill()
    code = await again.wait(timeout=120)
    channel = type(sb._agent()[1]).__name__
    await sb.stop()
    return {"running": running, "seen": seen.decode(), "code": code, "channel": channel}


async def main(address: str, mode: str, *ids: str) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=address)
    summary = await (spawn(defaults) if mode == "spawn" else attach(defaults, *ids))
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
