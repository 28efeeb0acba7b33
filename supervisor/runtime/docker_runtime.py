"""The one module that talks to Docker.

Every call into the blocking Docker SDK runs on this module's own thread pool,
so the event loop never waits on the engine. What comes back is the
project's own data (``ContainerInfo``) and the project's own errors: the
rest of the code never sees a ``docker`` type or exception.

Every call has a deadline, ``timeout`` (``daemon.timeouts.docker``), twice over: the SDK client's own
(each read from the engine's socket), and one around the thread (the whole call, which may make several
requests), so that a hung engine cannot hang the daemon. A stop gets its grace on top. An image build,
and a log follower once its stream is open, take as long as they take.

The SDK's unix-socket adapter keeps a connection pool per request URL (per container, in effect), 25 of
them, so an idle daemon held 25 or more connections to the engine, and more after a burst (its
``num_pools`` is ignored for unix sockets). ``OnePoolAdapter`` keeps one pool for the engine's socket:
connections are reused, and at most twice ``workers`` stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.transport import UnixHTTPAdapter
from docker.types import DeviceRequest, Mount

from supervisor.core.containers import LABEL_OWNER, ContainerSpec, readable_by
from supervisor.core.errors import DockerFailure, DockerUnavailable, ImageNotFound, ModelStartFailed
from supervisor.runtime.container_runtime import ContainerInfo
from supervisor.runtime.images import how_to_get

ENGINE_HINT = "start it with: dockerd --bridge=none --iptables=false &  (or: systemctl start docker)"
DEFAULT_TIMEOUT = 60.0  # seconds: daemon.timeouts.docker's default


class OnePoolAdapter(UnixHTTPAdapter):
    """The SDK's unix-socket adapter with one connection pool for the socket, not one per request URL."""

    def get_connection(self, url: str, proxies: Any = None) -> Any:
        return super().get_connection("http+docker://localhost", proxies)


class DockerRuntime:
    """The ``ContainerRuntime`` of a local Docker engine: an async facade over one Docker client.

    Create it, then ``await connect()``."""

    def __init__(self, base_url: str | None = None, workers: int = 8, timeout: float = DEFAULT_TIMEOUT):
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self.timeout = timeout  # seconds one call may take
        self.workers = workers  # calls at once; also the connections to the engine kept open
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._client: docker.DockerClient | None = None
        self._images_seen: set[str] = set()
        self._late: set[asyncio.Future] = set()  # creates that outlived their deadline: removed once made

    # -- plumbing ---------------------------------------------------------

    async def _run(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the pool, within ``timeout``."""
        return await self._run_within(self.timeout, action, fn, *args, **kwargs)

    async def _run_within(
        self, seconds: float | None, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """``fn`` on the pool, within ``seconds`` (None: no limit). Cancelled, a call not yet begun never begins."""
        working = self._submit(action, fn, *args, **kwargs)
        try:
            return await self._answer(working, action, seconds)
        except asyncio.CancelledError:
            working.cancel()  # begun: the thread finishes, and its answer is dropped
            raise

    def _submit(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        call = functools.partial(self._translated, action, fn, *args, **kwargs)
        return asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _answer(self, working: asyncio.Future, action: str, seconds: float | None) -> Any:
        """What ``working`` gives, once it is done within ``seconds``; past them, DockerFailure. Its thread goes on
        until the SDK's own timeout ends it (the asyncio deadline cannot stop a thread)."""
        done, _ = await asyncio.wait({working}, timeout=seconds)
        if not done:
            working.add_done_callback(lambda late: late.cancelled() or late.exception())  # nobody waits for it now
            raise DockerFailure(self._late_answer(action, seconds))
        return working.result()

    def _late_answer(self, action: str, seconds: float | None = None) -> str:
        """``seconds``: the whole call's deadline; None: the SDK's own, on one request."""
        deadline = f"within {seconds:g}s, daemon.timeouts.docker" if seconds else "daemon.timeouts.docker, per request"
        return (
            f"Docker did not answer in time to {action} ({deadline}): the engine at {self.base_url} is stuck or "
            "overloaded"
        )

    def _translated(self, action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return self._out_of_files_named(action, fn, *args, **kwargs)
        except (requests.exceptions.ConnectionError, ConnectionError) as exc:
            raise DockerUnavailable(
                f"Docker engine not reachable at {self.base_url} ({action}): {exc}; {ENGINE_HINT}"
            ) from None
        except requests.exceptions.ReadTimeout:  # the engine is there but stuck: as _answer says it
            raise DockerFailure(self._late_answer(action)) from None
        except requests.exceptions.RequestException as exc:
            raise DockerFailure(f"Docker failed to {action}: {exc}") from None
        except docker.errors.ImageNotFound as exc:
            raise ImageNotFound(f"image not found while trying to {action}: {_explain(exc)}") from None
        except docker.errors.DockerException as exc:
            if isinstance(exc.__cause__, requests.exceptions.ReadTimeout):  # the SDK's version check, stuck
                raise DockerFailure(self._late_answer(action)) from None
            if "Connection" in str(exc) or "FileNotFoundError" in str(exc):
                raise DockerUnavailable(
                    f"Docker engine not reachable at {self.base_url}: {exc}; {ENGINE_HINT}"
                ) from None
            raise DockerFailure(f"Docker failed to {action}: {_explain(exc)}") from None

    @staticmethod
    def _out_of_files_named(action: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Running out of descriptors looks like an unreachable engine to the SDK; say what it is."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "Too many open files" in str(exc):
                raise DockerFailure(
                    f"cannot {action}: localllmd is out of file descriptors (raise its LimitNOFILE)"
                ) from None
            raise

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise DockerUnavailable("DockerRuntime used before connect()")
        return self._client

    async def connect(self) -> str:
        """Open the client and ping the engine; returns the engine version."""

        def open_client() -> tuple[docker.DockerClient, str]:
            self._check_unix_socket()
            client = docker.DockerClient(base_url=self.base_url, timeout=self.timeout)
            if self.base_url.startswith("unix://"):
                client.api.adapters["http+docker://"].close()
                socket_url = "http+unix://" + self.base_url.removeprefix("unix://")
                kept = 2 * self.workers  # the workers' calls, and as many log followers, before one is dropped
                client.api.mount("http+docker://", OnePoolAdapter(socket_url, self.timeout, 1, kept))
            return client, client.version().get("Version", "?")

        self._client, version = await self._run("connect", open_client)
        return version

    async def ping(self) -> None:
        """Raise DockerUnavailable unless the engine answers now."""

        def ping() -> None:
            self._check_unix_socket()
            self.client.ping()

        await self._run("ping the engine", ping)

    def _check_unix_socket(self) -> None:
        """Fail early and clearly on a unix socket nobody listens on (the SDK would leak its socket)."""
        if not self.base_url.startswith("unix://"):
            return
        path = self.base_url.removeprefix("unix://")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(min(5.0, self.timeout))
            try:
                probe.connect(path)
            except OSError as exc:
                raise DockerUnavailable(
                    f"Docker engine not reachable at {self.base_url}: {exc.strerror or exc}; {ENGINE_HINT}"
                ) from None

    async def close(self) -> None:
        if self._client is not None:
            await self._run("close the client", self._client.close)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- images -----------------------------------------------------------

    async def image_exists(self, tag: str) -> bool:
        def exists() -> bool:
            try:
                self.client.images.get(tag)
                return True
            except docker.errors.ImageNotFound:
                return False

        return await self._run(f"look up image {tag}", exists)

    async def require_image(self, tag: str) -> None:
        """Fail clearly when ``tag`` is missing; an image seen once is not looked up again."""
        if tag in self._images_seen:
            return
        if not await self.image_exists(tag):
            raise ImageNotFound(f"image '{tag}' not found in the Docker engine: {how_to_get(tag)}")
        self._images_seen.add(tag)

    async def build_image(self, context: Path, tag: str) -> None:
        """As long as the build takes (the SDK sends a build with no timeout of its own)."""
        await self._run_within(
            None, f"build image {tag}", self.client.images.build, path=str(context), tag=tag, rm=True
        )

    # -- containers -------------------------------------------------------

    async def run(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start the container for ``spec``; replaces a stale one of ours by the same name.

        Cancelled while the engine works, it waits (within the deadline) for the engine's answer and removes what
        was made: the engine finishes a create whatever happens to our side, and nobody else would know the
        container. Past the deadline, what the engine makes later is removed when it is made.
        """
        await self.require_image(spec.image)
        action = f"start container {spec.name}"
        creating = self._submit(action, self._create_and_start, spec)
        try:
            return await self._answer(creating, action, self.timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                made = await self._answer(creating, action, self.timeout)
                await self.stop_and_remove(made.id, 0)
            if not creating.done():
                self._remove_when_made(creating)
            raise
        except DockerFailure:
            if not creating.done():  # out of time
                self._remove_when_made(creating)
            raise

    def _remove_when_made(self, creating: asyncio.Future) -> None:
        def made(done: asyncio.Future) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            removal = asyncio.ensure_future(self.stop_and_remove(done.result().id, 0))
            self._late.add(removal)
            removal.add_done_callback(self._late.discard)
            removal.add_done_callback(lambda task: task.cancelled() or task.exception())  # never "never retrieved"

        creating.add_done_callback(made)

    def _create_and_start(self, spec: ContainerSpec) -> ContainerInfo:
        _check_mounts_readable(spec)
        kwargs: dict[str, Any] = dict(
            image=spec.image,
            command=list(spec.command),
            name=spec.name,
            labels=spec.labels(),
            network_mode=spec.network if spec.network in ("none", "host") else None,
            network=None if spec.network in ("none", "host") else self._network(spec),
            entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
            mounts=[Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only) for m in spec.mounts],
            environment=dict(spec.environment),
            detach=True,
            # The llama.cpp images declare a health check on port 8080, which our servers do not use, so
            # Docker would call every container unhealthy; readiness is our own gate's job.
            healthcheck={"test": ["NONE"]},
            **_confinement_kwargs(spec),
        )
        if spec.gpu_device_ids is not None:
            ids = list(spec.gpu_device_ids)
            kwargs["device_requests"] = [
                DeviceRequest(device_ids=ids, capabilities=[["gpu"]])
                if ids
                else DeviceRequest(count=-1, capabilities=[["gpu"]])
            ]
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            self._remove_stale(spec)
            container = self.client.containers.create(**kwargs)
        try:
            container.start()
        except docker.errors.APIError:
            container.remove(force=True)
            raise
        return _info(container)  # as created: the gate watches what happens next

    def _network(self, spec: ContainerSpec) -> str:
        """The bridge network ``spec.network``, created (labelled ours) when it does not exist yet."""
        try:
            self.client.networks.get(spec.network)
        except docker.errors.NotFound:
            labels = {**dict(spec.extra_labels), LABEL_OWNER: spec.owner}
            try:
                self.client.networks.create(spec.network, driver="bridge", labels=labels)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # made meanwhile by another start: as good
                    raise
        return spec.network

    def _remove_stale(self, spec: ContainerSpec) -> None:
        stale = self.client.containers.get(spec.name)
        if stale.labels.get(LABEL_OWNER) != spec.owner:
            raise DockerFailure(
                f"a container named {spec.name} exists and is not ours; remove it or rename the instance"
            )
        stale.remove(force=True)

    async def remove_networks(self, owner: str) -> None:
        """Remove the networks ``owner`` made that no container uses any more (each takes one of the engine's
        few address pools). One still in use, or gone meanwhile, is left alone."""

        def remove() -> None:
            for network in self.client.networks.list(filters={"label": f"{LABEL_OWNER}={owner}"}):
                try:
                    network.reload()
                    if not network.containers:
                        network.remove()
                except docker.errors.APIError:  # in use after all (a start raced us), or already gone
                    continue

        await self._run(f"remove the networks of {owner}", remove)

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's current state, or None when it no longer exists."""

        def get() -> ContainerInfo | None:
            try:
                return _info(self.client.containers.get(container_id))
            except docker.errors.NotFound:
                return None

        return await self._run(f"inspect container {container_id[:12]}", get)

    async def stop_and_remove(self, container_id: str, grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL, then remove. Gone already is fine."""

        def stop() -> None:
            try:
                container = self.client.containers.get(container_id)
                if container.status in ("running", "paused", "restarting"):
                    container.stop(timeout=max(0, round(grace)))
                container.remove(force=True)
            except docker.errors.NotFound:
                return

        # the SDK gives a stop its grace on top of the client's timeout, as here
        await self._run_within(self.timeout + max(0, round(grace)), f"stop container {container_id[:12]}", stop)

    async def logs_tail(self, container_id: str, lines: int = 40) -> str:
        def tail() -> str:
            try:
                raw = self.client.containers.get(container_id).logs(tail=lines)
            except docker.errors.NotFound:
                return ""
            return raw.decode("utf-8", errors="replace").rstrip()

        return await self._run(f"read logs of {container_id[:12]}", tail)

    async def logs_stream(self, container_id: str, tail: int, follow: bool) -> AsyncIterator[bytes]:
        """The container's output from ``tail`` lines back, chunk by chunk; with ``follow``, until it exits.

        A follower gets a thread of its own, not one of the pool's: any number of them can wait for
        output without starving the calls everything else makes. Leaving the loop closes the stream.
        """
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()

        def open_stream():
            return self.client.containers.get(container_id).logs(stream=True, follow=follow, tail=tail)

        stream = await self._run(f"read logs of {container_id[:12]}", open_stream)

        def deliver(item: bytes | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads any more
                loop.call_soon_threadsafe(chunks.put_nowait, item)

        def pump() -> None:
            try:
                for chunk in stream:
                    deliver(chunk)
            except Exception as exc:  # closed under us (the reader left), or the engine went away
                deliver(exc)
            finally:
                deliver(None)

        threading.Thread(target=pump, name=f"logs-{container_id[:12]}", daemon=True).start()
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    break
                yield item
        finally:
            await loop.run_in_executor(None, stream.close)

    async def list_labelled(self, labels: dict[str, str]) -> list[ContainerInfo]:
        """Every container (running or not) carrying all of ``labels``."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        found = await self._run(
            "list containers", self.client.containers.list, all=True, filters=filters, ignore_removed=True
        )
        return [_info(c) for c in found]


def _confinement_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """The spec's least privilege as the SDK's arguments; a device request (the GPU) needs none of it back."""
    confinement = spec.confinement
    kwargs: dict[str, Any] = dict(
        cap_drop=list(confinement.cap_drop),
        security_opt=list(confinement.security_opt),
        read_only=confinement.read_only_root,
        tmpfs=dict(confinement.tmpfs),
    )
    if confinement.user is not None:
        kwargs["user"] = confinement.user
    if confinement.pids_limit is not None:
        kwargs["pids_limit"] = confinement.pids_limit
    if confinement.memory_limit is not None:
        kwargs["mem_limit"] = confinement.memory_limit
        kwargs["memswap_limit"] = confinement.memory_limit  # the same: no swap beyond the RAM limit
    return kwargs


def _check_mounts_readable(spec: ContainerSpec) -> None:
    """Refuse a start whose read-only mount the container's numeric user could not read.

    Without it llama-server exits with "failed to open GGUF file '/models/x.gguf' (Permission
    denied)", which names the path inside the container, not the host's file nor the fix. A file
    we cannot stat is left for Docker to report.
    """
    user = spec.confinement.user
    if user is None or not all(part.isdigit() for part in user.split(":")):
        return
    for mount in spec.mounts:
        if not mount.read_only:
            continue
        try:
            st = os.stat(mount.source)
        except OSError:
            continue
        if not readable_by(user, st.st_mode, st.st_uid, st.st_gid):
            raise ModelStartFailed(
                spec.model,
                (
                    f"{mount.source} is not readable by the container's user {user} (mode "
                    f"{st.st_mode & 0o777:04o}, owner {st.st_uid}:{st.st_gid}); the server runs without "
                    f"privileges, so make the file world-readable: chmod o+r {mount.source}"
                ),
            )


def _info(container: Any) -> ContainerInfo:
    state = container.attrs.get("State", {})
    status = state.get("Status", container.status)
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    return ContainerInfo(
        id=container.id,
        name=container.name,
        status=status,
        exit_code=exit_code,
        oom_killed=bool(state.get("OOMKilled")),
        labels=dict(container.labels),
    )


def _explain(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)
