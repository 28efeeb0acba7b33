"""A model whose output head is tied to its token embedding (Gemma 2/3, Llama 3.2 1B/3B, small Qwen2.5).

The file has no ``output.weight``; llama.cpp creates ``token_embd`` a second time as the head
(TENSOR_DUPLICATED) on the output layer's device. On a GPU that is a copy; on the CPU the same
mmap'd tensor. The estimate counts it on the GPU only, and ``localllmctl estimate`` shows it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from supervisor.cli.ctl import main
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import ModelEntry
from supervisor.core.backends.llamacpp import launch_settings
from supervisor.core.estimate import LaunchSettings, estimate
from supervisor.runtime.gguf_meta import read_gguf_facts
from supervisor.runtime.tinygguf import write_tiny_model

from .test_estimate import FACTS

TIED = replace(FACTS, output_bytes=200, tied_output_bytes=500)  # the head is token_embd's 500 bytes again


@pytest.mark.parametrize(
    "gpu_layers, weights",
    [
        (-1, 10_000 + 200 + 500),  # every layer, the output norm and the copied head
        (99, 10_000 + 200 + 500),
        (2, 4000 + 200 + 500),  # -ngl 2: the output layer and the last block
        (1, 200 + 500),  # -ngl 1: the output layer alone, head included
    ],
)
def test_the_copied_head_is_on_the_gpu_with_the_output_layer(gpu_layers, weights):
    got = estimate(TIED, LaunchSettings(context=1024, gpu_layers=gpu_layers, on_gpu=True))
    assert (got.weights, got.output_head) == (weights, 500)
    assert got.as_dict()["output_head"] == 500


def test_no_output_layer_on_the_gpu_no_copy():
    got = estimate(TIED, LaunchSettings(context=1024, gpu_layers=0, on_gpu=True))
    assert (got.weights, got.output_head) == (0, 0)


def test_on_the_cpu_the_copy_is_an_alias_and_costs_nothing():
    got = estimate(TIED, LaunchSettings(context=1024))
    assert (got.weights, got.output_head) == (10_000 + 500 + 200, 0)  # each tensor of the file once


def test_an_untied_model_has_no_copy():
    got = estimate(FACTS, LaunchSettings(context=1024, on_gpu=True))
    assert (got.weights, got.output_head) == (10_000 + 700, 0)


@pytest.fixture
def tied(tmp_path):
    return write_tiny_model(tmp_path / "tied.gguf", tied_embeddings=True, extra_vocab=1000)


def test_a_generated_tied_model_carries_its_head_onto_the_gpu(tied):
    facts = read_gguf_facts(tied)
    entry = ModelEntry(name="tied", gguf=tied)
    gpu = estimate(facts, launch_settings(entry, load_profiles()["gpu-1x24g"]))
    cpu = estimate(facts, launch_settings(entry, load_profiles()["cpu-only"]))
    embedding = 1311 * 64 * 4  # vocabulary 311 + 1000, embedding 64, f32
    assert facts.tied_output_bytes == embedding
    assert gpu.output_head == embedding
    assert gpu.weights == sum(facts.layer_bytes) + facts.output_bytes + embedding
    assert cpu.weights == facts.weight_bytes and cpu.output_head == 0


def test_localllmctl_estimate_shows_the_copied_head_in_the_gpu_weights(tied, capsys):
    assert main(["estimate", str(tied), "--profile", "gpu-1x24g"]) == 0
    lines = capsys.readouterr().out.splitlines()
    weights = next(i for i, line in enumerate(lines) if line.split()[0] == "weights")
    head = lines[weights + 1].split()
    assert head[:3] == ["head", f"{1311 * 64 * 4 / 2**20:.1f}", "MiB"]
    assert "copy of the tied token embedding" in lines[weights + 1]
    assert "flash attention on" in lines[1]


def test_localllmctl_estimate_json_has_the_head_and_the_new_settings(tied, capsys):
    assert main(["estimate", str(tied), "--profile", "gpu-1x24g", "--flash-attn", "off", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["output_head"] == 1311 * 64 * 4
    assert (shown["launch"]["flash_attention"], shown["launch"]["kv_unified"]) == (False, False)


def test_localllmctl_estimate_of_an_untied_model_shows_no_head_line(tmp_path, capsys):
    assert main(["estimate", str(write_tiny_model(tmp_path / "m.gguf")), "--profile", "gpu-1x24g"]) == 0
    assert not any(line.split()[0] == "head" for line in capsys.readouterr().out.splitlines()[2:])
