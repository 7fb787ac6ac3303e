"""The seed's first example, blocking (aviato.sync): two sandboxes, commands in parallel."""

from concurrent.futures import ThreadPoolExecutor

from aviato import SandboxDefaults, sync

defaults = SandboxDefaults(container_image="python:3.11", max_lifetime_seconds=60.0)

with sync.session(defaults) as session:
    # Create multiple sandboxes (started)
    sb1 = session.create(command="sleep", args=["infinity"], tags=["worker-1"])
    sb2 = session.create(command="sleep", args=["infinity"], tags=["worker-2"])

    with sb1, sb2:
        print(f"Sandbox 1: {sb1.sandbox_id}")
        print(f"Sandbox 2: {sb2.sandbox_id}")

        # Run commands in parallel: blocking calls from two threads
        with ThreadPoolExecutor(2) as pool:
            f1 = pool.submit(sb1.exec, ["echo", "from sandbox 1"])
            f2 = pool.submit(sb2.exec, ["echo", "from sandbox 2"])
            r1, r2 = f1.result(), f2.result()

        print(f"sb1: {r1.stdout.decode().strip()}")
        print(f"sb2: {r2.stdout.decode().strip()}")
