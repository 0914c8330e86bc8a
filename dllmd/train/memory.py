"""What a training step holds in memory: the bytes of training state, counted from the tensors.

``SavedActivations`` counts what autograd keeps from a forward pass for its backward (parameters,
which it also saves, excluded): the activation memory of a micro-batch. ``state_bytes`` is the rest
of training state: weights, gradients and AdamW's two moments. Both sides of ``dllmctl bench train``
count the same way, so a pipeline stage's figure compares with the single process's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class SavedActivations:
    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self._parameters = {p.untyped_storage().data_ptr() for p in params}

    @contextmanager
    def counting(self) -> Iterator[dict[int, int]]:
        """Within: every storage autograd saves (once each, parameters left out), storage -> bytes."""
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._parameters:
                seen.setdefault(storage.data_ptr(), storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield seen


def state_bytes(params: Iterable[torch.nn.Parameter]) -> int:
    """Weights, gradients and two AdamW moments, all fp32: four copies of the parameters."""
    return 4 * sum(p.numel() * 4 for p in params)
