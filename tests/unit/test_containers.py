"""supervisor.core.containers: the config hash, our labels and container names."""

from __future__ import annotations

import dataclasses
import re

import pytest

from supervisor.core.containers import (
    LABEL_BACKEND,
    LABEL_CONFIG_HASH,
    LABEL_DEVICE,
    LABEL_ENDPOINT,
    LABEL_MODEL,
    LABEL_OWNER,
    BindMount,
    Confinement,
    ContainerSpec,
    Endpoint,
    container_name,
    memory_limit_for,
    readable_by,
)


def changed_fields(confinement: Confinement | None) -> list[str]:
    if confinement is None:
        return []
    return [
        f.name
        for f in dataclasses.fields(Confinement)
        if getattr(confinement, f.name) != getattr(Confinement(), f.name)
    ]


DOCKER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")

BASE = ContainerSpec(
    name="localllm-localllmd-tiny-abc123",
    image="localllm/llama-server:0.3.36-cpu",
    command=("--model", "/models/tiny.gguf", "--host", "/run/llama/llama.sock"),
    endpoint=Endpoint(socket="0123456789abcdef"),
    model="tiny",
    backend="llamacpp",
    owner="localllmd",
    mounts=(BindMount("/srv/models/tiny.gguf", "/models/tiny.gguf"),),
    environment=(("A", "1"), ("B", "2")),
    gpu_device_ids=None,
    extra_labels=(("team", "ml"),),
)


def test_config_hash_is_stable_for_equal_specs():
    twin = dataclasses.replace(BASE)
    assert twin is not BASE
    assert twin.config_hash() == BASE.config_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", BASE.config_hash())


@pytest.mark.parametrize(
    "changes",
    [
        {"image": "ghcr.io/ggml-org/llama.cpp:server-cuda"},
        {"command": ("--model", "/models/tiny.gguf", "--host", "/run/llama/other.sock")},
        {"command": ("--host", "/run/llama/llama.sock", "--model", "/models/tiny.gguf")},
        {"mounts": (BindMount("/srv/models/other.gguf", "/models/tiny.gguf"),)},
        {"mounts": (BindMount("/srv/models/tiny.gguf", "/models/tiny.gguf", read_only=False),)},
        {"mounts": ()},
        {"environment": (("A", "1"),)},
        {"gpu_device_ids": ()},
        {"gpu_device_ids": ("0",)},
        {"confinement": Confinement(user="65534:65534")},
        {"confinement": Confinement(pids_limit=256)},
        {"confinement": Confinement(memory_limit=1 << 30)},
        {"confinement": Confinement(tmpfs=(("/tmp", "size=64m"),))},
        {"confinement": Confinement(read_only_root=False)},
        {"confinement": Confinement(cap_drop=())},
        {"confinement": Confinement(security_opt=())},
        {"network": "host"},
    ],
    ids=lambda c: "-".join([next(iter(c)), *changed_fields(c.get("confinement"))]),
)
def test_config_hash_changes_with_what_shapes_the_container(changes):
    assert dataclasses.replace(BASE, **changes).config_hash() != BASE.config_hash()


def test_all_gpus_and_one_gpu_hash_differently():
    assert (
        dataclasses.replace(BASE, gpu_device_ids=()).config_hash()
        != dataclasses.replace(BASE, gpu_device_ids=("0",)).config_hash()
    )


def test_a_gpu_by_uuid_and_by_index_hash_differently():
    # a container requested by index before GPUs were addressed by UUID is replaced, not adopted
    assert (
        dataclasses.replace(BASE, gpu_device_ids=("GPU-5f3e",)).config_hash()
        != dataclasses.replace(BASE, gpu_device_ids=("0",)).config_hash()
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "localllm-other-tiny-abc123"},
        {"owner": "other"},
        {"model": "tiny-renamed"},
        {"endpoint": Endpoint(socket="fedcba9876543210")},  # its directory is in the mounts, which count
        {"backend": "other"},
        {"extra_labels": (("team", "ops"), ("env", "prod"))},
        {"environment": (("B", "2"), ("A", "1"))},  # order of the environment does not matter
    ],
    ids=lambda c: next(iter(c)),
)
def test_config_hash_ignores_identity_and_labels(changes):
    assert dataclasses.replace(BASE, **changes).config_hash() == BASE.config_hash()


def test_labels():
    assert BASE.labels() == {
        "team": "ml",
        LABEL_OWNER: "localllmd",
        LABEL_MODEL: "tiny",
        LABEL_BACKEND: "llamacpp",
        LABEL_ENDPOINT: "unix:0123456789abcdef",
        LABEL_DEVICE: "cpu",
        LABEL_CONFIG_HASH: BASE.config_hash(),
    }
    assert (LABEL_OWNER, LABEL_MODEL, LABEL_CONFIG_HASH, LABEL_ENDPOINT, LABEL_BACKEND) == (
        "io.localllm.owner",
        "io.localllm.model",
        "io.localllm.config-hash",
        "io.localllm.endpoint",
        "io.localllm.backend",
    )


def test_extra_labels_cannot_override_ours():
    spec = dataclasses.replace(BASE, extra_labels=((LABEL_OWNER, "intruder"), (LABEL_ENDPOINT, "tcp:1")))
    labels = spec.labels()
    assert (labels[LABEL_OWNER], labels[LABEL_ENDPOINT]) == ("localllmd", "unix:0123456789abcdef")


@pytest.mark.parametrize(
    "endpoint, label, url",
    [
        (Endpoint(socket="0123456789abcdef"), "unix:0123456789abcdef", "http://0123456789abcdef.sock.localllm"),
        (Endpoint(port=28100), "tcp:28100", "http://127.0.0.1:28100"),
    ],
    ids=["socket", "port"],
)
def test_an_endpoint_reads_back_from_its_label_and_has_its_url(endpoint, label, url):
    assert (endpoint.label(), endpoint.url, Endpoint.from_label(label)) == (label, url, endpoint)


@pytest.mark.parametrize(
    "label", ["", "tcp:", "tcp:x", "unix:", "unix:../../etc", "unix:ABCDEF0123456789", "udp:53", "28100"]
)
def test_an_unreadable_endpoint_label_is_a_value_error(label):
    with pytest.raises(ValueError):
        Endpoint.from_label(label)


@pytest.mark.parametrize("fields", [{}, {"socket": "0123456789abcdef", "port": 1}])
def test_an_endpoint_is_a_socket_or_a_port(fields):
    with pytest.raises(ValueError, match="a socket or a port"):
        Endpoint(**fields)


@pytest.mark.parametrize(
    "model, slug",
    [
        ("tiny", "tiny"),
        ("qwen2.5-7b", "qwen2.5-7b"),
        ("org/qwen:7b@q4", "org-qwen-7b-q4"),
        ("a/b", "a-b"),
        ("a:b", "a-b"),
        ("x" * 60, "x" * 40),
        ("Ünïcode", "n-code"),
        ("@@", "model"),
    ],
)
def test_container_name_is_docker_legal(model, slug):
    name = container_name("localllmd", model)
    assert DOCKER_NAME.match(name), name
    assert re.fullmatch(rf"localllm-localllmd-{re.escape(slug)}-[0-9a-f]{{6}}", name), name


def test_container_names_differ_for_names_that_slug_the_same():
    assert container_name("localllmd", "a/b") != container_name("localllmd", "a:b")
    assert container_name("localllmd", "a/b") == container_name("localllmd", "a/b")


def test_container_names_differ_by_owner():
    assert container_name("lab-1", "tiny") != container_name("lab-2", "tiny")


def test_every_container_is_confined_unless_its_backend_says_otherwise():
    # what a backend does not name still holds: no capabilities, no privilege gain, a read-only root
    assert BASE.confinement == Confinement()
    assert (BASE.confinement.cap_drop, BASE.confinement.security_opt, BASE.confinement.read_only_root) == (
        ("ALL",),
        ("no-new-privileges",),
        True,
    )


def test_a_container_made_before_confinement_is_not_adopted():
    # the hash of an unconfined container differs, so an upgrade recreates what ran with full privileges
    unconfined = dataclasses.replace(BASE, confinement=Confinement(cap_drop=(), security_opt=(), read_only_root=False))
    assert unconfined.config_hash() != BASE.config_hash()


@pytest.mark.parametrize(
    "need, limit",
    [
        (0, 256 << 20),
        (1 << 30, (1 << 30) + (256 << 20) + (256 << 20)),
        (4 << 30, 5 * (1 << 30) + (256 << 20)),
    ],
)
def test_memory_limit_is_the_need_a_quarter_more_and_256_mib(need, limit):
    assert memory_limit_for(need) == limit


@pytest.mark.parametrize(
    "mode, owner, readable",
    [
        (0o644, (0, 0), True),  # the usual model file
        (0o640, (0, 0), False),  # group root: not nobody's
        (0o600, (0, 0), False),
        (0o604, (0, 0), True),
        (0o400, (65534, 0), True),  # its own
        (0o044, (65534, 0), False),  # its own, without the owner's bit: the others' bit does not count
        (0o040, (1000, 65534), True),  # its group
        (0o004, (1000, 65534), False),  # its group, without the group's bit
    ],
)
def test_readable_by_follows_the_permission_bits(mode, owner, readable):
    assert readable_by("65534:65534", mode, *owner) is readable


def test_readable_by_a_user_without_a_group_uses_the_uid_as_gid():
    assert readable_by("1000", 0o040, 0, 1000)
