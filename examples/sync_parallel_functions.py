"""The seed's "Parallel Function Execution" example, blocking (aviato.sync)."""

import time

from aviato import SandboxDefaults, sync

defaults = SandboxDefaults(container_image="python:3.11")

with sync.session(defaults) as session:

    @session.function()
    def compute(n: int) -> int:
        import time

        time.sleep(1)  # Simulate work
        return n * n

    # Run in parallel - total time ~1s instead of ~3s
    started = time.perf_counter()
    futures = [compute.submit(n) for n in (1, 2, 3)]
    results = [f.result() for f in futures]

    values = [r.value for r in results]
    print(values)  # [1, 4, 9]
    took = time.perf_counter() - started
    inside = max(r.seconds for r in results)
    print(
        f"took {took:.1f} s: 3 calls of {inside:.1f} s each, in parallel"
        " (one after another: ~3 s), including starting their worker sandboxes"
    )
