"""The seed's "Session Benefits" snippets, blocking (aviato.sync)."""

from aviato import SandboxDefaults, sync


def shared_configuration():
    defaults = SandboxDefaults(container_image="python:3.11", tags=("my-app",))

    with sync.session(defaults) as session:
        # Both sandboxes use python:3.11 and have "my-app" tag
        sb1 = session.create(command="sleep", args=["infinity"], start=False)
        sb2 = session.create(command="sleep", args=["infinity"], start=False)
        print(f"sb1: image {sb1.container_image}, tags {list(sb1.tags)}")
        print(f"sb2: image {sb2.container_image}, tags {list(sb2.tags)}")


def automatic_cleanup():
    defaults = SandboxDefaults(container_image="python:3.11")

    with sync.session(defaults) as session:
        with session.create(command="sleep", args=["infinity"]) as sb1:
            sb1.exec(["echo", "working"])
        # sb1 stopped by context manager

        sb2 = session.create(command="sleep", args=["infinity"])
        # Forgot to stop sb2!
        print(f"before exit: {session.sandbox_count} live sandbox(es) in the session")

    # Session cleanup stops sb2 automatically
    with sync.session(defaults) as later:
        print(f"after exit: sb2 is {later.from_id(sb2.sandbox_id).status().value}")


shared_configuration()
automatic_cleanup()
