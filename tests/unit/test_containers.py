"""supervisor.containers: the config hash, our labels and container names."""

from __future__ import annotations

import dataclasses
import re

import pytest

from supervisor.containers import (
    LABEL_BACKEND,
    LABEL_CONFIG_HASH,
    LABEL_DEVICE,
    LABEL_MODEL,
    LABEL_OWNER,
    LABEL_PORT,
    BindMount,
    ContainerSpec,
    container_name,
)

DOCKER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")

BASE = ContainerSpec(
    name="localllm-localllmd-tiny-abc123",
    image="localllm/llama-server:0.3.36-cpu",
    command=("--model", "/models/tiny.gguf", "--port", "28100"),
    port=28100,
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


@pytest.mark.parametrize("changes", [
    {"image": "ghcr.io/ggml-org/llama.cpp:server-cuda"},
    {"command": ("--model", "/models/tiny.gguf", "--port", "28101")},
    {"command": ("--port", "28100", "--model", "/models/tiny.gguf")},
    {"mounts": (BindMount("/srv/models/other.gguf", "/models/tiny.gguf"),)},
    {"mounts": (BindMount("/srv/models/tiny.gguf", "/models/tiny.gguf", read_only=False),)},
    {"mounts": ()},
    {"environment": (("A", "1"),)},
    {"gpu_device_ids": ()},
    {"gpu_device_ids": ("0",)},
], ids=lambda c: next(iter(c)))
def test_config_hash_changes_with_what_shapes_the_container(changes):
    assert dataclasses.replace(BASE, **changes).config_hash() != BASE.config_hash()


def test_all_gpus_and_one_gpu_hash_differently():
    assert dataclasses.replace(BASE, gpu_device_ids=()).config_hash() != \
        dataclasses.replace(BASE, gpu_device_ids=("0",)).config_hash()


def test_a_gpu_by_uuid_and_by_index_hash_differently():
    # a container requested by index before GPUs were addressed by UUID is replaced, not adopted
    assert dataclasses.replace(BASE, gpu_device_ids=("GPU-5f3e",)).config_hash() != \
        dataclasses.replace(BASE, gpu_device_ids=("0",)).config_hash()


@pytest.mark.parametrize("changes", [
    {"name": "localllm-other-tiny-abc123"},
    {"owner": "other"},
    {"model": "tiny-renamed"},
    {"port": 28199},
    {"backend": "other"},
    {"extra_labels": (("team", "ops"), ("env", "prod"))},
    {"environment": (("B", "2"), ("A", "1"))},  # order of the environment does not matter
], ids=lambda c: next(iter(c)))
def test_config_hash_ignores_identity_and_labels(changes):
    assert dataclasses.replace(BASE, **changes).config_hash() == BASE.config_hash()


def test_labels():
    assert BASE.labels() == {
        "team": "ml",
        LABEL_OWNER: "localllmd",
        LABEL_MODEL: "tiny",
        LABEL_BACKEND: "llamacpp",
        LABEL_PORT: "28100",
        LABEL_DEVICE: "cpu",
        LABEL_CONFIG_HASH: BASE.config_hash(),
    }
    assert (LABEL_OWNER, LABEL_MODEL, LABEL_CONFIG_HASH, LABEL_PORT, LABEL_BACKEND) == (
        "io.localllm.owner", "io.localllm.model", "io.localllm.config-hash", "io.localllm.port", "io.localllm.backend")


def test_extra_labels_cannot_override_ours():
    spec = dataclasses.replace(BASE, extra_labels=((LABEL_OWNER, "intruder"), (LABEL_PORT, "1")))
    labels = spec.labels()
    assert (labels[LABEL_OWNER], labels[LABEL_PORT]) == ("localllmd", "28100")


@pytest.mark.parametrize("model, slug", [
    ("tiny", "tiny"),
    ("qwen2.5-7b", "qwen2.5-7b"),
    ("org/qwen:7b@q4", "org-qwen-7b-q4"),
    ("a/b", "a-b"),
    ("a:b", "a-b"),
    ("x" * 60, "x" * 40),
    ("Ünïcode", "n-code"),
    ("@@", "model"),
])
def test_container_name_is_docker_legal(model, slug):
    name = container_name("localllmd", model)
    assert DOCKER_NAME.match(name), name
    assert re.fullmatch(rf"localllm-localllmd-{re.escape(slug)}-[0-9a-f]{{6}}", name), name


def test_container_names_differ_for_names_that_slug_the_same():
    assert container_name("localllmd", "a/b") != container_name("localllmd", "a:b")
    assert container_name("localllmd", "a/b") == container_name("localllmd", "a/b")


def test_container_names_differ_by_owner():
    assert container_name("lab-1", "tiny") != container_name("lab-2", "tiny")
