"""What every training step reads and at which learning rate: pure functions of the job.

The global order: every row of every shard, shuffled per epoch with the job's seed, and stratified:
each shard's rows are spread evenly over the epoch, so every global batch holds rows of each shard
in proportion to its size. A worker computes the rows of the shards it holds, so equal shards mean
equal work per step (a plain shuffle gives one worker 5 of 8 rows and the other 3 as often as not,
and the step waits for the slower). Step ``t`` of an epoch takes the next ``batch_size`` rows (a
short last batch is dropped, so every step has the same global batch). A worker computes the rows whose shard it holds. The order does not depend on
which worker holds which shard, so when a dead node's shard moves to a survivor the job still
trains on exactly the same batches, and a resumed job ends where an uninterrupted one ends.

A differentially private job samples instead (:func:`poisson_batch`): each row independently,
with the rate the privacy accountant is told (:func:`sample_rate`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Row:
    shard: str  # the shard's id: the public key of the node it was pushed to
    index: int


def global_order(shard_rows: Mapping[str, int], epoch: int, seed: int) -> list[Row]:
    return list(_order(tuple(sorted(shard_rows.items())), epoch, seed))


@functools.lru_cache(maxsize=4)  # every step of an epoch reads the same order: shuffle it once
def _order(shard_rows: tuple[tuple[str, int], ...], epoch: int, seed: int) -> tuple[Row, ...]:
    rng = np.random.default_rng([seed, epoch])
    rows, due = [], []
    for shard, count in shard_rows:
        rows += [Row(shard, int(i)) for i in rng.permutation(count)]
        # The k-th row drawn from this shard is due at (k + offset) / count of the epoch.
        due.append((np.arange(count) + rng.random()) / max(count, 1))
    order = np.argsort(np.concatenate(due) if due else np.zeros(0), kind="stable")
    return tuple(rows[i] for i in order)


def steps_per_epoch(shard_rows: Mapping[str, int], batch_size: int) -> int:
    return sum(shard_rows.values()) // batch_size


def total_steps(shard_rows: Mapping[str, int], batch_size: int, epochs: int | None, max_steps: int | None) -> int:
    per_epoch = steps_per_epoch(shard_rows, batch_size)
    if max_steps is not None:
        return max_steps
    return per_epoch * (epochs or 1)


def batch(shard_rows: Mapping[str, int], batch_size: int, seed: int, step: int) -> list[Row]:
    """The global batch of ``step`` (0-based, counted over the whole job)."""
    per_epoch = steps_per_epoch(shard_rows, batch_size)
    epoch, within = divmod(step, per_epoch)
    return list(_order(tuple(sorted(shard_rows.items())), epoch, seed)[within * batch_size:(within + 1) * batch_size])


POISSON_STREAM = 0x706F6973  # keeps Poisson draws apart from the shuffles drawn from the same seed


def sample_rate(shard_rows: Mapping[str, int], batch_size: int) -> float:
    """DP-SGD's sampling rate q: each row's chance to be in a step, so that a batch holds ``batch_size``
    rows on average (what the privacy accountant is told)."""
    return batch_size / sum(shard_rows.values())


def poisson_batch(shard_rows: Mapping[str, int], rate: float, seed: int, step: int) -> list[Row]:
    """DP-SGD's batch of ``step``: every row of every shard joins independently with probability
    ``rate``, drawn from (seed, step) alone. Its size varies from step to step (it can be empty): that
    is the sampling the accountant's amplification assumes, where a fixed-size shuffled batch is not.
    Like :func:`batch`, it does not depend on who holds which shard."""
    rng = np.random.default_rng([seed, step, POISSON_STREAM])
    rows = []
    for shard, count in sorted(shard_rows.items()):  # one draw per row: a home dataset's rows, milliseconds
        rows += [Row(shard, int(i)) for i in np.flatnonzero(rng.random(count) < rate)]
    return rows


def learning_rate(step: int, base: float, warmup_steps: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warmup to ``base``, then cosine decay to ``final_fraction * base`` at the last step."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
