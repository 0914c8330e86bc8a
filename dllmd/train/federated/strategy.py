"""What the coordinator does with a round's updates: which clients take part, how their updates are
weighted, and how the mean update moves the global weights (FedAvg, FedAvgM, FedAdam).

Pure functions of the job, shared by the coordinator and the one-process simulation: the same
clients are sampled for the same round, and the same sums are taken in the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from dllmd.net.messages.training import STRATEGIES

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
