"""localllmd, the composition root: config, logging, Docker, the fleet, the two servers, signals.

Everything is built here and handed down; nothing below this module reads
the environment, configures logging or installs signal handlers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from loguru import logger

from supervisor import __version__
from supervisor.api.control import DaemonFacts, create_control_app, open_control, remove_sockets
from supervisor.api.edge import Edge, EdgeSite
from supervisor.api.metrics import Metrics
from supervisor.api.proxy import create_proxy_app
from supervisor.config.access import Gate, plan_listeners
from supervisor.config.settings import Config, DaemonSettings, load_config
from supervisor.core.containers import servers_dir
from supervisor.core.errors import EXIT_OK, AlreadyRunning, CannotListen, ConfigError, LocalllmError
from supervisor.core.slots import Phase
from supervisor.fleet.events import EventBus
from supervisor.fleet.owner import Fleet
from supervisor.fleet.rollout import Rollout
from supervisor.fleet.sizing import size_catalog
from supervisor.runtime.docker_runtime import DockerRuntime
from supervisor.runtime.gpu_watch import GpuWatch
from supervisor.runtime.hardware import select_profile
from supervisor.runtime.nvml import Nvml
from supervisor.runtime.sdnotify import Notifier, ping_watchdog, watchdog_interval
from supervisor.runtime.upstream import open_session
from supervisor.state.generations import GenerationStatus, GenerationStore
from supervisor.state.learned import LearnedSizes

SHUTDOWN_GRACE = 2.0  # seconds in-flight requests get before they are cancelled
OPEN_FILES = 65536  # the open files limit localllmd raises itself to (up to the hard limit)
TICK_SECONDS = 1.0  # how often idle unloads, wait bounds and GPU readings are checked


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The demo's own directory, private (0700) and new, unless one is named: a fixed path in /tmp could be
    # made beforehand by another user, with files or symlinks of theirs in it.
    private = Path(tempfile.mkdtemp(prefix="localllm-demo-")) if args.demo and not args.state_dir else None
    try:
        config = demo_config(args.state_dir or private) if args.demo else load_config(args.config)
    except ConfigError as exc:
        print(f"localllmd: {exc.message}", file=sys.stderr)
        return exc.exit_code
    setup_logging(
        args.log_level or config.daemon.log_level,
        journald=bool(os.environ.get("JOURNAL_STREAM")),
        as_json=args.log_format == "json",
    )
    raise_open_files_limit()
    if private is not None:
        logger.info(
            "demo state in {} (control socket {}); removed when the demo stops", private, config.daemon.socket_path
        )
    daemon = Daemon(config, None if args.demo else args.config)
    if private is not None:
        daemon.before_forced_exit.append(lambda: shutil.rmtree(private, ignore_errors=True))
    try:
        asyncio.run(daemon.run())
    except LocalllmError as exc:
        logger.error("localllmd stopped: {}", exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        pass
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
    return EXIT_OK


def raise_open_files_limit() -> None:
    """Each waiting client holds a descriptor and each stream two: the usual soft limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open files limit from {} (keeping it): {}", soft, exc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="localllmd", description="Supervise local LLM servers in Docker.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="daemon config file (YAML)")
    source.add_argument(
        "--demo",
        action="store_true",
        help="run the embedded demo: CPU profile, one generated model, proxy on 127.0.0.1:8081",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="with --demo: where state and the model go (default: a new private directory in "
        "the temporary directory, removed at the end)",
    )
    parser.add_argument("--log-level", choices=["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line (for log shippers)",
    )
    parser.add_argument("--version", action="version", version=f"localllmd {__version__}")
    args = parser.parse_args(argv)
    if args.state_dir and not args.demo:
        parser.error("--state-dir goes with --demo; a config file sets daemon.state_dir")
    return args


def setup_logging(level: str, journald: bool = False, as_json: bool = False) -> None:
    """The only logging setup: one stderr sink, bound fields shown as key=value.

    Under systemd's journal: no timestamps (the journal has them) and ``<N>`` syslog priority
    prefixes, so ``journalctl -p err`` works. ``as_json``: one JSON object per line.
    """

    def render(record: dict) -> str:
        fields = " ".join(f"{k}={v}" for k, v in record["extra"].items())
        fields = f" [{fields}]" if fields else ""
        escaped = fields.replace("{", "{{").replace("}", "}}")
        if journald:
            # "\<" keeps loguru from reading the priority prefix as a colour tag
            return f"\\<{syslog_priority(record['level'].no)}>{{level}}{escaped} {{message}}\n{{exception}}"
        return "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7}" + escaped + " {message}\n{exception}"

    logger.remove()
    if as_json:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=render, backtrace=False, diagnose=False, colorize=False)


def syslog_priority(level_no: int) -> int:
    """loguru level number -> syslog priority (2 crit ... 7 debug)."""
    for floor, priority in ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6)):
        if level_no >= floor:
            return priority
    return 7


def demo_config(state_dir: Path) -> Config:
    """The embedded default: CPU profile and one small generated model, preloaded."""
    from supervisor.runtime.tinygguf import write_tiny_model

    model = state_dir / "models" / "demo-tiny.gguf"
    if not model.is_file():
        write_tiny_model(model, name="demo-tiny")
    return Config.model_validate(
        {
            "profile": "cpu-only",
            "daemon": {"instance": "demo", "state_dir": str(state_dir), "startup_timeout": 60},
            "models": [
                {
                    "name": "demo-tiny",
                    "aliases": ["gpt-3.5-turbo"],
                    "gguf": str(model),
                    "context_size": 512,
                    "preload": True,
                }
            ],
        }
    )


@contextlib.contextmanager
def hold_lock(path: Path):
    """One daemon per state directory: a second one is refused instead of fighting over containers."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as exc:
        raise CannotListen(f"cannot use the state directory {path.parent}: {exc.strerror or exc}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise AlreadyRunning(f"another localllmd (pid {holder}) is running with state_dir {path.parent}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


class Daemon:
    """localllmd's life in three steps, as uvicorn's server has them: ``startup`` builds everything and opens the
    servers, ``serve`` waits for the stop, ``shutdown`` takes down what startup built, as far as it got.

    The constructor does nothing; ``run`` holds the state directory's lock around the three. A signal handler only
    records the signal (``_record_signal``); ``_act_on_signals``, a task of the loop, acts on it: SIGHUP applies
    the config file again, the first SIGTERM or SIGINT stops the daemon gracefully, and a second one, while that
    shutdown runs, ends the process at once with status 128 + the signal's number (130, 143).
    """

    _exit = staticmethod(os._exit)

    def __init__(self, config: Config, config_path: Path | None):
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP; None for the embedded demo
        self.settings = config.daemon
        self.stopping = asyncio.Event()
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.before_forced_exit: list[Callable[[], object]] = []  # what must happen even then (the demo's directory)
        self.notifier = Notifier(None)
        # What startup builds, in its order; shutdown takes down whatever of it is there.
        self.gpu: GpuWatch | None = None
        self.runtime: DockerRuntime | None = None
        self.session: aiohttp.ClientSession | None = None
        self.events: EventBus | None = None
        self.fleet: Fleet | None = None
        self.rollout: Rollout | None = None
        self.runners: list[web.AppRunner] = []
        self.ticker: AsyncIOScheduler | None = None
        self.preload: asyncio.Task | None = None
        self._on_signals: asyncio.Task | None = None

    async def run(self) -> None:
        with hold_lock(self.settings.state_dir / "localllmd.lock"):
            self.notifier = Notifier.from_environment()
            try:
                await self.startup()
                await self.serve()
            finally:
                await self.shutdown()
        self.notifier.close()
        logger.info("localllmd stopped cleanly")

    # -- the three steps --------------------------------------------------------------

    async def startup(self) -> None:
        """Profile, Docker, sizing, the fleet and its adoption of what runs, the servers, the ticker, the preloads."""
        nvml = await asyncio.to_thread(Nvml.open)  # one session for the daemon's life (None without NVML)
        profile, reason = select_profile(self.config.profile, self.config.profiles_dir, nvml=nvml)
        if nvml is not None and not profile.has_gpus:
            nvml.close()
            nvml = None
        logger.info("localllmd {} starting; profile {}: {}", __version__, profile.name, reason)
        if self.settings.port_range is not None:
            logger.warning(
                "daemon.port_range is no longer used: every model server listens on a UNIX socket "
                "only localllm can reach; remove it from the config"
            )
        self.gpu = GpuWatch(nvml) if nvml is not None else None
        self.runtime = DockerRuntime(self.settings.docker_url, timeout=self.settings.timeouts.docker)
        docker_version = await self.runtime.connect()
        self.session = open_session(servers_dir(self.settings.state_dir), self.settings.timeouts)
        readings = await self.gpu.readings() if self.gpu is not None else None
        learned = LearnedSizes(self.settings.state_dir / "learned-sizes.json") if self.gpu is not None else None
        if learned and learned.problem:
            logger.warning("{}", learned.problem)
        sizings = await asyncio.to_thread(size_catalog, self.config, profile, learned)
        self.events = events = EventBus()
        fleet = Fleet(self.config, profile, self.runtime, self.session, sizings, learned, readings, events, self.gpu)
        metrics = Metrics(fleet)
        metrics.listen(events)
        log_devices(fleet)
        store = open_generations(self.settings.state_dir / "generations")
        self.rollout, self.fleet = Rollout(fleet, store), fleet
        recreate = await fleet.adopter.adopt_existing()
        facts = DaemonFacts(
            instance=self.settings.instance,
            profile=profile.name,
            profile_reason=reason,
            docker_version=docker_version,
            proxy_urls=tuple(f"http://{listen}/v1" for listen in self.settings.proxy_listen),
            started_at=time.time(),
        )
        await self._open_servers(
            create_proxy_app(fleet, self.session, self.settings, metrics),
            lambda gate: create_control_app(fleet, facts, self.rollout, events, gate, metrics=metrics),
        )
        self._install_signal_handlers()
        self.ticker = self._start_ticker(fleet)
        wanted = [e.name for e in self.config.models if e.preload]
        wanted += [name for name in recreate if name not in wanted]
        self.preload = asyncio.create_task(self._start_first_generation(fleet, store, wanted), name="preload")
        fleet.spawn(fleet.watch.watch_engine(), "watch-engine")
        logger.info("serving the proxy on {}", ", ".join(facts.proxy_urls))
        self.notifier.ready(fleet.status_line())
        interval = watchdog_interval()
        if interval:
            fleet.spawn(ping_watchdog(self.notifier, interval), "watchdog")

    async def serve(self) -> None:
        """Serve until the first SIGTERM or SIGINT: the servers, the ticker and the fleet's tasks do the work."""
        await self.stopping.wait()

    async def shutdown(self) -> None:
        """The servers close first (in-flight requests get SHUTDOWN_GRACE), then the fleet's work stops and every
        container goes. After a failed startup, only what it built is taken down."""
        if self.stopping.is_set():
            self.notifier.stopping()
            logger.info("shutting down: stopping in-flight work, then the containers")
        if self.preload is not None:
            self.preload.cancel()
        if self.fleet is not None:
            await self._take_down_fleet(self.fleet)
        if self.session is not None:
            await self.session.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.gpu is not None:
            self.gpu.close()
        if self.fleet is not None:
            remove_sockets(plan_listeners(self.settings))
        if self._on_signals is not None:
            self._on_signals.cancel()

    async def _take_down_fleet(self, fleet: Fleet) -> None:
        if self.ticker is not None and self.ticker.running:
            self.ticker.shutdown(wait=False)
        if self.events is not None:
            self.events.close()  # ends every event stream, so the servers can stop at once
        await self._close_servers()
        fleet.refuse_new_work()
        if self.rollout is not None:
            await self.rollout.cancel()  # a config change under way is reverted as far as it can be
        await fleet.shutdown()

    # -- the servers ------------------------------------------------------------------

    async def _open_servers(self, proxy: web.Application, control: Callable[[Gate], web.Application]) -> None:
        """Every listener of the proxy and the control API, or none: one that cannot listen is named in the
        CannotListen raised, and the shutdown closes those already open."""
        self.runners += await open_proxy(self.settings, proxy)
        self.runners += await open_control(plan_listeners(self.settings), control, SHUTDOWN_GRACE)

    async def _close_servers(self) -> None:
        """No new connections; in-flight requests get SHUTDOWN_GRACE, then their handlers are cancelled."""
        while self.runners:
            await self.runners.pop(0).cleanup()

    # -- what runs beside the servers -------------------------------------------------

    def _start_ticker(self, fleet: Fleet) -> AsyncIOScheduler:
        ticker = AsyncIOScheduler()
        every = {"trigger": "interval", "max_instances": 1, "coalesce": True}
        ticker.add_job(fleet.tick, seconds=TICK_SECONDS, **every)
        ticker.add_job(fleet.watch.probe_liveness, seconds=self.settings.liveness.period, **every)
        ticker.add_job(self._report_status, seconds=TICK_SECONDS, **every)
        ticker.start()
        return ticker

    async def _start_first_generation(self, fleet: Fleet, store: GenerationStore, wanted: list[str]) -> None:
        """Record the config we started with; it becomes last-good once its preloaded models are ready."""
        generation = None
        try:
            text = (
                self.config_path.read_text()
                if self.config_path
                else yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
            )
            generation = store.record(text, f"startup: {self.config_path or 'embedded demo'}", {}, self.config_path)
        except (LocalllmError, OSError) as exc:
            logger.error("cannot record the startup generation: {}", getattr(exc, "message", exc))
        await fleet.start_models(wanted)
        views = fleet.scheduler.views()
        failed = [n for n in wanted if n in views and views[n].phase is not Phase.READY]
        if generation is not None and store.generations and store.generations[-1].number == generation.number:
            with contextlib.suppress(LocalllmError):  # an apply made meanwhile has the last word
                store.mark(
                    generation.number,
                    GenerationStatus.FAILED if failed else GenerationStatus.GOOD,
                    f"preload failed for {', '.join(failed)}" if failed else "",
                )

    async def _report_status(self) -> None:
        if self.fleet is not None:
            self.notifier.status(self.fleet.status_line())

    async def _reload(self) -> None:
        """SIGHUP: apply the config file again, as ``localllmctl apply`` would."""
        if self.config_path is None or self.rollout is None:
            logger.warning("SIGHUP ignored: the embedded demo has no config file to re-read")
            return
        try:
            report = await self.rollout.apply(
                self.config_path.read_text(), f"sighup: {self.config_path}", self.config_path
            )
            logger.info("SIGHUP: generation {} applied", report["generation"])
        except (LocalllmError, OSError) as exc:
            logger.error("SIGHUP: {}", getattr(exc, "message", exc))

    # -- signals ----------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self._record_signal, signum)
        self._on_signals = asyncio.create_task(self._act_on_signals(), name="signals")

    def _record_signal(self, signum: int) -> None:
        """The signal handler: it only records."""
        self.signals.put_nowait(signum)

    async def _act_on_signals(self) -> None:
        """For the daemon's life, shutdown included: a second SIGTERM or SIGINT must still be heard then."""
        while True:
            signum = await self.signals.get()
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self.stopping.is_set() or self.fleet is None:
                    logger.warning("SIGHUP ignored: localllmd is shutting down")
                else:
                    self.fleet.spawn(self._reload(), "sighup")
            elif not self.stopping.is_set():
                logger.info("{}: shutting down; a second SIGTERM or SIGINT exits at once", name)
                self.stopping.set()
            else:
                self._force_exit(signum, name)

    def _force_exit(self, signum: int, name: str) -> None:
        """End the process now, in the middle of the shutdown: no more waiting for requests, tasks or containers.

        ``os._exit``: a normal exit would still wait for the Docker calls under way on their threads. What is
        left behind is what a crash leaves, and the next start deals with it: model containers still running
        are adopted or removed, the control sockets are bound anew, the state directory's lock is the kernel's.
        """
        status = 128 + signum
        logger.warning(
            "{} again during the shutdown: exiting now with status {}, without waiting for it to "
            "finish; model containers still running are adopted or removed at the next start",
            name,
            status,
        )
        for step in self.before_forced_exit:
            with contextlib.suppress(Exception):
                step()
        self.notifier.close()
        sys.stderr.flush()
        self._exit(status)


async def open_proxy(settings: DaemonSettings, app: web.Application) -> list[web.AppRunner]:
    """The proxy on each of ``daemon.proxy_listen``, with the deadlines and the connection cap of
    ``daemon.proxy_limits`` (edge.py); a client that leaves cancels its request. As ``control.open_control``:
    its runners, or CannotListen naming the address with none left open."""
    edge = Edge(settings.proxy_limits)
    runner = edge.runner(app, shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    for listen in settings.proxy_listen:
        try:
            await EdgeSite(runner, edge, listen.host, listen.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise CannotListen(f"cannot listen on {listen} (daemon.proxy_listen): {exc.strerror or exc}") from None
    return [runner]


def log_devices(fleet: Fleet) -> None:
    for device in fleet.scheduler.devices:
        if device.problem:
            logger.bind(device=device.id).error("unusable: {}", device.problem)
        else:
            logger.info(
                "device {}{}: budget {} MiB",
                device.id,
                f" ({device.uuid})" if device.uuid else "",
                device.budget // 2**20,
            )


def open_generations(directory: Path) -> GenerationStore:
    store = GenerationStore(directory)
    if store.problem:
        logger.warning("{}", store.problem)
    try:
        moved = store.move_secrets_out()  # generations an older localllm stored whole
        if moved:
            logger.info("moved the secrets of stored generations {} out of their configs", moved)
    except (LocalllmError, OSError) as exc:
        logger.warning("cannot move the secrets out of the stored generations: {}", getattr(exc, "message", exc))
    return store
