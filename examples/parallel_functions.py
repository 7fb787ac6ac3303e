"""The seed document's "Parallel Function Execution" example, as written."""

import asyncio

from aviato import Sandbox, SandboxDefaults

defaults = SandboxDefaults(container_image="python:3.11")


async def main():
    async with Sandbox.session(defaults) as session:

        @session.function()
        def compute(n: int) -> int:
            import time

            time.sleep(1)  # Simulate work
            return n * n

        # Run in parallel - total time ~1s instead of ~3s
        results = await asyncio.gather(
            compute(1),
            compute(2),
            compute(3),
        )

        values = [r.value for r in results]
        print(values)  # [1, 4, 9]


asyncio.run(main())
