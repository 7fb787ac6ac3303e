"""A client for tests/test_multihost_output.py, run on the client's own host
(namespace): functions and an actor on the agents' hosts print, and their lines show
here, on this process's stdout and stderr, over ZeroMQ.

    python tests/_mh_output_client.py SCHEDULER

Prints the forwarded lines as they come, then ``summary {json}``: the workers that ran
the calls and the channels that reached their agents.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aviato import Sandbox, SandboxDefaults


async def main(address: str) -> None:
    defaults = SandboxDefaults(container_image="python:3.11", scheduler=address)
    async with Sandbox.session(defaults) as session:

        @session.function(max_workers=2)
        def work(x: int) -> int:
            import subprocess
            import sys
            import time

            print("step", x)
            print("warn", x, file=sys.stderr)
            subprocess.run(["echo", "sub", str(x)], check=True)
            time.sleep(0.3)
            return x

        @session.cls()
        class Model:
            def __init__(self) -> None:
                print("model ready")

            def predict(self, x: int) -> int:
                print("predict", x)
                return x

        results = await asyncio.gather(*(work(i) for i in range(6)))
        m = Model()
        actor = await m.predict(7)
        channels = sorted(
            {type(h.conn).__name__ for pool in session._pools.values() for h in pool.workers}
        )
        await m.close()
    summary = {
        "workers": {str(r.value): r.sandbox_id for r in results},
        "actor": actor.sandbox_id,
        "channels": channels,
    }
    print("summary " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
