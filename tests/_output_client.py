"""A client for tests/test_output_forwarding.py, run as a process of its own so that
its stdout and stderr are what a user's terminal would show.

    python tests/_output_client.py SCHEDULER MODE lane|zmq

Each mode runs functions (or an actor) whose workers print, then prints
``summary {json}`` on stdout (after the session closed: all forwarded output is out).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from aviato import Sandbox, SandboxDefaults
from aviato._session import Session


def work(x: int) -> int:
    import logging
    import subprocess
    import sys

    print("out-1", x)
    print("err-1", x, file=sys.stderr)
    logging.getLogger("t").warning("log-1 %s", x)
    subprocess.run(["sh", "-c", f"echo sub-out {x}; echo sub-err {x} >&2"], check=True)
    print("out-2", x)
    return x


async def order(session: Session, defaults: SandboxDefaults) -> dict[str, Any]:
    fn = session.function()(work)
    results = [await fn(i) for i in range(3)]  # one worker, calls in order
    return {"workers": sorted({r.sandbox_id for r in results})}


async def live(session: Session, defaults: SandboxDefaults) -> dict[str, Any]:
    @session.function()
    def slow() -> int:
        import time

        print("started")
        print("progress", end="", flush=True)
        time.sleep(8)
        print(" done")
        return 1

    r = await slow()
    print("call-done", flush=True)
    return {"worker": r.sandbox_id}


async def off(session: Session, defaults: SandboxDefaults) -> dict[str, Any]:
    @session.function()
    def quiet() -> None:
        print("marker-not-forwarded")

    r = await quiet()
    worker = await Sandbox.from_id(r.sandbox_id, defaults=defaults)
    deadline = time.monotonic() + 60
    while b"marker-not-forwarded" not in await worker.logs() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return {"in_log": b"marker-not-forwarded" in await worker.logs()}


async def flood(session: Session, defaults: SandboxDefaults) -> dict[str, Any]:
    @session.function()
    def flood(mib: int) -> int:
        import os

        block = (b"f" * 1023 + b"\n") * 1024
        for _ in range(mib):  # straight to the descriptor, as fast as it goes
            os.write(1, block)
        print("flood-end", mib)
        return mib

    started = time.monotonic()
    await flood(200)
    took = time.monotonic() - started
    await flood(0)  # the worker (and its agent) serve on
    return {"took": took}


async def actor(session: Session, defaults: SandboxDefaults) -> dict[str, Any]:
    @session.cls()
    class Model:
        def __init__(self, name: str) -> None:
            print("init", name)

        def predict(self, x: int) -> int:
            import sys

            print("predict", x, file=sys.stderr)
            return x

    m = Model("a")
    r = await m.predict(3)
    await m.close()
    return {"worker": r.sandbox_id}


MODES = {f.__name__: f for f in (order, live, off, flood, actor)}


async def main(address: str, mode: str, via: str) -> None:
    defaults = SandboxDefaults(
        container_image="python:3.11",
        scheduler=address,
        lease_seconds=5,
        local_lane=via == "lane",
        forward_output=mode != "off",
    )
    async with Sandbox.session(defaults) as session:
        summary = await MODES[mode](session, defaults)
        summary["channels"] = sorted(
            {type(h.conn).__name__ for pool in session._pools.values() for h in pool.workers}
        )
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
