"""supervisor.state.learned: measured sizes, remembered on disk across restarts."""

from __future__ import annotations

import json
import os

import pytest

from supervisor.core.estimate import LaunchSettings
from supervisor.state.learned import LOWER_RUNS, LearnedSizes, after_run, learned_key

IMAGE = "llama-server:b1"


def test_empty_when_no_file(tmp_path):
    store = LearnedSizes(tmp_path / "learned.json")
    assert store.get("k") is None
    assert store.problem is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "first, second, kept",
    [
        (100, 200, 200),  # larger measurement replaces
        (200, 100, 200),  # a smaller running peak does not
        (150, 150, 150),
        (0, 7, 7),
    ],
)
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


@pytest.mark.parametrize(
    "content",
    [
        "this is not JSON {",
        "[1, 2, 3]",
        "null",
        '"a string"',
        '{"k": 5}',
        '{"k": {"model": "m"}}',  # no bytes
        '{"good": {"bytes": 1}, "bad": [1]}',
        "\udcff",  # not UTF-8 once written with surrogateescape
        '{"k": {"bytes": "lots"}}',  # bytes that are not a number
        '{"k": {"bytes": null}}',
        '{"k": {"bytes": [1]}}',
    ],
    ids=[
        "garbage",
        "list",
        "null",
        "string",
        "int-value",
        "no-bytes",
        "one-bad-entry",
        "binary",
        "bytes-text",
        "bytes-null",
        "bytes-list",
    ],
)
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
    key = learned_key(gguf, launch, IMAGE)
    assert len(key) == 24
    assert learned_key(gguf, LaunchSettings(context=4096), IMAGE) == key
    assert learned_key(tmp_path / "." / "m.gguf", launch, IMAGE) == key  # the same file by another spelling


def test_learned_key_follows_the_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"a" * 100)
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    launch = LaunchSettings(context=4096)
    before = learned_key(gguf, launch, IMAGE)

    gguf.write_bytes(b"b" * 100)  # new content, same size, and the old modification time put back
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert learned_key(gguf, launch, IMAGE) == before  # identity is path, size and mtime

    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))  # touched
    touched = learned_key(gguf, launch, IMAGE)
    assert touched != before

    gguf.write_bytes(b"b" * 101)  # grown
    os.utime(gguf, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))
    assert learned_key(gguf, launch, IMAGE) not in (before, touched)

    other = tmp_path / "other.gguf"  # same size and mtime, another file
    other.write_bytes(b"b" * 101)
    os.utime(other, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_001))
    assert learned_key(other, launch, IMAGE) != learned_key(gguf, launch, IMAGE)


@pytest.mark.parametrize(
    "changed",
    [
        LaunchSettings(context=8192),
        LaunchSettings(context=4096, parallel=2),
        LaunchSettings(context=4096, cache_type_k="q8_0"),
        LaunchSettings(context=4096, cache_type_v="q4_0"),
        LaunchSettings(context=4096, gpu_layers=10),
        LaunchSettings(context=4096, on_gpu=True),
        LaunchSettings(context=4096, ubatch=256),
        LaunchSettings(context=4096, flash_attention=False),
    ],
)
def test_learned_key_follows_the_launch_settings(tmp_path, changed):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert learned_key(gguf, changed, IMAGE) != learned_key(gguf, LaunchSettings(context=4096), IMAGE)


def test_learned_key_follows_the_image_and_tells_a_tag_from_a_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    launch = LaunchSettings(context=4096)
    assert learned_key(gguf, launch, "server-cuda-b1") != learned_key(gguf, launch, "server-cuda-b2")
    assert learned_key("llama3.2:1b", launch, "ollama:1") != learned_key("llama3.2:3b", launch, "ollama:1")
    assert learned_key("llama3.2:1b", launch, "ollama:1") != learned_key("llama3.2:1b", launch, "ollama:2")


@pytest.mark.parametrize(
    "learned, lower, peak, expected",
    [
        (None, [], 500, (500, [])),  # the first run teaches
        (500, [], 600, (600, [])),  # a higher peak raises at once
        (500, [400], 500, (500, [])),  # an equal peak breaks a run of lower ones
        (500, [], 400, (500, [400])),  # one lower run is counted, not trusted
        (500, [400], 450, (500, [400, 450])),
        (500, [400, 450], 420, (450, [])),  # the third in a row: down to the highest of them
    ],
)
def test_a_learned_size_comes_down_only_after_consistent_lower_peaks(learned, lower, peak, expected):
    assert LOWER_RUNS == 3
    assert after_run(learned, lower, peak) == expected


def test_finish_run_lowers_across_restarts_and_a_running_peak_raises(tmp_path):
    path = tmp_path / "learned.json"
    LearnedSizes(path).record("k", 1_000, "m")
    for peak in (800, 700):
        assert LearnedSizes(path).finish_run("k", peak, "m") == 1_000  # counted on disk, across restarts
    assert LearnedSizes(path).finish_run("k", 750, "m") == 800
    store = LearnedSizes(path)
    assert store.get("k") == 800
    assert store.record("k", 900, "m") == 900
    assert store.finish_run("k", 600, "m") == 900


def test_a_malformed_list_of_lower_peaks_sets_the_file_aside(tmp_path):
    path = tmp_path / "learned.json"
    path.write_text('{"k": {"bytes": 5, "lower": ["x"]}}')
    store = LearnedSizes(path)
    assert store.get("k") is None and store.problem is not None
