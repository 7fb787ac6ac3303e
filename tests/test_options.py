"""``SandboxOptions``: the one record of sandbox options, its merge and its one check
(unit tests, no cluster)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from aviato import ConfigurationError, Sandbox, SandboxDefaults
from aviato._function import FunctionOptions
from aviato._options import NAMES, SandboxOptions
from aviato._session import Session
from aviato.protocol import SandboxSpec
from scheduler.records import validate_spec

NOWHERE = "tcp://127.0.0.1:1"  # nothing is sent in these tests


# --------------------------------------------------------------------------- merge


def test_set_wins_and_unset_inherits() -> None:
    base = SandboxOptions(
        image="python:3.11",
        command="sleep",
        args=("infinity",),
        memory_bytes=256 << 20,
        cpus=1.0,
        network="none",
        working_dir="/w",
        max_lifetime_seconds=60.0,
        pids_limit=100,
    )
    assert SandboxOptions().over(base) == base
    mine = SandboxOptions(cpus=0.5, network="bridge", working_dir="/tmp")
    merged = mine.over(base)
    assert (merged.cpus, merged.network, merged.working_dir) == (0.5, "bridge", "/tmp")
    assert (merged.memory_bytes, merged.max_lifetime_seconds) == (256 << 20, 60.0)
    assert (merged.image, merged.command, merged.args) == ("python:3.11", "sleep", ("infinity",))


def test_tags_and_env_are_combined() -> None:
    base = SandboxOptions(tags=("team", "ci"), env={"A": "1", "B": "base"})
    merged = SandboxOptions(tags=("ci", "job-7"), env={"B": "mine", "C": "3"}).over(base)
    assert merged.tags == ("team", "ci", "job-7")  # in order, once each
    assert merged.env == {"A": "1", "B": "mine", "C": "3"}
    assert base.env == {"A": "1", "B": "base"}  # the base is not changed


def test_args_go_with_their_command() -> None:
    base = SandboxOptions(command="sleep", args=("infinity",))
    assert SandboxOptions().over(base).args == ("infinity",)
    assert SandboxOptions(command="echo").over(base).args == ()  # not sleep's args
    assert SandboxOptions(command="echo", args=("hi",)).over(base).args == ("hi",)
    assert SandboxOptions(args=("5",)).over(base) == SandboxOptions(command="sleep", args=("5",))


def test_an_empty_image_is_not_set() -> None:
    assert SandboxOptions(image="").over(SandboxOptions(image="python:3.11")).image == "python:3.11"


def test_lists_and_mappings_are_taken_as_given() -> None:
    options = SandboxOptions(args=["a"], tags=["t"], env=dict(A="1").items())  # type: ignore[arg-type]
    assert options.args == ("a",) and options.tags == ("t",) and options.env == {"A": "1"}


def test_the_defaults_are_merged_once_into_a_sandbox() -> None:
    defaults = SandboxDefaults(
        scheduler=NOWHERE,
        container_image="python:3.11",
        command="sleep",
        args=("infinity",),
        tags=("d",),
        env={"A": "1"},
        memory_bytes=128 << 20,
        working_dir="/w",
    )
    spec = Sandbox(tags=["s"], env={"B": "2"}, cpus=0.5, defaults=defaults)._spec
    assert spec == SandboxSpec(
        image="python:3.11",
        command="sleep",
        args=("infinity",),
        env={"A": "1", "B": "2"},
        tags=("d", "s"),
        memory_bytes=128 << 20,
        cpus=0.5,
        working_dir="/w",
    )
    spec = Sandbox(command="echo", container_image="alpine", defaults=defaults)._spec
    assert (spec.image, spec.command, spec.args) == ("alpine", "echo", ())


def test_a_functions_options_are_merged_over_the_sessions_defaults() -> None:
    defaults = SandboxDefaults(
        scheduler=NOWHERE, env={"A": "1"}, memory_bytes=128 << 20, tags=("d",)
    )
    session = Session(defaults)

    def options(**kw: Any) -> FunctionOptions:
        fn = session.function(**kw)(lambda: None)
        return fn.options

    one = options(env={"B": "2"}, cpus=0.5)
    assert one.sandbox == SandboxOptions(
        image="python:3.11",
        env={"A": "1", "B": "2"},
        tags=("d",),
        memory_bytes=128 << 20,
        cpus=0.5,
        args=(),
    )
    # The same sandboxes, however they were asked for: one pool.
    assert options().pool_key() == options(container_image="python:3.11").pool_key()
    assert options().pool_key() != options(memory_bytes=256 << 20).pool_key()
    assert (
        options(env={"X": "1", "Y": "2"}).pool_key() == options(env={"Y": "2", "X": "1"}).pool_key()
    )


def test_every_option_travels_in_the_spec_and_back() -> None:
    spec_fields = {f.name for f in dataclasses.fields(SandboxSpec)}
    assert set(NAMES) <= spec_fields
    options = SandboxOptions(
        image="python:3.11",
        command="sleep",
        args=("1",),
        env={"A": "1"},
        tags=("t",),
        max_lifetime_seconds=5.0,
        memory_bytes=64 << 20,
        cpus=0.5,
        pids_limit=10,
        network="none",
        working_dir="/w",
    )
    assert SandboxOptions.of(SandboxSpec.of(options)) == options


# --------------------------------------------------------------------------- problems


GOOD = SandboxOptions(image="python:3.11", command="sleep")

BAD: list[tuple[dict[str, Any], str]] = [
    ({"image": None}, "container_image is empty"),
    ({"image": ""}, "container_image is empty"),
    ({"image": "  "}, "container_image is empty"),
    ({"image": "x" * 256}, "at most 255"),
    ({"command": None}, "needs a command"),
    ({"command": " \t"}, "needs a command"),
    ({"max_lifetime_seconds": 0.0}, "max_lifetime_seconds"),
    ({"max_lifetime_seconds": float("nan")}, "max_lifetime_seconds"),
    ({"max_lifetime_seconds": float("inf")}, "max_lifetime_seconds"),
    ({"memory_bytes": 1024}, "memory_bytes must be at least 6 MiB"),
    ({"cpus": 0.0}, "cpus"),
    ({"cpus": float("nan")}, "cpus"),
    ({"cpus": 1e300}, "cpus"),
    ({"pids_limit": 0}, "pids_limit"),
    ({"network": "host"}, "network must be"),
]


def test_good_options_have_no_problems() -> None:
    assert GOOD.problems() == []
    for network in (None, "none", "bridge"):
        assert dataclasses.replace(GOOD, network=network, cpus=4096.0).problems() == []


@pytest.mark.parametrize(("change", "words"), BAD, ids=[w for _, w in BAD])
def test_one_check_on_both_sides(change: dict[str, Any], words: str) -> None:
    """The client refuses before sending (ConfigurationError, also a ValueError) what
    the scheduler refuses on receipt: the same check, the same words."""
    options = dataclasses.replace(GOOD, **change)
    (problem,) = options.problems()
    assert words in problem
    with pytest.raises(ConfigurationError, match=words.split(" ")[0]):
        SandboxSpec.of(options)
    # What another sender might put on the wire (str fields are never None there).
    wire = SandboxSpec(
        **{
            **{n: getattr(options, n) for n in NAMES},
            "image": options.image or "",
            "command": options.command or "",
            "args": (),
        }
    )
    assert validate_spec(wire) == problem


def test_every_problem_is_told_at_once() -> None:
    options = SandboxOptions(image="", command="", cpus=-1.0, network="host")
    assert len(options.problems()) == 4
    with pytest.raises(ValueError, match=r"container_image.*command.*cpus.*network"):
        Sandbox(
            container_image="",
            cpus=-1.0,
            network="host",
            defaults=SandboxDefaults(scheduler=NOWHERE, container_image=""),
        )


def test_args_as_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="list of strings"):
        Sandbox(command="sleep", args="infinity", defaults=SandboxDefaults(scheduler=NOWHERE))  # type: ignore[arg-type]
