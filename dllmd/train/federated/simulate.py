"""A federated job's yardstick: the same rounds in one process, no network.

The same clients sampled for the same rounds, each trained from the same global weights on the same
rows with :meth:`ClientModel.train_round`, the updates added in the same order and applied by the
same server optimizer. Tests compare a real job's exported weights with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dllmd.net.messages import training as S
from dllmd.train import schedule
from dllmd.train.federated.client import ClientModel, LocalRound
from dllmd.train.federated.strategy import ServerOptimizer, mean_update, plan_round
from dllmd.train.federated.weights import GlobalModel
from dllmd.train.model import load_causal_lm
from dllmd.train.privacy.job import JobPrivacy
from dllmd.train.worker import ShardRows


def simulate_rounds(model_dir: Path, shards: dict[str, ShardRows], spec: S.JobSpec) -> dict[str, torch.Tensor]:
    """Run ``spec.rounds`` rounds over ``shards`` (client public key -> its rows; clients in the order
    of ``spec.nodes``); returns the final global weights by parameter name. Secure aggregation is not
    simulated: its sum equals the plain one within the fixed-point step (and under DP its noise is
    drawn by the clients from seeds nobody keeps)."""
    files = sorted(model_dir.rglob("*.safetensors"))
    global_model = GlobalModel(load_causal_lm(model_dir, files))
    client = ClientModel(load_causal_lm(model_dir, files))
    server = ServerOptimizer(spec.strategy, spec.server_lr, spec.server_momentum, global_model.weights.numel())
    keys = [n.public_key for n in spec.nodes if n.public_key in shards]
    privacy = JobPrivacy.of(spec)  # client-level DP: the job's secret dp_seed must be in ``spec``
    rows = {k: int(shards[k].tokens.shape[0]) for k in keys}
    for round in range(spec.rounds):
        lr = schedule.learning_rate(round, spec.lr, spec.warmup_steps, spec.rounds)
        plan = plan_round(spec, privacy, keys, rows, round)
        sampled, weights = plan.sampled, plan.weights
        total = torch.zeros_like(global_model.weights)
        for key in sampled:
            result = client.train_round(shards[key], key, global_model.weights, LocalRound(
                round=round, local_steps=spec.local_steps, batch_size=spec.batch_size,
                micro_batch_size=spec.micro_batch_size, lr=lr, seed=spec.seed, weight_decay=spec.weight_decay,
                grad_clip=spec.grad_clip, dtype=spec.dtype, proximal_mu=spec.proximal_mu,
                update_clip=plan.update_clip, weight=weights[key]))
            total.add_(result.update)
        server.step(global_model.weights, mean_update(total, sum(weights.values()), spec, privacy, round))
    return {name.removeprefix("model."): t.clone() for name, t in global_model.tensors().items()}
