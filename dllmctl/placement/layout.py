"""The shapes placement works with: a model's weight sizes, what a node offers, and the one span
record (a node's contiguous layers) that plans, deploys, rebalances and routes all speak. Pure.

A layout travels as JSON (``dllmctl plan --json > plan.json``, ``dllmctl deploy --plan plan.json``);
:meth:`Layout.from_json` is the one reader of that file, and checks it like any other input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dllmd.net.messages.tensor import TensorSlice
from dllmd.net.schema import parse_args
from dllmd.net.wire import WireError


class PlanError(ValueError):
    """The request cannot be met (or a plan file is malformed); the message says what is missing."""


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model: bytes per decoder layer, of the embeddings, of the head."""

    name: str
    layer_bytes: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    tied: bool
    """The head reuses the embedding matrix, so the last span holds the embeddings too."""

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @classmethod
    def uniform(cls, name: str, num_layers: int, layer_bytes: int, embed_bytes: int, head_bytes: int,
                tied: bool = False) -> "ModelShape":
        """A model whose layers all weigh the same (every supported family; handy in simulations)."""
        return cls(name, (layer_bytes,) * num_layers, embed_bytes, head_bytes, tied)

    @classmethod
    def from_manifest(cls, manifest) -> "ModelShape":
        """From a store :class:`~dllmd.models.store.Manifest`."""
        return cls(manifest.name, tuple(layer.bytes for layer in manifest.layers), manifest.embed.bytes,
                   manifest.head.bytes, manifest.tied_embeddings)


@dataclass(frozen=True)
class NodeCapacity:
    """A node as the planner sees it: free memory (VRAM where it computes on a GPU, else RAM) and speed."""

    name: str
    free_memory_bytes: int
    gflops: float


@dataclass(frozen=True)
class Span:
    """Layers ``[start, end)`` on ``node`` (+ the embeddings when ``embed``, the final norm and head when
    ``head``); ``bytes`` is the weight memory it holds (0 where nobody counted it)."""

    node: str
    start: int
    end: int
    embed: bool
    head: bool
    bytes: int = 0
    tensor_slice: TensorSlice | None = None
    """A tensor-parallel member's part of each of these layers (None: the whole layers)."""

    @property
    def layers(self) -> int:
        return self.end - self.start

    @property
    def group(self) -> str:
        """The tensor-parallel group this span is a member of ("" for a whole span)."""
        return self.tensor_slice.group if self.tensor_slice else ""

    @property
    def leads(self) -> bool:
        """Whether sessions enter here: a whole span, or member 0 of a group."""
        return self.tensor_slice is None or self.tensor_slice.rank == 0


@dataclass(frozen=True)
class ThroughputEstimate:
    """A layout's decode tokens/s when every stage runs full pipelines (the routed maximum flow over its
    spans) and the most any layout of the same nodes could reach (their total GFLOP/s over one token's
    FLOPs), both from the planner's compute model (:mod:`dllmctl.placement.throughput`)."""

    tokens_per_second: float
    bound_tokens_per_second: float

    def to_json(self) -> dict:
        bound = self.bound_tokens_per_second
        return {"modelled_tokens_per_second": round(self.tokens_per_second, 3),
                "bound_tokens_per_second": round(bound, 3),
                "fraction_of_bound": round(self.tokens_per_second / bound, 4) if bound > 0 else None}


@dataclass
class Layout:
    model: str
    replicas: int
    spans: list[Span] = field(default_factory=list)
    expected_ms: dict[str, float] = field(default_factory=dict)
    # Private mode: the client holds the embeddings, layers [0, K) and the head; the spans cover the rest.
    private_layers: int = 0
    """Node -> modelled compute of its span per decode token (what the planner balanced), where known."""
    throughput: "ThroughputEstimate | None" = None
    """The layout's modelled aggregate decode rate against the bound, where the planner aimed at it."""

    def to_json(self) -> dict:
        """``{"model", "replicas", "spans": [{"node", "start", "end", "embed", "head", "bytes"[, "tensor_slice"]
        [, "expected_ms"]}]}``, end exclusive."""
        spans = []
        for s in self.spans:
            doc = span_json(s)
            if s.node in self.expected_ms:
                doc["expected_ms"] = float(f"{self.expected_ms[s.node]:.4g}")  # a model's figure: 4 digits say it
            spans.append(doc)
        doc = {"model": self.model, "replicas": self.replicas, "spans": spans}
        if self.private_layers:
            doc["private_layers"] = self.private_layers
        if self.throughput is not None:
            doc["throughput"] = self.throughput.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: Any, model: str, num_layers: int) -> "Layout":
        """A plan file's layout for ``model`` (of ``num_layers`` layers); PlanError naming what is wrong."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("spans"), list) or not doc["spans"]:
            raise PlanError("a plan is a JSON object with a non-empty 'spans' list (see 'dllmctl plan --json')")
        if doc.get("model") not in (None, model):
            raise PlanError(f"this is a plan for {doc['model']!r}, not {model!r}")
        replicas = doc.get("replicas", 1)
        if type(replicas) is not int or replicas < 1:
            raise PlanError(f"'replicas' must be a positive integer, got {replicas!r}")
        private = doc.get("private_layers", 0)
        if type(private) is not int or not 0 <= private < num_layers:
            raise PlanError(f"'private_layers' must be an integer in [0, {num_layers}), got {private!r}")
        spans = [_span(i, raw, num_layers, private) for i, raw in enumerate(doc["spans"])]
        nodes = [s.node for s in spans]
        if len(set(nodes)) != len(nodes):
            raise PlanError(f"a node holds one span of a model; {sorted({n for n in nodes if nodes.count(n) > 1})} "
                            f"appear more than once")
        check_groups(spans)
        return cls(model, replicas, spans, private_layers=private)

    def groups(self) -> dict[str, list[Span]]:
        """Each tensor-parallel group's members, in rank order."""
        return groups_of(self.spans)


def span_json(span: Span) -> dict:
    """A span as a plan file holds it (``tensor_slice`` only for a tensor-parallel member)."""
    doc = asdict(span)
    if span.tensor_slice is None:
        del doc["tensor_slice"]
    return doc


def groups_of(spans: list[Span]) -> dict[str, list[Span]]:
    groups: dict[str, list[Span]] = {}
    for span in spans:
        if span.tensor_slice is not None:
            groups.setdefault(span.group, []).append(span)
    return {name: sorted(members, key=lambda s: s.tensor_slice.rank) for name, members in groups.items()}


def check_groups(spans: list[Span]) -> None:
    """Every group's members hold the same layers, one per rank, and their slices tile each layer."""
    for name, members in groups_of(spans).items():
        size = members[0].tensor_slice.size
        if [m.tensor_slice.rank for m in members] != list(range(size)) or any(
                m.tensor_slice.size != size for m in members):
            raise PlanError(f"group {name!r} must have one member of each rank 0..{size - 1}, "
                            f"got ranks {[m.tensor_slice.rank for m in members]}")
        if len({(m.start, m.end) for m in members}) != 1:
            raise PlanError(f"the members of group {name!r} must hold the same layers")
        for lo, hi in (("kv_lo", "kv_hi"), ("mlp_lo", "mlp_hi"), ("vocab_lo", "vocab_hi")):
            bounds = [(getattr(m.tensor_slice, lo), getattr(m.tensor_slice, hi)) for m in members]
            if lo == "vocab_lo" and not (members[0].embed or members[0].head):
                continue
            if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
                raise PlanError(f"the slices of group {name!r} must tile {lo.removesuffix('_lo')} without gaps or "
                                f"overlaps, got {bounds}")


def _span(index: int, raw: Any, num_layers: int, private: int = 0) -> Span:
    where = f"spans[{index}]"
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where} must be an object with node, start, end, embed, head")
    node = raw.get("node")
    start, end = raw.get("start"), raw.get("end")
    if not isinstance(node, str) or not node:
        raise PlanError(f"{where}.node must be a node name")
    if type(start) is not int or type(end) is not int or not 0 <= start < end <= num_layers:
        raise PlanError(f"{where}: layers [{start!r}, {end!r}) are not a non-empty range inside the model's "
                        f"{num_layers} layers")
    # The ends of the model are implied by the layers: a plan cannot ask a middle span to hold the head.
    # A private plan's nodes hold neither end (the client does) and none of the client's first layers.
    if private:
        if start < private or raw.get("embed", False) is not False or raw.get("head", False) is not False:
            raise PlanError(f"{where}: a private plan's spans start at layer {private} or later and hold neither "
                            f"embeddings nor head")
        embed = head = False
    else:
        embed, head = raw.get("embed", start == 0), raw.get("head", end == num_layers)
    if not private and (embed is not (start == 0) or head is not (end == num_layers)):
        raise PlanError(f"{where}: embed must be true exactly when start is 0, head exactly when end is "
                        f"{num_layers}")
    size = raw.get("bytes", 0)
    if type(size) is not int or size < 0:
        raise PlanError(f"{where}.bytes must be a non-negative integer")
    tensor_slice = raw.get("tensor_slice")
    if tensor_slice is not None:
        try:
            tensor_slice = parse_args(TensorSlice, tensor_slice) if isinstance(tensor_slice, Mapping) else None
        except WireError as exc:
            raise PlanError(f"{where}.tensor_slice: {exc.message}") from None
        if tensor_slice is None:
            raise PlanError(f"{where}.tensor_slice must be an object (see 'dllmctl plan --parallelism tensor --json')")
    return Span(node, start, end, embed, head, size, tensor_slice)


def span_bytes(model: ModelShape, start: int, end: int) -> int:
    """Weight bytes a node holding layers ``[start, end)`` keeps: + embeddings if first, + head if last."""
    total = sum(model.layer_bytes[start:end])
    if start == 0:
        total += model.embed_bytes
    if end == model.num_layers:
        total += model.head_bytes + (model.embed_bytes if model.tied and start != 0 else 0)
    return total
