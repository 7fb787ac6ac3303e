"""The seed document's first example, as written: two sandboxes, commands in parallel."""

import asyncio

from aviato import Sandbox, SandboxDefaults


async def main():
    defaults = SandboxDefaults(
        container_image="python:3.11",
        max_lifetime_seconds=60.0,
    )

    async with Sandbox.session(defaults) as session:
        # Create multiple sandboxes
        sb1 = session.create(
            command="sleep",
            args=["infinity"],
            tags=["worker-1"],
        )
        sb2 = session.create(
            command="sleep",
            args=["infinity"],
            tags=["worker-2"],
        )

        async with sb1, sb2:
            print(f"Sandbox 1: {sb1.sandbox_id}")
            print(f"Sandbox 2: {sb2.sandbox_id}")

            # Run commands in parallel
            r1, r2 = await asyncio.gather(
                sb1.exec(["echo", "from sandbox 1"]),
                sb2.exec(["echo", "from sandbox 2"]),
            )

            print(f"sb1: {r1.stdout.decode().strip()}")
            print(f"sb2: {r2.stdout.decode().strip()}")


asyncio.run(main())
