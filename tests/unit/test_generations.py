"""supervisor.state.generations: the pure change plan, secrets kept apart, and the on-disk generation store."""

from __future__ import annotations

import json
import os
import stat
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.state.generations import (
    KEEP,
    NOT_STORED,
    ChangePlan,
    GenerationStatus,
    GenerationStore,
    StateWriteFailed,
    plan_change,
    restore_secrets,
    split_secrets,
)


@pytest.mark.parametrize(
    "running, wanted, old, expected",
    [
        (
            {"a": "h1", "b": "h2", "c": "h3"},
            {"a": "h1", "b": "h9", "d": "", "e": ""},
            {"a", "b", "c", "e"},
            (("a",), ("b",), ("c",), ("d",), ("e",)),
        ),
        ({}, {}, set(), ((), (), (), (), ())),
        ({}, {"z": "1", "y": "2"}, set(), ((), (), (), ("y", "z"), ())),
        ({"z": "1", "y": "2"}, {}, {"y", "z"}, ((), (), ("y", "z"), (), ())),
        ({"b": "1", "a": "1"}, {"a": "1", "b": "1"}, {"a", "b"}, (("a", "b"), (), (), (), ())),
        ({"b": "1", "a": "1"}, {"a": "2", "b": "3"}, {"a", "b"}, ((), ("a", "b"), (), (), ())),
        ({}, {"a": "1", "b": "1"}, {"b", "a"}, ((), (), (), (), ("a", "b"))),
    ],
)
def test_plan_change(running, wanted, old, expected):
    plan = plan_change(running, wanted, old)
    assert (plan.keep, plan.replace, plan.remove, plan.add, plan.update) == expected
    assert plan == ChangePlan(*expected)


@pytest.mark.parametrize(
    "replace, remove, keep, add, update, changes",
    [
        ((), (), (), (), (), False),
        ((), (), ("k",), ("a",), ("u",), False),
        (("r",), (), (), (), (), True),
        ((), ("x",), (), (), (), True),
        (("r",), ("x",), ("k",), (), (), True),
    ],
)
def test_changes_containers(replace, remove, keep, add, update, changes):
    assert ChangePlan(keep, replace, remove, add, update).changes_containers is changes


def yaml_names(directory):
    return sorted(p.name for p in directory.glob("*.yaml"))


def test_record_mark_and_reload(tmp_path):
    d = tmp_path / "generations"
    store = GenerationStore(d)
    assert (store.generations, store.active, store.last_good, store.problem) == ([], None, None, None)
    g1 = store.record("models: {}\n", "startup: /etc/x.yaml", {"a": "h1"})
    assert (g1.number, g1.status, g1.source, g1.hashes, g1.reason) == (
        1,
        "pending",
        "startup: /etc/x.yaml",
        {"a": "h1"},
        "",
    )
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
        (1, "good", "", True, True),
        (2, "failed", "boom", False, False),
    ]
    assert again.record("third\n", "rollback to 1", {}).number == 3


def test_generation_statuses_are_the_strings_history_has_always_shown():
    assert [str(status) for status in GenerationStatus] == ["pending", "good", "failed", "invalid"]
    assert GenerationStatus.GOOD == "good" and json.dumps(GenerationStatus.FAILED) == '"failed"'


def test_statuses_are_stored_and_read_back_as_the_same_json(tmp_path):
    d = tmp_path / "generations"
    store = GenerationStore(d)
    store.record("a\n", "startup", {})
    store.mark(1, GenerationStatus.GOOD)
    store.record("b\n", "sighup", {})
    store.mark(2, GenerationStatus.INVALID, "bad")
    index = json.loads((d / "index.json").read_text())
    assert [g["status"] for g in index["generations"]] == ["good", "invalid"]
    again = GenerationStore(d)
    assert [g.status for g in again.generations] == [GenerationStatus.GOOD, GenerationStatus.INVALID]
    assert all(type(g.status) is GenerationStatus for g in again.generations)
    assert json.dumps(again.as_list()) == json.dumps(store.as_list())


def test_a_misspelt_status_is_refused_and_changes_nothing(tmp_path):
    store = GenerationStore(tmp_path / "generations")
    store.record("a\n", "startup", {})
    with pytest.raises(ValueError):
        store.mark(1, "godo")
    assert (store.get(1).status, store.active) == (GenerationStatus.PENDING, None)


def test_a_status_another_version_wrote_is_kept_as_written(tmp_path):
    d = tmp_path / "generations"
    d.mkdir()
    (d / "index.json").write_text(
        json.dumps(
            {
                "active": None,
                "last_good": None,
                "generations": [{"number": 1, "created_at": 0.0, "source": "x", "status": "superseded"}],
            }
        )
    )
    store = GenerationStore(d)
    assert store.problem is None and store.get(1).status == "superseded"


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


@pytest.mark.parametrize(
    "garbage",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b"null",
        b'"text"',
        b"{}",
        b'{"generations": 5}',
        b'{"generations": [1]}',
        b'{"generations": [{"number": 1}]}',
        b'{"generations": [{"bogus": 1}]}',
    ],
)
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


SECRET_CONFIG = """\
# the daemon's config
daemon:
  instance: x  # comments stay
  api_keys: [key-one-0123456789, "key-two-0123456789"]
  control_token: admin-token-0123456789abcdef0123456789
  control_tokens:
    - {token: viewer-token-0123456789abcdef0123456789, role: viewer}
    - token: 'operator-token-0123456789abcdef01234567'
      role: operator
models: []
"""
SECRETS = [
    "key-one-0123456789",
    "key-two-0123456789",
    "admin-token-0123456789abcdef0123456789",
    "viewer-token-0123456789abcdef0123456789",
    "operator-token-0123456789abcdef01234567",
]


def files_under(directory):
    return {str(p.relative_to(directory)): p for p in directory.rglob("*") if p.is_file()}


def test_stored_generations_hold_no_secret_and_are_the_daemons_alone_whatever_the_umask(tmp_path):
    old = os.umask(0o022)  # a shell's usual umask would leave them world-readable
    try:
        store = GenerationStore(tmp_path / "generations")
        store.record(SECRET_CONFIG, "startup", {})
        store.record("daemon:\n  api_keys: [secret-key-0123456789]\n", "apply", {})
        store.record("models: []\n", "apply", {})  # nothing secret: no secrets file
    finally:
        os.umask(old)
    directory = tmp_path / "generations"
    files = files_under(directory)
    assert {name: stat.S_IMODE(p.stat().st_mode) for name, p in files.items()} == {
        "000001.yaml": 0o600,
        "000002.yaml": 0o600,
        "000003.yaml": 0o600,
        "index.json": 0o600,
        "secrets/000001.json": 0o600,
        "secrets/000002.json": 0o600,
    }
    assert stat.S_IMODE((directory / "secrets").stat().st_mode) == 0o700
    for name in ("000001.yaml", "000002.yaml", "000003.yaml", "index.json"):
        text = files[name].read_text()
        assert not [secret for secret in [*SECRETS, "secret-key-0123456789"] if secret in text], name
    assert store.text_of(1) == SECRET_CONFIG.replace("key-one-0123456789", '"<redacted>"').replace(
        '"key-two-0123456789"', '"<redacted>"'
    ).replace("admin-token-0123456789abcdef0123456789", '"<redacted>"').replace(
        "viewer-token-0123456789abcdef0123456789", '"<redacted>"'
    ).replace("'operator-token-0123456789abcdef01234567'", '"<redacted>"')
    again = GenerationStore(directory)
    assert [again.config_text(n) for n in (1, 2, 3)] == [
        SECRET_CONFIG,
        "daemon:\n  api_keys: [secret-key-0123456789]\n",
        "models: []\n",
    ]
    assert [g["secrets"] for g in again.as_list()] == [True, True, False]


def test_a_generations_secrets_go_with_it(tmp_path):
    store = GenerationStore(tmp_path)
    for n in range(1, KEEP + 3):
        store.record(f"daemon:\n  api_keys: [key-{n:04d}-abcdef]\n", "s", {})
        store.mark(n, "good" if n == 1 else "failed")
    kept = [g.number for g in store.generations]
    assert sorted(p.name for p in (tmp_path / "secrets").iterdir()) == [f"{n:06d}.json" for n in kept]
    assert store.config_text(1) == "daemon:\n  api_keys: [key-0001-abcdef]\n"


def test_a_failed_record_leaves_no_secrets_behind(tmp_path):
    store = GenerationStore(tmp_path)
    (tmp_path / "index.json").mkdir()
    with pytest.raises(StateWriteFailed):
        store.record(SECRET_CONFIG, "s", {})
    assert (store.generations, list((tmp_path / "secrets").iterdir()), yaml_names(tmp_path)) == ([], [], [])


def test_missing_or_foreign_secrets_are_an_error_not_a_config_without_them(tmp_path):
    store = GenerationStore(tmp_path)
    store.record(SECRET_CONFIG, "s", {})
    (tmp_path / "secrets" / "000001.json").write_text(json.dumps({"daemon.api_keys[0]": "x"}))
    with pytest.raises(ValueError, match="the stored secrets do not fit the stored text"):
        store.config_text(1)
    (tmp_path / "secrets" / "000001.json").unlink()
    with pytest.raises(FileNotFoundError):
        store.config_text(1)


def test_generations_stored_whole_by_an_older_version_have_their_secrets_moved_out(tmp_path):
    (tmp_path / "000001.yaml").write_text(SECRET_CONFIG)
    (tmp_path / "000002.yaml").write_text("models: []\n")
    (tmp_path / "000007.yaml").write_text(SECRET_CONFIG)  # left from an index set aside
    index = {
        "active": 1,
        "last_good": 1,
        "generations": [
            {"number": n, "created_at": 1.0, "source": "s", "status": "good", "hashes": {}, "reason": ""}
            for n in (1, 2)
        ],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    store = GenerationStore(tmp_path)
    assert store.move_secrets_out() == [1, 7]
    assert store.move_secrets_out() == []
    for name, path in files_under(tmp_path).items():
        assert not [s for s in SECRETS if s in path.read_text()] or name.startswith("secrets/"), name
    assert GenerationStore(tmp_path).config_text(1) == SECRET_CONFIG


@pytest.mark.parametrize(
    "text",
    [
        SECRET_CONFIG,
        "daemon:\n  labels: {k: &t anchored-secret-123}\n  control_token: *t\n",  # the anchor is where the value is
        "base: &b\n  api_keys: [merged-secret-123]\ndaemon:\n  <<: *b\n  instance: x\n",
        "daemon:\n  api_keys:\n    - |\n      block-secret-123\n    - >-\n      folded-secret-123\n  instance: x\n",
        'daemon: {api_keys: [flow-secret-123], control_token: "quoted-secret-123"}\n',
        "daemon:\n  api_keys: [dup-one-secret-123]\n  api_keys: [dup-two-secret-123]\n",  # invalid, but recorded
        "daemon:\n  api_keys: !!binary c2VjcmV0LWJ5dGVz\n",
    ],
)
def test_split_and_restore_give_back_the_text_and_leave_no_secret(text):
    redacted, secrets = split_secrets(text)
    assert secrets
    assert not [v for v in secrets.values() if v.strip("'\"") in redacted]
    assert "secret-123" not in redacted and "c2VjcmV0LWJ5dGVz" not in redacted
    back = restore_secrets(redacted, secrets)
    assert yaml.safe_load(back) == yaml.safe_load(text)
    assert back == text or "dup-one" in text  # exact, but for duplicate keys (dumped without comments)


@pytest.mark.parametrize(
    "text, stored",
    [
        ("models: []\n", "models: []\n"),
        ("second\n", "second\n"),
        ("daemon:\n  control_token:\n", None),
        ("daemon:\n  api_keys: []\n  instance: x\n", None),
        ("daemon: [\n  api_keys: [half-a-secret-123\n", NOT_STORED),  # not YAML: nothing of it is kept
    ],
)
def test_texts_without_secrets_are_stored_as_they_are(text, stored):
    assert split_secrets(text) == (stored or text, {})


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(
        st.text(alphabet=string.ascii_letters + string.digits + "-_.~+/=", min_size=8, max_size=40), max_size=4
    ),
    token=st.one_of(st.none(), st.text(alphabet=string.printable.strip(), min_size=32, max_size=64)),
    style=st.sampled_from([False, True, None]),
)
def test_any_secrets_in_any_style_round_trip(keys, token, style):
    keys = [f"k3y{key}" for key in keys]
    daemon = {
        "instance": "x",
        "api_keys": keys,
        "control_tokens": [{"token": token, "role": "viewer"}] if token else [],
    }
    text = "# header\n" + yaml.safe_dump({"daemon": daemon, "models": []}, default_flow_style=style)
    redacted, secrets = split_secrets(text)
    assert restore_secrets(redacted, secrets) == text
    assert not [key for key in keys if key in redacted]
    assert token is None or token not in redacted or token in "# header"


def test_the_unit_sets_a_private_umask_and_a_memory_ceiling():
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "localllm.service").read_text()
    assert "\nUMask=0077\n" in unit and "\nMemoryMax=" in unit


def test_a_generation_remembers_the_file_it_was_read_from(tmp_path):
    store = GenerationStore(tmp_path / "generations")
    store.record("models: []\n", "apply", {}, tmp_path / "etc" / ".." / "config.yaml")
    store.record("models: []\n", "sighup", {})
    assert [g.path for g in GenerationStore(tmp_path / "generations").generations] == [
        str(tmp_path / "config.yaml"),
        "",
    ]
