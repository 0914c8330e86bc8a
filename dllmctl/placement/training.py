"""Pipeline stages for training: which contiguous layers each stage holds. Pure.

The planner (:func:`plan_layout`) places inference spans by weight bytes and throughput. Training
holds more per layer: fp32 weights, their gradients, AdamW's two moments and the buffer gradients
are summed in (five fp32 copies), plus the saved activations of the micro-batches the schedule keeps
in flight. :func:`training_shape` scales a model's shape by that, and :func:`plan_stages` plans one
chain over the stage positions, each as strong as the weakest of its replicas (every replica of a
stage holds the same layers, so that their gradients can be summed): balanced by compute, the
default. :func:`plan_stages_by_memory` balances memory instead, counting each stage's own in-flight
micro-batches (1F1B keeps more on the first stages): the most any stage fills of its node's memory is
made as small as it can be, at the price of a larger bubble where the head's compute then sits on
a stage with as many layers as the others.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllmctl.placement.layout import ModelShape, NodeCapacity, PlanError, span_bytes
from dllmctl.placement.planner import DEFAULT_RESERVE_FRACTION, plan_layout
from dllmd.train.footprint import LOGITS_BYTES_PER_VOCAB

STATE_COPIES = 5  # weights, gradients, two moments, the summing buffer: all fp32
BALANCES = ("compute", "memory")


@dataclass(frozen=True)
class TrainingLoad:
    """What a step keeps in memory beside the weights: tokens per micro-batch, how many micro-batches
    the schedule holds at once (at most, on any stage), what one layer saves per token for its
    backward (:func:`dllmd.train.footprint.layer_activation_bytes`), the model's vocabulary."""

    tokens_per_micro_batch: int
    in_flight: int
    activation_bytes_per_token: int
    vocab: int
    weight_itemsize: int = 4  # of the stored weights the shape was measured in


def training_shape(model: ModelShape, load: TrainingLoad, in_flight: int | None = None) -> ModelShape:
    """``model`` with each part's bytes as training holds them (``in_flight`` micro-batches' saved
    activations per layer: the schedule's most by default)."""
    scale = STATE_COPIES * 4 / load.weight_itemsize
    held = load.in_flight if in_flight is None else in_flight
    activations = held * load.tokens_per_micro_batch * load.activation_bytes_per_token
    logits = load.tokens_per_micro_batch * load.vocab * LOGITS_BYTES_PER_VOCAB
    return ModelShape(model.name, tuple(int(b * scale) + activations for b in model.layer_bytes),
                      int(model.embed_bytes * scale), int(model.head_bytes * scale) + logits, model.tied)


def _positions(model: ModelShape, replicas: list[list[NodeCapacity]]) -> list[NodeCapacity]:
    """One capacity per stage position: the weakest of its replicas' nodes."""
    stages = len(replicas[0])
    if any(len(r) != stages for r in replicas):
        raise PlanError("every replica needs as many nodes as there are stages")
    if stages > model.num_layers:
        raise PlanError(f"{model.name} has {model.num_layers} layers: at most that many stages, not {stages}")
    return [NodeCapacity(f"stage-{s}", min(r[s].free_memory_bytes for r in replicas),
                         min(r[s].gflops for r in replicas)) for s in range(stages)]


def plan_stages(model: ModelShape, replicas: list[list[NodeCapacity]]) -> list[tuple[int, int]]:
    """Layer spans ``[start, end)`` of the P stages, for replicas of P nodes each (stage s of every
    replica at position s); PlanError if the nodes cannot hold them or a stage would get no layer."""
    stages = len(replicas[0])
    positions = _positions(model, replicas)
    layout = plan_layout(model, positions, replicas=1)
    order = [int(span.node.split("-")[1]) for span in layout.spans]
    if order != list(range(stages)):
        raise PlanError(f"{model.name} does not split into {stages} stages in this order over these nodes "
                        f"(the planner gives {len(order)}): choose the layers with --stage-layers, or use fewer stages")
    return [(span.start, span.end) for span in layout.spans]


def plan_stages_by_memory(model: ModelShape, load: TrainingLoad, in_flight: list[int],
                          replicas: list[list[NodeCapacity]],
                          reserve_fraction: float = DEFAULT_RESERVE_FRACTION) -> list[tuple[int, int]]:
    """Layer spans ``[start, end)`` of the P stages that make the largest share any stage takes of its
    position's usable memory as small as it can be; stage s holds ``in_flight[s]`` micro-batches'
    activations (``model``: the stored shape, not :func:`training_shape`'s). Exact, by dynamic
    programming over the split points (P x L^2 spans: instant at any real depth). PlanError if even
    the best split does not fit."""
    stages = len(in_flight)
    positions = _positions(model, replicas)
    if len(positions) != stages:
        raise PlanError(f"{stages} stages' in-flight counts for {len(positions)} stage positions")
    shapes = [training_shape(model, load, held) for held in in_flight]
    budgets = [p.free_memory_bytes * (1 - reserve_fraction) for p in positions]
    layers = model.num_layers

    def share(s: int, start: int, end: int) -> float:
        return span_bytes(shapes[s], start, end) / budgets[s] if budgets[s] > 0 else float("inf")

    # best[s][j]: the smallest worst share of stages 0..s-1 holding layers [0, j), and its last split.
    best = [[(float("inf"), -1)] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0)
    for s in range(stages):
        for end in range(s + 1, layers - (stages - s - 1) + 1):
            best[s + 1][end] = min(((max(best[s][start][0], share(s, start, end)), start)
                                    for start in range(s, end) if best[s][start][1] >= 0), default=(float("inf"), -1))
    worst, _ = best[stages][layers]
    if worst > 1:
        raise PlanError(f"{model.name} does not fit these {stages} stages' memory however its layers are split "
                        f"(the best split fills {worst:.0%} of a stage's usable memory): add nodes or stages, lower "
                        f"--micro-batch-size, or use --recompute")
    spans, end = [], layers
    for s in range(stages, 0, -1):
        start = best[s][end][1]
        spans.append((start, end))
        end = start
    return spans[::-1]


def stages_from_counts(counts: list[int], num_layers: int) -> list[tuple[int, int]]:
    """``--stage-layers 2,3``: spans from layer counts, which must add up to the model's layers."""
    if len(counts) < 2 or any(c < 1 for c in counts):
        raise PlanError("--stage-layers needs two stages or more, each of at least one layer")
    if sum(counts) != num_layers:
        raise PlanError(f"--stage-layers adds up to {sum(counts)} layers, but the model has {num_layers}")
    spans, start = [], 0
    for count in counts:
        spans.append((start, start + count))
        start += count
    return spans
