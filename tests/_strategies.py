"""Hypothesis strategies built from the protocol's own dataclass types.

``instances(cls)`` draws valid instances of a message or record, field by field from
its annotations (``dataclasses.fields``: the ``TYPE`` class variable is no field).
``mutations(cls)`` draws a valid instance's wire body with ONE field changed: to a
value of another type, to a well-typed extreme, or removed. ``conforms`` checks a
decoded value against its annotations, written apart from the codec so that it can
disagree with it. ``hostile`` gives well-typed values a handler must survive: odd
paths and argv, extreme ids, timeouts, sizes and counts.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from functools import cache
from typing import Any

from hypothesis import strategies as st

from aviato.protocol import MESSAGE_TYPES, Message, to_wire

INT64 = (-(2**63), 2**63 - 1)

#: Well-typed values that are odd where a path, a name, an id or a command goes.
ODD_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "/",
    "//",
    "/tmp",
    "~",
    "-",
    "--help",
    "*",
    "%s%n",
    "\x00",
    "a\x00b",
    "\n",
    "\u202e",
    "sb-",
    "sb-does-not-exist",
    "../../../../etc/shadow",
    "/etc/passwd/x",
    "/proc/self/status",
    "/nonexistent/dir/file",
    "relative/path",
    "x" * 300,
    "é" * 2000,
]
ODD_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, -(2**63)]
ODD_FLOATS = [0.0, -0.0, -1.0, 1e-9, 1e300, -1e300, math.inf, -math.inf, math.nan]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields_of(cls: type) -> list[tuple[str, Any, bool]]:
    """(name, annotation, required) of each real field: ClassVars are not fields."""
    hints = _hints(cls)
    return [
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    ]


@cache
def valid(tp: Any) -> st.SearchStrategy[Any]:
    """Any value of annotation ``tp``, plain or extreme."""
    if tp is Any:
        return st.none() | st.booleans() | st.integers(*INT64) | st.text(max_size=8)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return instances(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else valid(a) for a in args))
    if origin is tuple:
        return st.lists(valid(args[0]), max_size=4).map(tuple)
    if origin is dict:
        return st.dictionaries(valid(args[0]), valid(args[1]), max_size=4)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(*INT64) | st.sampled_from(ODD_INTS)
    if tp is float:
        return st.floats() | st.sampled_from(ODD_FLOATS)
    if tp is str:
        return st.text(max_size=20) | st.sampled_from(ODD_STRINGS)
    if tp is bytes:
        return st.binary(max_size=20)
    raise TypeError(f"no strategy for {tp!r}")


def instances(cls: type) -> st.SearchStrategy[Any]:
    """Valid instances of the dataclass ``cls``, every field drawn from its annotation."""
    return st.builds(cls, **{name: valid(tp) for name, tp, _ in fields_of(cls)})


def message_types() -> list[type[Message]]:
    return sorted(MESSAGE_TYPES.values(), key=lambda c: int(c.TYPE))


#: Plain msgpack values of every shape, for a field set to the wrong thing.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
wire_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


#: Values one step from right for some annotation: where a lax check slips.
NEAR_MISSES: list[Any] = [True, False, 0, 1, 1.5, math.nan, "1", "", b"1", None, [], [1], {}]


@st.composite
def mutations(draw: st.DrawFn, cls: type) -> tuple[dict[str, Any], str, str]:
    """(wire body, field, how): a valid instance's body with one field changed."""
    body = to_wire(draw(instances(cls)))
    fields = fields_of(cls)
    if not fields:
        return body, "", "none"
    name, tp, _ = draw(st.sampled_from(fields))
    how = draw(st.sampled_from(["wrong", "valid", "removed"]))
    if how == "removed":
        del body[name]
    elif how == "valid":  # another valid value, extremes included
        body[name] = to_wire(draw(valid(tp)))
    else:  # near misses (a bool for an int, a number in a string...) or any shape
        body[name] = draw(st.sampled_from(NEAR_MISSES) | wire_values)
    return body, name, how


def conforms(value: Any, tp: Any, where: str = "") -> str | None:
    """Where ``value`` breaks annotation ``tp`` (a path), or None if it conforms."""
    if tp is Any:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if type(value) is not tp:
            return f"{where or tp.__name__}: {type(value).__name__}, not {tp.__name__}"
        for name, hint, _ in fields_of(tp):
            bad = conforms(getattr(value, name), hint, f"{where}.{name}")
            if bad:
                return bad
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        fits = [conforms(value, a, where) for a in args if a is not type(None)]
        return None if None in fits else f"{where}: {value!r:.60} fits none of {tp}"
    if origin is tuple:
        if type(value) is not tuple:
            return f"{where}: {type(value).__name__}, not a tuple"
        for i, item in enumerate(value):
            bad = conforms(item, args[0], f"{where}[{i}]")
            if bad:
                return bad
        return None
    if origin is dict:
        if type(value) is not dict:
            return f"{where}: {type(value).__name__}, not a dict"
        for k, v in value.items():
            bad = conforms(k, args[0], f"{where}<key>") or conforms(v, args[1], f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return None if isinstance(value, tp) else f"{where}: {value!r:.60} is not a {tp.__name__}"
    if tp in (str, int, float, bool, bytes):
        return None if type(value) is tp else f"{where}: {type(value).__name__}, not {tp.__name__}"
    return f"{where}: no check for {tp!r}"


# --------------------------------------------------------------------------- hostile requests

#: Commands that end by themselves (random argv[0]s are never real programs: a random
#: "yes" would run for ever); their arguments are drawn freely.
SAFE_ARGV0 = ["true", "false", "echo", "cat", "ls", "env", "pwd", "/bin/true", "/nonexistent"]
SAFE_SCRIPTS = ["exit 7", "echo out; echo err >&2", "kill -9 $$", "sleep 0.2", "printf '\\0\\1'"]
TIMEOUTS = [None, 0.0, -1.0, 1e-9, 0.3, 5.0, 1e300, math.inf, -math.inf, math.nan]


def odd_text(max_size: int = 30) -> st.SearchStrategy[str]:
    return st.sampled_from(ODD_STRINGS) | st.text(max_size=max_size)


def odd_ints() -> st.SearchStrategy[int]:
    return st.sampled_from(ODD_INTS) | st.integers(*INT64)


def argvs() -> st.SearchStrategy[tuple[str, ...]]:
    free = st.lists(odd_text(), max_size=3)
    return (
        st.tuples(st.sampled_from(SAFE_ARGV0 + ODD_STRINGS), free).map(lambda a: (a[0], *a[1]))
        | st.sampled_from(SAFE_SCRIPTS).map(lambda s: ("sh", "-c", s))
        | st.just(())
    )


def envs() -> st.SearchStrategy[dict[str, str]]:
    names = st.sampled_from(["PATH", "HOME", "LD_PRELOAD", "", "A=B", "\x00", "é"]) | odd_text(8)
    return st.dictionaries(names, odd_text(), max_size=3)


def paths() -> st.SearchStrategy[str]:
    return odd_text() | odd_text(20).map(lambda s: "/tmp/" + s)


def agent_requests(live: str) -> st.SearchStrategy[tuple[Any, list[bytes]]]:
    """(request, payload frames) for an agent's data plane: well typed, hostile, and
    aimed at the live sandbox ``live`` most of the time (else at no sandbox at all)."""
    from aviato.protocol import (
        CallHeader,
        Exec,
        GetLogs,
        ListProcesses,
        Ping,
        ReadFile,
        ReadOutput,
        ResizeTerminal,
        RunCalls,
        Serialization,
        SignalProcess,
        SpawnProcess,
        WriteFile,
        WriteStdin,
    )

    ids = st.sampled_from([live] * 4) | odd_text()
    timeouts = st.sampled_from(TIMEOUTS)
    execs = st.builds(
        Exec,
        sandbox_id=ids,
        argv=argvs(),
        cwd=st.none() | paths(),
        env=envs(),
        timeout_seconds=timeouts,
        stream=st.booleans(),
    ).map(lambda m: (m, []))
    writes = st.tuples(
        st.builds(WriteFile, sandbox_id=ids, path=paths(), mode=odd_ints() | st.just(0o644)),
        st.binary(max_size=2000).map(lambda b: [b]),
    )
    reads = st.builds(ReadFile, sandbox_id=ids, path=paths()).map(lambda m: (m, []))
    logs = st.builds(GetLogs, sandbox_id=ids).map(lambda m: (m, []))
    headers = st.builds(
        CallHeader,
        call_id=odd_ints(),
        digest=odd_text(),
        ship_function=st.booleans(),
        serialization=st.sampled_from(list(Serialization)),  # others: malformed
        max_result_bytes=odd_ints(),
    )
    calls = st.builds(RunCalls, sandbox_id=ids, calls=st.lists(headers, max_size=3).map(tuple)).map(
        lambda m: (m, [b"\x80junk"] * sum(1 + c.ship_function for c in m.calls))
    )
    # Kept processes (issue 13): spawned from the same safe argvs (a cat waits on its
    # open stdin until the sandbox ends), and requests about ids that mostly name none.
    waits = st.sampled_from([0.0, 0.1, -1.0, 61.0, 1e300, math.inf, math.nan])
    procs = st.sampled_from(["proc-0", ""]) | odd_text()
    sizes = st.sampled_from([24, 80]) | odd_ints()
    spawns = st.builds(
        SpawnProcess,
        sandbox_id=ids,
        argv=argvs(),
        cwd=st.none() | paths(),
        env=envs(),
        pty=st.booleans(),
        rows=sizes,
        cols=sizes,
    ).map(lambda m: (m, []))
    stdin = st.tuples(
        st.builds(WriteStdin, sandbox_id=ids, process_id=procs, eof=st.booleans()),
        st.binary(max_size=2000).map(lambda b: [b]),
    )
    process_requests = st.one_of(
        spawns,
        stdin,
        st.builds(ReadOutput, ids, procs, odd_ints(), waits).map(lambda m: (m, [])),
        st.builds(SignalProcess, ids, procs, odd_ints()).map(lambda m: (m, [])),
        st.builds(ResizeTerminal, ids, procs, sizes, sizes).map(lambda m: (m, [])),
        st.builds(ListProcesses, ids, procs | st.just(""), waits).map(lambda m: (m, [])),
    )
    return st.one_of(
        execs, execs, writes, reads, logs, calls, process_requests, st.just((Ping(), []))
    )


def scheduler_requests(live: str, agent_id: str) -> st.SearchStrategy[tuple[Any, list[bytes]]]:
    """Requests for the scheduler, hostile and well typed. Never one that would stop the
    live sandbox or speak for the real agent (that is a test of something else)."""
    from aviato.protocol import (
        AgentHeartbeat,
        ClusterStatus,
        GetSandbox,
        ListSandboxes,
        Ping,
        SandboxExited,
        SandboxStatus,
        SessionClose,
        SessionKeepalive,
        StopSandbox,
        WaitSandbox,
    )

    others = odd_text().filter(lambda s: s not in (live, agent_id))
    ids = st.sampled_from([live] * 3) | others
    texts = st.lists(odd_text(), max_size=3).map(tuple)
    short_waits = st.sampled_from([0.0, -1.0, 1e-9, 0.2, -math.inf, math.nan])
    numbers = st.sampled_from([x for x in TIMEOUTS if x is not None])  # no None: not optional
    waits = st.one_of(
        st.builds(WaitSandbox, sandbox_id=st.just(live), timeout_seconds=short_waits),
        st.builds(WaitSandbox, sandbox_id=others, timeout_seconds=numbers),
    )
    messages = st.one_of(
        st.builds(GetSandbox, sandbox_id=ids),
        st.builds(
            ListSandboxes,
            tags=texts,
            statuses=st.lists(st.sampled_from(list(SandboxStatus)), max_size=3).map(tuple),
            session_id=st.none() | odd_text(),
        ),
        st.builds(StopSandbox, sandbox_id=others, reason=odd_text()),
        waits,
        st.builds(SessionKeepalive, session_id=others, lease_seconds=numbers),
        st.builds(SessionClose, session_id=others),
        st.builds(AgentHeartbeat, agent_id=others, running=texts),
        st.builds(
            SandboxExited, sandbox_id=others, exit_code=st.none() | odd_ints(), reason=odd_text()
        ),
        st.just(ClusterStatus()),
        st.just(Ping()),
    )
    return messages.map(lambda m: (m, []))


def hostile_specs() -> st.SearchStrategy[Any]:
    """SandboxSpecs that decode, with hostile values in every field a runtime uses."""
    from aviato.protocol import SandboxSpec

    floats = st.sampled_from([x for x in TIMEOUTS if x is not None])
    return st.builds(
        SandboxSpec,
        image=st.sampled_from(["python:3.11"] * 6) | odd_text(),
        command=st.sampled_from(["sleep", "true", "sh"] * 2) | odd_text(),
        args=st.sampled_from([("infinity",), ("-c", "exit 3"), ()])
        | st.lists(odd_text(), max_size=2).map(tuple),
        env=envs(),
        tags=st.lists(odd_text(), max_size=2).map(tuple),
        max_lifetime_seconds=st.none() | floats,
        memory_bytes=st.none() | st.just(64 << 20) | odd_ints(),
        cpus=st.none() | st.just(0.5) | floats,
        pids_limit=st.none() | st.just(64) | odd_ints(),
        network=st.none() | st.sampled_from(["none", "bridge", "host", "container:x", ""]),
        working_dir=st.none() | paths(),
    )
