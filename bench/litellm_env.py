"""LiteLLM's proxy for the overhead benchmark: its own venv outside the clone, one config, one process.

The venv lives in ``${LOCALLLM_CACHE:-~/.cache/localllm}/litellm-venv`` and is
reused when it already holds the pinned version. LiteLLM runs as its docs show
it (``litellm --config ... --port P --host 127.0.0.1 --num_workers 1``) with no
database, no callbacks and no master key, so that it does what localllm does
for an unauthenticated request: route by model and forward.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.runtime.images import cache_root  # noqa: E402

# The newest release whose ``[proxy]`` extra installs from PyPI: 1.109 and later ask for a
# ``litellm-proxy`` distribution that PyPI does not serve.
LITELLM_VERSION = "1.108.7"

# Quiet, offline, no database: the model cost map comes from the package (not fetched),
# logs at ERROR, and no master key (LiteLLM refuses that unless told it is deliberate).
QUIET_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    "LITELLM_TELEMETRY": "False",
}
UNSET_ENV = ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL", "STORE_MODEL_IN_DB")


def venv_dir() -> Path:
    return cache_root() / "litellm-venv"


def installed_version(venv: Path | None = None) -> str | None:
    """The litellm version in the venv, or None when there is none."""
    python = (venv or venv_dir()) / "bin" / "python"
    if not python.is_file() or not (python.parent / "litellm").is_file():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def ensure_installed(say=print) -> Path:
    """The venv with ``litellm[proxy]==LITELLM_VERSION``, created or upgraded only when needed."""
    venv = venv_dir()
    if installed_version(venv) == LITELLM_VERSION:
        return venv
    say(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once)")
    if not (venv / "bin" / "python").is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
        check=True,
        timeout=1800,
    )
    if installed_version(venv) != LITELLM_VERSION:
        raise RuntimeError(f"litellm {LITELLM_VERSION} did not install into {venv}")
    return venv


def package_versions(
    venv: Path,
    names: tuple[str, ...] = ("litellm", "uvicorn", "uvloop", "httptools", "fastapi", "httpx", "aiohttp", "openai"),
) -> dict[str, str | None]:
    """Versions of the packages that shape LiteLLM's request path (None: not installed)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *names], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


def config(model: str, upstream: str) -> dict:
    """One ``model_list`` entry whose ``litellm_params`` point at the llama-server at ``upstream`` (no /v1)."""
    return {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": f"{upstream}/v1", "api_key": "none"},
            }
        ],
        "litellm_settings": {"telemetry": False},
    }


class LiteLLMProxy:
    """``litellm --config`` on 127.0.0.1:``port``; ``url`` is its root. Stop it with ``stop()``."""

    def __init__(self, workdir: Path, venv: Path, model: str, upstream: str, port: int):
        self.config_path = workdir / "litellm-config.yaml"
        self.config_path.write_text(yaml.safe_dump(config(model, upstream)))
        self.log_path = workdir / "litellm.log"
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            str(venv / "bin" / "litellm"),
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--telemetry",
            "False",
        ]
        env = {k: v for k, v in os.environ.items() if k not in UNSET_ENV}
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env={**env, **QUIET_ENV}, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds until ``/health/readiness`` answers 200."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"litellm exited ({self.process.returncode}): {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health/readiness", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"litellm not ready within {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to its process group (uvicorn and anything it spawned), SIGKILL after 20 s."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
