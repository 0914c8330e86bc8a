"""The update every replica applies after the all-reduce, shared with the single-process reference.

Gradients travel as one flat fp32 buffer: every parameter's summed gradient, then the summed loss
and the number of target tokens. After the all-reduce every worker divides by the global token
count, so the gradient is that of the mean loss over the whole global batch (workers holding more
tokens weigh more), clips by the global norm, and takes the same AdamW step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dllmd.train.model import parameters


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping


def make_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    # foreach=False: the same per-parameter kernels on every machine, so replicas stay bitwise equal.
    return torch.optim.AdamW([p for _, p in parameters(model)], lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.eps, weight_decay=config.weight_decay, foreach=False)


def flatten_grads(model: torch.nn.Module, loss_sum: float, tokens: int) -> torch.Tensor:
    """The summed gradients, loss and token count as one flat fp32 buffer. The parameters' own
    gradients are released: the buffer holds them now (one copy of the weights less until the step)."""
    params = [p for _, p in parameters(model)]
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    extra = torch.tensor([loss_sum, float(tokens)], dtype=torch.float32, device=grads[0].device)
    flat = torch.cat([*(g.float() for g in grads), extra]).cpu().contiguous()
    for param in params:
        param.grad = None
    return flat


@dataclass
class StepResult:
    loss: float | None  # None: a DP step whose Poisson batch was empty
    tokens: int
    grad_norm: float


def mean_gradients(flat: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """The gradient of the mean loss (``flat``'s summed gradients divided in place by its token count,
    as a view), the mean loss and the token count."""
    tokens = float(flat[-1])
    if tokens <= 0:
        raise ValueError("the global batch has no target tokens")
    return flat[:-2].div_(tokens), float(flat[-2]) / tokens, int(tokens)


NORM_CHUNK = 1 << 22  # elements converted to float64 at a time: not a float64 copy of every gradient


def squared_norm(grads: torch.Tensor) -> float:
    """The squared L2 norm, summed in float64: what the stages of a pipeline add up into the global norm."""
    return sum(float(torch.linalg.vector_norm(chunk.double())) ** 2 for chunk in grads.split(NORM_CHUNK))


def clip_and_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, grads: torch.Tensor,
                  norm: float, lr: float, grad_clip: float) -> None:
    """Scale ``grads`` (laid out as ``params``, in order) by the global ``norm``'s clip, and step."""
    if grad_clip and norm > grad_clip:
        grads.mul_(grad_clip / (norm + 1e-6))
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = grads[offset:offset + count].view_as(param).to(param.device, param.dtype)
        offset += count
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, flat: torch.Tensor, lr: float,
                 grad_clip: float) -> StepResult:
    """Turn the summed buffer into mean gradients, clip, and step. ``flat`` is consumed."""
    grads, loss, tokens = mean_gradients(flat)
    norm = math.sqrt(squared_norm(grads))
    clip_and_step([p for _, p in parameters(model)], optimizer, grads, norm, lr, grad_clip)
    return StepResult(loss, tokens, norm)


class TrainingState:
    """A worker's weights and AdamW moments as named tensors (``model.<name>``,
    ``optim.<name>.exp_avg`` / ``.exp_avg_sq``): what checkpoints hold and resumes load. A worker
    sets ``state_params`` (name in the model's checkpoint -> parameter) and ``optimizer``. A worker
    whose own state differs from its peers' (error feedback, DiLoCo's inner AdamW) lists it apart,
    as ``local.*`` names: checkpoints keep every worker's."""

    state_params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    def state_names(self) -> list[str]:
        names = [f"model.{name}" for name in self.state_params]
        for name in self.state_params:
            names += [f"optim.{name}.exp_avg", f"optim.{name}.exp_avg_sq"]
        return names

    def state_tensor(self, name: str) -> torch.Tensor:
        kind, rest = name.split(".", 1)
        if kind == "model":
            return self.state_params[rest].detach().cpu()
        param_name, slot = rest.rsplit(".", 1)
        param = self.state_params[param_name]
        state = self.optimizer.state.get(param)
        return state[slot].detach().cpu() if state else torch.zeros_like(param, device="cpu")

    def optimizer_step(self) -> int:
        states = [s for s in self.optimizer.state.values() if "step" in s]
        return int(states[0]["step"]) if states else 0

    def local_state_names(self) -> list[str]:
        """This worker's own state (``local.*``), which the other replicas do not share: none here."""
        return []

    def local_state_tensor(self, name: str) -> torch.Tensor:
        raise ValueError(f"this worker keeps no {name}")

    def load_local_state(self, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
        if tensors:
            raise ValueError(f"this worker keeps no {', '.join(sorted(tensors))}")

    def load_state(self, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
        with torch.no_grad():
            for name, tensor in tensors.items():
                kind, rest = name.split(".", 1)
                if kind == "model":
                    self.state_params[rest].copy_(tensor)
                    continue
                param_name, slot = rest.rsplit(".", 1)
                param = self.state_params[param_name]
                state = self.optimizer.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state[slot].copy_(tensor)
                state["step"] = torch.tensor(float(optimizer_step))
