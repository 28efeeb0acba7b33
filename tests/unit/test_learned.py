"""supervisor.learned: measured sizes, remembered on disk across restarts."""

from __future__ import annotations

import json
import os

import pytest

from supervisor.estimate import LaunchSettings
from supervisor.learned import LearnedSizes, learned_key


def test_empty_when_no_file(tmp_path):
    store = LearnedSizes(tmp_path / "learned.json")
    assert store.get("k") is None
    assert store.problem is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("first, second, kept", [
    (100, 200, 200),   # larger measurement replaces
    (200, 100, 200),   # smaller one does not
    (150, 150, 150),
    (0, 7, 7),
])
def test_record_keeps_the_larger(tmp_path, first, second, kept):
    store = LearnedSizes(tmp_path / "learned.json")
    assert store.record("k", first, "m") == first
    assert store.record("k", second, "m") == kept
    assert store.get("k") == kept


def test_keys_are_independent(tmp_path):
    store = LearnedSizes(tmp_path / "learned.json")
    store.record("a", 10, "one")
    store.record("b", 5, "two")
    assert (store.get("a"), store.get("b"), store.get("c")) == (10, 5, None)


def test_survives_a_reload(tmp_path):
    path = tmp_path / "state" / "learned.json"  # the directory is created on save
    first = LearnedSizes(path)
    first.record("a", 1_000, "one")
    first.record("b", 2_000, "two")
    again = LearnedSizes(path)
    assert (again.get("a"), again.get("b")) == (1_000, 2_000)
    assert again.problem is None
    assert again.record("a", 500, "one") == 1_000  # the max still holds after a reload
    assert LearnedSizes(path).get("a") == 1_000
    on_disk = json.loads(path.read_text())
    assert on_disk["b"]["bytes"] == 2_000
    assert on_disk["b"]["model"] == "two"


def test_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "learned.json"
    store = LearnedSizes(path)
    for n in range(3):
        store.record(f"k{n}", n, "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned.json"]


@pytest.mark.parametrize("content", [
    "this is not JSON {",
    "[1, 2, 3]",
    "null",
    '"a string"',
    '{"k": 5}',
    '{"k": {"model": "m"}}',                 # no bytes
    '{"good": {"bytes": 1}, "bad": [1]}',
    "\udcff",                                # not UTF-8 once written with surrogateescape
    '{"k": {"bytes": "lots"}}',              # bytes that are not a number
    '{"k": {"bytes": null}}',
    '{"k": {"bytes": [1]}}',
], ids=["garbage", "list", "null", "string", "int-value", "no-bytes", "one-bad-entry", "binary",
        "bytes-text", "bytes-null", "bytes-list"])
def test_corrupt_file_is_set_aside(tmp_path, content):
    path = tmp_path / "learned.json"
    raw = content.encode("utf-8", "surrogateescape")
    path.write_bytes(raw)
    store = LearnedSizes(path)
    assert store.get("k") is None
    assert store.get("good") is None
    assert not path.exists()
    (aside,) = tmp_path.glob("learned.json.corrupt-*")
    assert aside.name.removeprefix("learned.json.corrupt-").isdigit()
    assert aside.read_bytes() == raw
    assert store.problem is not None
    assert str(path) in store.problem
    assert str(aside) in store.problem
    store.record("k", 3, "m")  # the store works, from empty
    assert LearnedSizes(path).get("k") == 3
    assert aside.read_bytes() == raw


def test_learned_key_is_stable(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 100)
    launch = LaunchSettings(context=4096)
    key = learned_key(gguf, launch)
    assert len(key) == 24
    assert learned_key(gguf, LaunchSettings(context=4096)) == key
    assert learned_key(tmp_path / "." / "m.gguf", launch) == key  # the same file by another spelling


def test_learned_key_follows_the_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"a" * 100)
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    launch = LaunchSettings(context=4096)
    before = learned_key(gguf, launch)

    gguf.write_bytes(b"b" * 100)  # new content, same size, and the old modification time put back
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert learned_key(gguf, launch) == before  # identity is path, size and mtime

    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))  # touched
    touched = learned_key(gguf, launch)
    assert touched != before

    gguf.write_bytes(b"b" * 101)  # grown
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))
    assert learned_key(gguf, launch) not in (before, touched)

    other = tmp_path / "other.gguf"  # same size and mtime, another file
    other.write_bytes(b"b" * 101)
    os.utime(other, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))
    assert learned_key(other, launch) != learned_key(gguf, launch)


@pytest.mark.parametrize("changed", [
    LaunchSettings(context=8192),
    LaunchSettings(context=4096, parallel=2),
    LaunchSettings(context=4096, cache_type_k="q8_0"),
    LaunchSettings(context=4096, cache_type_v="q4_0"),
    LaunchSettings(context=4096, gpu_layers=10),
    LaunchSettings(context=4096, on_gpu=True),
    LaunchSettings(context=4096, ubatch=256),
    LaunchSettings(context=4096, flash_attention=False),
])
def test_learned_key_follows_the_launch_settings(tmp_path, changed):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert learned_key(gguf, changed) != learned_key(gguf, LaunchSettings(context=4096))
