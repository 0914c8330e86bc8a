"""DP-SGD's per-example gradients, each clipped to norm C, summed: what a worker all-reduces.

Each example (a packed row) has its own gradient, of its own loss: the mean next-token cross
entropy over its labelled positions (0 for a row with none). ``torch.func`` computes them for a
micro-batch at once, ``vmap(grad(loss))`` over transformers' own model through ``functional_call``
(tied weights stay tied: the tied matrix's gradient sums both uses, as autograd's does). The
micro-batch bounds memory: vmap holds one gradient per example of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from dllmd.train.model import parameters

# CPU attention has no batching rule: vmap runs it once per example (the same values, only slower).
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the "
                                          "batching rule", category=UserWarning)

NORM_EPS = 1e-6  # as Opacus: the clip factor of an example with a zero gradient stays finite


def per_example_gradients(model: torch.nn.Module, tokens: torch.Tensor,
                          labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Every example's gradient (name -> ``[examples, *shape]``), summed token loss and token count."""
    device = next(model.parameters()).device
    weights = {name: p.detach() for name, p in parameters(model)}

    def example_loss(weights, tokens, labels):
        logits = functional_call(model, weights, (), {"input_ids": tokens[None]}).logits[0]
        total = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        count = (labels != -100).sum()
        return total / count.clamp(min=1), (total.detach(), count)

    per_example = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    grads, (totals, counts) = per_example(weights, tokens.to(device).long(), labels.to(device))
    return grads, totals, counts


def clip_factors(grads: Mapping[str, torch.Tensor], clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's gradient norm (over every parameter) and the factor min(1, C / norm) clipping it to C."""
    squares = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values())
    norms = squares.sqrt()
    return norms, (clip / (norms + NORM_EPS)).clamp(max=1.0)


def add_clipped_sum(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                    clip: float) -> tuple[float, int]:
    """Add the micro-batch's clipped per-example gradients, summed, to the parameters' ``.grad``;
    returns its summed token loss and its token count."""
    grads, totals, counts = per_example_gradients(model, tokens, labels)
    _, factors = clip_factors(grads, clip)
    with torch.no_grad():
        for name, param in parameters(model):
            clipped = torch.einsum("e,e...->...", factors, grads[name])
            param.grad = clipped if param.grad is None else param.grad.add_(clipped)
    return float(totals.sum()), int(counts.sum())


def clipped_gradient_sum(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         clip: float) -> tuple[float, int]:
    """Sum the clipped per-example gradients of every ``(tokens, labels)`` micro-batch into ``.grad``
    (from zero); their summed token loss and token count."""
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for tokens, labels in batches:
        loss, n = add_clipped_sum(model, tokens, labels, clip)
        total, count = total + loss, count + n
    return total, count
