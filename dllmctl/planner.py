"""Layer layouts: which node holds which contiguous layers. Pure functions, no I/O.

Each node's share of the layers follows its measured throughput (GFLOP/s), capped by what its
free memory holds (after headroom for KV caches and activations). The first span also holds the
embeddings, the last the final norm and head (and, when tied, the embeddings again). With
``replicas=R`` the nodes form R disjoint chains, each covering every layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

DEFAULT_USABLE_FRACTION = 0.8  # of a node's free memory; the rest is for caches and activations


class PlanError(ValueError):
    """The request cannot be met; the message says what is missing."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    tied: bool

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> "ModelShape":
        layers = sorted(manifest["layers"], key=lambda layer: layer["index"])
        return cls(manifest["name"], tuple(int(layer["bytes"]) for layer in layers), int(manifest["embed"]["bytes"]),
                   int(manifest["head"]["bytes"]), bool(manifest["tied_embeddings"]))


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    free_memory_bytes: int
    gflops: float


@dataclass(frozen=True)
class Span:
    node: str
    start: int
    end: int
    embed: bool
    head: bool
    bytes: int


@dataclass
class Layout:
    model: str
    replicas: int
    spans: list[Span] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "replicas": self.replicas, "spans": [asdict(s) for s in self.spans]}


def span_bytes(model: ModelShape, start: int, end: int) -> int:
    """Weights a node holding [start, end) keeps in memory."""
    total = sum(model.layer_bytes[start:end])
    if start == 0:
        total += model.embed_bytes
    if end == model.num_layers:
        total += model.head_bytes + (model.embed_bytes if model.tied and start != 0 else 0)
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _ideal_counts(num_layers: int, weights: list[float]) -> list[int]:
    """Layers per node proportional to ``weights`` (largest-remainder rounding, sums to num_layers)."""
    total = sum(weights) or 1.0
    raw = [num_layers * w / total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts


def _chain(model: ModelShape, nodes: list[NodeCapacity], usable: float) -> list[Span]:
    """One chain over ``nodes`` (in order) covering every layer, or PlanError."""
    n = model.num_layers
    budget = [int(node.free_memory_bytes * usable) for node in nodes]
    counts = _ideal_counts(n, [max(node.gflops, 1e-3) for node in nodes])
    # Walk the chain; a node takes its share but never more than its memory holds, and what it
    # cannot hold moves on to the nodes after it.
    spans, start, owed = [], 0, 0
    for i, node in enumerate(nodes):
        want = counts[i] + owed
        if i == len(nodes) - 1:
            want = n - start
        take = want
        while take > 0 and span_bytes(model, start, start + take) > budget[i]:
            take -= 1
        owed = want - take
        if take > 0:
            spans.append(Span(node.name, start, start + take, start == 0, start + take == n,
                              span_bytes(model, start, start + take)))
            start += take
    if start < n:
        needed = span_bytes(model, start, n)
        raise PlanError(f"layers {start}-{n - 1} of {model.name} ({_size(needed)} of weights) do not fit on "
                        f"{', '.join(node.name for node in nodes)} (usable memory {_size(sum(budget))} in all, "
                        f"{_size(span_bytes(model, 0, n))} needed): add a node, free memory or lower --replicas")
    return spans


def plan_layout(model: ModelShape, nodes: list[NodeCapacity], replicas: int = 1,
                usable_fraction: float = DEFAULT_USABLE_FRACTION) -> Layout:
    """Contiguous spans for ``model`` over ``nodes``; ``replicas`` disjoint chains."""
    if model.num_layers < 1:
        raise PlanError(f"{model.name} has no layers")
    if replicas < 1:
        raise PlanError("--replicas must be at least 1")
    if not nodes:
        raise PlanError("no nodes to plan over: register or start some")
    if len({n.name for n in nodes}) != len(nodes):
        raise PlanError("node names must be unique")
    if replicas > len(nodes):
        raise PlanError(f"{replicas} replicas need at least {replicas} nodes; {len(nodes)} available")
    # Deal nodes into chains by descending throughput so every chain gets fast and slow machines.
    ranked = sorted(nodes, key=lambda node: (-node.gflops, node.name))
    chains = [ranked[r::replicas] for r in range(replicas)]
    layout = Layout(model.name, replicas)
    for chain in chains:
        ordered = sorted(chain, key=lambda node: [n.name for n in nodes].index(node.name))  # keep the caller's order
        layout.spans.extend(_chain(model, ordered, usable_fraction))
    return layout
