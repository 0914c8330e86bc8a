"""A model's weights as one flat fp32 vector: what a federated round sends each client, what a
client's update is a change of, and what the coordinator's server optimizer steps. Coordinator and
client cut the vector the same way because they agree on the layout digest."""

from __future__ import annotations

import hashlib
import math

import torch

from dllmd.train.model import parameters


def layout_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' names and shapes in training order: coordinator and client agree on
    what each element of a flat weight vector is."""
    text = ";".join(f"{name}:{tuple(p.shape)}" for name, p in parameters(model))
    return hashlib.sha256(text.encode()).hexdigest()


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for _, p in parameters(model)])


def load_flat(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for _, param in parameters(model):
            count = param.numel()
            param.copy_(flat[offset:offset + count].view_as(param))
            offset += count
    if offset != flat.numel():
        raise ValueError(f"the weights have {flat.numel()} elements, the model {offset}")


class GlobalModel:
    """The global weights as one flat fp32 vector, with the names and shapes that cut it into tensors."""

    def __init__(self, model: torch.nn.Module):
        self.layout = [(name, tuple(p.shape)) for name, p in parameters(model)]
        self.digest = layout_digest(model)
        self.weights = flat_weights(model)

    def tensors(self, prefix: str = "model.", flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        flat = self.weights if flat is None else flat
        out, offset = {}, 0
        for name, shape in self.layout:
            count = math.prod(shape)
            out[prefix + name] = flat[offset:offset + count].view(shape)
            offset += count
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        return torch.cat([tensors[prefix + name].reshape(-1).float() for name, _ in self.layout])
