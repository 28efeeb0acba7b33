"""The soak's report: soak.json (everything), soak.md (for people) and soak.svg (RSS and fds over time, drawn by
hand: no plotting dependency)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

ABBREVIATIONS = {
    "daemon_kill9": "kill9",
    "docker_kill": "dkill",
    "docker_rm": "drm",
    "docker_pause": "pause",
    "sigstop": "stop",
    "apply_good": "good",
    "apply_bad": "bad",
    "apply_invalid": "inval",
    "unload": "unld",
    "load": "load",
    "full_state": "full",
    "delete_model": "del",
    "engine_restart": "dockerd",
}


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "soak.svg").write_text(svg(report))
    (out / "soak.md").write_text(markdown(report))


def summary(report: dict) -> str:
    requests = report.get("requests", {})
    outcomes = ", ".join(f"{k} {v}" for k, v in requests.get("by_outcome", {}).items() if v)
    faults = ", ".join(f"{k} {v['count']}" for k, v in sorted(report.get("faults", {}).items()))
    lines = [
        f"soak: seed {report['seed']}, {report['minutes']:g} minute(s) of faults, {len(report.get('steps', []))} "
        f"steps, {report.get('daemon_starts', 0)} daemon start(s)",
        f"soak: faults: {faults or 'none'}",
        f"soak: requests: {requests.get('total', 0)} ({outcomes or 'none'})",
    ]
    resources = report.get("resources", {})
    if resources.get("baseline") and resources.get("end"):
        b, p, e = resources["baseline"], resources.get("peak", {}), resources["end"]
        lines.append(
            f"soak: RSS baseline {b['rss_mib']} MiB, peak {p.get('rss_mib')} MiB, end {e['rss_mib']} MiB; "
            f"fds {b['fds']} / {p.get('fds')} / {e['fds']}; within tolerance: {resources.get('within')}"
        )
    violations = report.get("violations", [])
    lines.append(f"soak: {len(violations)} invariant violation(s)" + (":" if violations else ""))
    for v in violations:
        lines.append(f"  seed {v['seed']} step {v['step']} ({v['fault']}) [{v['invariant']}]: {v['message'][:400]}")
    if violations:
        lines.append(f"soak: reproduce with: {report['command']}")
    return "\n".join(lines)


def _kinds(kinds: dict | None) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in kinds.items()) if kinds else "-"


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown(report: dict) -> str:
    setup = report.get("setup", {})
    machine = report.get("machine", {})
    violations = report.get("violations", [])
    engine = (
        "enabled"
        if report.get("engine_restart_enabled")
        else "disabled (LOCALLLM_SOAK_ALLOW_ENGINE_RESTART=1 enables it)"
    )
    full = (
        "enabled (the state directory on a 1 MiB tmpfs)" if report.get("full_state_enabled") else "disabled (no tmpfs)"
    )
    lines = [
        "# localllm fault soak",
        "",
        f"Command: `{report['command']}`. Seed **{report['seed']}**, **{report['minutes']:g} minute(s)** of faults "
        f"under load ({report.get('load_seconds', 0)} s of load, {report.get('duration_s', 0)} s in all, "
        f"{report.get('daemon_starts', 0)} daemon start(s)). "
        f"Machine: {machine.get('cpus', '?')} cores, {machine.get('cpu_model', '?')}, {machine.get('when', '?')}.",
        "",
        f"**Invariant violations: {len(violations)}** (target 0)."
        + (f" Aborted: {report['error']}" if report.get("error") else ""),
        "",
        "## Setup",
        "",
        f"- {len(setup.get('models', []))} generated models ("
        + ", ".join(
            f"{m['name']} {m['weight']:.0%} of requests{', preloaded' if m['preload'] else ''}"
            for m in setup.get("models", [])
        )
        + f"), each declared at `memory: {setup.get('memory_per_model')}` in a {setup.get('budget_gib')} GiB "
        "budget: two fit, never three.",
        f"- {setup.get('clients')} client threads: chat (non-streaming), chat streams, completions, and chat streams "
        f"that the client closes after 1-3 events; models picked by weight. Client timeouts: no byte for "
        f"{setup.get('client_read_timeout_s')} s, or {setup.get('client_total_timeout_s')} s in all, is a hang.",
        f"- Daemon: liveness {setup.get('liveness')}, restart {setup.get('restart')}, queue_timeout "
        f"{setup.get('queue_timeout_s')} s, startup_timeout {setup.get('startup_timeout_s')} s.",
        f"- Engine restart fault: {engine}; full state directory fault: {full}.",
        f"- Checks: after every step, within a {setup.get('settle_s')} s settle; once a second, the memory budget and "
        f"containers left exited, paused or created beyond {setup.get('leftover_window_s')} s. A model hit by a "
        f"fault must answer again within {setup.get('recovery_deadline_s')} s.",
        "",
        "## Faults by kind",
        "",
        "Unavailable: from the fault (for a deleted model file, from its restoring) until the model answered a request "
        "again, over every model the fault hit.",
        "",
        "| fault | injected | skipped | longest unavailable | median unavailable | violations |",
        "|---|---|---|---|---|---|",
    ]
    for kind, entry in sorted(report.get("faults", {}).items()):
        longest = entry["longest_unavailable_s"]
        median = entry["median_unavailable_s"]
        lines.append(
            f"| {kind} | {entry['count']} | {entry['skipped']} | {'-' if longest is None else f'{longest:.2f} s'} | "
            f"{'-' if median is None else f'{median:.2f} s'} | {entry['violations']} |"
        )
    requests = report.get("requests", {})
    lines += [
        "",
        "## Requests by outcome",
        "",
        f"{requests.get('total', 0)} requests. `daemon_down`: a connection refused or broken while localllmd was "
        "killed and restarting. `transport_error`, `hang`, `silent_truncation` and `bad_answer` are violations.",
        "",
        "| outcome | requests |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in requests.get("by_outcome", {}).items()]
    by_kind = requests.get("by_kind", {})
    if by_kind:
        outcomes = [o for o, n in requests.get("by_outcome", {}).items() if n]
        lines += ["", "| kind | " + " | ".join(outcomes) + " |", "|---|" + "---|" * len(outcomes)]
        lines += [f"| {k} | " + " | ".join(str(v.get(o, 0)) for o in outcomes) + " |" for k, v in by_kind.items()]
    if requests.get("error_responses"):
        lines += ["", "Error responses: " + ", ".join(f"`{k}` {v}" for k, v in requests["error_responses"].items())]
    if requests.get("stream_error_events"):
        lines += [
            "",
            "Stream error events: " + ", ".join(f"`{k}` {v}" for k, v in requests["stream_error_events"].items()),
        ]
    lines += ["", "## Invariant violations", ""]
    if not violations:
        lines.append("None.")
    for v in violations:
        lines.append(
            f"- seed {v['seed']}, step {v['step']} ({v['fault']}), at {v['t']} s, `{v['invariant']}`: {v['message']}"
        )
    resources = report.get("resources", {})
    baseline, peak, end = resources.get("baseline") or {}, resources.get("peak") or {}, resources.get("end") or {}
    tolerance = resources.get("tolerance", {})
    within = "not measured" if "within" not in resources else "yes" if resources["within"] else "no"
    lines += [
        "",
        "## The daemon's RSS and open file descriptors",
        "",
        "Sampled once a second from `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/fd`. Baseline: the idle daemon "
        "after a warm-up (every model answered once, two resident). End: after the load stopped and "
        f"{setup.get('cool_down_s')} s of quiet. Each is a median of about 6 samples; a kill -9 starts a new "
        "process (a new pid).",
        "",
        "| | baseline | peak | end | limit at the end |",
        "|---|---|---|---|---|",
        f"| RSS (MiB) | {_cell(baseline.get('rss_mib'))} | {_cell(peak.get('rss_mib'))} | "
        f"{_cell(end.get('rss_mib'))} | {_cell(tolerance.get('rss_limit_mib'))} ({_cell(tolerance.get('rss'))}) |",
        f"| open fds | {_cell(baseline.get('fds'))} | {_cell(peak.get('fds'))} | {_cell(end.get('fds'))} | "
        f"{_cell(tolerance.get('fd_limit'))} ({_cell(tolerance.get('fds'))}) |",
        "",
        f"Back within tolerance after the load: **{within}**.",
        "",
        "Open descriptors by kind (lsof; a unix socket named by the process at its other end), baseline and end: "
        f"{_kinds(baseline.get('fd_kinds'))}; {_kinds(end.get('fd_kinds'))}.",
        "",
        "![RSS and open fds of localllmd over the run, faults marked](soak.svg)",
        "",
        "## Steps",
        "",
        "| step | at | fault | target | what happened | unavailable | violations |",
        "|---|---|---|---|---|---|---|",
    ]
    for step in report.get("steps", []):
        unavailable = ", ".join(
            f"{n} {'never' if s is None else f'{s:.1f} s'}" for n, s in step["unavailable_s"].items()
        )
        lines.append(
            f"| {step['step']} | {step['t']:.0f} s | {step['fault']} | {_cell(step['target'])} | "
            f"{_cell(step['detail'])} | {unavailable or '-'} | {step['violations']} |"
        )
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {_cell(n)}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def nice_step(top: float, most: int = 6) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) that divides 0..``top`` into at most ``most`` parts."""
    if top <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(top / most))
    return next(m * power for m in (1, 2, 5, 10, 20) if top / (m * power) <= most)


def svg(report: dict, width: int = 960) -> str:
    """Two panels, RSS (MiB) and open fds against time, one line per daemon process, faults marked above."""
    samples = report.get("resources", {}).get("samples", [])
    markers = report.get("markers", [])
    left, right, top, panel, gap = 60, 20, 40, 170, 50
    height = top + 2 * panel + gap + 72
    t_max = max([s[0] for s in samples] + [m[0] for m in markers] + [1.0])
    plot_w = width - left - right

    def x(t: float) -> float:
        return left + plot_w * t / t_max

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13">localllmd during the soak: seed {report.get("seed")}, '
        f"{report.get('minutes', 0):g} min; one line per daemon process (a kill -9 starts a new one)</text>",
    ]
    series = [("RSS (MiB)", 2, 1 / 1024, "#1f77b4"), ("open fds", 3, 1, "#d62728")]
    for index, (label, column, scale, colour) in enumerate(series):
        y0 = top + index * (panel + gap)
        values = [s[column] * scale for s in samples] or [0.0]
        step = nice_step(max(values) * 1.05)
        v_max = step * math.ceil(max(values) * 1.05 / step)
        v_min = 0.0

        def y(v: float, y0=y0, v_max=v_max, v_min=v_min) -> float:
            return y0 + panel - panel * (v - v_min) / (v_max - v_min)

        parts.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{left}" y="{y0 - 6}">{label}</text>')
        for k in range(round(v_max / step) + 1):
            v = k * step
            parts.append(f'<line x1="{left - 4}" x2="{left}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#999"/>')
            parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        for t, kind in markers:
            parts.append(
                f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{y0}" y2="{y0 + panel}" stroke="#ccc" '
                f'stroke-dasharray="2,3"><title>{html.escape(kind)} at {t:.0f}s</title></line>'
            )
        for pid in sorted({s[1] for s in samples}, key=lambda p: min(s[0] for s in samples if s[1] == p)):
            points = " ".join(f"{x(s[0]):.1f},{y(s[column] * scale):.1f}" for s in samples if s[1] == pid)
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5">'
                f"<title>pid {pid}</title></polyline>"
            )
        baseline = (report.get("resources", {}).get("baseline") or {}).get("rss_mib" if column == 2 else "fds")
        if baseline is not None:
            parts.append(
                f'<line x1="{left}" x2="{left + plot_w}" y1="{y(baseline):.1f}" y2="{y(baseline):.1f}" '
                f'stroke="#2ca02c" stroke-dasharray="6,4"><title>baseline {baseline}</title></line>'
            )
    axis_y = top + 2 * panel + gap
    t_step = nice_step(t_max, 12)
    for k in range(int(t_max // t_step) + 1):
        t = k * t_step
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#999"/>')
        parts.append(f'<text x="{x(t):.1f}" y="{axis_y + 16}" text-anchor="middle">{t:g} s</text>')
    for number, (t, kind) in enumerate(markers):  # the faults' names, staggered on three rows between the panels
        row = number % 3
        parts.append(
            f'<text x="{x(t):.1f}" y="{top + panel + 12 + 11 * row}" font-size="9" text-anchor="middle" '
            f'fill="#666">{ABBREVIATIONS.get(kind, kind)}</text>'
        )
    names = [f"{a}: {k}" for k, a in ABBREVIATIONS.items()]
    for row, chunk in enumerate((names[:7], names[7:])):
        legend = ("faults: " if row == 0 else "") + ", ".join(chunk)
        parts.append(
            f'<text x="{left}" y="{height - 36 + 12 * row}" font-size="9" fill="#666">{html.escape(legend)}</text>'
        )
    parts.append(
        f'<text x="{left}" y="{height - 10}" font-size="9" fill="#666">dashed green: the baseline; '
        "dotted grey: a fault injected</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
