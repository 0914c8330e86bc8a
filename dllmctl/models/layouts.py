"""Layouts of a model over the nodes as they are now: ask the live nodes, plan (or rebalance) with
the pure planner, and make a rebalance so. What ``dllmctl plan``, ``deploy`` and ``rebalance`` run.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from dllmd.models.store import Manifest
from dllmd.net.identity import Identity
from dllmctl.cluster.links import measure_links
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmctl.models.deploy import Progress, deploy, deploy_span, undeploy
from dllmctl.placement.capacity import (capacities_for, capped_note, current_replicas, live_spans, node_capacities,
                                        unload_first)
from dllmctl.placement.groups import plan_groups
from dllmctl.placement.churn import TARGET_FRACTION, fewest_moves, rebalance_swarm
from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span, ThroughputEstimate
from dllmctl.placement.planner import plan_layout, plan_private_layout
from dllmctl.placement.rebalance import Rebalance, plan_rebalance
from dllmctl.placement.swarm import plan_swarm
from dllmctl.placement.tensor import TensorShape
from dllmctl.placement.throughput import layout_throughput, throughput_bound


def _refusal_note(rows: list[dict]) -> str:
    """What a refused plan should also say: the nodes that are down, and the caps of those up."""
    down = [r["name"] for r in rows if r["status"] != "up"]
    return capped_note(rows) + (f" (down: {', '.join(down)})" if down else "")


def _no_node_up() -> PlanError:
    return PlanError("no node is up; start some with 'dllmctl cluster up --local 3' or check 'dllmctl nodes list'")


async def plan_on_live_nodes(user: Identity, entries: list[NodeEntry], manifest: Manifest, replicas: int,
                             private_layers: int = 0, throughput: bool = False) -> Layout:
    """Contiguous spans of the model over those of ``entries`` that are up; PlanError if they cannot hold it.
    ``private_layers`` K > 0: layers K.. only, the client holding the rest (private mode). ``throughput``:
    as many chains as raise the aggregate tokens/s (at least ``replicas``), nodes that would slow a
    chain left idle (:func:`~dllmctl.placement.swarm.plan_swarm`), instead of exactly ``replicas``
    chains over every node."""
    rows = await query_nodes(user, entries)
    capacities = node_capacities(rows)
    if not capacities:
        raise _no_node_up()
    try:
        shape = ModelShape.from_manifest(manifest)
        if private_layers:
            return plan_private_layout(shape, capacities, private_layers, replicas=replicas)
        if throughput:
            return with_throughput(plan_swarm(shape, capacities, min_replicas=replicas), shape, capacities)
        return plan_layout(shape, capacities, replicas=replicas)
    except PlanError as exc:
        raise PlanError(str(exc) + _refusal_note(rows)) from None


def tensor_shape(model_dir: Path, manifest: Manifest) -> TensorShape:
    """The sizes a tensor-parallel split works with, from the model's config (and its stored dtype)."""
    config = json.loads((model_dir / "config.json").read_text())
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(manifest.dtype, 4)
    return TensorShape.from_config(config, itemsize)


async def plan_groups_on_live_nodes(user: Identity, entries: list[NodeEntry], model_dir: Path, manifest: Manifest,
                                    parallelism: str, tp: int | None = None, replicas: int = 1) -> Layout:
    """A tensor-parallel (one group per replica) or hybrid (a chain of groups) layout over the live nodes
    that do not serve the model yet: a node holds one span of a model, and a new layout never silently
    replaces one that serves. ``tp`` None: every free node in one group per replica (tensor), pairs
    (hybrid), at most the model's KV heads. Groups are formed by the round trips the nodes measure
    between themselves (``peers.ping``, remembered for a while by each node)."""
    rows = await query_nodes(user, entries)
    holding = sorted(r["name"] for r in rows if r["status"] == "up"
                     and any(s.get("model") == manifest.name for s in r["serving"]))
    free = [c for c in node_capacities(rows) if c.name not in holding]
    if not free and not holding:
        raise _no_node_up()
    shape = tensor_shape(model_dir, manifest)
    if tp is None:
        tp = max(1, min(len(free) // replicas if parallelism == "tensor" else 2, shape.kv_heads))
    # Groups go where links are fast: each free node measures its round trips to the others.
    names = {c.name for c in free}
    latency = await measure_links(user, [e for e in entries if e.name in names]) if tp > 1 else {}
    try:
        return plan_groups(ModelShape.from_manifest(manifest), shape, free, tp, replicas,
                           stages=1 if parallelism == "tensor" else None, latency=latency)
    except PlanError as exc:
        held = (f"; {', '.join(holding)} already serve {manifest.name} in another layout (a new one never replaces "
                f"it: 'dllmctl undeploy {manifest.name}' first, or add nodes)") if holding else ""
        raise PlanError(str(exc) + held + _refusal_note(rows)) from None


async def deploy_parallel_layout(user: Identity, entries: list[NodeEntry], model_dir: Path, manifest: Manifest,
                                 parallelism: str, tp: int | None = None, replicas: int = 1,
                                 progress: Progress = lambda *_: None) -> Layout:
    """Plan a tensor-parallel or hybrid layout over the free live nodes and deploy it (groups linked)."""
    layout = await plan_groups_on_live_nodes(user, entries, model_dir, manifest, parallelism, tp, replicas)
    await deploy(user, {e.name: e for e in entries}, model_dir, layout.spans, progress)
    return layout


@dataclass
class LiveRebalance:
    """A rebalance proposed over the live nodes, with what applying it needs to know of them."""

    result: Rebalance
    rows: list[dict]


async def rebalance_on_live_nodes(user: Identity, entries: list[NodeEntry], manifest: Manifest,
                                  replicas: int | None, throughput: bool = False) -> LiveRebalance:
    """A layout over the live nodes that moves as few layers as possible from what they serve now
    (``replicas``: default as many as hold the model's layers now). ``throughput``: the layout of most
    routed tokens/s among those that move at most twice the fewest layers a layout keeping 90% of the
    bound must move (:func:`~dllmctl.placement.churn.rebalance_swarm`; ``replicas``: at least, default 1)."""
    shape = ModelShape.from_manifest(manifest)
    rows = await query_nodes(user, entries)
    capacities = capacities_for(rows, manifest.name)
    if not capacities:
        raise _no_node_up()
    current = live_spans(shape, rows, manifest.name)
    try:
        if throughput:
            result = rebalance_throughput(shape, capacities, current, replicas or 1)
            with_throughput(result.layout, shape, capacities)
        else:
            result = plan_rebalance(shape, capacities, current, replicas or current_replicas(shape, current))
    except PlanError as exc:
        raise PlanError(str(exc) + _refusal_note(rows)) from None
    return LiveRebalance(result, rows)


def rebalance_throughput(shape: ModelShape, capacities: list[NodeCapacity], current: list[Span],
                         min_replicas: int) -> Rebalance:
    """:func:`~dllmctl.placement.churn.rebalance_swarm` within twice :func:`~dllmctl.placement.churn.fewest_moves`;
    where that keeps the layout below 90% of the bound, the budget doubles while that buys a better
    layout, until one reaches 90% (or the whole model's layers on every node are allowed).
    ``fewest_moves`` is a lower bound: over a few nodes, each able to hold much of the model, the
    fewest moves that really reach 90% can be several times it (a node joining two replicas must take
    layers off one of them). The candidates change the layout locally, so a layout far from the
    swarm planner's (one planned by ``plan_layout``) is re-planned with ``plan --throughput`` and
    ``deploy``, not rebalanced into it."""
    budget = 2 * fewest_moves(shape, capacities, current)
    most = shape.num_layers * max(len(capacities), 1)
    gflops = {c.name: c.gflops for c in capacities}
    target = TARGET_FRACTION * throughput_bound(shape, capacities)
    result, rate = None, -1.0
    while True:
        tried = rebalance_swarm(shape, capacities, current, min_replicas=min_replicas, budget=budget)
        tried_rate = layout_throughput(shape, tried.layout.spans, gflops)
        if result is not None and tried_rate <= rate + 1e-9:
            return result  # a larger budget bought nothing: the candidates are spent
        result, rate = tried, tried_rate
        if budget >= most or rate >= target:
            return result
        budget = min(most, max(2 * budget, 1))


def with_throughput(layout: Layout, shape: ModelShape, capacities: list[NodeCapacity]) -> Layout:
    """``layout`` with its routed decode throughput and the bound no layout beats (what ``plan --json``
    shows for a throughput plan), both in the planner's modelled tokens/s."""
    gflops = {c.name: c.gflops for c in capacities}
    layout.throughput = ThroughputEstimate(layout_throughput(shape, layout.spans, gflops),
                                           throughput_bound(shape, capacities))
    return layout


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


async def plan_for(user, entries, directory, manifest, parallelism: str, tp: int | None, replicas: int,
                   private_layers: int = 0, throughput: bool = False):
    """The layout ``plan`` shows and ``deploy`` (and ``infer --deploy``) deploys, for ``--parallelism`` and ``--tp``
    (``private_layers`` K: a private-mode layout of layers K.. without embeddings or head; ``throughput``:
    see :func:`plan_on_live_nodes`)."""
    if throughput and (parallelism != "pipeline" or private_layers):
        raise PlanError("--throughput plans pipeline chains (--parallelism pipeline, not private)")
    if parallelism in ("pipeline", "model"):
        if tp not in (None, 1):
            raise PlanError("--tp applies to --parallelism tensor or hybrid")
        return await plan_on_live_nodes(user, entries, manifest, replicas, private_layers, throughput)
    if private_layers:
        raise PlanError("a private layout is a pipeline of spans (--parallelism pipeline)")
    if parallelism not in ("tensor", "hybrid"):
        raise PlanError(f"--parallelism must be pipeline, tensor or hybrid, not {parallelism!r}")
    return await plan_groups_on_live_nodes(user, entries, directory, manifest, parallelism, tp, replicas)
