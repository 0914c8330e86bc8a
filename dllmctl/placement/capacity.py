"""What the live nodes can offer a model, and what they hold of it now, from ``nodes list`` rows. Pure.

The rows are those of :func:`dllmctl.cluster.live.query_nodes`; nodes that are not up offer nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from dllmd.units import mib
from dllmctl.placement.coverage import layer_coverage
from dllmctl.placement.layout import ModelShape, NodeCapacity, Span, span_bytes
from dllmctl.placement.planner import DEFAULT_RESERVE_FRACTION
from dllmctl.placement.rebalance import Rebalance


def node_capacities(rows: list[dict], rate: str = "decode") -> list[NodeCapacity]:
    """What each live node can offer (:func:`offered_memory`) at its measured speed: its decode rate
    (:func:`decode_rates`, what inference spans are weighed by) or, with ``rate="matmul"``, its matmul
    rate (what training's micro-batches, big products, run at)."""
    up = [row for row in rows if row["status"] == "up"]
    speeds = decode_rates(up) if rate == "decode" else {r["name"]: _matmul(r.get("hardware") or {}) for r in up}
    return [NodeCapacity(name=row["name"], free_memory_bytes=offered_memory(row), gflops=speeds[row["name"]])
            for row in up]


def decode_gflops(hardware: dict) -> float:
    """The FLOP rate a node decodes at, which the planner weighs spans by and models times with: a
    decode token reads each weight once for two FLOPs, so its fp32 weights stream at ``stream_gbps``
    bound it to half that in GFLOP/s, far below the matmul rate of big products (SmolLM2 on one 2-core
    node: 341 GFLOP/s matmul, 29 GB/s streamed, so 14.5 GFLOP/s; modelled 24 ms a token against 35-37
    measured, where the matmul rate alone said 1 ms). A node that predates the stream rate: 0."""
    matmul, stream = _matmul(hardware), float(hardware.get("stream_gbps") or 0.0)
    return min(matmul, stream / 2) if stream > 0 and matmul > 0 else 0.0


def decode_rates(rows: list[dict]) -> dict[str, float]:
    """Each node's decode rate by name. A node that predates the stream rate is given its matmul rate
    scaled as the nodes that measure both scale (their median), so a cluster half upgraded is not
    planned as if the old half were ~20x faster; with no such node, every node's matmul rate."""
    rates = {row["name"]: decode_gflops(row.get("hardware") or {}) for row in rows}
    matmul = {row["name"]: _matmul(row.get("hardware") or {}) for row in rows}
    ratios = sorted(rates[n] / matmul[n] for n in rates if rates[n] > 0)
    scale = ratios[len(ratios) // 2] if ratios else 1.0
    return {n: rates[n] if rates[n] > 0 else matmul[n] * scale for n in rates}


def _matmul(hardware: dict) -> float:
    return float(hardware.get("matmul_gflops") or 0.0)


def offered_memory(row: dict) -> int:
    """Free VRAM if the node computes on a GPU, else available RAM; no more than its owner's cap
    (node.toml's [limits] memory) leaves beside what dllm already holds there."""
    hw = row["hardware"]
    free = int(hw["gpus"][0]["memory_free"] if hw.get("gpus") else hw["ram_available"])
    cap = memory_cap(row)
    return min(free, max(cap - (row.get("memory_used_bytes") or 0), 0)) if cap else free


def memory_cap(row: dict) -> int:
    """The node's memory cap in bytes (0: none, as from nodes that predate [limits])."""
    return (row.get("limits") or {}).get("memory_bytes", 0)


def capped_note(rows: list[dict]) -> str:
    """For a plan that does not fit: the live nodes whose owners cap what dllm may use there."""
    capped = [f"{r['name']} at {mib(memory_cap(r))} ({mib(r.get('memory_used_bytes') or 0)} in use)"
              for r in rows if r["status"] == "up" and memory_cap(r)]
    return f" (capped by their owners, [limits] memory in node.toml: {', '.join(capped)})" if capped else ""


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
