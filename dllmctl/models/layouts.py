"""Layouts of a model over the nodes as they are now: ask the live nodes, plan (or rebalance) with
the pure planner, and make a rebalance so. What ``dllmctl plan``, ``deploy`` and ``rebalance`` run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from dllmd.models.store import Manifest
from dllmd.net.identity import Identity
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmctl.models.deploy import Progress, deploy_span, undeploy
from dllmctl.placement.capacity import capacities_for, current_replicas, live_spans, node_capacities, unload_first
from dllmctl.placement.layout import Layout, ModelShape, PlanError, Span
from dllmctl.placement.planner import plan_layout
from dllmctl.placement.rebalance import Rebalance, plan_rebalance


def _down_note(rows: list[dict]) -> str:
    down = [r["name"] for r in rows if r["status"] != "up"]
    return f" (down: {', '.join(down)})" if down else ""


def _no_node_up() -> PlanError:
    return PlanError("no node is up; start some with 'dllmctl cluster up --local 3' or check 'dllmctl nodes list'")


async def plan_on_live_nodes(user: Identity, entries: list[NodeEntry], manifest: Manifest, replicas: int) -> Layout:
    """Contiguous spans of the model over those of ``entries`` that are up; PlanError if they cannot hold it."""
    rows = await query_nodes(user, entries)
    capacities = node_capacities(rows)
    if not capacities:
        raise _no_node_up()
    try:
        return plan_layout(ModelShape.from_manifest(manifest), capacities, replicas=replicas)
    except PlanError as exc:
        raise PlanError(str(exc) + _down_note(rows)) from None


@dataclass
class LiveRebalance:
    """A rebalance proposed over the live nodes, with what applying it needs to know of them."""

    result: Rebalance
    rows: list[dict]


async def rebalance_on_live_nodes(user: Identity, entries: list[NodeEntry], manifest: Manifest,
                                  replicas: int | None) -> LiveRebalance:
    """A layout over the live nodes that moves as few layers as possible from what they serve now
    (``replicas``: default as many as hold the model's layers now)."""
    shape = ModelShape.from_manifest(manifest)
    rows = await query_nodes(user, entries)
    capacities = capacities_for(rows, manifest.name)
    if not capacities:
        raise _no_node_up()
    current = live_spans(shape, rows, manifest.name)
    try:
        result = plan_rebalance(shape, capacities, current, replicas or current_replicas(shape, current))
    except PlanError as exc:
        raise PlanError(str(exc) + _down_note(rows)) from None
    return LiveRebalance(result, rows)


def changed_spans(result: Rebalance) -> list[Span]:
    """The spans of the new layout whose node's span changes."""
    moved = {m.node for m in result.moves}
    return [s for s in result.layout.spans if s.node in moved]


async def apply_rebalance(user: Identity, entries: dict[str, NodeEntry], model_dir: Path, live: LiveRebalance,
                          dtype: str, progress: Progress = lambda *_: None) -> tuple[list[dict], dict[str, str]]:
    """Load the changed spans (all nodes at once), then unload the spans of nodes left without one:
    the old layout serves for as long as it can. Nodes whose new span does not fit beside their old
    one drop the old first."""
    result = live.result
    model = result.layout.model
    unload_nodes = unload_first(result, live.rows)

    async def load(span: Span) -> dict:
        if span.node in unload_nodes:
            await undeploy(user, [entries[span.node]], model)
        return await deploy_span(user, entries[span.node], model_dir, span, progress, dtype)

    deployed = list(await asyncio.gather(*(load(s) for s in changed_spans(result))))
    dropped = [entries[m.node] for m in result.moves if m.after is None]
    return deployed, (await undeploy(user, dropped, model) if dropped else {})
