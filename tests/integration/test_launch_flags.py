"""The flags a container of ours gets, on the real (CPU) llama-server.

Every flag that pins an assumption of the estimate must be one the server knows (an unknown flag
makes it exit), and a GPU command must fail fast on a server that has no CUDA device instead of
serving from the CPU with ``/health`` answering 200.
"""

from __future__ import annotations

import re

from supervisor.config.policy import ALWAYS_DENIED_FLAGS, DEFAULT_EXTRA_ARGS
from supervisor.config.profiles import load_profiles
from supervisor.config.settings import LLAMA_FLAGS_SET_BY_LOCALLLM, DaemonSettings, ModelEntry
from supervisor.core.backends import llamacpp
from supervisor.core.containers import Endpoint
from supervisor.core.placement import Device
from supervisor.runtime.images import LLAMA_CPP_PYTHON_VERSION, cache_root

from .conftest import RUN_ID, TEST_RUN_LABEL, poll_for

CPU_IMAGE = "localllm/llama-server:0.3.36-cpu"


def run_to_exit(engine, models_dir, command) -> tuple[int, str]:
    container = engine.containers.run(
        CPU_IMAGE,
        list(command),
        detach=True,
        network_mode="host",
        labels={TEST_RUN_LABEL: RUN_ID},
        volumes={str(models_dir / "tiny.gguf"): {"bind": "/models/tiny.gguf", "mode": "ro"}},
    )
    try:
        status = poll_for(lambda: container.reload() or container.status == "exited", 60, "llama-server to exit")
        assert status
        return container.attrs["State"]["ExitCode"], container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


def test_a_gpu_command_exits_on_a_server_without_cuda(engine, models_dir):
    # What the server-cuda image does when CUDA cannot start (no GPU injected, a driver too old):
    # its CUDA backend is not there, so CUDA0 is unknown and it exits, rather than serving on the CPU.
    gpu = load_profiles()["gpu-1x24g"]
    entry = ModelEntry(name="tiny", gguf=models_dir / "tiny.gguf", context_size=256)
    spec = llamacpp.container_spec(
        entry,
        gpu,
        DaemonSettings(),
        Endpoint(socket="0123456789abcdef"),
        Device(id="gpu0", budget=1 << 30, index=0, uuid="GPU-0"),
    )
    assert spec.command[-4:] == ("--n-gpu-layers", "999", "--device", "CUDA0")
    code, log = run_to_exit(engine, models_dir, spec.command)
    assert code != 0
    assert "invalid device: CUDA0" in log


def test_every_pinned_flag_is_known_to_the_server(engine, models_dir):
    # The GPU command without the device: --fit, --flash-attn, --no-kv-unified, -ub, the cache types,
    # and -ngl all parse (a CPU build only warns about -ngl); --help exits 0 once they all did.
    gpu = load_profiles()["gpu-1x24g"]
    entry = ModelEntry(name="tiny", gguf=models_dir / "tiny.gguf", context_size=256, gpu_layers=-1)
    launch = llamacpp.launch_settings(entry, gpu)
    flags = [*llamacpp.launch_flags(launch), *llamacpp.gpu_flags(launch)[:2]]
    assert flags[-2:] == ["--n-gpu-layers", "all"]
    code, log = run_to_exit(engine, models_dir, ["--model", "/models/tiny.gguf", *flags, "--help"])
    assert code == 0, log
    assert "error" not in log.lower().split("usage")[0]


def test_every_flag_the_config_and_the_policy_name_is_one_the_vendored_llama_server_knows():
    # The sources the test bed's image was built from (scripts/dev.sh setup unpacks them): a renamed flag
    # in a new llama.cpp would silently stop being refused or allowed.
    arg_cpp = (
        cache_root()
        / "llama-server"
        / LLAMA_CPP_PYTHON_VERSION
        / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        / "vendor"
        / "llama.cpp"
        / "common"
        / "arg.cpp"
    )
    assert arg_cpp.is_file(), f"{arg_cpp} is missing: run `bash scripts/dev.sh setup` (it builds the image from it)"
    known = set(re.findall(r'"(--?[A-Za-z][A-Za-z0-9.-]*)"', arg_cpp.read_text(encoding="utf-8", errors="replace")))
    assert set(ALWAYS_DENIED_FLAGS) - known == set()
    assert set(DEFAULT_EXTRA_ARGS) - known == set()
    assert set(LLAMA_FLAGS_SET_BY_LOCALLLM) - known == set()
    assert not set(DEFAULT_EXTRA_ARGS) & set(ALWAYS_DENIED_FLAGS)
