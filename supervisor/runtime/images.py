"""Building the CPU llama-server image from the pinned llama-cpp-python sdist.

No registry is needed: the sdist (from PyPI) vendors llama.cpp, we build only
the ``llama-server`` target, and pack the binary with exactly the shared
libraries ``ldd`` lists into a ``FROM scratch`` image. The compiled binary is
cached outside any checkout, keyed by version, so a rebuild of the image
takes seconds. Used by ``localllmctl image build``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.runtime.docker_runtime import DockerRuntime

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]


def cpu_image_tag(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    return f"localllm/llama-server:{version}-cpu"


def how_to_get(image: str) -> str:
    """What an operator should do when ``image`` is missing."""
    if image.startswith("localllm/llama-server:"):
        version = image.split(":", 1)[1].removesuffix("-cpu")
        return f"build it with: localllmctl image build --version {version}"
    return f"pull it with: docker pull {image}"


def cache_root() -> Path:
    env = os.environ.get("LOCALLLM_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "localllm"


def server_binary(version: str) -> Path:
    return cache_root() / "llama-server" / version / "build" / "bin" / "llama-server"


async def build_cpu_image(runtime: DockerRuntime, version: str, say: Callable[[str], None]) -> str:
    """Ensure the CPU image exists; build the binary only if it is not cached."""
    tag = cpu_image_tag(version)
    if await runtime.image_exists(tag):
        say(f"image {tag} already present")
        return tag
    binary = server_binary(version)
    if binary.is_file():
        say(f"using cached llama-server binary {binary}")
    else:
        compile_server(version, say)
    with tempfile.TemporaryDirectory(prefix="localllm-image-") as context:
        write_image_context(binary, Path(context))
        say(f"building image {tag} from {binary}")
        await runtime.build_image(Path(context), tag)
    say(f"image {tag} ready")
    return tag


def compile_server(version: str, say: Callable[[str], None]) -> Path:
    """Download the sdist and build the ``llama-server`` target (minutes on a small machine)."""
    root = cache_root() / "llama-server" / version
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        say(f"downloading llama-cpp-python {version} sdist from PyPI")
        _check_call(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(root),
            ],
            root / "download.log",
        )
    source = root / f"llama_cpp_python-{version}"
    if not source.is_dir():
        say("unpacking the sdist")
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
    llama_cpp = source / "vendor" / "llama.cpp"
    build = root / "build"
    log = root / "build.log"
    say(f"configuring llama.cpp (log: {log})")
    _check_call(["cmake", "-S", str(llama_cpp), "-B", str(build), *CMAKE_FLAGS], log)
    say("compiling llama-server (about 7 minutes on 2 cores)")
    _check_call(["cmake", "--build", str(build), "--target", "llama-server", f"-j{os.cpu_count() or 2}"], log)
    return server_binary(version)


def write_image_context(binary: Path, context: Path) -> None:
    """A ``FROM scratch`` context: the binary plus exactly the libraries ldd lists."""
    rootfs = context / "rootfs"
    rootfs.mkdir()
    shutil.copy2(binary, rootfs / "llama-server")
    for library in shared_libraries(binary):
        target = rootfs / library.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, target)  # follows symlinks: the real file under the linked name
    (context / "Dockerfile").write_text('FROM scratch\nCOPY rootfs/ /\nENTRYPOINT ["/llama-server"]\n')


def shared_libraries(binary: Path) -> list[Path]:
    output = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return parse_ldd(output)


def parse_ldd(output: str) -> list[Path]:
    """Library paths from ``ldd`` output (the vdso has none)."""
    paths = []
    for line in output.splitlines():
        words = line.split()
        if "=>" in words:
            after = words[words.index("=>") + 1]
            if after == "not":
                raise RuntimeError(f"ldd cannot find {words[0]}, which llama-server needs: install it first")
            if after.startswith("/"):
                paths.append(Path(after))
        elif words and words[0].startswith("/"):
            paths.append(Path(words[0]))
    return paths


def _check_call(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {done.returncode}); see {log}:\n{tail}")
