"""The agent's object store alone (agent/object_store.py): budgets, spill, refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.object_store import ObjectStore, budgets_from_env, object_id_problem
from aviato.exceptions import ConfigurationError, ObjectLostError, ObjectStoreFullError


def store(tmp_path: Path, memory: int, disk: int) -> ObjectStore:
    return ObjectStore(lambda: tmp_path / "objects", memory, disk)


def test_held_in_memory_then_spilled_least_recently_used_first(tmp_path: Path) -> None:
    s = store(tmp_path, 100, 1000)
    s.put("a", "ses", [b"a" * 40])
    s.put("b", "ses", [b"b" * 40, b"B" * 10])
    assert (s.memory_bytes, s.disk_bytes) == (90, 0)
    assert not (tmp_path / "objects").exists()  # made at the first spill only
    s.get("a")  # now b is the least recently used
    s.put("c", "ses", [b"c" * 40])
    assert s.entries["b"].frames is None and s.entries["a"].frames is not None
    assert (s.memory_bytes, s.disk_bytes) == (80, 50)
    assert [bytes(f) for f in s.get("b")] == [b"b" * 40, b"B" * 10]  # read back whole
    assert (tmp_path / "objects" / "b").stat().st_size == 50


def test_an_object_over_the_memory_budget_goes_to_disk(tmp_path: Path) -> None:
    s = store(tmp_path, 10, 100)
    entry = s.put("big", "ses", [b"x" * 50])
    assert entry.frames is None and s.memory_bytes == 0 and s.disk_bytes == 50
    assert bytes(s.get("big")[0]) == b"x" * 50


def test_over_the_disk_cap_a_put_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    s = store(tmp_path, 10, 60)
    s.put("a", "ses", [b"a" * 50])
    with pytest.raises(ObjectStoreFullError, match=r"ref\.release"):
        s.put("b", "ses", [b"b" * 20])
    assert list(s.entries) == ["a"] and s.disk_bytes == 50
    s.release(["a"])
    s.put("b", "ses", [b"b" * 20])
    assert s.disk_bytes == 20 and not (tmp_path / "objects" / "a").exists()


def test_release_by_id_and_by_session_and_close(tmp_path: Path) -> None:
    s = store(tmp_path, 30, 1000)
    s.put("a", "one", [b"a" * 20])
    s.put("b", "one", [b"b" * 20])  # spills a
    s.put("c", "two", [b"c" * 5])
    freed = s.release(["c"], session_id="one")
    assert sorted(e.object_id for e in freed) == ["a", "b", "c"]
    assert (s.memory_bytes, s.disk_bytes, len(s.entries)) == (0, 0, 0)
    assert list((tmp_path / "objects").iterdir()) == []
    with pytest.raises(ObjectLostError, match="put the value again"):
        s.get("a")
    s.put("d", "two", [b"d" * 25])
    s.put("e", "two", [b"e" * 25])
    s.close()
    assert not (tmp_path / "objects").exists()


def test_ids_and_budgets_are_checked(tmp_path: Path) -> None:
    assert object_id_problem("ab_C-9") == ""
    for bad in ("", "../x", "a/b", "x" * 65, "a b"):
        assert object_id_problem(bad)
        with pytest.raises(ValueError):
            store(tmp_path, 10, 10).put(bad, "", [b"x"])
    assert budgets_from_env({"AVIATO_OBJECT_MEMORY_BYTES": "5"})[0] == 5
    with pytest.raises(ConfigurationError, match="AVIATO_OBJECT_DISK_BYTES"):
        budgets_from_env({"AVIATO_OBJECT_DISK_BYTES": "lots"})


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcde"), st.integers(1, 80)),
        st.tuples(st.just("get"), st.sampled_from("abcde"), st.just(0)),
        st.tuples(st.just("release"), st.sampled_from("abcde"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, memory=st.integers(0, 120), disk=st.integers(0, 200))
def test_the_budgets_always_hold_and_values_come_back(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, str, int]],
    memory: int,
    disk: int,
) -> None:
    s = store(tmp_path_factory.mktemp("s"), memory, disk)
    model: dict[str, bytes] = {}
    for op, key, size in ops:
        if op == "put":
            value = key.encode() * size
            try:
                s.put(key, "ses", [value[: size // 2], value[size // 2 :]])
                model[key] = value
            except ObjectStoreFullError:
                pass  # refused: the old value of that key, if any, stays
        elif op == "get":
            if key in model:
                assert b"".join(bytes(f) for f in s.get(key)) == model[key]
            else:
                with pytest.raises(ObjectLostError):
                    s.get(key)
        else:
            s.release([key])
            model.pop(key, None)
        assert s.memory_bytes <= memory and s.disk_bytes <= disk
        assert s.memory_bytes == sum(e.size for e in s.entries.values() if e.frames is not None)
        assert s.disk_bytes == sum(e.size for e in s.entries.values() if e.frames is None)
        assert set(s.entries) == set(model)
    s.close()
