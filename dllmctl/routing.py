"""Which live nodes serve which layers of a model, as stage candidates for a route."""

from __future__ import annotations

from dllmctl.cluster import NodeEntry, query_nodes
from dllmctl.inference import Stage
from dllmd.net.identity import Identity


async def live_stages(user: Identity, nodes: list[NodeEntry], model: str, timeout: float = 3.0) -> list[Stage]:
    """Ask every node what it serves now; the spans of ``model`` on nodes that are up."""
    by_name = {n.name: n for n in nodes}
    stages = []
    for row in await query_nodes(user, nodes, timeout):
        if row["status"] != "up":
            continue
        for span in row["serving"]:
            if span.get("model") == model:
                stages.append(Stage(by_name[row["name"]], span["start"], span["end"], span["embed"], span["head"],
                                    row["latency_ms"] or 0.0))
    return stages
