"""What the coordinator does with a round's updates: which clients take part, how their updates are
weighted, and how the mean update moves the global weights (FedAvg, FedAvgM, FedAdam).

Pure functions of the job, shared by the coordinator and the one-process simulation: the same
clients are sampled for the same round, and the same sums are taken in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dllmd.net.messages.training import STRATEGIES
from dllmd.train.privacy.noise import gaussian_noise

ADAM_BETA2 = 0.99  # Reddi et al., "Adaptive Federated Optimization" (2021)
ADAM_TAU = 1e-3  # their adaptivity: the v floor that keeps early steps from exploding


def sample_clients(clients: list[str], per_round: int, seed: int, round: int) -> list[str]:
    """The clients of ``round``: ``per_round`` of them (0: all) without replacement, drawn with the job's
    seed, in the job's order."""
    if not per_round or per_round >= len(clients):
        return list(clients)
    rng = np.random.default_rng([seed, round, 0x5EED])
    chosen = set(int(i) for i in rng.choice(len(clients), size=per_round, replace=False))
    return [c for i, c in enumerate(clients) if i in chosen]


def client_weights(rows: dict[str, int], sampled: list[str]) -> dict[str, float]:
    """FedAvg's weights: each sampled client's share of the round's rows."""
    total = sum(rows[c] for c in sampled)
    return {c: rows[c] / total for c in sampled}


class ServerOptimizer:
    """The global step: ``weights += lr * direction(mean update)``; its state is checkpointed."""

    def __init__(self, strategy: str, lr: float, momentum: float, numel: int):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.strategy, self.lr, self.momentum = strategy, lr, momentum
        self.state: dict[str, torch.Tensor] = {}
        if strategy == "fedavgm":
            self.state["momentum"] = torch.zeros(numel)
        elif strategy == "fedadam":
            self.state["m"] = torch.zeros(numel)
            self.state["v"] = torch.zeros(numel)

    def step(self, weights: torch.Tensor, mean_update: torch.Tensor) -> None:
        if self.strategy == "fedavg":
            weights.add_(mean_update, alpha=self.lr)
        elif self.strategy == "fedavgm":
            momentum = self.state["momentum"]
            momentum.mul_(self.momentum).add_(mean_update)
            weights.add_(momentum, alpha=self.lr)
        else:  # fedadam: the mean update is the negative pseudo-gradient
            m, v = self.state["m"], self.state["v"]
            m.mul_(self.momentum).add_(mean_update, alpha=1 - self.momentum)
            v.mul_(ADAM_BETA2).addcmul_(mean_update, mean_update, value=1 - ADAM_BETA2)
            weights.addcdiv_(m, v.sqrt().add_(ADAM_TAU), value=self.lr)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            if name not in self.state or self.state[name].shape != tensor.shape:
                raise ValueError(f"the checkpoint's server state {name!r} does not fit strategy {self.strategy}")
            self.state[name].copy_(tensor)


CLIENT_STREAM = 0xC11E  # the Poisson client draws' stream of the job's secret DP seed
NOISE_SALT = 0xFED  # the coordinator's aggregate noise, a stream apart from DP-SGD's


def poisson_clients(clients: list[str], rate: float, seed: int, round: int) -> list[str]:
    """Client-level DP's sampling: each client joins ``round`` independently with probability ``rate``,
    drawn from the job's secret seed (the accountant's amplification assumes nobody knows who took part)."""
    rng = np.random.default_rng([seed, round, CLIENT_STREAM])
    return [c for c, draw in zip(clients, rng.random(len(clients))) if draw < rate]


@dataclass(frozen=True)
class RoundPlan:
    """Who takes part in a round and how their updates enter the mean."""

    sampled: list[str]
    weights: dict[str, float]  # each client multiplies its (clipped) update by its weight
    update_clip: float  # each client's update norm bound (0: none)
    client_noise_std: float  # secure aggregation under DP: the noise each client adds before weighting


def plan_round(spec, privacy, clients: list[str], rows: dict[str, int], round: int) -> RoundPlan:
    """FedAvg: ``clients_per_round`` sampled with the job's seed, weighted by their rows. Under client-level
    DP: Poisson sampling with the secret seed, every update clipped to ``dp_clip`` and weighted
    1 / (expected clients), so one client moves the mean by at most ``dp_clip`` over that: the
    sensitivity the noise is scaled to. With secure aggregation each client adds its part of the noise,
    enough that ``min_clients`` parts make the whole: the coordinator never sees an un-noised sum."""
    if privacy is None:
        sampled = sample_clients(clients, spec.clients_per_round, spec.seed, round)
        return RoundPlan(sampled, client_weights(rows, sampled), spec.update_clip, 0.0)
    sampled = poisson_clients(clients, privacy.sample_rate, privacy.seed, round)
    weight = 1.0 / privacy.batch_size
    noise = spec.dp_noise_multiplier * spec.dp_clip / math.sqrt(spec.min_clients) if spec.secure_aggregation else 0.0
    return RoundPlan(sampled, {c: weight for c in sampled}, spec.dp_clip, noise)


def mean_update(total: torch.Tensor, share: float, spec, privacy, round: int) -> torch.Tensor:
    """The round's mean update from the sum of the weighted updates (``share``: the weights summed). FedAvg
    renormalises by the weights of those who answered; DP keeps the fixed denominator (already in the
    weights) and, without secure aggregation, adds the Gaussian noise here, from the secret seed."""
    if privacy is None:
        return total.div_(share)
    if not spec.secure_aggregation:
        std = spec.dp_noise_multiplier * spec.dp_clip / privacy.batch_size
        total.add_(gaussian_noise(total.numel(), std, privacy.seed, round, NOISE_SALT))
    return total
