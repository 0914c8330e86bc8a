"""Held-out loss: the mean next-token cross entropy of a model over rows it was not trained on, the
same summed loss training computes (``loss_sum``), divided once by the tokens counted. Benchmarks
compare training modes by it."""

from __future__ import annotations

import torch

from dllmd.train.model import loss_sum
from dllmd.train.worker import ShardRows


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, rows: ShardRows, micro_batch_size: int = 4) -> float:
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, rows.tokens.shape[0], micro_batch_size):
            tokens, labels = rows.batch(list(range(start, min(start + micro_batch_size, rows.tokens.shape[0]))))
            loss, n = loss_sum(model, tokens, labels, "float32")
            total, count = total + float(loss), count + n
    finally:
        model.train()
    if not count:
        raise ValueError("the held-out rows have no target tokens")
    return total / count
