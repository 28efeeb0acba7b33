"""supervisor.generations: the pure change plan and the on-disk generation store."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from supervisor.generations import (
    KEEP,
    ChangePlan,
    GenerationStore,
    StateWriteFailed,
    plan_change,
)


@pytest.mark.parametrize("running, wanted, old, expected", [
    ({"a": "h1", "b": "h2", "c": "h3"}, {"a": "h1", "b": "h9", "d": "", "e": ""}, {"a", "b", "c", "e"},
     (("a",), ("b",), ("c",), ("d",), ("e",))),
    ({}, {}, set(), ((), (), (), (), ())),
    ({}, {"z": "1", "y": "2"}, set(), ((), (), (), ("y", "z"), ())),
    ({"z": "1", "y": "2"}, {}, {"y", "z"}, ((), (), ("y", "z"), (), ())),
    ({"b": "1", "a": "1"}, {"a": "1", "b": "1"}, {"a", "b"}, (("a", "b"), (), (), (), ())),
    ({"b": "1", "a": "1"}, {"a": "2", "b": "3"}, {"a", "b"}, ((), ("a", "b"), (), (), ())),
    ({}, {"a": "1", "b": "1"}, {"b", "a"}, ((), (), (), (), ("a", "b"))),
])
def test_plan_change(running, wanted, old, expected):
    plan = plan_change(running, wanted, old)
    assert (plan.keep, plan.replace, plan.remove, plan.add, plan.update) == expected
    assert plan == ChangePlan(*expected)


@pytest.mark.parametrize("replace, remove, keep, add, update, changes", [
    ((), (), (), (), (), False),
    ((), (), ("k",), ("a",), ("u",), False),
    (("r",), (), (), (), (), True),
    ((), ("x",), (), (), (), True),
    (("r",), ("x",), ("k",), (), (), True),
])
def test_changes_containers(replace, remove, keep, add, update, changes):
    assert ChangePlan(keep, replace, remove, add, update).changes_containers is changes


def yaml_names(directory):
    return sorted(p.name for p in directory.glob("*.yaml"))


def test_record_mark_and_reload(tmp_path):
    d = tmp_path / "generations"
    store = GenerationStore(d)
    assert (store.generations, store.active, store.last_good, store.problem) == ([], None, None, None)
    g1 = store.record("models: {}\n", "startup: /etc/x.yaml", {"a": "h1"})
    assert (g1.number, g1.status, g1.source, g1.hashes, g1.reason) == (1, "pending", "startup: /etc/x.yaml", {"a": "h1"}, "")
    assert (d / "000001.yaml").read_text() == "models: {}\n"
    index = json.loads((d / "index.json").read_text())
    assert (index["active"], index["last_good"]) == (None, None)
    assert [(g["number"], g["status"]) for g in index["generations"]] == [(1, "pending")]
    store.mark(1, "good")
    assert (store.active, store.last_good) == (1, 1)
    g2 = store.record("second\n", "sighup", {})
    assert g2.number == 2
    store.mark(2, "failed", "boom")
    assert (store.active, store.last_good) == (1, 1)
    assert (store.get(2).status, store.get(2).reason) == ("failed", "boom")
    assert store.get(3) is None
    assert yaml_names(d) == ["000001.yaml", "000002.yaml"]
    assert list(d.glob("*.tmp")) == []

    again = GenerationStore(d)
    assert again.problem is None
    assert (again.active, again.last_good) == (1, 1)
    assert again.generations == store.generations
    assert again.text_of(1) == "models: {}\n"
    assert again.text_of(2) == "second\n"
    assert [(g["number"], g["status"], g["reason"], g["active"], g["last_good"]) for g in again.as_list()] == [
        (1, "good", "", True, True), (2, "failed", "boom", False, False)]
    assert again.record("third\n", "rollback to 1", {}).number == 3


def test_as_list_flags_active_and_last_good_separately(tmp_path):
    store = GenerationStore(tmp_path)
    for n in (1, 2):
        store.record(f"g{n}\n", "s", {})
        store.mark(n, "good")
    store.set_active(1)
    assert [(g["number"], g["active"], g["last_good"]) for g in store.as_list()] == [(1, True, False), (2, False, True)]
    assert (GenerationStore(tmp_path).active, GenerationStore(tmp_path).last_good) == (1, 2)


def test_prune_keeps_active_and_last_good_even_when_oldest(tmp_path):
    store = GenerationStore(tmp_path)
    for n in (1, 2):
        store.record(f"g{n}\n", "s", {})
        store.mark(n, "good")
    store.set_active(1)  # active 1, last good 2: the two oldest
    total = KEEP + 5
    for n in range(3, total + 1):
        store.record(f"g{n}\n", "s", {})
        store.mark(n, "failed", "no")
    kept = [1, 2, *range(total - KEEP + 3, total + 1)]
    assert len(kept) == KEEP
    assert [g.number for g in store.generations] == kept
    assert (store.active, store.last_good) == (1, 2)
    assert yaml_names(tmp_path) == [f"{n:06d}.yaml" for n in kept]
    assert [g.number for g in GenerationStore(tmp_path).generations] == kept
    assert store.text_of(1) == "g1\n"
    assert store.text_of(total) == f"g{total}\n"
    assert store.record("next\n", "s", {}).number == total + 1


def test_no_prune_at_exactly_keep(tmp_path):
    store = GenerationStore(tmp_path)
    for n in range(1, KEEP + 1):
        store.record(f"g{n}\n", "s", {})
        store.mark(n, "failed")
    assert [g.number for g in store.generations] == list(range(1, KEEP + 1))


@pytest.mark.parametrize("garbage", [
    b"{not json", b"\xff\xfe\x00", b"[1, 2]", b"null", b'"text"', b"{}", b'{"generations": 5}',
    b'{"generations": [1]}', b'{"generations": [{"number": 1}]}', b'{"generations": [{"bogus": 1}]}',
])
def test_corrupt_index_is_set_aside(tmp_path, garbage):
    (tmp_path / "index.json").write_bytes(garbage)
    store = GenerationStore(tmp_path)
    aside = list(tmp_path.glob("index.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == garbage
    assert not (tmp_path / "index.json").exists()
    assert (store.generations, store.active, store.last_good) == ([], None, None)
    assert store.problem is not None
    assert "unreadable" in store.problem and str(aside[0]) in store.problem
    assert store.record("fresh\n", "s", {}).number == 1
    assert [g["number"] for g in json.loads((tmp_path / "index.json").read_text())["generations"]] == [1]
    assert GenerationStore(tmp_path).problem is None


def test_corrupt_index_recovery_does_not_overwrite_old_configs(tmp_path):
    # The module promises "an unreadable index is set aside ... nothing is deleted".
    store = GenerationStore(tmp_path)
    store.record("old one\n", "s", {})
    (tmp_path / "index.json").write_text("garbage")
    fresh = GenerationStore(tmp_path)
    fresh.record("new one\n", "s", {})
    assert sorted(p.read_text() for p in tmp_path.glob("*.yaml")) == ["new one\n", "old one\n"]


def test_store_under_a_file_path_constructs_empty(tmp_path):
    # Nothing there to read: the store should start empty, not crash with a raw OSError.
    (tmp_path / "afile").write_text("x")
    store = GenerationStore(tmp_path / "afile" / "generations")
    assert (store.generations, store.active, store.last_good) == ([], None, None)


def test_unwritable_directory_raises_and_changes_nothing(tmp_path):
    store = GenerationStore(tmp_path / "afile" / "generations")
    (tmp_path / "afile").write_text("x")  # the parent is now a regular file: mkdir fails
    with pytest.raises(StateWriteFailed) as caught:
        store.record("text\n", "s", {})
    assert caught.value.http_status == 507
    assert caught.value.code == "state_write_failed"
    assert "nothing was changed" in caught.value.message
    assert (store.generations, store.active, store.last_good) == ([], None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_failed_index_write_rolls_back_record(tmp_path):
    store = GenerationStore(tmp_path)
    store.record("one\n", "s", {})
    store.mark(1, "good")
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.json").mkdir()
    with pytest.raises(StateWriteFailed) as caught:
        store.record("two\n", "s", {})
    assert "nothing was changed" in caught.value.message
    assert [g.number for g in store.generations] == [1]
    assert (store.active, store.last_good) == (1, 1)
    assert yaml_names(tmp_path) == ["000001.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001.yaml", "index.json"]


def test_failed_mark_leaves_disk_state_whole(tmp_path):
    # "a crash or a full disk leaves the previous state whole": when mark() cannot
    # write the index, the old index must still find every config it names.
    store = GenerationStore(tmp_path)
    for n in range(1, KEEP + 2):
        store.record(f"g{n}\n", "s", {})
    old_index = (tmp_path / "index.json").read_bytes()
    (tmp_path / "index.json").unlink()
    (tmp_path / "index.json").mkdir()
    with pytest.raises(StateWriteFailed):
        store.mark(KEEP + 1, "failed")
    (tmp_path / "index.json").rmdir()
    (tmp_path / "index.json").write_bytes(old_index)  # the index as the failed write left it
    reloaded = GenerationStore(tmp_path)
    assert len(reloaded.generations) == KEEP + 1
    assert [g.number for g in reloaded.generations if not (tmp_path / f"{g.number:06d}.yaml").exists()] == []


def test_stored_generations_are_readable_by_the_daemon_alone_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # a shell's usual umask would leave them world-readable
    try:
        store = GenerationStore(tmp_path / "generations")
        store.record("daemon:\n  api_keys: [secret-key-0123456789]\n", "startup", {})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "generations").iterdir()}
    assert modes == {"000001.yaml": 0o600, "index.json": 0o600}


def test_the_unit_sets_a_private_umask_and_a_memory_ceiling():
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "localllm.service").read_text()
    assert "\nUMask=0077\n" in unit and "\nMemoryMax=" in unit
