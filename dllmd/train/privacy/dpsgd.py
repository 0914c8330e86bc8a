"""DP-SGD's update, after the all-reduce of the clipped per-example gradient sums, on every replica
and in the one-process reference.

Noise N(0, (z C)^2) per coordinate is added once, to the global sum (one seeded draw, the same on
every worker: ``noise.py``), then the sum is divided by the expected batch size (q x rows, the
``--batch-size``), not by the batch's own size or token count: those depend on which rows were
sampled, and dividing by them would leak it. No global-norm clip follows (``--grad-clip`` is not
applied): each example's clip already bounds what one row can move, and AdamW steps on the result.
"""

from __future__ import annotations

import math

import torch

from dllmd.net.messages.training import PrivacyPlan
from dllmd.train.model import parameters
from dllmd.train.optim import StepResult, clip_and_step, squared_norm
from dllmd.train.privacy.noise import gaussian_noise

NOISE_SALT = 1  # the noise's stream of the job's DP seed (the Poisson sampling draws from numpy, apart)


def privatize(flat: torch.Tensor, plan: PrivacyPlan, step: int) -> torch.Tensor:
    """Turn ``flat``'s all-reduced sum of clipped gradients into the noised mean gradient, in place;
    returns it (a view of ``flat``, which still ends with the summed loss and token count)."""
    grads = flat[:-2]
    grads.add_(gaussian_noise(grads.numel(), plan.noise_multiplier * plan.clip, plan.seed, step, NOISE_SALT))
    return grads.div_(plan.expected_batch_size)


def batch_loss(flat: torch.Tensor) -> float | None:
    """The batch's mean token loss, as exact jobs report it (None for a batch without tokens)."""
    tokens = float(flat[-1])
    return float(flat[-2]) / tokens if tokens else None


def apply_private_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, flat: torch.Tensor,
                         lr: float) -> StepResult:
    """AdamW on a privatized buffer (:func:`privatize`), without a global clip. ``flat`` is consumed."""
    grads = flat[:-2]
    norm = math.sqrt(squared_norm(grads))
    loss, tokens = batch_loss(flat), int(flat[-1])
    clip_and_step([p for _, p in parameters(model)], optimizer, grads, norm, lr, grad_clip=0.0)
    return StepResult(loss, tokens, norm)
