"""DiLoCo's yardstick: the same job in one process, every worker a model of its own, no network.

Written plainly, apart from the workers' code: each simulated worker trains on the rows of the
global batches whose shards it computes (in the batch's order, in micro-batches, with the same summed
loss and AdamW update as :mod:`dllmd.train.local`), and every ``sync_every`` inner steps the
token-weighted mean of (outer - worker) weights goes to torch's own ``SGD(nesterov=True)`` as the
outer weights' gradient. Tests compare a real job's weights with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dllmd.train import schedule
from dllmd.train.model import load_causal_lm, loss_sum, parameters
from dllmd.train.optim import OptimConfig, apply_update, flatten_grads, make_optimizer
from dllmd.train.worker import ShardRows, micro_batches


def train_diloco_locally(model_dir: Path, shards: dict[str, ShardRows], owners: list[list[str]], steps: int,
                         batch_size: int, micro_batch_size: int, optim: OptimConfig, sync_every: int,
                         outer_lr: float, outer_momentum: float, seed: int = 0, warmup_steps: int = 0,
                         dtype: str = "float32") -> dict[str, torch.Tensor]:
    """``steps`` inner steps by ``len(owners)`` workers, worker w computing the shards ``owners[w]``;
    returns the final outer weights by parameter name."""
    files = sorted(model_dir.rglob("*.safetensors"))
    workers = [load_causal_lm(model_dir, files) for _ in owners]
    optimizers = [make_optimizer(model, optim) for model in workers]
    outer_model = load_causal_lm(model_dir, files)
    outer = [p for _, p in parameters(outer_model)]
    outer_optimizer = torch.optim.SGD(outer, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0,
                                      foreach=False)
    owner = {shard: w for w, mine in enumerate(owners) for shard in mine}
    rows = {key: shard.tokens.shape[0] for key, shard in shards.items()}
    for first in range(0, steps, sync_every):
        tokens = [0] * len(workers)
        for step in range(first, min(first + sync_every, steps)):
            lr = schedule.learning_rate(step, optim.lr, warmup_steps, steps)
            batch = schedule.batch(rows, batch_size, seed, step)
            for w, (model, optimizer) in enumerate(zip(workers, optimizers)):
                mine = [(r.shard, r.index) for r in batch if owner[r.shard] == w]
                if not mine:
                    continue
                model.zero_grad(set_to_none=True)
                total, count = 0.0, 0
                for ids, labels in micro_batches(shards, mine, micro_batch_size):
                    loss, n = loss_sum(model, ids, labels, dtype)
                    loss.backward()
                    total, count = total + float(loss.detach()), count + n
                apply_update(model, optimizer, flatten_grads(model, total, count), lr, optim.grad_clip)
                tokens[w] += count
        with torch.no_grad():
            inner = [[p for _, p in parameters(model)] for model in workers]
            for i, param in enumerate(outer):
                param.grad = sum((param - inner[w][i]) * tokens[w] for w in range(len(workers))) / sum(tokens)
            outer_optimizer.step()
            for params in inner:
                for mine, shared in zip(params, outer):
                    mine.copy_(shared)
    return {name: p.detach().cpu() for name, p in parameters(outer_model)}
