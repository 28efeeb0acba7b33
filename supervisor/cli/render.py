"""localllmctl's tables and short formats: what an operator reads (``--json`` prints the data itself)."""

from __future__ import annotations

import io
import time

from rich import box
from rich.console import Console
from rich.table import Table

from supervisor.core.estimate import gpu_offload

WIDE = 400  # render wide and let the terminal wrap: a truncated model name is worse than a long line


def render_table(rows: list[list[str]], title: str | None = None) -> str:
    """Rows (the first is the header) as a table with a rule under the header; no colour, no padding at ends."""
    table = Table(
        *rows[0],
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=title,
        title_justify="left",
        header_style="bold",
    )
    for row in rows[1:]:
        table.add_row(*row)
    buffer = io.StringIO()
    Console(file=buffer, width=WIDE, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip())


def render_status(status: dict) -> str:
    daemon = status["daemon"]
    head = (
        f"localllmd {daemon['version']}  instance {daemon['instance']}  profile {daemon['profile']}  "
        f"up {format_age(daemon['uptime_seconds'])}  docker {daemon['docker_version']}\n"
        f"proxy {', '.join(daemon['proxy'])}\n"
    )
    if daemon.get("degraded"):
        head += f"DEGRADED: {daemon['degraded']}\n"
    rows = [
        [
            "MODEL",
            "STATE",
            "DEVICE",
            "MEMORY",
            "MEASURED",
            "ENDPOINT",
            "CONTAINER",
            "IN-FLIGHT",
            "WAITING",
            "LAST USED",
            "FLAGS",
        ]
    ]
    now = time.time()
    for model in status["models"]:
        memory = model.get("memory") or {}
        offload = ["cpu-offload"] if memory.get("partial_offload") else []  # Ollama put part of it on the CPU
        flags = ",".join([f for f in ("preload", "pinned") if model[f]] + offload)
        last = format_age(now - model["last_used"]) + " ago" if model["last_used"] else "-"
        rows.append(
            [
                model["name"],
                model["state"],
                model.get("device") or "-",
                format_mib(memory.get("need")),
                format_mib(memory.get("measured")),
                where(model),
                model["container"] or "-",
                str(model["in_flight"]),
                str(model.get("waiting", 0)),
                last,
                flags or "-",
            ]
        )
    errors = [f"  {m['name']}: {m['error']}" for m in status["models"] if m.get("error")]
    errors += [
        f"  device {d['id']}{' (' + d['uuid'] + ')' if d.get('uuid') else ''} is unusable: {d['problem']}"
        for d in status.get("devices", [])
        if d.get("problem")
    ]
    table = render_table(rows) if status["models"] else "(no models in the catalog)"
    return head + "\n" + table + ("\n\nerrors:\n" + "\n".join(errors) if errors else "")


def render_history(generations: list[dict]) -> str:
    rows = [["GEN", "STATUS", "WHEN", "SOURCE", "REASON"]]
    for g in generations:
        marks = "".join(m for m, on in ((" *active", g["active"]), (" *last-good", g["last_good"])) if on)
        rows.append(
            [
                str(g["number"]),
                g["status"] + marks,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["created_at"])),
                g["source"],
                g["reason"] or "-",
            ]
        )
    return render_table(rows)


def render_profiles(profiles: list[dict], detected: str | None) -> str:
    rows = [["PROFILE", "GPUS", "RAM", "CONTEXT", "PARALLEL", "DESCRIPTION"]]
    for p in profiles:
        gpus = " + ".join(f"{g['vram_gib']:g}G" for g in p["hardware"]["gpus"]) or "-"
        name = p["name"] + (" (detected)" if p["name"] == detected else "")
        rows.append(
            [
                name,
                gpus,
                f"{p['hardware']['ram_gib']:g}G",
                str(p["defaults"]["context_size"]),
                str(p["defaults"]["parallel"]),
                p["description"],
            ]
        )
    return render_table(rows)


def render_estimate(name: str, path: str, profile: str, sizing) -> str:
    launch, parts = sizing.launch, sizing.estimate
    head_on_gpu = launch.on_gpu and gpu_offload(parts.total_layers, launch.gpu_layers)[1]
    where = (
        f"{parts.offloaded_layers}/{parts.total_layers} layers{' and the output layer' if head_on_gpu else ''}"
        " on the GPU"
        if launch.on_gpu
        else "all layers in host memory"
    )
    head = (
        f"{name} ({path})\nprofile {profile}: context {launch.context}, {launch.parallel} slot(s)"
        f"{', one unified KV cache' if launch.kv_unified else ''}, KV cache {launch.cache_type_k}/"
        f"{launch.cache_type_v}, flash attention {'on' if launch.flash_attention else 'off'}, {where}\n"
    )
    rows = [("weights", parts.weights, "")]
    if parts.output_head:  # a tied-embedding model: llama.cpp copies token_embd to the GPU as its head
        rows.append(("  head", parts.output_head, "  the output head, a copy of the tied token embedding"))
    rows += [("KV cache", parts.kv_cache, ""), ("compute", parts.compute, "")]
    if parts.outputs:
        rows.append(("outputs", parts.outputs, "  the logits buffer"))
    rows += [("overhead", parts.overhead, ""), ("total", parts.total, "")]
    return head + "\n".join(f"  {label:<9} {value / 2**20:>10.1f} MiB{note}" for label, value, note in rows)


def render_ollama_memory(memory: dict) -> str:
    show = memory.get("show") or {}
    details = show.get("details") or {}
    lines = [f"{memory['model']} (ollama): needs {format_mib(memory['need'])}, from {memory['source']}"]
    for label, key in (("declared", "declared"), ("measured", "measured"), ("learned", "learned")):
        if memory.get(key):
            lines.append(f"  {label:<9} {format_mib(memory[key])}")
    if show.get("estimate"):
        lines.append(
            f"  /api/show {format_mib(show['estimate'])} ({details.get('parameter_size', '?')} parameters, "
            f"{details.get('quantization_level', '?')})"
        )
    if show.get("problem"):
        lines.append(f"  /api/show: {show['problem']}")
    return "\n".join(lines)


def render_event(event: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event["time"])) + f".{int(event['time'] * 1000) % 1000:03d}"
    who = event["model"] or "-"
    return f"{when}  {event['kind']:<14} {who:<20} {event['message']}"


def where(model: dict) -> str:
    """A model's endpoint in a few letters: ``socket`` (llama.cpp: a UNIX socket only localllm reaches) or its port."""
    endpoint = model.get("endpoint") or ""
    return "socket" if endpoint.startswith("unix:") else endpoint.removeprefix("tcp:") or "-"


def endpoint_phrase(model: dict) -> str:
    shown = where(model)
    return "on its socket" if shown == "socket" else f"on port {shown}"


def render_report(report: dict) -> str:
    plan = report["plan"]
    lines = [f"  {label:<8} {', '.join(plan[label])}" for label in ("replace", "remove", "add", "keep") if plan[label]]
    return "\n".join([*lines, f"generation {report['generation']} ({report['source']}): {report['status']}"])


def format_mib(value: int | None) -> str:
    """Bytes, short: ``1.5M``, ``118M``, ``5.4G``."""
    if value is None:
        return "-"
    mib = value / 2**20
    return f"{mib:.1f}M" if mib < 10 else f"{mib:.0f}M" if mib < 1024 else f"{mib / 1024:.1f}G"


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
