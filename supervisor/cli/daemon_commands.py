"""localllmctl's commands that talk to the daemon: status, load, unload, apply, rollback, history, logs, events.

Each one waits for the daemon at most ``--timeout`` (ctl_target.deadline): a call answered at once, whole;
a stream or a long action, until it starts (ctl_client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from supervisor.cli.client import DaemonUnresponsive, quote
from supervisor.cli.render import endpoint_phrase, render_event, render_history, render_report, render_status
from supervisor.cli.target import client
from supervisor.core.errors import EXIT_FAILURE, EXIT_OK, BadRequest, LocalllmError, RemoteError


def cmd_status(args: argparse.Namespace) -> int:
    if args.check:
        return check_health(args)
    status = asyncio.run(client(args).get("/status"))
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return EXIT_OK


def check_health(args: argparse.Namespace) -> int:
    """For monitoring: 0 healthy; 1 unhealthy, unreachable or not answering in time, with the reason on stdout."""
    try:
        health = asyncio.run(client(args).get("/health"))
    except RemoteError as exc:  # 503: the daemon answered, and it is not healthy
        health = exc.body
    except DaemonUnresponsive as exc:
        health = {"status": "unresponsive", "problems": [exc.message]}
    except LocalllmError as exc:
        health = {"status": "unreachable", "problems": [exc.message]}
    if args.json:
        print(json.dumps(health, indent=2))
    else:
        print(health.get("status", "unhealthy") + "".join(f"\n  {p}" for p in health.get("problems", [])))
    return EXIT_OK if health.get("status") == "ok" else EXIT_FAILURE


def cmd_load(args: argparse.Namespace) -> int:
    model = asyncio.run(with_progress(args, "POST", f"/models/{quote(args.model)}/load", {"model": args.model}))
    print(
        json.dumps(model, indent=2)
        if args.json
        else f"{model['name']} is ready {endpoint_phrase(model)} (container {model['container']}, "
        f"loaded in {model['load_seconds'] or 0:.2f}s)"
    )
    return EXIT_OK


def cmd_unload(args: argparse.Namespace) -> int:
    model = asyncio.run(with_progress(args, "POST", f"/models/{quote(args.model)}/unload", {"model": args.model}))
    print(json.dumps(model, indent=2) if args.json else f"{model['name']} is {model['state']}")
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    """Show what would change, then apply it with progress; the daemon validates and records the generation."""
    try:
        text = args.file.read_text()
    except OSError as exc:
        raise BadRequest(f"cannot read {args.file}: {exc.strerror or exc}") from None
    body = {"config": text, "source": str(args.file.resolve())}
    if not args.json:
        try:
            preview = asyncio.run(client(args).request("POST", "/validate", body))
            print(preview["diff"] or "(the config text is unchanged)", file=sys.stderr)
        except RemoteError as exc:  # invalid or refused: the apply below records it as such, and says why
            if exc.code not in ("invalid_config", "apply_refused"):
                raise
    report = asyncio.run(with_progress(args, "POST", "/apply", body))
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    report = asyncio.run(with_progress(args, "POST", "/rollback", {"generation": args.generation}))
    print(json.dumps(report, indent=2) if args.json else render_report(report))
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    generations = asyncio.run(client(args).get("/history"))["generations"]
    print(json.dumps(generations, indent=2) if args.json else render_history(generations))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    if args.tail < 0:
        raise BadRequest(f"--tail must be 0 or more, not {args.tail}")

    async def run() -> None:
        params = {"tail": str(args.tail), "follow": "true" if args.follow else "false"}
        async for line in client(args).lines(f"/models/{quote(args.model)}/logs", params):
            print(line, flush=True)

    asyncio.run(run())
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise BadRequest(f"--limit must be 0 or more, not {args.limit}")

    control = client(args)

    def following() -> None:  # the daemon has subscribed us: every event from now on is printed
        print(f"following localllmd's events on {control.target} (Ctrl-C to stop)", file=sys.stderr, flush=True)

    async def run() -> None:
        params = {"limit": str(args.limit), "follow": "true" if args.follow else "false"}
        if args.model:
            params["model"] = args.model
        async for event in control.events(params, on_open=following if args.follow else None):
            print(json.dumps(event) if args.json else render_event(event), flush=True)

    asyncio.run(run())
    return EXIT_OK


async def with_progress(args: argparse.Namespace, method: str, route: str, body: dict) -> dict:
    """A long action: the daemon's event stream opens first, within the deadline, which shows the daemon answers;
    then the action runs as long as it takes, its events printed to stderr as they happen (not with --json)."""
    control = client(args)
    subscribed, shown = asyncio.Event(), [0]

    async def show_events() -> None:
        async for event in control.events({"limit": "0", "follow": "true"}, on_open=subscribed.set):
            if not args.json:
                print(render_event(event), file=sys.stderr, flush=True)
            shown[0] = event["id"]

    watcher = asyncio.create_task(show_events())
    opened = asyncio.create_task(subscribed.wait())
    try:
        await asyncio.wait([watcher, opened], return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and (problem := watcher.exception()) is not None:
            if not isinstance(problem, RemoteError):
                raise problem  # unreachable, or no answer in time: the action would wait for nothing
            if not args.json:  # the daemon answered, so it runs: the action goes ahead, without progress
                print(f"(no progress shown: {problem.message})", file=sys.stderr, flush=True)
        try:
            return await control.request(method, route, body, long=True)
        finally:  # show the events up to the answer (and its failure) before the answer itself
            if not args.json:
                with contextlib.suppress(LocalllmError, TimeoutError):
                    last = (await control.get("/status"))["daemon"]["last_event_id"]
                    async with asyncio.timeout(2):
                        while shown[0] < last and not watcher.done():
                            await asyncio.sleep(0.01)
    finally:
        for task in (watcher, opened):
            task.cancel()
        await asyncio.gather(watcher, opened, return_exceptions=True)
