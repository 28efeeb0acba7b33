"""supervisor.runtime.images: pure pieces of the CPU image build."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.runtime.images import (
    LLAMA_CPP_PYTHON_VERSION,
    cpu_image_tag,
    how_to_get,
    parse_ldd,
)


def test_parse_recorded_ldd_output(fixture_text):
    assert parse_ldd(fixture_text("ldd-llama-server.txt")) == [
        Path("/lib/x86_64-linux-gnu/libstdc++.so.6"),
        Path("/lib/x86_64-linux-gnu/libm.so.6"),
        Path("/lib/x86_64-linux-gnu/libgomp.so.1"),
        Path("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
        Path("/lib/x86_64-linux-gnu/libc.so.6"),
        Path("/lib64/ld-linux-x86-64.so.2"),
    ]


@pytest.mark.parametrize(
    "line, paths",
    [
        ("\tlinux-vdso.so.1 (0x00007ffc3b5f1000)", []),
        ("\tlinux-vdso.so.1 =>  (0x00007ffc3b5f1000)", []),
        ("\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2a1c61f000)", ["/lib/x86_64-linux-gnu/libc.so.6"]),
        ("\t/lib64/ld-linux-x86-64.so.2 (0x00007f2a1cc2e000)", ["/lib64/ld-linux-x86-64.so.2"]),
        ("\tnot a dynamic executable", []),
        ("\tstatically linked", []),
        ("", []),
    ],
)
def test_parse_ldd_lines(line, paths):
    assert parse_ldd(line) == [Path(p) for p in paths]


def test_cpu_image_tag():
    assert LLAMA_CPP_PYTHON_VERSION == "0.3.36"
    assert cpu_image_tag() == "localllm/llama-server:0.3.36-cpu"
    assert cpu_image_tag("0.3.2") == "localllm/llama-server:0.3.2-cpu"


@pytest.mark.parametrize(
    "image, advice",
    [
        ("localllm/llama-server:0.3.36-cpu", "build it with: localllmctl image build --version 0.3.36"),
        ("localllm/llama-server:0.3.2-cpu", "build it with: localllmctl image build --version 0.3.2"),
        ("ghcr.io/ggml-org/llama.cpp:server-cuda", "pull it with: docker pull ghcr.io/ggml-org/llama.cpp:server-cuda"),
        ("ollama/ollama", "pull it with: docker pull ollama/ollama"),
        ("localllm/other:1.0", "pull it with: docker pull localllm/other:1.0"),
    ],
)
def test_how_to_get(image, advice):
    assert how_to_get(image) == advice


def test_how_to_get_round_trips_the_built_tag():
    assert how_to_get(cpu_image_tag("9.9.9")).endswith("--version 9.9.9")


def test_parse_ldd_refuses_a_missing_library():
    output = "\tlibgomp.so.1 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n"
    with pytest.raises(RuntimeError, match="ldd cannot find libgomp.so.1"):
        parse_ldd(output)
