"""A client for the several-host tests, run on the client's own host (namespace).

    python tests/_mh_client.py SCHEDULER CALLS SECONDS_PER_CALL [HOLD [LEASE]]

Fans CALLS function calls out over the cluster, prints ``ready`` once the first result
is in, ``progress N`` every 50 results, then ``summary {json}``: how many results came
back, whether each was the right one for its input, how many attempts they took, and
the pool's statistics. With ``AVIATO_TEST_TALLY=host:port`` each execution is
reported there, from the worker. With HOLD, it first starts that many plain sandboxes (tagged
``held``, session lease LEASE seconds), prints ``held N``, and at the end checks
that each still runs a command; with CALLS 0 it then just waits, to be killed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter

from aviato import AviatoError, Sandbox, SandboxDefaults


async def main(address: str, calls: int, seconds: float, hold: int, lease: float) -> None:
    defaults = SandboxDefaults(
        container_image="python:3.11", scheduler=address, lease_seconds=lease
    )
    done = 0
    async with Sandbox.session(defaults) as session:
        held = [
            session.create(command="sleep", args=["infinity"], tags=["held"]) for _ in range(hold)
        ]
        await asyncio.gather(*(sb.start() for sb in held))
        print(f"held {len(held)}", flush=True)
        if calls == 0:
            await asyncio.sleep(3600)  # until killed

        # Each execution reports to the test's tally (tests/_tally.py), from inside the
        # worker: every call must have run at least once, whatever was retried.
        host, _, port = os.environ.get("AVIATO_TEST_TALLY", "").rpartition(":")
        tally = (host, int(port)) if host else None

        @session.function(retries=3, timeout_seconds=120)
        def work(i: int, seconds: float) -> tuple[int, int]:
            import socket
            import time

            if tally is not None:
                with socket.create_connection(tally, 10) as s:
                    s.sendall(b"%d\n" % i)
            time.sleep(seconds)
            return i, i * i

        async def one(i: int) -> tuple[int, object]:
            nonlocal done
            try:
                result = await work(i, seconds)
                outcome: object = (result.value, result.attempts)
            except AviatoError as exc:  # typed; the test decides which are acceptable
                outcome = [f"{type(exc).__name__}: {exc}", exc.retryable]
            done += 1
            if done == 1:
                print("ready", flush=True)
            if done % 50 == 0:
                print(f"progress {done}", flush=True)
            return i, outcome

        t0 = time.monotonic()
        outcomes = await asyncio.gather(*(one(i) for i in range(calls)))
        elapsed = time.monotonic() - t0
        stats = dataclasses.asdict(work.statistics())
        # How the client reached its workers' agents (on other hosts: never the lane).
        channels = sorted(
            {type(w.conn).__name__ for pool in session._pools.values() for w in pool.workers}
        )
        still = [(await sb.exec(["echo", "ok"])).stdout == b"ok\n" for sb in held]
        closing = time.monotonic()
    close_seconds = time.monotonic() - closing
    seen = Counter(i for i, _ in outcomes)
    right = sum(1 for i, o in outcomes if isinstance(o, tuple) and tuple(o[0]) == (i, i * i))
    errors = [o[0] for _, o in outcomes if isinstance(o, list)]
    attempts = Counter(o[1] for _, o in outcomes if isinstance(o, tuple))
    print(
        "summary "
        + json.dumps(
            {
                "calls": calls,
                "results": len(outcomes),
                "distinct": len(seen),
                "right": right,
                "errors": errors[:10],
                "error_count": len(errors),
                "retryable_errors": sum(1 for _, o in outcomes if isinstance(o, list) and o[1]),
                "held_ok": still,
                "attempts": {str(k): v for k, v in sorted(attempts.items())},
                "stats": stats,
                "channels": channels,
                "seconds": round(elapsed, 2),
                "close_seconds": round(close_seconds, 2),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hold = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    lease = float(sys.argv[5]) if len(sys.argv) > 5 else 15.0
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), hold, lease))
