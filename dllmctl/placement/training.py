"""Pipeline stages for training: which contiguous layers each stage holds. Pure.

The planner (:func:`plan_layout`) places inference spans by weight bytes and throughput. Training
holds more per layer: fp32 weights, their gradients, AdamW's two moments and the buffer gradients
are summed in (five fp32 copies), plus the saved activations of the micro-batches the schedule keeps
in flight. :func:`training_shape` scales a model's shape by that, and :func:`plan_stages` plans one
chain over the stage positions, each as strong as the weakest of its replicas (every replica of a
stage holds the same layers, so that their gradients can be summed).
"""

from __future__ import annotations

from dataclasses import dataclass

from dllmctl.placement.layout import ModelShape, NodeCapacity, PlanError
from dllmctl.placement.planner import plan_layout

STATE_COPIES = 5  # weights, gradients, two moments, the summing buffer: all fp32
ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN = 24  # what a decoder layer saves for its backward, roughly
LOGITS_BYTES_PER_TOKEN_PER_VOCAB = 8  # the head's fp32 logits and their gradient


@dataclass(frozen=True)
class TrainingLoad:
    """What a step keeps in memory beside the weights: tokens per micro-batch, how many micro-batches
    the schedule holds at once, the model's width and vocabulary."""

    tokens_per_micro_batch: int
    in_flight: int
    hidden: int
    vocab: int
    weight_itemsize: int = 4  # of the stored weights the shape was measured in


def training_shape(model: ModelShape, load: TrainingLoad) -> ModelShape:
    """``model`` with each part's bytes as training holds them."""
    scale = STATE_COPIES * 4 / load.weight_itemsize
    activations = load.in_flight * load.tokens_per_micro_batch * load.hidden * ACTIVATION_BYTES_PER_TOKEN_PER_HIDDEN
    logits = load.tokens_per_micro_batch * load.vocab * LOGITS_BYTES_PER_TOKEN_PER_VOCAB
    return ModelShape(model.name, tuple(int(b * scale) + activations for b in model.layer_bytes),
                      int(model.embed_bytes * scale), int(model.head_bytes * scale) + logits, model.tied)


def plan_stages(model: ModelShape, replicas: list[list[NodeCapacity]]) -> list[tuple[int, int]]:
    """Layer spans ``[start, end)`` of the P stages, for replicas of P nodes each (stage s of every
    replica at position s); PlanError if the nodes cannot hold them or a stage would get no layer."""
    stages = len(replicas[0])
    if any(len(r) != stages for r in replicas):
        raise PlanError("every replica needs as many nodes as there are stages")
    if stages > model.num_layers:
        raise PlanError(f"{model.name} has {model.num_layers} layers: at most that many stages, not {stages}")
    positions = [NodeCapacity(f"stage-{s}", min(r[s].free_memory_bytes for r in replicas),
                              min(r[s].gflops for r in replicas)) for s in range(stages)]
    layout = plan_layout(model, positions, replicas=1)
    order = [int(span.node.split("-")[1]) for span in layout.spans]
    if order != list(range(stages)):
        raise PlanError(f"{model.name} does not split into {stages} stages in this order over these nodes "
                        f"(the planner gives {len(order)}): choose the layers with --stage-layers, or use fewer stages")
    return [(span.start, span.end) for span in layout.spans]


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
