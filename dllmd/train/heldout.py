"""A job's held-out evaluation: which rows it never trains on, when it scores them, and the score.

Two kinds of held-out data, one score:

* **Rows** (``--eval-fraction F`` of the job's own dataset, or every row of ``--eval-data``, another
  sharded dataset): scored by whoever holds them — each data-parallel worker the rows of the shards
  it computes, each pipeline replica's stages in a forward-only pass, each federated client its own
  (no row leaves its organization: only the sums below do). Every scorer returns
  :class:`EvalSums` (summed token loss, target tokens, top-1 hits), the coordinator adds them up and
  divides once: the same token-weighted mean a single process over all the rows computes.
* **A text** (``--eval-text``, ``JobSpec.eval_tokens``): the coordinator's replica scores it in
  sliding windows with :mod:`dllmd.inference.perplexity` (``heldout_loss``).

Which rows are held out is a pure function of the job's seed, the shard's id and its row count
(:func:`split`), so the coordinator and a federated client compute the same split without telling
each other anything, and a resumed job holds out the same rows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from dllmd.inference.perplexity import heldout_nll
from dllmd.net.messages.training import EVAL_FRACTION_MAX, JobSpec
from dllmd.train import schedule
from dllmd.train.model import autocast, summed_cross_entropy

HELDOUT_STREAM = 0x686F6C64  # keeps the split's draw apart from the shuffles drawn from the same seed


@dataclass(frozen=True)
class EvalSums:
    """What one scorer saw: summed next-token loss (nats), target tokens, top-1 hits."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0

    def __add__(self, other: "EvalSums") -> "EvalSums":
        return EvalSums(self.nll + other.nll, self.tokens + other.tokens, self.correct + other.correct)

    def metrics(self) -> dict:
        """The metrics row's keys (``eval_*``); empty when nothing was scored."""
        if not self.tokens:
            return {}
        loss = self.nll / self.tokens
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
                "eval_accuracy": self.correct / self.tokens, "eval_tokens": self.tokens}


def token_sums(logits: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """The sums of a forward pass's logits ``[..., vocab]`` against its labels (-100: not a target)."""
    nll, count = summed_cross_entropy(logits, labels)
    labels = labels.to(logits.device)
    hits = ((logits.argmax(-1) == labels) & (labels != -100)).sum()
    return EvalSums(float(nll), count, int(hits))


@torch.no_grad()
def score_rows(model: torch.nn.Module, shards: Mapping, rows: Sequence[tuple[str, int]], micro_batch_size: int,
               dtype: str = "float32") -> EvalSums:
    """``rows`` (``(shard, row)`` pairs of ``shards``' :class:`ShardRows`) under ``model``, forward only."""
    from dllmd.train.worker import micro_batches

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = EvalSums()
    try:
        for tokens, labels in micro_batches(shards, rows, micro_batch_size):
            with autocast(device, dtype):
                logits = model(input_ids=tokens.to(device).long()).logits
            total = total + token_sums(logits, labels)
    finally:
        model.train(was_training)
    return total


def rows_loss(model: torch.nn.Module, shard, micro_batch_size: int = 4) -> float:
    """The mean token loss of every row of one :class:`ShardRows` (benchmarks compare modes by it)."""
    sums = score_rows(model, {"rows": shard}, [("rows", i) for i in range(shard.tokens.shape[0])], micro_batch_size)
    if not sums.tokens:
        raise ValueError("the held-out rows have no target tokens")
    return sums.nll / sums.tokens


def held_count(rows: int, fraction: float) -> int:
    """How many of a shard's ``rows`` are held out: the fraction rounded, at least one, never all."""
    if not fraction or rows < 2:
        return 0
    return min(rows - 1, max(1, round(fraction * rows)))


def split(seed: int, shard: str, rows: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(trained rows, held-out rows) of a shard, both sorted: a seeded draw of :func:`held_count` rows."""
    digest = int.from_bytes(hashlib.sha256(shard.encode()).digest()[:8], "big")
    order = np.random.default_rng([seed, HELDOUT_STREAM, digest]).permutation(rows)
    held = held_count(rows, fraction)
    return np.sort(order[held:]), np.sort(order[:held])


class HeldOut:
    """A job's split of its own dataset (identity without ``--eval-fraction``) and when it evaluates."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.train: dict[str, np.ndarray] = {}
        self.held: dict[str, np.ndarray] = {}
        for s in spec.shards:
            if s.rows:
                self.train[s.id], self.held[s.id] = split(spec.seed, s.id, s.rows, spec.eval_fraction)

    @property
    def train_counts(self) -> dict[str, int]:
        """Rows per shard the schedule draws from: the held-out ones are never in a batch."""
        return {shard: len(rows) for shard, rows in self.train.items()}

    def trained(self, rows: list[schedule.Row]) -> list[schedule.Row]:
        """The schedule's rows (indices into each shard's trained rows) as rows of the shards."""
        if not self.spec.eval_fraction:
            return rows
        return [schedule.Row(r.shard, int(self.train[r.shard][r.index])) for r in rows]

    @property
    def scores_rows(self) -> bool:
        return bool(self.spec.eval_fraction or self.spec.eval_dataset)

    def due(self, step: int, total: int) -> bool:
        """Whether the job evaluates after ``step`` (0-based): every ``--eval-every`` steps (without it,
        at every checkpoint) and after the last."""
        if not (self.scores_rows or self.spec.eval_tokens):
            return False
        every = self.spec.eval_every or self.spec.checkpoint_every
        return step + 1 == total or bool(every and (step + 1) % every == 0)


def held_rows(spec: JobSpec, heldout: HeldOut, shard_ids: list[str],
              owner_of: Callable[[str], object]) -> tuple[list[str], dict]:
    """The held-out rows to score and who scores them: (the shards the rows tensors number, owner -> its
    int64 ``[rows, 2]`` tensor of (shard number, row)); ``owner_of(shard)`` names who holds a shard's
    rows now (None: nobody, it is not scored)."""
    if spec.eval_dataset:  # every row of every shard of the other dataset, on its own node
        refs = [s for s in spec.eval_shards if s.rows]
        shards, rows = [s.id for s in refs], {s.id: range(s.rows) for s in refs}
    else:
        shards, rows = shard_ids, {s: heldout.held[s].tolist() for s in shard_ids}
    per_owner: dict = {}
    for number, shard in enumerate(shards):
        owner = owner_of(shard)
        if owner is not None:
            per_owner.setdefault(owner, []).extend([number, int(i)] for i in rows[shard])
    return shards, {o: torch.tensor(r, dtype=torch.int64).reshape(-1, 2) for o, r in per_owner.items()}


def refusal(spec: JobSpec, config: dict) -> str | None:
    """Why ``spec``'s held-out data cannot be scored with a model of ``config``, or None."""
    if not 0 <= spec.eval_fraction <= EVAL_FRACTION_MAX:
        return f"--eval-fraction must be in (0, {EVAL_FRACTION_MAX}], not {spec.eval_fraction:g}"
    if spec.eval_fraction and spec.eval_dataset:
        return "give --eval-fraction or --eval-data, not both"
    if spec.eval_every and not (spec.eval_fraction or spec.eval_dataset or spec.eval_tokens):
        return "--eval-every needs held-out data: --eval-fraction, --eval-data or --eval-text"
    if spec.eval_dataset and spec.eval_dataset == spec.dataset:
        return "--eval-data is the training dataset itself; hold part of it out with --eval-fraction instead"
    if spec.eval_fraction and (spec.dp_clip or spec.dp_noise_multiplier) and spec.parallelism != "federated":
        return ("--eval-fraction with DP-SGD: the accountant's sampling rate counts every row of the dataset; "
                "hold out with --eval-data (another dataset) instead")
    if spec.eval_dataset and spec.parallelism in ("model", "hybrid"):
        return ("--eval-data is scored where its shards are, and a pipeline's rows live on its first stages: "
                "use --eval-fraction for pipeline and hybrid jobs")
    if not spec.eval_tokens:
        return None
    if spec.parallelism != "data":
        return (f"--eval-text is scored on the coordinator's whole replica: built for --parallelism data, "
                f"not {spec.parallelism} (use --eval-fraction)")
    vocab = int(config["vocab_size"])
    if not all(0 <= t < vocab for t in spec.eval_tokens):
        return f"the held-out text must be token ids of {spec.model}'s vocabulary (0-{vocab - 1})"
    if not 1 < spec.eval_window <= int(config.get("max_position_embeddings", spec.eval_window)):
        return f"--eval-window {spec.eval_window} is more than {spec.model}'s positions"
    return None


def score(model: torch.nn.Module, spec: JobSpec) -> float:
    """The held-out text's mean token loss under ``model``, in windows of ``eval_window`` (stride half)."""
    return heldout_nll(model, spec.eval_tokens, spec.eval_window, max(1, spec.eval_window // 2))
