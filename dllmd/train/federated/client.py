"""One federated client's round: start from the global weights, take ``local_steps`` AdamW steps on
this client's own rows, and hand back the (weighted, clipped) change of its weights.

The daemon's ``fed.train`` and the one-process simulation (``simulate.py``) both run
:meth:`ClientModel.train_round`, so a federated job and its simulation compute the same thing.
The optimizer starts fresh every round: a client sampled in round 3 and again in round 9 must not
carry moments from a model that no longer exists, and its state would otherwise be one more thing
that is not the same on every client.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from dllmd.train import schedule
from dllmd.train.federated.weights import flat_weights, load_flat
from dllmd.train.model import TrainModelError, loss_sum, parameters
from dllmd.train.privacy.noise import gaussian_noise
from dllmd.train.optim import (OptimConfig, clip_and_step, flatten_grads, make_optimizer, mean_gradients,
                               squared_norm)
from dllmd.train.worker import ShardRows, micro_batch

# Architectures a client builds from a coordinator's config.json (transformers' own classes; never
# remote code): the decoder families the rest of dllm runs.
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2",
               "granite", "smollm3", "gpt2", "gpt_neox", "opt", "starcoder2")


@dataclass(frozen=True)
class LocalRound:
    """What one round asks of a client."""

    round: int
    local_steps: int
    batch_size: int  # rows per local step (at most the client's rows)
    micro_batch_size: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "float32"
    proximal_mu: float = 0.0  # FedProx
    update_clip: float = 0.0  # 0: the update is not clipped
    weight: float = 1.0  # the client's share of the round's mean update
    noise_std: float = 0.0  # Gaussian noise added to the clipped update before weighting (DP under secagg)


@dataclass
class LocalResult:
    update: torch.Tensor  # flat fp32: weight x the clipped change of the weights
    rows: int
    tokens: int
    loss_before: float
    loss_after: float
    update_norm: float  # before clipping
    clipped: bool


def model_config(config: dict):
    """transformers' config object for a coordinator's config.json, refusing anything but the
    decoder architectures dllm trains."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise TrainModelError(f"model_type {model_type!r} is not one dllm trains ({', '.join(MODEL_TYPES)})")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
    try:
        built = AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as exc:
        raise TrainModelError(f"the model's config.json is not valid for {model_type}: {exc}") from None
    built._attn_implementation = "sdpa"
    return built


def parameter_count(config: dict) -> int:
    """Parameters of the architecture, counted on the meta device: nothing is allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(config))
    return sum(p.numel() for _, p in parameters(model))


class ClientModel:
    """A client's replica: transformers' model class, trained from the global weights each round."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = [p for _, p in parameters(model)]
        self.numel = sum(p.numel() for p in self.params)

    @classmethod
    def from_config(cls, config: dict, device: torch.device | str = "cpu") -> "ClientModel":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)  # overwritten by the global weights; deterministic anyway
        model = AutoModelForCausalLM.from_config(model_config(config), dtype=torch.float32)
        return cls(model.to(device).train())

    def train_round(self, shard: ShardRows, shard_key: str, global_weights: torch.Tensor,
                    args: LocalRound) -> LocalResult:
        load_flat(self.model, global_weights)
        optimizer = make_optimizer(self.model, OptimConfig(lr=args.lr, weight_decay=args.weight_decay,
                                                           grad_clip=args.grad_clip))
        rows = {shard_key: int(shard.tokens.shape[0])}
        size = min(args.batch_size, rows[shard_key])
        anchor = global_weights.to(self.params[0].device) if args.proximal_mu else None
        shards = {shard_key: shard}
        losses, tokens = [], 0
        for local in range(args.local_steps):
            batch = schedule.batch(rows, size, args.seed, args.round * args.local_steps + local)
            optimizer.zero_grad(set_to_none=True)
            total, count = 0.0, 0
            for start in range(0, len(batch), args.micro_batch_size):
                ids, labels = micro_batch(shards, [(r.shard, r.index) for r in batch[start:start + args.micro_batch_size]])
                loss, n = loss_sum(self.model, ids, labels, args.dtype)
                loss.backward()
                total, count = total + float(loss.detach()), count + n
            grads, mean_loss, _ = mean_gradients(flatten_grads(self.model, total, count))
            if anchor is not None:  # FedProx: the gradient of mu/2 ||w - w_global||^2
                grads.add_(torch.cat([p.detach().reshape(-1) for p in self.params]).sub_(anchor).cpu(),
                           alpha=args.proximal_mu)
            clip_and_step(self.params, optimizer, grads, math.sqrt(squared_norm(grads)), args.lr, args.grad_clip)
            losses.append(mean_loss)
            tokens += count
        update = flat_weights(self.model).sub_(global_weights)
        norm = math.sqrt(squared_norm(update))
        clipped = bool(args.update_clip and norm > args.update_clip)
        if clipped:
            update.mul_(args.update_clip / (norm + 1e-6))
        if args.noise_std:  # drawn from a seed nobody else knows: the coordinator must not subtract it
            update.add_(gaussian_noise(update.numel(), args.noise_std, secrets.randbits(63), args.round))
        if args.weight != 1.0:
            update.mul_(args.weight)
        return LocalResult(update=update, rows=rows[shard_key], tokens=tokens, loss_before=losses[0],
                           loss_after=losses[-1], update_norm=norm, clipped=clipped)
