"""Private mode, the client's side: it embeds the prompt, runs the first layers, and runs the final norm
and head and samples, so what crosses the network is hidden states only.

Raw embeddings would give the prompt away (a nearest-neighbour lookup in the public embedding table
recovers every token), so the client runs at least one decoder layer itself. It uses the very span
code the daemons use (:class:`~dllmd.models.span.LayerSpan`, with its own KV cache per session),
loading only the tensors it needs from the local model store: embeddings, layers ``[0, K)``, norm,
head. The nodes hold layers ``K..`` without embeddings or head (``dllmctl deploy --private``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from dllmd.models.cache import SpanCache
from dllmd.models.span import LayerSpan
from dllmd.models.store import ModelStore

DEFAULT_PRIVATE_LAYERS = 1


class PrivateModeError(ValueError):
    pass


@dataclass
class PrivateEnds:
    """The two ends of the model a private client runs: ``front`` (embeddings and layers ``[0, K)``) and
    ``back`` (the final norm and head, no layer)."""

    front: LayerSpan
    back: LayerSpan

    @property
    def layers(self) -> int:
        """K: the first layer the nodes run."""
        return self.front.end

    def new_cache(self) -> SpanCache:
        """The front's KV cache for one session (a replay after a failover starts a new one)."""
        return self.front.new_cache()

    @torch.inference_mode()
    def embed(self, token_ids: list[int], start: int, cache: SpanCache, dtype: torch.dtype) -> torch.Tensor:
        """Hidden states ``[1, seq, hidden]`` after layer K - 1 for ``token_ids`` at positions ``start..``,
        in ``dtype`` (what the first node's span computes in)."""
        positions = torch.arange(start, start + len(token_ids)).unsqueeze(0)
        return self.front(torch.tensor([token_ids], dtype=torch.int64), positions, cache).to(dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[seq, vocab]`` for the last node's hidden states ``[seq, hidden]``."""
        hidden = hidden.to(self.back.dtype).unsqueeze(0)
        # The head has no layer and so no cache: positions only satisfy the span's signature.
        return self.back.forward_training(hidden, torch.arange(hidden.shape[1]).unsqueeze(0))[0]


def load_private_ends(store: ModelStore, name: str, directory: Path, layers: int = DEFAULT_PRIVATE_LAYERS,
                      dtype: torch.dtype = torch.float32) -> PrivateEnds:
    """The client's ends of model ``name``, read from the local store (only their tensors)."""
    config = AutoConfig.from_pretrained(directory)
    check_private_layers(layers, config.num_hidden_layers)
    source = store.tensor_source(name)
    front = LayerSpan(config, 0, layers, embed=True, head=False, tensors=source, dtype=dtype)
    back = LayerSpan(config, config.num_hidden_layers, config.num_hidden_layers, embed=False, head=True,
                     tensors=source, dtype=dtype)
    return PrivateEnds(front.eval(), back.eval())


def check_private_layers(layers: int, num_layers: int) -> None:
    """K is at least 1 (raw embeddings give the prompt away) and leaves the nodes at least one layer."""
    if not 1 <= layers < num_layers:
        raise PrivateModeError(f"--private-layers must be between 1 and {num_layers - 1} for a model of "
                               f"{num_layers} layers (the client runs layers [0, K), the nodes the rest)")
