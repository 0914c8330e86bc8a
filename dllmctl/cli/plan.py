"""``dllmctl plan`` and ``dllmctl rebalance``: layouts of a model over the live nodes."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import (DtypeOpt, JsonOpt, LayoutOpt, NodesOpt, PrivateLayersOpt, PrivateOpt, ReplicasOpt,
                                ThroughputOpt, TpOpt, fail, human_bytes,
                                layers_text, load_user, local_model, out, print_json, print_layout, print_throughput,
                                select_nodes)

ModelArg = Annotated[str, typer.Argument(help="Model name in the local store.")]


def plan_command(model: ModelArg, nodes: NodesOpt = None, replicas: ReplicasOpt = 1,
                 parallelism: LayoutOpt = "pipeline", tp: TpOpt = None, private: PrivateOpt = False,
                 private_layers: PrivateLayersOpt = 1, throughput: ThroughputOpt = False,
                 as_json: JsonOpt = False) -> None:
    """Layer spans per node (or tensor-parallel groups and each member's slice), sized by free memory
    and measured throughput, with each part's expected compute per token. With --private the nodes
    split layers K.. only: this machine holds the embeddings, the first K layers and the head."""
    import asyncio

    from dllmctl.models.layouts import plan_for
    from dllmctl.placement.layout import PlanError

    directory, manifest = local_model(model)
    try:
        layout = asyncio.run(plan_for(load_user(), select_nodes(nodes), directory, manifest, parallelism, tp, replicas,
                                      private_layers if private else 0, throughput))
    except PlanError as exc:
        fail(str(exc))
    if as_json:
        print_json(layout.to_json())
    else:
        print_layout(layout.to_json())


def rebalance_command(
    model: ModelArg,
    replicas: Annotated[Optional[int], typer.Option(
        min=1, max=16, help="Hold every layer on this many nodes (default: as many as hold its layers now; with "
                            "--throughput, at least this many chains, default 1).")] = None,
    throughput: Annotated[bool, typer.Option("--throughput", help=(
        "The layout of most aggregate tokens/s among those that move at most twice the fewest layers a layout "
        "keeping 90% of the bound must move (nodes that would slow a chain left idle).")) ] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Deploy the new spans and unload the dropped ones.")] = False,
    dtype: DtypeOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """After nodes joined or left: a layout that moves as few layers as possible (--apply makes it so)."""
    import asyncio

    from dllmd.net.client import CallError
    from dllmctl.cli.common import transfer_progress
    from dllmctl.models.deploy import bytes_to_send
    from dllmctl.models.layouts import apply_rebalance, changed_spans, rebalance_on_live_nodes
    from dllmctl.placement.capacity import served_dtype
    from dllmctl.placement.layout import PlanError

    user, entries = load_user(), select_nodes(None)
    directory, manifest = local_model(model)
    try:
        live = asyncio.run(rebalance_on_live_nodes(user, entries, manifest, replicas, throughput))
    except PlanError as exc:
        fail(str(exc))
    result = live.result
    doc = result.to_json()
    if apply:
        deployed, unloaded = [], {}
        if result.changed:
            changed = changed_spans(result)
            with transfer_progress(as_json) as progress:
                tasks = {s.node: progress.add_task(f"{s.node} [{s.start}-{s.end})", total=bytes_to_send(manifest, s))
                         for s in changed}
                try:
                    deployed, unloaded = asyncio.run(apply_rebalance(
                        user, {e.name: e for e in entries}, directory, live, dtype or served_dtype(live.rows, model),
                        lambda node, n: progress.advance(tasks[node], n)))
                except CallError as exc:
                    fail(f"rebalance stopped half-way: {exc}; run 'dllmctl rebalance {model} --apply' again")
        doc.update(deployed=deployed, unloaded=unloaded)
    if as_json:
        print_json(doc)
        return
    _show(result, apply)


def _show(result, applied: bool) -> None:
    moves = {m.node: m for m in result.moves}
    table = Table("node", "layers", "was", "new layers", "embed", "head", "weights")
    for s in result.layout.spans:
        move = moves.get(s.node)
        table.add_row(s.node, layers_text(s.start, s.end), _layers(move.before) if move else "same",
                      str(move.new_layers) if move and move.new_layers else "",
                      "yes" if s.embed else "", "yes" if s.head else "", human_bytes(s.bytes))
    for m in result.moves:
        if m.after is None:
            table.add_row(m.node, "-", _layers(m.before), "", "", "", "")
    out.print(table)
    if result.layout.throughput is not None:
        print_throughput(result.layout.replicas, result.layout.throughput.to_json(), result.how)
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
    return layers_text(*r) if r else "-"
