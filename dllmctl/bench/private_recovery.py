"""How much of a prompt the first node could read from what private mode sends it.

The attack measured is the casual one: take each hidden state the first node receives and look up the
nearest row of the model's public embedding table (cosine similarity). With K = 0 the node would
receive the raw embeddings and recover every token; after the client's K >= 1 layers it recovers
fewer. This is a floor on what a determined node learns, not a bound (docs/security.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from dllmd.models.span import LayerSpan
from dllmd.models.store import ModelStore


@torch.inference_mode()
def nearest_token_recovery(store: ModelStore, name: str, directory: Path, layers: int,
                           token_ids: list[int]) -> float:
    """The fraction of ``token_ids`` whose hidden state after ``layers`` client layers (0: the raw
    embeddings) is nearest, by cosine, to that token's own row of the embedding table."""
    config = AutoConfig.from_pretrained(directory)
    front = LayerSpan(config, 0, layers, embed=True, head=False, tensors=store.tensor_source(name)).eval()
    hidden = front(torch.tensor([token_ids]), torch.arange(len(token_ids)).unsqueeze(0), front.new_cache())[0]
    table = torch.nn.functional.normalize(front.parts.embed_tokens.weight.float(), dim=-1)
    guesses = (torch.nn.functional.normalize(hidden.float(), dim=-1) @ table.T).argmax(dim=-1)
    return float((guesses == torch.tensor(token_ids)).float().mean())
