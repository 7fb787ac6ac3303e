"""The wire protocol: every message round-trips; every malformed envelope is refused
with a DecodeError (and never another exception); error codes <-> exceptions."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviato import exceptions as exc
from aviato._errors import to_exception
from aviato._server.errors import error_reply
from aviato._storage import Mount
from aviato._types import FileInfo
from aviato.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ActorCallReply,
    ActorCallRequest,
    AgentHeartbeat,
    AgentInfo,
    AgentLocation,
    AgentSandboxesReply,
    AgentSpares,
    AgentVolumes,
    CallHeader,
    CallOutcome,
    CallResults,
    Cancel,
    ClusterStatus,
    ClusterStatusReply,
    CreateSandbox,
    DashboardViewReply,
    Decoded,
    DecodeError,
    DeregisterAgent,
    DownloadFile,
    ErrorCode,
    ErrorReply,
    Exec,
    ExecChunk,
    ExecReply,
    ExecResultsReply,
    ExtendLifetime,
    FileChunk,
    FileListReply,
    FileReply,
    FunctionOutput,
    GetAgentSandboxes,
    GetDashboardView,
    GetExecResults,
    GetLogs,
    GetObject,
    GetSandbox,
    GetTunnels,
    HeartbeatReply,
    KeepResult,
    ListFiles,
    ListProcesses,
    ListSandboxes,
    ListSnapshots,
    ListVolumes,
    LocateAgent,
    LogChunk,
    LogsReply,
    Message,
    MsgType,
    ObjectData,
    ObjectSessions,
    ObjectSessionsEnded,
    ObjectSource,
    ObjectsReleased,
    ObjectStats,
    ObjectStatsReply,
    ObjectStored,
    OkReply,
    PauseSandbox,
    Ping,
    PlaceSandbox,
    Pong,
    PoolFigures,
    PortTunnel,
    ProcessInfo,
    ProcessOutput,
    ProcessReply,
    PutObject,
    ReadFile,
    ReadOutput,
    RegisterAgent,
    RegisterReply,
    ReleaseObjects,
    RemoveFile,
    RemoveSnapshot,
    RemoveVolume,
    ResizeTerminal,
    RunCalls,
    SandboxActivity,
    SandboxExited,
    SandboxInfo,
    SandboxListReply,
    SandboxReply,
    SandboxSpec,
    SandboxStatus,
    SessionClose,
    SessionCloseReply,
    SessionKeepalive,
    SignalProcess,
    SnapshotInfo,
    SnapshotListReply,
    SnapshotReply,
    SnapshotSandbox,
    SpareShape,
    SpawnProcess,
    StopSandbox,
    StreamAck,
    StreamLogs,
    TransferDone,
    TunnelsReply,
    UploadFile,
    VolumeInfo,
    VolumeListReply,
    WaitSandbox,
    WatchActorCalls,
    WatchOutput,
    WriteFile,
    WriteStdin,
    decode,
    encode,
    path_problem,
    to_wire,
)
from tests._strategies import conforms, fields_of, instances, message_types, mutations

# --------------------------------------------------------------------------- samples

SPEC = SandboxSpec(
    image="python:3.11",
    command="python",
    args=("-c", "print(1)"),
    env={"A": "1", "B": "two"},
    tags=("ml", "batch"),
    session_id="sess-1",
    max_lifetime_seconds=42.5,
    memory_bytes=256 * 1024 * 1024,
    cpus=1.5,
    pids_limit=64,
    network="bridge",
    working_dir="/work",
    mounts=(Mount("/datasets/imagenet", "/data", read_only=True), Mount("/srv/x", "/x")),
    volumes={"/cache": "pip-cache"},
    ports=(8000, 8443),
    gpus=2,
    agent_labels={"zone": "a"},
    placement="pack",
    network_allow=("10.1.2.0/24", "pypi-mirror.internal:443"),
)

INFO = SandboxInfo(
    sandbox_id="sb-1",
    spec=SPEC,
    status=SandboxStatus.RUNNING,
    agent_id="agent-a",
    agent_address="tcp://10.0.0.1:7000",
    exit_code=3,
    reason="because",
    created_at=1234.5,
    deadline=1277.0,
    runtime="docker",
    agent_public_key="rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
    gpu_ids=("0", "3"),
)

INFO2 = SandboxInfo(
    sandbox_id="sb-2",
    spec=SandboxSpec(image="alpine", command="sleep"),
    status=SandboxStatus.FAILED,
)

AGENT = AgentInfo(
    agent_id="agent-a",
    address="tcp://10.0.0.1:7000",
    slots=8,
    used=3,
    alive=False,
    runtime="docker",
    labels={"zone": "eu"},
    seconds_since_heartbeat=2.25,
    cpus=16.0,
    memory_bytes=64 << 30,
    gpus=("0", "1", "2", "3"),
    cpus_used=2.5,
    memory_used=4 << 30,
    gpus_used=("0", "3"),
    userns="root is uid 231072 on the host",
)

#: One representative instance per message class, with non-default values.
#: Lifecycle messages (aviato/protocol/lifecycle.py, MsgType 140-159).
_SNAP = SnapshotInfo(
    "aviato-snapshot:0123456789ab-sb-00000001-17", "agent-a", "sb-1", "python:3.11", 1.5, 99
)
#: Object refs (aviato/protocol/objects.py), every field away from its default somewhere.
OBJECT_SAMPLES: list[Message] = [
    PutObject(object_id="a" * 32, session_id="ses-1", buffers=2),
    ObjectStored(object_id="a" * 32, size=1 << 33, agent_id="agent-a", in_memory=False),
    GetObject(object_id="a" * 32),
    ObjectData(object_id="a" * 32, buffers=1),
    ReleaseObjects(object_ids=("a" * 32, "b" * 32), session_id="ses-1"),
    ObjectsReleased(count=2, size=1 << 20),
    ObjectStats(),
    ObjectStatsReply("agent-a", 3, 1 << 20, 1 << 30, 2 << 30, 20 << 30, 4, 9, 2),
    # (aviato/protocol/objects_more.py)
    ObjectSessions(agent_id="agent-a", session_ids=("ses-1", "ses-2")),
    ObjectSessionsEnded(session_ids=("ses-2",)),
    LocateAgent(agent_id="agent-a", wanted="agent-b"),
    AgentLocation(agent_id="agent-b", address="tcp://h:7000", public_key="K" * 40),
]

LIFECYCLE_SAMPLES: list[Message] = [
    ExtendLifetime(sandbox_id="sb-1", seconds=600.0),
    PauseSandbox(sandbox_id="sb-1", pause=False),
    SandboxActivity(agent_id="agent-a", sandbox_ids=("sb-1", "sb-2")),
    SnapshotSandbox(sandbox_id="sb-1"),
    SnapshotReply(snapshot=_SNAP),
    ListSnapshots(),
    SnapshotListReply(snapshots=(_SNAP, _SNAP)),
    RemoveSnapshot(image=_SNAP.image),
]

SAMPLES: list[Message] = [
    OkReply(),
    ErrorReply(ErrorCode.NOT_FOUND, "no such sandbox", {"sandbox_id": "sb-1", "n": [1, 2]}),
    CreateSandbox(spec=SPEC, timeout_seconds=9.5),
    GetSandbox(sandbox_id="sb-1"),
    ListSandboxes(
        tags=("a", "b"),
        statuses=(SandboxStatus.RUNNING, SandboxStatus.TERMINATED),
        session_id="sess-1",
    ),
    StopSandbox(sandbox_id="sb-1", reason="enough"),
    WaitSandbox(sandbox_id="sb-1", timeout_seconds=3.0),
    GetDashboardView("sb-1"),
    DashboardViewReply(),
    GetAgentSandboxes(),
    AgentSandboxesReply(),
    GetExecResults("sb-1"),
    ExecResultsReply(),
    SessionKeepalive(
        "sess-1",
        15.0,
        (
            PoolFigures("square", 2, 0, 3, 120, 55.5, 0.2, 1.9, 1, 0, 0.9, 7.5),
            PoolFigures("cube"),
        ),
    ),
    SessionClose(session_id="sess-1"),
    ClusterStatus(),
    SandboxReply(sandbox=INFO),
    SandboxListReply(sandboxes=(INFO, INFO2)),
    SessionCloseReply(stopped=("sb-1", "sb-2")),
    ClusterStatusReply(agents=(AGENT,), sandbox_counts={"running": 2, "queued": 1}, sessions=4),
    RegisterAgent(
        agent_id="agent-a",
        address="tcp://10.0.0.1:7000",
        slots=8,
        runtime="docker",
        fresh=True,
        labels={"zone": "eu"},
        sandboxes=(INFO, INFO2),
        public_key="Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID",
        instance="0123abcd",
        replaces="fedc3210",
        spares=1,
        spare_shapes=(SpareShape("python:3.11", cpus=1.0, ready=1),),
        cpus=16.0,
        memory_bytes=64 << 30,
        gpus=("0", "1"),
        userns="root is uid 231072 on the host",
    ),
    DeregisterAgent(agent_id="agent-a", instance="0123abcd"),
    RegisterReply(heartbeat_interval=0.25, adopt=("sb-1",), reap=("sb-2", "sb-3")),
    AgentHeartbeat(agent_id="agent-a", running=("sb-1", "sb-2")),
    AgentSpares(
        agent_id="agent-a",
        spares=3,
        shapes=(
            SpareShape("python:3.11", ready=2),
            SpareShape("python:3.11", 0.5, 256 << 20, 64, "none", "/srv", ready=1),
        ),
    ),
    HeartbeatReply(registered=True, dead_agents=("agent-b",)),
    PlaceSandbox(sandbox=INFO),
    SandboxExited(sandbox_id="sb-1", exit_code=137, reason="oom killed"),
    Exec(
        sandbox_id="sb-1",
        argv=("ls", "-l"),
        cwd="/tmp",
        env={"X": "y"},
        timeout_seconds=5.0,
        stream=True,
    ),
    ExecChunk(fd=2),
    ExecReply(returncode=-9, timed_out=True),
    WriteFile(sandbox_id="sb-1", path="/tmp/f", mode=0o600),
    ReadFile(sandbox_id="sb-1", path="/dev/zero", max_bytes=4096),
    FileReply(size=12345),
    GetLogs(sandbox_id="sb-1"),
    LogsReply(fds=(1, 2, 1)),
    Cancel(),
    Ping(),
    Pong(server="agent", server_id="agent-a"),
    RunCalls(
        sandbox_id="sb-9",
        calls=(CallHeader(1, "abc123", True, "pickle"), CallHeader(2, "abc123", False, "json")),
    ),
    CallResults(
        sandbox_id="sb-9",
        outcomes=(CallOutcome(1, "ok", 0.25), CallOutcome(2, "lost", 0.0, "worker died")),
    ),
    SpawnProcess("sb-1", ("bash", "-l"), "/tmp", {"A": "1"}, pty=True, rows=40, cols=120),
    WriteStdin("sb-1", "proc-1", eof=True),
    ReadOutput("sb-1", "proc-1", offset=4096, wait_seconds=10.0),
    ProcessOutput(
        ProcessInfo("proc-1", ("sleep", "9"), False, 137, 9, True), 4096, 12, True, (1, 2)
    ),
    SignalProcess("sb-1", "proc-1", 2),
    ResizeTerminal("sb-1", "proc-1", 40, 120),
    ListProcesses("sb-1", "proc-1", 5.0),
    ProcessReply((ProcessInfo("proc-1", ("cat",), True), ProcessInfo("proc-2", (), False, 0))),
    DownloadFile(sandbox_id="sb-1", path="/data/out.tar", window=4),
    UploadFile(sandbox_id="sb-1", path="/data/model.bin", size=1 << 33, mode=0o600, window=16),
    FileChunk(seq=7, last=True),
    StreamAck(seq=3),
    TransferDone(size=1 << 31),
    ListFiles(sandbox_id="sb-1", path="/data"),
    FileListReply(entries=(FileInfo("a", 1, False, 1.5), FileInfo("d", 0, True, 2.0))),
    RemoveFile(sandbox_id="sb-1", path="/data/tmp", recursive=True),
    StreamLogs(sandbox_id="sb-1", follow=True, window=2),
    LogChunk(seq=9, fd=2),
    *LIFECYCLE_SAMPLES,
    AgentVolumes(agent_id="agent-a", names=("pip-cache", "data")),
    ListVolumes(),
    VolumeListReply(
        volumes=(
            VolumeInfo("pip-cache", "agent-a", "tcp://10.0.0.1:7000"),
            VolumeInfo("data", "agent-b", "tcp://10.0.0.2:7000", "key", "unix:host:/p"),
        )
    ),
    RemoveVolume(name="pip-cache"),
    GetTunnels(sandbox_id="sb-1"),
    TunnelsReply(tunnels=(PortTunnel(8000, "10.0.0.1", 32768),)),
    *OBJECT_SAMPLES,
    # output forwarding (aviato/protocol/output.py, MsgType 200-219)
    WatchOutput(sandbox_id="sb-1"),
    FunctionOutput(sandbox_id="sb-1", fd=2, name="work", dropped=4096),
    WatchActorCalls(sandbox_id="sb-1"),
    ActorCallRequest(sandbox_id="sb-1", rid=3, actor="Model-0a1b2c3d4e5f", method="predict"),
    ActorCallReply(
        sandbox_id="sb-1",
        rid=3,
        status="ok",
        buffers=1,
        actor_sandbox_id="sb-2",
        seconds=0.25,
    ),
]


def test_run_calls_naming_objects_round_trips() -> None:
    msg = RunCalls(
        sandbox_id="sb-9",
        calls=(CallHeader(1, "abc123", False, "pickle"),),
        objects=(
            ObjectSource("a" * 32, "agent-a", "tcp://10.0.0.1:7000", "key", "unix:h:/p", "ses-1"),
        ),
        keep=(KeepResult(1, "b" * 32, "ses-1"),),
    )
    assert decode(encode(msg, 5)).msg == msg


def test_every_message_class_has_a_sample() -> None:
    covered = [type(m) for m in SAMPLES]
    assert len(covered) == len(set(covered)), "a message class is sampled twice"
    assert set(covered) == set(MESSAGE_TYPES.values())


def test_message_types_maps_to_the_module_classes() -> None:
    # dataclass(slots=True) replaces each class, so Message.__subclasses__() also lists
    # the discarded originals: MESSAGE_TYPES must hold the classes the module exports.
    import aviato.protocol as protocol

    module_classes = {
        obj
        for obj in vars(protocol).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    }
    assert set(MESSAGE_TYPES.values()) == module_classes
    assert len({cls.TYPE for cls in module_classes}) == len(module_classes)
    for t, cls in MESSAGE_TYPES.items():
        assert cls.TYPE is t
        assert getattr(protocol, cls.__name__) is cls


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    payloads = [b"first", memoryview(b"second payload")]
    frames = encode(msg, 987654321, payloads, token="s3cret")
    d = decode(frames)
    assert isinstance(d, Decoded)
    assert d.msg == msg
    assert type(d.msg) is type(msg)
    assert d.request_id == 987654321
    assert d.token == "s3cret"
    assert [bytes(p) for p in d.payloads] == [b"first", b"second payload"]


def test_curve_keys_ride_along_and_default_to_none() -> None:
    """The agent's data-plane key travels in RegisterAgent and every SandboxInfo; a
    body without it (keys off) decodes to "" rather than failing."""
    reg = next(m for m in SAMPLES if isinstance(m, RegisterAgent))
    assert decode(encode(reg, 1)).msg.public_key == reg.public_key != ""
    body = {k: v for k, v in to_wire(reg).items() if k != "public_key"}
    frames = [msgpack.packb({"v": PROTOCOL_VERSION, "t": int(reg.TYPE), "id": 2, "b": body})]
    assert decode(frames).msg.public_key == ""
    reply = decode(encode(SandboxReply(INFO), 3)).msg
    assert isinstance(reply, SandboxReply)
    assert reply.sandbox.agent_public_key == INFO.agent_public_key
    assert SandboxInfo("sb", SPEC, SandboxStatus.RUNNING).agent_public_key == ""


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_without_token_or_payloads(msg: Message) -> None:
    d = decode(encode(msg, 0))
    assert d.msg == msg
    assert d.request_id == 0
    assert d.token is None
    assert d.payloads == ()


def test_round_trip_keeps_enum_and_tuple_types() -> None:
    d = decode(encode(SandboxListReply(sandboxes=(INFO,)), 1))
    info = d.msg.sandboxes[0]  # type: ignore[attr-defined]
    assert isinstance(d.msg.sandboxes, tuple)  # type: ignore[attr-defined]
    assert info.status is SandboxStatus.RUNNING
    assert isinstance(info.spec.args, tuple)
    assert isinstance(info.spec, SandboxSpec)
    err = decode(encode(ErrorReply(ErrorCode.TIMEOUT, "late"), 2)).msg
    assert err.code is ErrorCode.TIMEOUT  # type: ignore[attr-defined]


def test_int_sent_for_float_field_decodes_as_float() -> None:
    d = decode(encode(WaitSandbox(sandbox_id="sb", timeout_seconds=3), 1))  # type: ignore[arg-type]
    assert d.msg.timeout_seconds == 3.0  # type: ignore[attr-defined]
    assert isinstance(d.msg.timeout_seconds, float)  # type: ignore[attr-defined]


def test_payloads_are_separate_frames_not_in_the_body() -> None:
    big = b"\xaa" * 100_000
    view = memoryview(b"\xbb" * 1000)
    frames = encode(WriteFile(sandbox_id="sb", path="/f"), 5, [big, view])
    assert len(frames) == 3
    assert frames[1] is big
    assert frames[2] is view
    envelope = frames[0]
    assert isinstance(envelope, bytes)
    assert len(envelope) < 200
    assert b"\xaa\xaa\xaa\xaa" not in envelope
    d = decode(frames)
    assert d.payloads[0] is big
    assert d.payloads[1] is view


def test_envelope_layout() -> None:
    frames = encode(GetSandbox(sandbox_id="sb-9"), 17, token="t")
    env = msgpack.unpackb(frames[0], raw=False)
    assert env == {
        "v": PROTOCOL_VERSION,
        "t": int(MsgType.GET_SANDBOX),
        "id": 17,
        "tok": "t",
        "b": {"sandbox_id": "sb-9"},
    }


def test_bytearray_envelope_is_accepted() -> None:
    frames = encode(Ping(), 3)
    assert decode([bytearray(frames[0])]).msg == Ping()


# --------------------------------------------------------------------------- refusals


def _env(**over: Any) -> bytes:
    env: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": int(MsgType.GET_SANDBOX), "id": 7}
    env["b"] = {"sandbox_id": "sb-1"}
    env.update(over)
    return msgpack.packb({k: v for k, v in env.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()


def _refused(frame: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode([frame])
    return info.value


def test_valid_baseline_envelope_decodes() -> None:
    assert decode([_env()]).msg == GetSandbox(sandbox_id="sb-1")


def test_wrong_version_is_version_mismatch() -> None:
    err = _refused(_env(v=PROTOCOL_VERSION + 98))
    assert err.code is ErrorCode.VERSION_MISMATCH
    assert err.request_id == 7
    assert str(PROTOCOL_VERSION + 98) in str(err)
    assert str(PROTOCOL_VERSION) in str(err)
    assert isinstance(err, exc.ProtocolError)


def test_missing_version_is_version_mismatch() -> None:
    err = _refused(_env(v=_DROP))
    assert err.code is ErrorCode.VERSION_MISMATCH
    assert err.request_id == 7


def test_empty_frame_list_is_malformed() -> None:
    with pytest.raises(DecodeError) as info:
        decode([])
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x81", b"not msgpack at all \xff\xfe", msgpack.packb(1) + b"extra"],
    ids=["empty", "never-used-byte", "truncated-map", "garbage", "trailing-data"],
)
def test_non_msgpack_is_malformed(frame: bytes) -> None:
    err = _refused(frame)
    assert err.code is ErrorCode.MALFORMED
    assert err.request_id is None


@pytest.mark.parametrize("value", [[1, 2], 5, "envelope", None])
def test_envelope_not_a_map_is_malformed(value: Any) -> None:
    err = _refused(msgpack.packb(value))
    assert err.code is ErrorCode.MALFORMED
    assert err.request_id is None


@pytest.mark.parametrize("rid", [_DROP, "7", True, 1.5, None])
def test_missing_or_non_integer_id_is_malformed(rid: Any) -> None:
    err = _refused(_env(id=rid))
    assert err.code is ErrorCode.MALFORMED
    assert err.request_id is None


def test_frame_of_unsupported_type_is_malformed() -> None:
    with pytest.raises(DecodeError) as info:
        decode(["a str is not a frame"])
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("t", [999, 0, -1, "10", _DROP])
def test_unknown_type_is_malformed(t: Any) -> None:
    err = _refused(_env(t=t))
    assert err.code is ErrorCode.MALFORMED
    assert err.request_id == 7


def test_non_string_token_is_malformed() -> None:
    err = _refused(_env(tok=12))
    assert err.code is ErrorCode.MALFORMED
    assert err.request_id == 7


@pytest.mark.parametrize(
    ("t", "body"),
    [
        # unknown field
        (MsgType.GET_SANDBOX, {"sandbox_id": "sb", "extra": 1}),
        # missing required field
        (MsgType.GET_SANDBOX, {}),
        (MsgType.CREATE_SANDBOX, {"spec": {"image": "i", "command": "c"}}),
        # unknown / missing field in a nested record
        (
            MsgType.CREATE_SANDBOX,
            {"spec": {"image": "i", "command": "c", "bogus": 1}, "timeout_seconds": 1.0},
        ),
        (MsgType.CREATE_SANDBOX, {"spec": {"image": "i"}, "timeout_seconds": 1.0}),
        # str where int
        (MsgType.EXEC_CHUNK, {"fd": "1"}),
        # bool where int
        (MsgType.EXEC_CHUNK, {"fd": True}),
        (MsgType.FILE_REPLY, {"size": False}),
        # bool where float
        (MsgType.WAIT_SANDBOX, {"sandbox_id": "sb", "timeout_seconds": True}),
        # str where float
        (MsgType.WAIT_SANDBOX, {"sandbox_id": "sb", "timeout_seconds": "3"}),
        # int where str, int where bool
        (MsgType.GET_SANDBOX, {"sandbox_id": 5}),
        (MsgType.HEARTBEAT_REPLY, {"registered": 1}),
        # bytes where str
        (MsgType.GET_SANDBOX, {"sandbox_id": b"sb"}),
        # list where map
        (MsgType.ERROR, {"code": "timeout", "message": "m", "detail": [1, 2]}),
        (MsgType.SANDBOX_REPLY, {"sandbox": ["sb-1"]}),
        # map where list; wrong item type in a list
        (MsgType.SESSION_CLOSE_REPLY, {"stopped": {"a": 1}}),
        (MsgType.SESSION_CLOSE_REPLY, {"stopped": ["ok", 3]}),
        # wrong value type in a dict; non-string dict key
        (MsgType.CLUSTER_STATUS_REPLY, {"agents": [], "sandbox_counts": {"a": "1"}, "sessions": 0}),
        (MsgType.CLUSTER_STATUS_REPLY, {"agents": [], "sandbox_counts": {b"a": 1}, "sessions": 0}),
        # None for a non-optional field
        (MsgType.EXEC_REPLY, {"returncode": None}),
        # bad enum values
        (MsgType.ERROR, {"code": "no_such_code", "message": "m"}),
        (MsgType.ERROR, {"code": 1, "message": "m"}),
        (MsgType.LIST_SANDBOXES, {"statuses": ["running", "sleeping"]}),
        # body that is not a map
        (MsgType.PING, [1]),
        (MsgType.PING, "body"),
    ],
)
def test_bad_body_is_malformed(t: MsgType, body: Any) -> None:
    err = _refused(_env(t=int(t), b=body))
    assert err.code is ErrorCode.MALFORMED, str(err)
    assert err.request_id == 7


def test_malformed_message_names_the_field() -> None:
    err = _refused(_env(t=int(MsgType.EXEC_CHUNK), b={"fd": "1"}))
    assert "fd" in str(err)


def test_missing_body_is_fine_for_a_message_without_fields() -> None:
    assert decode([_env(t=int(MsgType.PING), b=_DROP)]).msg == Ping()


# --------------------------------------------------------------------------- property


def _check_decode_total(frame: bytes) -> None:
    try:
        result = decode([frame])
    except DecodeError as err:
        assert isinstance(err.code, ErrorCode)
        assert err.request_id is None or isinstance(err.request_id, int)
    else:
        assert isinstance(result, Decoded)
        assert isinstance(result.msg, Message)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_never_raises_anything_else(data: bytes) -> None:
    _check_decode_total(data)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
_type_numbers = st.sampled_from([int(t) for t in MsgType]) | _values
# Real field names only: dataclasses.fields() leaves out the TYPE class variable.
_field_names = st.sampled_from(
    sorted(
        {f.name for cls in [*MESSAGE_TYPES.values(), SandboxSpec, SandboxInfo] for f in fields(cls)}
    )
)
# Bodies that use real field names, so the checks deep inside from_wire are reached.
_bodies = _values | st.dictionaries(_field_names, _values, max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    v=st.just(PROTOCOL_VERSION) | _values,
    t=_type_numbers,
    rid=st.integers(min_value=-(2**63), max_value=2**64 - 1) | _values,
    b=_bodies,
    tok=st.none() | st.text(max_size=4) | _values,
    drop=st.sets(st.sampled_from(["v", "t", "id", "b", "tok"])),
)
def test_decode_of_arbitrary_envelopes_never_raises_anything_else(
    v: Any, t: Any, rid: Any, b: Any, tok: Any, drop: set[str]
) -> None:
    env = {"v": v, "t": t, "id": rid, "b": b, "tok": tok}
    for key in drop:
        del env[key]
    _check_decode_total(msgpack.packb(env, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(cls=st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)), data=st.data())
def test_decode_of_well_formed_bodies_with_random_field_values(cls: type, data: Any) -> None:
    names = sorted(f.name for f in fields(cls))
    body = data.draw(st.dictionaries(st.sampled_from(names), _values) if names else st.just({}))
    frame = msgpack.packb(
        {"v": PROTOCOL_VERSION, "t": int(cls.TYPE), "id": 1, "b": body}, use_bin_type=True
    )
    _check_decode_total(frame)


def _wire(msg: Message) -> bytes:
    """A message's body as bytes: equal bytes, equal messages (NaN included)."""
    return msgpack.packb(to_wire(msg), use_bin_type=True)


@settings(max_examples=300, deadline=None)
@given(msg=st.sampled_from(message_types()).flatmap(instances))
def test_every_valid_instance_round_trips(msg: Message) -> None:
    """Instances built from the dataclass types' own annotations: each one decodes,
    to itself, with every field as annotated."""
    back = decode(encode(msg, 3)).msg
    assert type(back) is type(msg) and _wire(back) == _wire(msg)
    assert conforms(back, type(msg)) is None


def test_one_field_mutated_at_a_time() -> None:
    """A valid message with ONE field changed (a wrong type, another valid value, or
    removed): a valid value is accepted, a required field's absence refused naming it,
    and whatever is accepted has every field as its annotation says."""
    seen: Counter[str] = Counter()

    @settings(max_examples=600, deadline=None, database=None)
    @given(cls=st.sampled_from(message_types()), data=st.data())
    def check(cls: type[Message], data: Any) -> None:
        body, name, how = data.draw(mutations(cls))
        frame = msgpack.packb(
            {"v": PROTOCOL_VERSION, "t": int(cls.TYPE), "id": 9, "b": body}, use_bin_type=True
        )
        try:
            msg = decode([frame]).msg
        except DecodeError as err:
            seen[f"{how}: refused"] += 1
            assert err.code is ErrorCode.MALFORMED and err.request_id == 9
            assert how != "valid", f"a valid {cls.__name__}.{name} was refused: {err}"
            assert name in str(err), f"the refusal does not name {name!r}: {err}"
            return
        seen[f"{how}: decoded"] += 1
        assert type(msg) is cls
        assert conforms(msg, cls) is None, conforms(msg, cls)
        required = next((r for n, _, r in fields_of(cls) if n == name), False)
        assert not (how == "removed" and required), f"{cls.__name__} decoded without {name}"

    check()
    print(dict(seen))
    decoded = sum(n for k, n in seen.items() if k.endswith("decoded"))
    assert decoded > sum(seen.values()) // 3, seen  # most reach the field checks and pass


# --------------------------------------------------------------------------- error mapping

#: Every exception class with its own wire code, and that code.
CODED: list[tuple[type[exc.AviatoError], ErrorCode]] = [
    (exc.ProtocolError, ErrorCode.MALFORMED),
    (exc.UnauthorizedError, ErrorCode.UNAUTHORIZED),
    (exc.ClusterUnavailableError, ErrorCode.UNAVAILABLE),
    (exc.AgentIdInUseError, ErrorCode.ID_IN_USE),
    (exc.SandboxError, ErrorCode.BAD_REQUEST),
    (exc.SandboxNotFoundError, ErrorCode.NOT_FOUND),
    (exc.SandboxNotRunningError, ErrorCode.NOT_RUNNING),
    (exc.SandboxTimeoutError, ErrorCode.TIMEOUT),
    (exc.SandboxFailedError, ErrorCode.FAILED),
    (exc.SandboxTerminatedError, ErrorCode.TERMINATED),
    (exc.SandboxFileError, ErrorCode.FILE_ERROR),
    (exc.PayloadTooLargeError, ErrorCode.TOO_LARGE),
    (exc.ProcessNotFoundError, ErrorCode.PROCESS_NOT_FOUND),
    (exc.UnsupportedOperationError, ErrorCode.UNSUPPORTED),
    (exc.SandboxPausedError, ErrorCode.PAUSED),
    (exc.SandboxNotPausedError, ErrorCode.NOT_PAUSED),
    (exc.UnsupportedOperationError, ErrorCode.UNSUPPORTED),
    (exc.IsolationUnavailableError, ErrorCode.ISOLATION_UNAVAILABLE),
    (exc.ResourcesUnavailableError, ErrorCode.RESOURCES_UNAVAILABLE),
    (exc.ObjectLostError, ErrorCode.OBJECT_LOST),
    (exc.ObjectStoreFullError, ErrorCode.OBJECT_STORE_FULL),
]


def _make(cls: type[exc.AviatoError], message: str) -> exc.AviatoError:
    if cls is exc.SandboxFileError:
        return exc.SandboxFileError(message, filepath="/tmp/x.txt", sandbox_id="sb-7")
    if issubclass(cls, exc.SandboxError):
        return cls(message, sandbox_id="sb-7")
    return cls(message)


@pytest.mark.parametrize(("cls", "code"), CODED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_error_round_trip(cls: type[exc.AviatoError], code: ErrorCode) -> None:
    original = _make(cls, "it went wrong")
    reply = error_reply(original)
    assert reply.code is code
    assert reply.message == "it went wrong"
    # ...and survives the wire
    reply = decode(encode(reply, 1)).msg  # type: ignore[assignment]
    back = to_exception(reply)
    assert type(back) is cls
    if isinstance(original, exc.SandboxError):
        assert isinstance(back, exc.SandboxError)
        assert back.sandbox_id == "sb-7"
        # Named once, as the daemons' logs name it.
        assert str(back) == "it went wrong [sandbox sb-7]"
    else:
        assert str(back) == "it went wrong"
    if isinstance(original, exc.SandboxFileError):
        assert isinstance(back, exc.SandboxFileError)
        assert back.filepath == "/tmp/x.txt"


@pytest.mark.parametrize("cls", list(exc.FILE_ERROR_KINDS.values()), ids=lambda c: c.__name__)
def test_file_error_kinds_round_trip(cls: type[exc.SandboxFileError]) -> None:
    """A missing path, a directory, a file, a bad path: each its own class (and the
    builtin it also is) on the client, with its filepath."""
    reply = decode(encode(error_reply(cls("no", filepath="/x", sandbox_id="sb-7")), 1)).msg
    assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.FILE_ERROR
    back = to_exception(reply)
    assert type(back) is cls and back.filepath == "/x" and back.sandbox_id == "sb-7"
    builtin = {"not_found": FileNotFoundError, "bad_path": ValueError}.get(cls.KIND, OSError)
    assert isinstance(back, builtin)
    # an unknown kind (a newer agent): the base class
    reply = ErrorReply(ErrorCode.FILE_ERROR, "m", {"filepath": "/x", "kind": "new-kind"})
    assert type(to_exception(reply)) is exc.SandboxFileError


def test_path_problem() -> None:
    assert path_problem("/data/x.bin") == "" and path_problem("/") == ""
    for bad in ("x", "data/x", "", "/a/../b", "/..", "/a/\x00"):
        assert path_problem(bad), bad
    assert path_problem("/", allow_root=False) and path_problem("//", allow_root=False)
    assert path_problem("/a/..b") == ""  # a name, not a component


def test_coded_list_covers_every_mapped_exception_class() -> None:
    mapped = {type(to_exception(ErrorReply(code, "m"))) for code in ErrorCode}
    assert mapped - {exc.AviatoError} == {cls for cls, _ in CODED}


def test_every_code_maps_to_an_aviato_error() -> None:
    for code in ErrorCode:
        e = to_exception(ErrorReply(code, "msg", {"sandbox_id": "sb-1"}))
        assert isinstance(e, exc.AviatoError)
        assert str(e) == ("msg [sandbox sb-1]" if isinstance(e, exc.SandboxError) else "msg")
    assert isinstance(to_exception(ErrorReply(ErrorCode.TIMEOUT, "t")), TimeoutError)
    assert type(to_exception(ErrorReply(ErrorCode.VERSION_MISMATCH, "v"))) is exc.ProtocolError


def test_sandbox_id_absent_or_bad_type_becomes_none() -> None:
    e = to_exception(ErrorReply(ErrorCode.NOT_FOUND, "m", {"sandbox_id": 5}))
    assert isinstance(e, exc.SandboxNotFoundError)
    assert e.sandbox_id is None
    f = to_exception(ErrorReply(ErrorCode.FILE_ERROR, "m"))
    assert isinstance(f, exc.SandboxFileError)
    assert f.filepath == ""
    assert f.sandbox_id is None


def test_value_error_is_bad_request_and_unknown_is_internal() -> None:
    assert error_reply(ValueError("bad arg")).code is ErrorCode.BAD_REQUEST
    reply = error_reply(KeyError("boom"))
    assert reply.code is ErrorCode.INTERNAL
    assert "KeyError" in reply.message
    assert type(to_exception(reply)) is exc.AviatoError


def test_decode_error_maps_to_protocol_error() -> None:
    err = _refused(b"\xc1")
    assert error_reply(err).code is ErrorCode.MALFORMED


def test_the_schedulers_plain_heartbeat_path_agrees_with_the_checked_decoder() -> None:
    """The scheduler decodes a no-change heartbeat by hand (cheaper); it must give what
    the checked decoder gives, and leave anything else to it."""
    from aviato.protocol import AgentHeartbeat, encode, open_envelope
    from scheduler.server import _plain_heartbeat

    for msg in (
        AgentHeartbeat("a", full=False),
        AgentHeartbeat("a", ("sb-1",)),
        AgentHeartbeat("a", full=False, gone=("sb-1",)),
        AgentHeartbeat("a"),
    ):
        frames = encode(msg, 7, token="t")
        fast = _plain_heartbeat(open_envelope(frames))
        if fast is not None:
            assert fast == decode(frames)
        else:
            assert msg.full or msg.gone
    assert _plain_heartbeat(open_envelope(encode(AgentHeartbeat("a", full=False), 1))) is not None


@given(st.lists(st.sampled_from(list(SandboxStatus)), min_size=0, max_size=5))
def test_the_schedulers_row_encoding_is_the_generic_one(statuses: list[SandboxStatus]) -> None:
    """The scheduler converts each spec once (``info_wire``, ``encode_body``): its frames
    must decode to what the generic ``encode`` would have sent."""
    from aviato.protocol import PlaceSandbox, SandboxListReply, SandboxReply, encode
    from scheduler.server import SchedulerServer

    server = SchedulerServer()
    spec = SandboxSpec("img", "cmd", ("a",), {"K": "V"}, ("t",), "s", 3.0, 10**8, 1.5)
    rows = tuple(
        SandboxInfo(f"sb-{i}", spec, st_, "a", "tcp://h:1", 0, "r", 1.0, 2.0, "docker", "k", "l")
        for i, st_ in enumerate(statuses)
    )
    msgs: list[Message] = [SandboxListReply(rows, "9")]
    msgs += [PlaceSandbox(r) for r in rows] + [SandboxReply(r) for r in rows]
    for msg in msgs:
        assert decode(server._encode(msg, 3)) == decode(encode(msg, 3))
        assert server._encode(msg, 3)[0] == encode(msg, 3)[0]  # byte for byte
