"""``dllmctl top``: every node and every running job, live (a ClusterSnapshot every --interval seconds)."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from dllmctl.cli.common import STATUS_STYLE, JsonOpt, err, fail, layers_text, load_registry, load_user, \
    maybe_number, out, split_names


def top_command(
    interval: Annotated[float, typer.Option(min=0.2, max=3600.0, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="One snapshot, then exit.")] = False,
    nodes: Annotated[Optional[str], typer.Option(help="Comma-separated node names (default: all registered).")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, max=60.0, help="Seconds to wait for each node.")] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Nodes (up/down, CPU, GPU, RAM, what they serve, sessions, tokens/s) and running jobs (step, loss,
    tokens/s, ETA), refreshed every --interval seconds until Ctrl+C. --json: one snapshot per line."""
    import asyncio

    from rich.live import Live

    from dllmctl.cluster.registry import RegistryError
    from dllmctl.monitor.snapshot import cluster_snapshot

    user, registry, names = load_user(), load_registry(), split_names(nodes) or None

    def take():
        try:
            return asyncio.run(cluster_snapshot(user, registry, names, timeout))
        except RegistryError as exc:
            fail(str(exc))

    try:
        if as_json:  # NDJSON: one snapshot a line, the first right away
            while True:
                print(take().to_json(), flush=True)
                if once:
                    return
                time.sleep(interval)
        snap = take()
        if once:
            out.print(render(snap))
            return
        with Live(render(snap), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(take()), refresh=True)
    except KeyboardInterrupt:
        err.print("stopped watching")
        raise typer.Exit(0)


def render(snap) -> Group:
    """The snapshot as two tables: nodes, then running jobs."""
    nodes = Table(title=f"{snap.up}/{len(snap.nodes)} nodes up, {snap.tokens_per_s:.1f} tok/s generated "
                        f"({time.strftime('%H:%M:%S', time.localtime(snap.taken_at))})")
    for name in ("node", "status", "ms", "CPU", "RAM", "GPU", "serving", "sess", "queue", "tok/s", "tokens"):
        nodes.add_column(name, no_wrap=name in ("node", "status", "CPU", "RAM"))
    for n in snap.nodes:
        status = Text(n.status, style=STATUS_STYLE.get(n.status, ""))
        s = n.stats
        if s is None:
            nodes.add_row(n.name, status, "-", "-", "-", "-", Text(n.error or "", style="dim"), "-", "-", "-", "-")
            continue
        nodes.add_row(n.name, status, maybe_number(n.latency_ms, ".1f"), f"{s.cpu_percent:.0f}%",
                      _used_of(s.ram_used_bytes, s.ram_total_bytes), _gpus(s.gpus), _serving(s.serving),
                      str(s.sessions), str(s.queued), f"{s.tokens_per_s:.1f}", str(s.tokens_generated))
    if not snap.nodes:
        return Group(Text("no nodes registered; add one with 'dllmctl nodes add' or start 'dllmctl cluster up "
                          "--local 3'"))
    if not snap.jobs:
        return Group(nodes, Text("no running jobs", style="dim"))
    jobs = Table("job", "coordinator", "state", "step", "loss", "tok/s", "ETA", title="running jobs")
    for j in snap.jobs:
        jobs.add_row(j.job, j.coordinator, j.state, f"{j.step}/{j.total_steps}", maybe_number(j.loss, ".4f"),
                     maybe_number(j.tokens_per_s, ".0f"), _duration(j.eta_s))
    return Group(nodes, jobs)


def _used_of(used: int, total: int) -> str:
    """``5.7/16G``: both in GiB, the total rounded (it is there for scale)."""
    return f"{used / 2**30:.1f}/{total / 2**30:.0f}G"


def _gpus(gpus) -> str:
    if not gpus:
        return "-"
    return ", ".join(f"{g.index}: {'' if g.util_percent is None else f'{g.util_percent:.0f}% '}"
                     f"{_used_of(g.memory_used_bytes, g.memory_total_bytes)}" for g in gpus)


def _serving(spans) -> str:
    if not spans:
        return "-"
    parts = []
    for s in spans:
        part = f"{s.model} {layers_text(s.start, s.end)}"
        if s.tensor_slice is not None:
            part += f" (slice {s.tensor_slice.rank + 1}/{s.tensor_slice.size})"
        parts.append(part)
    return "; ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
