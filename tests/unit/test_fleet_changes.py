"""Config changes and Ollama models on a real Fleet (and Rollout), driven in-process with the recording fake:
no Docker, no GPU, in seconds.

A changed model's new version starts beside the old one when the budget holds both, else after the old one
went offline; a new version that fails its gate is reverted to the last-good one. Ollama models share one
server container, whose fake answers the part of Ollama's API the fleet uses (tests/unit/fleet_harness.py).
Only the fleet's public surface is used: load, unload, use, upstream, describe, snapshot, shutdown, the events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import pytest

from supervisor.core.backends import ollama
from supervisor.core.errors import ApplyFailed
from supervisor.fleet.events import EventBus, EventKind
from supervisor.fleet.owner import Fleet
from supervisor.fleet.rollout import Rollout
from supervisor.state.generations import GenerationStatus, GenerationStore

from .fleet_harness import (
    FAKE_CONTAINER_HEADER,
    GIB,
    FakeOllamaApi,
    RecordingFakeRuntime,
    config_text,
    kinds,
    scenario,
    text_fleet,
    until,
)

# The CPU profile's budget is 14 GiB (16 GiB of RAM less a 2 GiB reserve): a model declared at 6 GiB leaves room
# for its new version beside it, one at 8 GiB does not.
NEED = {"beside": 6 * GIB, "offline": 8 * GIB}
NEW_CONTEXT = 2048  # the change: the profile's default context is 4096


def context_of(spec) -> int:
    """The context a llama-server container is started with."""
    command = list(spec.command)
    return int(command[command.index("--ctx-size") + 1])


def shape(spec) -> tuple:
    """What the config says of a container: all but its socket (a fresh one each, hence in its config hash)."""
    return spec.image, spec.command, spec.environment, spec.confinement, spec.network, spec.model


def model(fleet: Fleet, name: str) -> dict:
    return fleet.describe(fleet.resolve(name))


def apply_statuses(bus: EventBus, generation: int) -> list[str]:
    return [e.data["status"] for e in bus.recent() if e.kind == EventKind.APPLY and e.data["generation"] == generation]


def apply_status_now(bus: EventBus) -> str | None:
    statuses = [e.data["status"] for e in bus.recent() if e.kind == EventKind.APPLY]
    return statuses[-1] if statuses else None


@dataclass
class Client:
    """Requests to one model, one after another as the proxy sends them (reserve, then the upstream the fleet
    names), until stopped. Each answer is kept with the container that gave it and the apply's status then."""

    fleet: Fleet
    runtime: RecordingFakeRuntime
    session: aiohttp.ClientSession
    bus: EventBus
    name: str
    answers: list[tuple[str, str | None]] = field(default_factory=list)  # (container name, apply status)
    failures: list[str] = field(default_factory=list)

    async def _request(self) -> None:
        async with self.fleet.use(self.name) as instance:
            with self.fleet.upstream(instance) as url:
                async with self.session.get(url + "/health") as response:
                    assert response.status == 200, response.status
                    self.answers.append((response.headers[FAKE_CONTAINER_HEADER], apply_status_now(self.bus)))

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._request()
            except Exception as exc:  # every failure is the test's finding
                self.failures.append(repr(exc))
            await asyncio.sleep(0.01)  # pacing, as a client would: the old version can be seen idle

    @contextlib.asynccontextmanager
    async def running(self):
        stop = asyncio.Event()
        task = asyncio.create_task(self._run(stop))
        try:
            yield self
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)  # a request that never gets its turn fails the test, not hangs it

    async def long_request(self, seconds: float) -> tuple[str, bool]:
        """One request that takes ``seconds``: the container that answered, and whether it still existed then."""
        async with self.fleet.use(self.name) as instance:
            with self.fleet.upstream(instance) as url:
                async with self.session.get(url + "/slow", params={"seconds": str(seconds)}) as response:
                    assert response.status == 200, response.status
                    name = response.headers[FAKE_CONTAINER_HEADER]
                    return name, any(c.info.name == name for c in self.runtime.containers.values())

    def answered_by(self, container: str) -> bool:
        return any(name == container for name, _ in self.answers)

    def containers(self) -> list[str]:
        """The containers that answered, in turn (repeats folded)."""
        return [name for i, (name, _) in enumerate(self.answers) if i == 0 or self.answers[i - 1][0] != name]


async def running_generation(tmp_path, session, room: str, runtime: RecordingFakeRuntime | None = None):
    """A fleet started from a config whose model ``a`` is loaded, recorded as generation 1, last-good (as the
    daemon records its startup config), and the changed config's text: ``a`` with a smaller context."""
    text = config_text(tmp_path, [{"name": "a", "memory": NEED[room]}])
    fleet, runtime, bus, path = text_fleet(tmp_path, session, text, runtime)
    rollout = Rollout(fleet, GenerationStore(tmp_path / "generations"))
    first = rollout.store.record(text, "startup", {}, path).number
    await fleet.load("a")
    rollout.store.mark(first, GenerationStatus.GOOD)
    changed = config_text(tmp_path, [{"name": "a", "memory": NEED[room], "context_size": NEW_CONTEXT}])
    return fleet, runtime, bus, path, rollout, changed


@pytest.mark.parametrize("room", ["beside", "offline"])
def test_a_changed_model_moves_to_its_new_version_while_its_requests_are_answered(tmp_path, room):
    async def body(session):
        fleet, runtime, bus, path, rollout, changed = await running_generation(tmp_path, session, room)
        [old] = runtime.started()
        old_id, old_hash = runtime.id_of(old), model(fleet, "a")["config_hash"]
        runtime.start_delay = 0.2  # the new version takes a while to start
        async with Client(fleet, runtime, session, bus, "a").running() as client:
            long = asyncio.create_task(client.long_request(0.5))  # in flight on the old version through the change
            await until(lambda: model(fleet, "a")["in_flight"] == 1, what="the long request to be under way")
            report = await rollout.apply(changed, str(path), path)
            new = runtime.started()[-1]
            await until(lambda: client.answered_by(new), what="an answer from the new version")
        await until(lambda: old_id not in runtime.containers, what="the old version to be retired")
        new_id = runtime.id_of(new)
        assert await long == (old, True)  # the old version went only once it had answered

        assert report["generation"] == 2 and report["status"] == GenerationStatus.GOOD
        assert list(report["plan"]["replace"]) == ["a"]
        if room == "beside":  # started beside the old one, which went only once the new one took over
            assert runtime.timeline() == [("run", old), ("run", new), ("remove", old)]
            assert apply_statuses(bus, 2) == ["applying", "launching", "healthy", "good"]
        else:  # no room for both: the old one went first
            assert runtime.timeline() == [("run", old), ("remove", old), ("run", new)]
            assert apply_statuses(bus, 2) == ["applying", "stopping_old", "launching", "healthy", "good"]
        described = model(fleet, "a")
        assert described["state"] == "ready" and described["container"] == new_id[:12]
        assert described["config_hash"] == runtime.specs[new_id].config_hash() != old_hash
        assert context_of(runtime.specs[new_id]) == NEW_CONTEXT and context_of(runtime.specs[old_id]) == 4096
        assert set(runtime.containers) == {new_id}
        store = rollout.store
        assert [g.status for g in store.generations] == ["good", "good"]
        # the hash planned for a: taken on the old container's socket, so not the new container's own hash
        assert store.active == store.last_good == 2 and set(store.get(2).hashes) == {"a"}
        assert store.get(2).hashes["a"] != old_hash

        assert client.failures == [] and client.containers() == [old, new]
        during_launch = [name for name, status in client.answers if status == "launching"]
        if room == "beside":  # zero downtime: the old version answered while the new one started
            assert during_launch and set(during_launch) == {old}
        else:  # offline meanwhile: requests waited, and none failed
            assert during_launch == []
        await fleet.shutdown()
        assert runtime.containers == {}

    scenario(body, tmp_path)


@pytest.mark.parametrize("room", ["beside", "offline"])
def test_a_change_whose_new_version_fails_its_gate_is_reverted_to_the_last_good_one(tmp_path, room):
    async def body(session):
        runtime = RecordingFakeRuntime(fails=lambda spec: context_of(spec) == NEW_CONTEXT)
        fleet, runtime, bus, path, rollout, changed = await running_generation(tmp_path, session, room, runtime)
        [old] = runtime.started()
        old_id = runtime.id_of(old)
        async with Client(fleet, runtime, session, bus, "a").running() as client:
            with pytest.raises(ApplyFailed) as failed:
                await rollout.apply(changed, str(path), path)
            serving = old if room == "beside" else runtime.started()[-1]
            await until(
                lambda: client.answered_by(serving) and client.answers[-1][0] == serving,
                what="an answer from the last-good version",
            )

        report = failed.value.report
        assert report["generation"] == 2 and report["status"] == GenerationStatus.FAILED
        assert report["reason"].startswith(
            "health gate failed: model 'a' failed to start: server exited during startup (exit code 1)"
        ) and report["reason"].endswith("boom")
        assert report["degraded"] is None
        new = runtime.started()[1]
        assert context_of(runtime.specs[runtime.id_of(new)]) == NEW_CONTEXT
        if room == "beside":  # the old version never stopped
            assert runtime.timeline() == [("run", old), ("run", new), ("remove", new)]
            assert apply_statuses(bus, 2) == ["applying", "launching", "failed"]
            assert client.containers() == [old]
        else:  # the old version was offline: the last-good spec runs again in a container of its own
            assert runtime.timeline() == [
                ("run", old),
                ("remove", old),
                ("run", new),
                ("remove", new),
                ("run", serving),
            ]
            assert apply_statuses(bus, 2) == ["applying", "stopping_old", "launching", "failed"]
            assert client.containers() == [old, serving]
        serving_id = runtime.id_of(serving)
        described = model(fleet, "a")
        assert described["state"] == "ready" and described["container"] == serving_id[:12]
        assert described["config_hash"] == runtime.specs[serving_id].config_hash()
        assert shape(runtime.specs[serving_id]) == shape(runtime.specs[old_id])  # the last-good config
        assert set(runtime.containers) == {serving_id} and (serving_id == old_id) == (room == "beside")
        store = rollout.store
        assert [g.status for g in store.generations] == ["good", "failed"]
        assert store.active == store.last_good == 1 and store.get(2).reason == report["reason"]
        assert client.failures == [] and "DEGRADED" not in fleet.status_line()
        await fleet.shutdown()
        assert runtime.containers == {}

    scenario(body, tmp_path)


def test_a_model_waiting_for_room_does_not_take_the_room_of_a_model_offline_for_a_change_that_fails(tmp_path):
    """The revert's relaunch of the last-good version must find its room: the soak saw a waiting model take it
    between the failed gate and the relaunch, and the revert end degraded ("could not be attached")."""

    async def body(session):
        models = [{"name": "a", "memory": NEED["offline"]}, {"name": "b", "memory": NEED["offline"]}]  # one at a time
        fleet, runtime, bus, path = text_fleet(tmp_path, session, config_text(tmp_path, models))
        rollout = Rollout(fleet, GenerationStore(tmp_path / "generations"))
        await fleet.load("a")
        rollout.store.mark(rollout.store.record(path.read_text(), "startup", {}, path).number, GenerationStatus.GOOD)
        runtime.fails = lambda spec: context_of(spec) == NEW_CONTEXT
        runtime.start_delay = 0.2
        models[0]["context_size"] = NEW_CONTEXT
        changed = config_text(tmp_path, models)

        async def ticking():  # the daemon's periodic tick: it admits waiting models
            while True:
                await fleet.tick()
                await asyncio.sleep(0.02)

        ticks = asyncio.create_task(ticking())
        applying = asyncio.create_task(rollout.apply(changed, str(path), path))
        await until(lambda: model(fleet, "a")["state"] != "ready", what="a to go offline for its new version")
        waiting = asyncio.create_task(fleet.load("b"))
        with pytest.raises(ApplyFailed) as failed:
            await applying
        assert failed.value.report["degraded"] is None and "DEGRADED" not in fleet.status_line()
        await waiting  # b's turn comes after the revert: the last-good a, idle, is evicted for it
        assert model(fleet, "b")["state"] == "ready"
        ticks.cancel()
        await fleet.shutdown()

    scenario(body, tmp_path)


@pytest.mark.parametrize("together", [True, False], ids=["loaded-together", "loaded-in-turn"])
def test_ollama_models_share_one_server_which_outlives_an_unloaded_model_until_shutdown(tmp_path, together):
    async def body(session):
        api = FakeOllamaApi(store={"embedder:latest"}, embedding={"embedder:latest"})
        text = config_text(
            tmp_path,
            [
                {"name": "chat", "backend": "ollama", "tag": "tiny:1b", "pull": True},
                {"name": "embed", "backend": "ollama", "tag": "embedder:latest"},
            ],
        )
        fleet, runtime, bus, _ = text_fleet(tmp_path, session, text, RecordingFakeRuntime(ollama=api))
        if together:
            await asyncio.gather(fleet.load("chat"), fleet.load("embed"))
        else:
            await fleet.load("chat")
            await fleet.load("embed")

        [server] = runtime.started()  # one container for both
        server_id = runtime.id_of(server)
        assert runtime.specs[server_id].model == ollama.SERVER_LABEL and api.servers == 1
        models = {m["name"]: m for m in fleet.snapshot()}
        for name in ("chat", "embed"):
            assert models[name]["state"] == "ready" and models[name]["container"] == server_id[:12]
            assert models[name]["memory"]["measured"] == api.size  # what /api/ps said it uses
        assert api.pulls == ["tiny:1b"] and "pull" in kinds(bus)  # only the missing one was pulled
        assert {tag: (e["via"], e["num_ctx"]) for tag, e in api.loaded.items()} == {
            "tiny:1b": ("generate", 4096),
            "embedder:latest": ("embed", 4096),
        }  # the server's context
        assert api.loads == Counter({"tiny:1b": 1, "embedder:latest": 1})
        async with fleet.use("chat") as instance:  # a request reaches the shared server
            with fleet.upstream(instance) as url:
                async with session.get(url + "/api/tags") as response:
                    listed = {m["name"] for m in (await response.json())["models"]}
        assert listed == {"tiny:1b", "embedder:latest"}

        await fleet.unload("chat")
        models = {m["name"]: m for m in fleet.snapshot()}
        assert models["chat"]["state"] == "stopped" and models["chat"]["container"] is None
        assert models["embed"]["state"] == "ready" and models["embed"]["container"] == server_id[:12]
        assert api.unloads == Counter({"tiny:1b": 1}) and set(api.loaded) == {"embedder:latest"}
        assert runtime.running(ollama.SERVER_LABEL) == [server_id] and runtime.removed() == []

        await fleet.shutdown()
        assert runtime.removed() == [server_id] and runtime.containers == {}
        assert len(runtime.started()) == 1 and api.loads == Counter({"tiny:1b": 1, "embedder:latest": 1})

    scenario(body, tmp_path)
