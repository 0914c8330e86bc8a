"""``dllmctl rebalance``: after nodes joined or left, a layout that moves as few layers as possible."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from dllmctl.cli.common import err, fail, human_bytes, load_registry, load_user, out, print_json
from dllmctl.cli.deploy import model_dir
from dllmctl.cli.plan import node_capacities
from dllmctl.cluster import NodeEntry, query_nodes
from dllmctl.coverage import layer_coverage
from dllmctl.deploy import SpanAssignment, bytes_to_send, deploy_span, undeploy
from dllmctl.planner import DEFAULT_RESERVE_FRACTION, ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.rebalance import Rebalance, plan_rebalance
from dllmd.net.client import CallError
from dllmd.net.identity import Identity


def rebalance_command(model: str, replicas: int | None, apply: bool, dtype: str, as_json: bool) -> None:
    """Propose (and with --apply make) a layout over the live nodes that moves as few layers as possible."""
    user, registry = load_user(), load_registry()
    directory = model_dir(model)
    manifest = json.loads((directory / "manifest.json").read_text())
    shape = ModelShape.from_manifest(manifest)
    entries = registry.select(None)
    rows = asyncio.run(query_nodes(user, entries))
    capacities = capacities_for(rows, model)
    if not capacities:
        fail("no node is up; start some with 'dllmctl cluster up --local 3' or check 'dllmctl nodes list'")
    current = live_spans(shape, rows, model)
    replicas = replicas or current_replicas(shape, current)
    try:
        result = plan_rebalance(shape, capacities, current, replicas)
    except PlanError as exc:
        down = [r["name"] for r in rows if r["status"] != "up"]
        fail(str(exc) + (f" (down: {', '.join(down)})" if down else ""))
    doc = result.to_json()
    if apply:
        deployed, unloaded = _apply_with_progress(user, {e.name: e for e in entries}, directory, manifest, result,
                                                  unload_first(result, rows), dtype or served_dtype(rows, model),
                                                  as_json) if result.changed else ([], {})
        doc.update(deployed=deployed, unloaded=unloaded)
    if as_json:
        print_json(doc)
        return
    _show(result, apply)


def capacities_for(rows: list[dict], model: str) -> list[NodeCapacity]:
    """What each live node can give ``model``: as for 'dllmctl plan', plus the memory of the span of it
    the node holds now, which the new span replaces."""
    held = {r["name"]: sum(s.get("param_bytes", 0) for s in r["serving"] if s.get("model") == model) for r in rows}
    return [replace(c, free_memory_bytes=c.free_memory_bytes + held[c.name]) for c in node_capacities(rows)]


def live_spans(shape: ModelShape, rows: list[dict], model: str) -> list[Span]:
    """The spans of ``model`` that nodes serve now; nodes that are not up count as gone."""
    return [Span(r["name"], s["start"], s["end"], s["embed"], s["head"], span_bytes(shape, s["start"], s["end"]))
            for r in rows if r["status"] == "up" for s in r["serving"] if s.get("model") == model]


def current_replicas(shape: ModelShape, current: list[Span]) -> int:
    """How many nodes hold the most-held layer now: a node that left must not cost the model a replica."""
    runs = layer_coverage(shape.num_layers, [(s.start, s.end) for s in current])
    return max([run.count for run in runs] + [1])


def served_dtype(rows: list[dict], model: str) -> str:
    """The dtype most of the model's live spans run in, so new spans match their neighbours ('' if none)."""
    dtypes = Counter(s.get("dtype", "") for r in rows if r["status"] == "up" for s in r["serving"]
                     if s.get("model") == model)
    return min(dtypes, key=lambda d: (-dtypes[d], d)) if dtypes else ""


def unload_first(result: Rebalance, rows: list[dict]) -> set[str]:
    """Nodes whose new span does not fit next to their old one: a node builds the new span before it
    drops the old, so these must drop it first."""
    free = {c.name: c.free_memory_bytes for c in node_capacities(rows)}  # as reported, old span still loaded
    new_bytes = {s.node: s.bytes for s in result.layout.spans}
    return {m.node for m in result.moves
            if m.before and m.after and new_bytes[m.node] > free[m.node] * (1 - DEFAULT_RESERVE_FRACTION)}


def _apply_with_progress(user: Identity, entries: dict[str, NodeEntry], directory: Path, manifest: dict,
                         result: Rebalance, unload_nodes: set[str], dtype: str,
                         as_json: bool) -> tuple[list[dict], dict[str, str]]:
    changed = [_assignment(s) for s in result.layout.spans if s.node in {m.node for m in result.moves}]
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=as_json) as progress:
        tasks = {s.node: progress.add_task(f"{s.node} [{s.start}-{s.end})", total=bytes_to_send(manifest, s))
                 for s in changed}
        try:
            return asyncio.run(_apply(user, entries, directory, result, changed, unload_nodes, dtype,
                                      lambda node, n: progress.advance(tasks[node], n)))
        except CallError as exc:
            fail(f"rebalance stopped half-way: {exc}; run 'dllmctl rebalance {result.layout.model} --apply' again")


async def _apply(user: Identity, entries: dict[str, NodeEntry], directory: Path, result: Rebalance,
                 changed: list[SpanAssignment], unload_nodes: set[str], dtype: str,
                 progress: Callable[[str, int], None]) -> tuple[list[dict], dict[str, str]]:
    """Load the changed spans (all nodes at once), then unload the spans of nodes left without one:
    the old layout serves for as long as it can."""
    model = result.layout.model

    async def load(span: SpanAssignment) -> dict:
        if span.node in unload_nodes:
            await undeploy(user, [entries[span.node]], model)
        return await deploy_span(user, entries[span.node], directory, span, progress, dtype)

    deployed = list(await asyncio.gather(*(load(s) for s in changed)))
    dropped = [entries[m.node] for m in result.moves if m.after is None]
    return deployed, (await undeploy(user, dropped, model) if dropped else {})


def _assignment(span: Span) -> SpanAssignment:
    return SpanAssignment(span.node, span.start, span.end, span.embed, span.head)


def _show(result: Rebalance, applied: bool) -> None:
    moves = {m.node: m for m in result.moves}
    table = Table("node", "layers", "was", "new layers", "embed", "head", "weights")
    for s in result.layout.spans:
        move = moves.get(s.node)
        table.add_row(s.node, _layers((s.start, s.end)), _layers(move.before) if move else "same",
                      str(move.new_layers) if move and move.new_layers else "",
                      "yes" if s.embed else "", "yes" if s.head else "", human_bytes(s.bytes))
    for m in result.moves:
        if m.after is None:
            table.add_row(m.node, "-", _layers(m.before), "", "", "", "")
    out.print(table)
    if not result.changed:
        out.print("nothing to change: every layer is held as asked")
    elif applied:
        out.print(f"moved {result.moved_layers} layers; changed the span of {_nodes(len(result.moves))}")
    else:
        out.print(f"{result.moved_layers} layers to move; the span of {_nodes(len(result.moves))} changes "
                  f"(--apply makes it so)")


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _layers(r: tuple[int, int] | None) -> str:
    return f"{r[0]}-{r[1] - 1}" if r else "-"

