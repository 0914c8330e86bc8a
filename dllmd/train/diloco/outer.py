"""DiLoCo's outer step: Nesterov-momentum SGD on the shared (outer) weights, fed the workers' mean
pseudo-gradient (outer weights - a worker's weights after its inner steps).

The arithmetic is torch's ``SGD(momentum=mu, nesterov=True)`` with no dampening, element for element
(a buffer that starts at zero takes the first gradient exactly as torch's clone does), written out so
that the buffer is a plain tensor a checkpoint holds. With momentum 0 it is plain SGD; with lr 1 and
momentum 0 the new outer weights are the workers' mean weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class OuterOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        with torch.no_grad():
            self.weights = [p.detach().clone() for p in params]  # the outer weights: the last sync's result
        self.buffers = [torch.zeros_like(w) for w in self.weights]

    def pseudo_gradient(self, params: list[torch.nn.Parameter], weight: float) -> list[torch.Tensor]:
        """(outer weights - ``params``) x ``weight`` (this worker's tokens since the last sync), flattened."""
        with torch.no_grad():
            return [((w - p.detach()) * weight).reshape(-1) for w, p in zip(self.weights, params)]

    def step(self, params: list[torch.nn.Parameter], mean_delta: torch.Tensor) -> None:
        """Move the outer weights by the mean pseudo-gradient (laid out as ``params``, in order), and
        set ``params`` to them."""
        offset = 0
        with torch.no_grad():
            for weight, buffer, param in zip(self.weights, self.buffers, params):
                grad = mean_delta[offset:offset + weight.numel()].view_as(weight).to(weight.device)
                offset += weight.numel()
                if self.momentum:
                    buffer.mul_(self.momentum).add_(grad)
                    grad = grad.add(buffer, alpha=self.momentum)
                weight.add_(grad, alpha=-self.lr)
                param.copy_(weight)

    def reset_to(self, params: list[torch.nn.Parameter]) -> None:
        """The outer weights are ``params`` now (a checkpoint was loaded into them)."""
        with torch.no_grad():
            for weight, param in zip(self.weights, params):
                weight.copy_(param)
