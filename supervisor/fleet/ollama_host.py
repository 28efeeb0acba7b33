"""The Ollama server container: started when an Ollama model needs it, replaced when its spec changes.

The fleet owns one ``OllamaHost``. Models come and go inside the server
through its API (``ollama_api``); the container itself is started, gated on
``/api/version``, adopted after a daemon crash and removed here only. One
server at a time: a change to the ``ollama:`` section replaces it, and the
rollout takes its models offline first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
from loguru import logger

from supervisor.config.profiles import Profile
from supervisor.config.settings import Config
from supervisor.core.backends import ollama
from supervisor.core.containers import ContainerSpec, Endpoint
from supervisor.core.errors import LocalllmError, ModelStartFailed
from supervisor.core.placement import Device
from supervisor.runtime.container_runtime import ContainerRuntime
from supervisor.runtime.health import wait_until_ready
from supervisor.runtime.ollama_api import OllamaApi


class OllamaHost:
    def __init__(
        self,
        runtime: ContainerRuntime,
        session: aiohttp.ClientSession,
        profile: Profile,
        new_socket: Callable[[str, tuple[int, int]], Endpoint],
        stop_grace: float,
        device_of: Callable[[Config, str], Device | None],
    ):
        self.runtime = runtime
        self.session = session
        self.profile = profile
        self.new_socket = new_socket  # (model, the server's uid and gid): a fresh socket endpoint
        self.stop_grace = stop_grace
        self.device_of = device_of  # the GPU the server sees for a config (ollama.device), None on the CPU
        self.spec: ContainerSpec | None = None
        self.container_id: str | None = None
        self._lock = asyncio.Lock()

    def api(self, model: str) -> OllamaApi:
        assert self.spec is not None, "the Ollama server is not running"
        return OllamaApi(self.session, self.spec.endpoint.url, model)

    async def ensure(self, config: Config, model: str) -> tuple[ContainerSpec, str]:
        """The running server for ``config``: the current one if its spec still matches and it runs, else a new one."""
        async with self._lock:
            if self.container_id is not None and self.spec is not None:
                wanted = self.server_spec(config, self.spec.endpoint, model)
                info = await self.runtime.inspect(self.container_id)
                if wanted.config_hash() == self.spec.config_hash() and info is not None and info.running:
                    return self.spec, self.container_id
                why = "its spec changed" if info is not None and info.running else "it is not running"
                logger.info("replacing the Ollama server {}: {}", self.container_id[:12], why)
                await self.discard()
            return await self._start(config, model)

    async def _start(self, config: Config, model: str) -> tuple[ContainerSpec, str]:
        try:
            Path(config.ollama_store).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelStartFailed(
                model, f"cannot create the Ollama store {config.ollama_store}: {exc.strerror or exc}"
            ) from None
        owner = store_owner(Path(config.ollama_store)) or (0, 0)  # the relay makes the socket as the server's user
        spec = self.server_spec(config, self.new_socket(model, owner), model)
        self.spec = spec
        try:
            self.container_id = (await self.runtime.run(spec)).id
        except BaseException:  # cancelled too: the runtime removed what it made
            self.spec = None
            raise
        logger.info("Ollama server {} started ({})", spec.name, spec.endpoint)
        try:
            await wait_until_ready(
                self.runtime,
                self.session,
                model=model,
                container_id=self.container_id,
                url=spec.endpoint.url + ollama.readiness_path,
                deadline=config.ollama.startup_timeout,
            )
        except BaseException as exc:
            if isinstance(exc, ModelStartFailed):
                exc.message = f"the Ollama server did not start: {exc.message}"
            await self._discard_quietly()
            raise
        return spec, self.container_id

    def server_spec(self, config: Config, endpoint: Endpoint, model: str = "ollama") -> ContainerSpec:
        """The server for ``config`` on ``endpoint``: on its GPU, as the owner of its store."""
        return ollama.server_spec(
            config, self.profile, endpoint, self.device_of(config, model), store_owner(Path(config.ollama_store))
        )

    def adopt(self, spec: ContainerSpec, container_id: str) -> None:
        self.spec, self.container_id = spec, container_id

    async def running(self) -> bool:
        if self.container_id is None:
            return False
        info = await self.runtime.inspect(self.container_id)
        return info is not None and info.running

    async def discard(self, grace: float | None = None) -> None:
        """Stop and remove the server; forgotten only once it is gone."""
        container_id = self.container_id
        if container_id is None:
            return
        await self.runtime.stop_and_remove(container_id, self.stop_grace if grace is None else grace)
        logger.info("Ollama server {} stopped and removed", container_id[:12])
        if self.spec is not None:
            await self.runtime.remove_networks(self.spec.owner)  # its network, once nothing uses it
        if self.container_id == container_id:
            self.spec, self.container_id = None, None

    async def _discard_quietly(self) -> None:
        try:
            await self.discard(0)
        except LocalllmError as exc:
            logger.error("could not remove the Ollama server ({}); the shutdown sweep removes it", exc.message)


def store_owner(store: Path) -> tuple[int, int] | None:
    """(uid, gid) of the store directory: the server runs as its owner, since with no capabilities even root
    cannot write into a 0700 directory of another user's. None while it does not exist yet."""
    try:
        info = store.stat()
    except OSError:
        return None
    return info.st_uid, info.st_gid
