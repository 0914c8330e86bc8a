"""Federated rounds' parts in one process: sampling, weights, server optimizers, clipping and the
client's local round (a planted outlier client moves the mean by at most its clip)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmd.net.messages import training as S
from dllmd.train.federated.client import ClientModel, LocalRound, model_config, parameter_count
from dllmd.train.federated.strategy import (ServerOptimizer, client_weights, mean_update, plan_round,
                                            poisson_clients, sample_clients)
from dllmd.train.federated.weights import flat_weights
from dllmd.train.model import TrainModelError
from dllmd.train.optim import squared_norm
from dllmd.train.privacy.job import JobPrivacy
from dllmd.train.worker import ShardRows
from tests.tiny_models import make_tiny_model

CLIENTS = [f"{i:064x}" for i in range(10)]


def test_sampling_is_seeded_and_fair():
    assert sample_clients(CLIENTS, 0, 1, 0) == CLIENTS
    picks = [sample_clients(CLIENTS, 3, 7, r) for r in range(400)]
    assert picks[5] == sample_clients(CLIENTS, 3, 7, 5) and all(len(p) == 3 for p in picks)
    assert all(p == sorted(p, key=CLIENTS.index) for p in picks)  # in the job's order
    counts = [sum(c in p for p in picks) for c in CLIENTS]
    assert all(abs(n - 120) < 45 for n in counts), counts  # 400 x 3/10, binomial sd ~9
    rounds = [poisson_clients(CLIENTS, 0.3, 99, r) for r in range(400)]
    assert rounds[3] == poisson_clients(CLIENTS, 0.3, 99, 3) and poisson_clients(CLIENTS, 0.3, 98, 3) != rounds[3]
    sizes = [len(p) for p in rounds]
    assert abs(sum(sizes) / 400 - 3) < 0.3 and min(sizes) < 3 < max(sizes)  # the count varies: Poisson


def test_weights_and_the_dp_plan():
    rows = {c: i + 1 for i, c in enumerate(CLIENTS)}
    weights = client_weights(rows, CLIENTS[:3])
    assert weights == pytest.approx({CLIENTS[0]: 1 / 6, CLIENTS[1]: 2 / 6, CLIENTS[2]: 3 / 6})
    spec = S.JobSpec(model="m", dataset="d", nodes=[], shards=[S.ShardRef(id=c, node=c[:4], rows=rows[c])
                                                               for c in CLIENTS], parallelism="federated",
                     rounds=3, clients_per_round=4, dp_clip=0.5, dp_noise_multiplier=2.0, dp_seed=1234, min_clients=2)
    privacy = JobPrivacy.of(spec)
    assert privacy.sample_rate == pytest.approx(0.4) and privacy.batch_size == 4
    plan = plan_round(spec, privacy, CLIENTS, rows, 0)
    assert plan.update_clip == 0.5 and set(plan.weights.values()) <= {0.25} and plan.client_noise_std == 0
    spec.secure_aggregation = True
    assert plan_round(spec, privacy, CLIENTS, rows, 0).client_noise_std == pytest.approx(2.0 * 0.5 / math.sqrt(2))
    # The fixed denominator: the noise is added once, N(0, (zC)^2) / expected clients.
    spec.secure_aggregation = False
    noise = mean_update(torch.zeros(200_000), 1.0, spec, privacy, 0)
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


def test_server_optimizers():
    weights, mean = torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])
    ServerOptimizer("fedavg", 0.5, 0.9, 3).step(weights, mean)
    assert weights.tolist() == [0.5, -1.0, 0.25]
    momentum, w = ServerOptimizer("fedavgm", 1.0, 0.5, 3), torch.zeros(3)
    momentum.step(w, mean)
    momentum.step(w, mean)
    assert w.tolist() == pytest.approx((mean * 2.5).tolist())  # 1 + (0.5 + 1)
    adam, w = ServerOptimizer("fedadam", 0.1, 0.9, 3), torch.zeros(3)
    adam.step(w, mean)
    m, v = 0.1 * mean, 0.01 * mean ** 2
    assert w.tolist() == pytest.approx((0.1 * m / (v.sqrt() + 1e-3)).tolist())
    with pytest.raises(ValueError, match="strategy"):
        ServerOptimizer("fedsgd", 1.0, 0.9, 3)
    with pytest.raises(ValueError, match="does not fit"):
        adam.load({"m": torch.zeros(4)})


def test_a_client_refuses_a_config_it_would_not_build(tmp_path):
    with pytest.raises(TrainModelError, match="model_type"):
        model_config({"model_type": "remote_thing", "auto_map": {"AutoModel": "x.y"}})
    config = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "m")).config.to_dict()
    built = ClientModel.from_config(config)
    assert parameter_count(config) == built.numel


def test_an_outlier_client_moves_the_mean_by_at_most_its_clip(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "m"))
    client = ClientModel(model)
    start = flat_weights(model)
    generator = torch.Generator().manual_seed(0)
    rows = ShardRows(torch.randint(0, model.config.vocab_size, (8, 16), generator=generator, dtype=torch.int32),
                     8 * 16)
    outlier = LocalRound(round=0, local_steps=3, batch_size=4, micro_batch_size=2, lr=1.0, seed=0, grad_clip=0.0)
    free = client.train_round(rows, "k", start, outlier)
    assert math.sqrt(squared_norm(free.update)) > 10 and not free.clipped  # lr 1: a wild update
    clip, weight = 0.5, 0.25
    bounded = client.train_round(rows, "k", start, LocalRound(**{**outlier.__dict__, "update_clip": clip,
                                                                 "weight": weight}))
    assert bounded.clipped and bounded.update_norm == pytest.approx(free.update_norm, rel=1e-6)
    assert math.sqrt(squared_norm(bounded.update)) <= clip * weight * (1 + 1e-6)
