"""The seed document's "Session Benefits" snippets, run as written inside one main()."""

import asyncio

from aviato import Sandbox, SandboxDefaults


async def shared_configuration():
    defaults = SandboxDefaults(
        container_image="python:3.11",
        tags=("my-app",),
    )

    async with Sandbox.session(defaults) as session:
        # Both sandboxes use python:3.11 and have "my-app" tag
        sb1 = session.create(command="sleep", args=["infinity"])
        sb2 = session.create(command="sleep", args=["infinity"])
        print(f"sb1: image {sb1.container_image}, tags {list(sb1.tags)}")
        print(f"sb2: image {sb2.container_image}, tags {list(sb2.tags)}")


async def automatic_cleanup():
    defaults = SandboxDefaults(container_image="python:3.11")

    async with Sandbox.session(defaults) as session:
        sb1 = session.create(command="sleep", args=["infinity"])
        async with sb1:
            await sb1.exec(["echo", "working"])
        # sb1 stopped by context manager

        sb2 = session.create(command="sleep", args=["infinity"])
        await sb2.start()
        # Forgot to stop sb2!
        print(f"before exit: {session.sandbox_count} live sandbox(es) in the session")

    # Session cleanup stops sb2 automatically
    print(f"after exit: sb2 is {(await sb2.status()).value}")


async def main():
    await shared_configuration()
    await automatic_cleanup()


asyncio.run(main())
