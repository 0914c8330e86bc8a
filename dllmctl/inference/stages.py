"""The live spans of a model, asked of the nodes now: the candidates routing chooses from (I/O)."""

from __future__ import annotations

from dllmd.net.identity import Identity
from dllmd.net.messages.tensor import TensorSlice
from dllmd.net.schema import parse_args
from dllmctl.cluster.live import query_nodes
from dllmctl.cluster.registry import NodeEntry
from dllmctl.placement.capacity import decode_rates
from dllmctl.placement.layout import Span
from dllmctl.placement.routing import Stage


async def live_stages(user: Identity, nodes: list[NodeEntry], model: str, timeout: float = 3.0) -> list[Stage]:
    """Ask every node what it serves now; the spans of ``model`` on nodes that are up, with their load.
    A tensor-parallel group is one stage, its member 0 (where sessions enter), once it is linked and
    for as long as it has every member."""
    by_name = {n.name: n for n in nodes}
    stages = []
    rows = [row for row in await query_nodes(user, nodes, timeout) if row["status"] == "up"]
    speeds = decode_rates(rows)
    for row in rows:
        gflops = speeds[row["name"]]
        for span in row["serving"]:
            if span.get("model") == model:
                tensor_slice = parse_args(TensorSlice, span["tensor_slice"]) if span.get("tensor_slice") else None
                if tensor_slice is not None and (tensor_slice.rank != 0 or not span.get("group_ready")
                                                 or span.get("group_broken")):
                    continue
                held = Span(row["name"], span["start"], span["end"], span["embed"], span["head"],
                            int(span.get("param_bytes", 0)), tensor_slice)
                stages.append(Stage(by_name[row["name"]], held, latency_ms=row["latency_ms"] or 0.0,
                                    step_ms=float(span.get("step_ms", 0.0)), sessions=int(span.get("sessions", 0)),
                                    queued=int(span.get("queued", 0)), gflops=gflops))
    return stages
