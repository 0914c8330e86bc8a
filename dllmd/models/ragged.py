"""Decode steps of several sessions through one span as a single forward pass.

Sessions at a stage have KV caches of different lengths. Padding them into one tensor would copy
every cache on every step; instead the batch runs transformers' own layers with a batch dimension
(so every projection and MLP reads its weights once for all sessions) and only attention, the
one part whose inputs differ in length, runs per session on that session's own cache - through
the same kernel (sdpa or the family's eager function) a lone session would use.

This works through transformers' attention-function registry: while a batched step runs, the
span's config names :data:`RAGGED`, whose function receives the per-session keys and values that
:class:`BatchCache` hands back from ``update``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

RAGGED = "dllm_ragged"
_BASE_ATTR = "_dllm_base_attention"


class RaggedKV:
    """Keys (or values) of a batch whose sessions hold different numbers of tokens: one
    ``[1, kv_heads, length_b, head_dim]`` tensor per session. ``queries``: in a packed pass, how many
    query tokens of the one packed sequence belong to each session (None: one row per session)."""

    __slots__ = ("parts", "queries")

    def __init__(self, parts: list[torch.Tensor], queries: list[int] | None = None):
        self.parts = parts
        self.queries = queries


class PackedMasks:
    """The attention masks of a packed pass: each session's own, as its lone step would build it."""

    __slots__ = ("masks",)

    def __init__(self, masks: list):
        self.masks = masks


class BatchCache:
    """The cache protocol over several sessions' caches, for one new token per session.

    ``update`` appends row ``b`` of the new keys/values to session ``b``'s own cache (so sliding-window
    layers trim exactly as they do alone) and returns the per-session results unpadded."""

    is_compileable = False

    def __init__(self, caches: Sequence):
        self.caches = list(caches)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for row, cache in enumerate(self.caches):
            k, v = cache.update(key_states[row:row + 1], value_states[row:row + 1], layer_idx)
            keys.append(k)
            values.append(v)
        return RaggedKV(keys), RaggedKV(values)


class PackedCache:
    """The cache protocol over several sessions' caches whose new tokens lie one after another in one
    packed sequence (prefill chunks of different lengths): ``update`` gives each session's cache its own
    stretch of the new keys/values and returns the per-session results."""

    is_compileable = False

    def __init__(self, caches: Sequence, lengths: list[int]):
        self.caches, self.lengths = list(caches), list(lengths)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = [], []
        for k_part, v_part, cache in zip(key_states.split(self.lengths, dim=2), value_states.split(self.lengths, dim=2),
                                         self.caches):
            k, v = cache.update(k_part, v_part, layer_idx)
            keys.append(k)
            values.append(v)
        return RaggedKV(keys, self.lengths), RaggedKV(values, self.lengths)


def _base_function(module: torch.nn.Module):
    name = getattr(module.config, _BASE_ATTR)
    if name == "eager":
        # Each family keeps its own eager function (Gemma2's soft-capping lives there).
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def ragged_attention(module, query, key, value, attention_mask, **kwargs):
    base = _base_function(module)
    if not isinstance(key, RaggedKV):
        return base(module, query, key, value, attention_mask, **kwargs)
    if key.queries is not None:
        # A packed pass: each session's stretch of queries attends to its own cache under its own mask.
        masks = attention_mask.masks if isinstance(attention_mask, PackedMasks) else [None] * len(key.parts)
        outputs = [base(module, q, k, v, m, **kwargs)[0]
                   for q, k, v, m in zip(query.split(key.queries, dim=2), key.parts, value.parts, masks)]
        return torch.cat(outputs, dim=1), None
    # One query token per session sees all of its cached keys: no mask, exactly as a lone decode step.
    outputs = [base(module, query[row:row + 1], key.parts[row], value.parts[row], None, **kwargs)[0]
               for row in range(query.shape[0])]
    return torch.cat(outputs, dim=0), None


AttentionInterface.register(RAGGED, ragged_attention)


@contextmanager
def ragged_attention_on(config):
    """Route the attention of every layer built from ``config`` through :func:`ragged_attention`.

    Only for the duration of a batched step, after its masks are built: transformers picks the mask
    format from the same config field."""
    base = config._attn_implementation
    setattr(config, _BASE_ATTR, base)
    config._attn_implementation = RAGGED
    try:
        yield
    finally:
        config._attn_implementation = base
