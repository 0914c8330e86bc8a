"""Data-parallel training's yardstick: the same job in one process, no network.

The same global batches in the same order, the same summed loss, the same AdamW update; only the
all-reduce is missing (one replica sums every row itself). With ``privacy``, DP-SGD as the workers
run it: the same Poisson batches, per-example clipping and seeded noise. Tests compare distributed
weights with it, and ``dllmctl bench train`` measures its throughput as the baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from dllmd.net.messages.training import PrivacyPlan
from dllmd.train import schedule
from dllmd.train.memory import SavedActivations
from dllmd.train.model import load_causal_lm, loss_sum, parameters
from dllmd.train.optim import OptimConfig, apply_update, flatten_grads, make_optimizer
from dllmd.train.privacy.dpsgd import apply_private_update, privatize
from dllmd.train.worker import ShardRows, micro_batch, private_gradients


def train_locally(model_dir: Path, shards: dict[str, ShardRows], steps: int, batch_size: int, micro_batch_size: int,
                  optim: OptimConfig, seed: int = 0, warmup_steps: int = 0, dtype: str = "float32",
                  on_step: Callable[[int, dict], None] = lambda step, metrics: None,
                  privacy: PrivacyPlan | None = None) -> dict[str, torch.Tensor]:
    """Train ``steps`` steps; returns the final weights by parameter name. With ``privacy``,
    ``batch_size`` is the expected size of the Poisson batches (the plan's divisor)."""
    if privacy is not None and privacy.expected_batch_size != batch_size:
        raise ValueError("privacy.expected_batch_size is the job's batch size")
    model = load_causal_lm(model_dir, sorted(model_dir.rglob("*.safetensors")))
    optimizer = make_optimizer(model, optim)
    saved_activations = SavedActivations(p for _, p in parameters(model))
    rows = {key: shard.tokens.shape[0] for key, shard in shards.items()}
    for step in range(steps):
        started = time.perf_counter()
        lr = schedule.learning_rate(step, optim.lr, warmup_steps, steps)
        if privacy is not None:
            rate = schedule.sample_rate(rows, batch_size)
            batch = [(r.shard, r.index) for r in schedule.poisson_batch(rows, rate, privacy.seed, step)]
            flat = private_gradients(model, shards, batch, micro_batch_size, privacy.clip)
            privatize(flat, privacy, step)
            result = apply_private_update(model, optimizer, flat, lr)
            seconds = time.perf_counter() - started
            on_step(step, {"loss": result.loss, "tokens": result.tokens, "rows": len(batch), "step_s": seconds,
                           "tokens_per_s": result.tokens / seconds})
            continue
        batch = schedule.batch(rows, batch_size, seed, step)
        model.zero_grad(set_to_none=True)
        total, count, activations = 0.0, 0, 0
        for start in range(0, batch_size, micro_batch_size):
            tokens, labels = micro_batch(shards, [(r.shard, r.index) for r in batch[start:start + micro_batch_size]])
            with saved_activations.counting() as saved:  # one micro-batch in flight at a time
                loss, n = loss_sum(model, tokens, labels, dtype)
            activations = max(activations, sum(saved.values()))
            loss.backward()
            total, count = total + float(loss.detach()), count + n
        result = apply_update(model, optimizer, flatten_grads(model, total, count), lr, optim.grad_clip)
        seconds = time.perf_counter() - started
        on_step(step, {"loss": result.loss, "tokens": result.tokens, "step_s": seconds,
                       "tokens_per_s": result.tokens / seconds, "activation_bytes": activations})
    return {name: p.detach().cpu() for name, p in parameters(model)}
