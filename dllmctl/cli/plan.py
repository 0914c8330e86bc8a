"""``dllmctl plan``: a layer layout for a model over the live nodes."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from dllmctl.cli.common import JsonOpt, fail, human_bytes, load_registry, load_user, out, print_json
from dllmctl.cluster import Registry, RegistryError, query_nodes
from dllmctl.deploy import SpanAssignment
from dllmctl.planner import Layout, ModelShape, NodeCapacity, PlanError, plan_layout
from dllmd.net.identity import Identity


def node_capacities(rows: list[dict]) -> list[NodeCapacity]:
    """What each live node can offer: free VRAM if it computes on a GPU, else available RAM."""
    capacities = []
    for row in rows:
        if row["status"] != "up":
            continue
        hw = row["hardware"]
        free = hw["gpus"][0]["memory_free"] if hw.get("gpus") else hw["ram_available"]
        capacities.append(NodeCapacity(name=row["name"], free_memory_bytes=int(free), gflops=float(hw["matmul_gflops"])))
    return capacities


def compute_layout(user: Identity, registry: Registry, model: str, manifest: dict, names: list[str] | None,
                   replicas: int) -> Layout:
    try:
        entries = registry.select(names)
    except RegistryError as exc:
        fail(str(exc))
    rows = asyncio.run(query_nodes(user, entries))
    down = [r["name"] for r in rows if r["status"] != "up"]
    capacities = node_capacities(rows)
    if not capacities:
        fail("no node is up; start some with 'dllmctl cluster up --local 3' or check 'dllmctl nodes list'")
    try:
        return plan_layout(ModelShape.from_manifest(manifest), capacities, replicas=replicas)
    except PlanError as exc:
        fail(str(exc) + (f" (down: {', '.join(down)})" if down else ""))


def make_plan(user: Identity, registry: Registry, model: str, manifest: dict, names: list[str] | None,
              replicas: int) -> list[SpanAssignment]:
    layout = compute_layout(user, registry, model, manifest, names, replicas)
    return [SpanAssignment(s.node, s.start, s.end, s.embed, s.head) for s in layout.spans]


def plan_command(
    model: Annotated[str, typer.Argument(help="Model name in the local store.")],
    nodes: Annotated[Optional[str], typer.Option(help="Comma-separated node names (default: all registered).")] = None,
    replicas: Annotated[int, typer.Option(min=1, max=16, help="Hold every layer on this many nodes.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Contiguous layer spans per node, sized by free memory and weighted by measured throughput."""
    from dllmctl.cli.deploy import model_dir

    user, registry = load_user(), load_registry()
    manifest = json.loads((model_dir(model) / "manifest.json").read_text())
    names = [n.strip() for n in nodes.split(",") if n.strip()] if nodes else None
    layout = compute_layout(user, registry, model, manifest, names, replicas)
    doc = layout.to_json()
    if as_json:
        print_json(doc)
        return
    table = Table("node", "layers", "embed", "head", "weights")
    for s in doc["spans"]:
        table.add_row(s["node"], f"{s['start']}-{s['end'] - 1}", "yes" if s["embed"] else "", "yes" if s["head"] else "",
                      human_bytes(s["bytes"]))
    out.print(table)
