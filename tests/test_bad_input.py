"""Bad input gets a typed error a user can act on, and the daemons keep serving."""

from __future__ import annotations

import msgpack
import pytest
import zmq
import zmq.asyncio

from aviato import (
    PayloadTooLargeError,
    Sandbox,
    SandboxDefaults,
    SandboxFailedError,
    SandboxNotFoundError,
    SandboxNotRunningError,
    _connection,
)
from aviato.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReply,
    Ping,
    Pong,
    decode,
    encode,
)


def test_empty_command_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="needs a command"):
        Sandbox(command="", defaults=SandboxDefaults(scheduler="tcp://127.0.0.1:1"))
    with pytest.raises(ValueError, match="needs a command"):
        Sandbox(defaults=SandboxDefaults(scheduler="tcp://127.0.0.1:1"))


async def test_exec_argument_errors(defaults: SandboxDefaults) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        with pytest.raises(TypeError, match="argv list"):
            await sb.exec("echo hi")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="non-empty"):
            await sb.exec([])


async def test_unknown_image_names_the_image(defaults: SandboxDefaults) -> None:
    sb = Sandbox(
        command="sleep",
        args=["infinity"],
        container_image="aviato-test/nope:404",
        defaults=defaults,
    )
    with pytest.raises(SandboxFailedError, match="aviato-test/nope:404") as info:
        await sb.start()
    assert "build-image.sh" in str(info.value) or "pull" in str(info.value)


async def test_exec_on_a_stopped_sandbox(defaults: SandboxDefaults) -> None:
    # Looped: a stop that returned before the agent had acted flaked here once in five.
    for _ in range(8):
        sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
        await sb.stop()
        with pytest.raises(SandboxNotRunningError):
            await sb.exec(["true"])
        # Another handle to the same sandbox asks the agent, which also refuses.
        again = await Sandbox.from_id(sb.sandbox_id or "", defaults=defaults)
        with pytest.raises(SandboxNotRunningError):
            await again.exec(["true"])
        with pytest.raises(SandboxNotRunningError):
            await again.read_file("/etc/hostname")


async def test_never_started_sandbox(defaults: SandboxDefaults) -> None:
    sb = Sandbox(command="sleep", args=["infinity"], defaults=defaults)
    with pytest.raises(SandboxNotRunningError, match="start"):
        await sb.exec(["true"])


async def test_unknown_sandbox_id(defaults: SandboxDefaults) -> None:
    with pytest.raises(SandboxNotFoundError, match="sb-doesnotexist"):
        await Sandbox.from_id("sb-doesnotexist", defaults=defaults)


async def test_oversized_payload_is_refused_before_sending(
    defaults: SandboxDefaults, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Sandbox(command="sleep", args=["infinity"], defaults=defaults) as sb:
        monkeypatch.setattr(_connection, "MAX_PAYLOAD_BYTES", 1024)
        with pytest.raises(PayloadTooLargeError, match="limit"):
            await sb.write_file("/tmp/x", b"x" * 2048)
        monkeypatch.undo()
        assert (await sb.exec(["true"])).returncode == 0


async def _raw(address: str, frames: list[bytes], expect_reply: bool = True):
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        await sock.send_multipart(frames)
        if not expect_reply:
            return None
        assert await sock.poll(5000), "no reply"
        return decode(await sock.recv_multipart())
    finally:
        sock.close()


async def _agent_address(defaults: SandboxDefaults) -> tuple[str, Sandbox]:
    sb = await Sandbox.create("sleep", "infinity", defaults=defaults)
    assert sb.info and sb.info.agent_address
    return sb.info.agent_address, sb


@pytest.mark.parametrize("target", ["scheduler", "agent"])
async def test_daemons_refuse_malformed_and_foreign_messages(
    target: str, defaults: SandboxDefaults
) -> None:
    sb = None
    address = defaults.scheduler or ""
    if target == "agent":
        address, sb = await _agent_address(defaults)
    try:
        # Another protocol version: a clear refusal naming both versions.
        foreign = msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": int(Ping.TYPE), "id": 9, "b": {}})
        reply = await _raw(address, [foreign])
        assert isinstance(reply.msg, ErrorReply) and reply.request_id == 9
        assert reply.msg.code is ErrorCode.VERSION_MISMATCH
        assert str(PROTOCOL_VERSION + 1) in reply.msg.message
        # A well-formed envelope with a bad body: MALFORMED, with the request id.
        bad = msgpack.packb({"v": PROTOCOL_VERSION, "t": 11, "id": 10, "b": {"sandbox_id": 5}})
        reply = await _raw(address, [bad])
        assert isinstance(reply.msg, ErrorReply) and reply.msg.code is ErrorCode.MALFORMED
        # Garbage with no request id: dropped, nothing to answer.
        await _raw(address, [b"\xc1garbage"], expect_reply=False)
        # A message the daemon does not serve.
        reply = await _raw(address, encode(Pong(server="x"), 11))
        assert isinstance(reply.msg, ErrorReply) and reply.msg.code is ErrorCode.BAD_REQUEST
        # ... and it still serves.
        reply = await _raw(address, encode(Ping(), 12))
        assert isinstance(reply.msg, Pong) and reply.msg.server == target
    finally:
        if sb is not None:
            await sb.stop()


async def test_token_is_checked_by_the_scheduler(tmp_path) -> None:
    import subprocess
    import sys

    from aviato import UnauthorizedError
    from aviato._connection import Connection
    from aviato.protocol import ClusterStatus, ClusterStatusReply
    from tests.conftest import ROOT, wait_until

    ready = tmp_path / "addr"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scheduler",
            "--bind",
            "tcp://127.0.0.1:*",
            "--ready-file",
            str(ready),
            "--token",
            "s3cret",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(ready.exists, 15, 0.02, "scheduler")
        address = ready.read_text().strip()
        for token in (None, "wrong"):
            conn = Connection(address, token)
            try:
                with pytest.raises(UnauthorizedError, match="token"):
                    await conn.request(ClusterStatus(), timeout=5)
            finally:
                conn.close()
        conn = Connection(address, "s3cret")
        try:
            reply = await conn.request(ClusterStatus(), timeout=5)
            assert isinstance(reply.msg, ClusterStatusReply)
        finally:
            conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_daemons_really_cannot_unpickle() -> None:
    """The suite's clusters run with AVIATO_FORBID_UNPICKLE=1: check that it bites,
    through every door: pickle's and _pickle's functions and Unpickler classes, the
    pure-Python twins, cloudpickle, and references taken before the guard was set up
    (an unpickler bound early still resolves globals through find_class)."""
    import collections
    import pickle
    import subprocess
    import sys

    from tests.conftest import ROOT

    # Plain data (no global to resolve: only the replaced entry points can refuse it)
    # through the module doors; a global (only the audit hook sees every way to it)
    # through references taken before the guard.
    data, with_global = pickle.dumps([1, "x"]), pickle.dumps(collections.OrderedDict(a=1))
    doors = {
        "pickle.loads": "pickle.loads(b)",
        "pickle.load": "pickle.load(io.BytesIO(b))",
        "pickle.Unpickler": "pickle.Unpickler(io.BytesIO(b)).load()",
        "pickle._loads": "pickle._loads(b)",
        "pickle._Unpickler": "pickle._Unpickler(io.BytesIO(b)).load()",
        "_pickle.loads": "_pickle.loads(b)",
        "_pickle.load": "_pickle.load(io.BytesIO(b))",
        "_pickle.Unpickler": "_pickle.Unpickler(io.BytesIO(b)).load()",
        "cloudpickle.loads": "cloudpickle.loads(b)",
        "loads bound early": "early_loads(g)",
        "Unpickler bound early": "EarlyUnpickler(io.BytesIO(g)).load()",
        "its subclass": "type('Sub', (EarlyUnpickler,), {})(io.BytesIO(g)).load()",
        "pure Unpickler bound early": "EarlyPure(io.BytesIO(g)).load()",
    }
    code = (
        "import io, pickle, _pickle, cloudpickle\n"
        "from pickle import loads as early_loads\n"
        "from _pickle import Unpickler as EarlyUnpickler\n"
        "from pickle import _Unpickler as EarlyPure\n"
        "from aviato._server.daemon import daemon_setup\n"
        "daemon_setup()\n"
        f"b, g = {data!r}, {with_global!r}\n"
        f"for name, expr in {doors!r}.items():\n"
        "    try:\n"
        "        eval(expr)\n"
        "    except RuntimeError as e:\n"
        "        print(name, '=', 'refused' if 'forbidden' in str(e) else e)\n"
        "    else:\n"
        "        print(name, '=', 'UNPICKLED')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"AVIATO_FORBID_UNPICKLE": "1", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.stdout.splitlines() == [f"{name} = refused" for name in doors], (
        out.stdout + out.stderr
    )


def test_daemons_say_when_they_listen_openly(tmp_path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, wait_until

    for bind, expect in (
        ("tcp://127.0.0.1:*", "loopback only"),
        ("tcp://0.0.0.0:*", "NO AUTHENTICATION"),
    ):
        log = tmp_path / "sched.log"
        ready = tmp_path / "addr"
        ready.unlink(missing_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "--bind", bind, "--ready-file", str(ready)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(ready.exists, 15, 0.02, "scheduler")
            wait_until(lambda e=expect, f=log: e in f.read_text(), 10, 0.05, f"{expect!r} logged")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_an_error_reply_never_echoes_a_long_message() -> None:
    """A daemon's refusal quoting a peer's input (Docker's create error repeats a
    hostile spec) is cut in the middle: the start and the end stay readable."""
    from aviato._server.errors import MAX_MESSAGE_CHARS, error_reply
    from aviato.exceptions import SandboxFailedError

    long = "image 'x' refused: " + "A" * 5000 + " (the end)"
    reply = error_reply(SandboxFailedError(long))
    assert len(reply.message) <= MAX_MESSAGE_CHARS
    assert reply.message.startswith("image 'x' refused: AAA")
    assert reply.message.endswith("AAA (the end)")
    assert "characters cut" in reply.message
    assert error_reply(SandboxFailedError("short")).message == "short"
    assert len(error_reply(RuntimeError("B" * 5000)).message) <= MAX_MESSAGE_CHARS
