"""A session's KV cache at one span, and the helpers every pass uses on it.

:class:`SpanCache` is what a stage keeps per session: one transformers cache layer per decoder layer
of the span (a sliding-window layer for sliding attention), with the span-local bookkeeping a pass
needs (its length, whether a failed pass left it unusable, the prefix cache's observer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

KVObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called with (absolute layer index, new keys, new values) each time a layer appends to a cache."""


@contextmanager
def _broken_on_failure(caches: Sequence[SpanCache]):
    """A pass that fails half-way has updated some layers' caches and not others: none is usable after."""
    try:
        yield
    except BaseException:
        for cache in caches:
            cache._broken = True
        raise


def _check_one_step_each(caches: Sequence[SpanCache], what: str) -> None:
    """Before a pass of several sessions: each cache once (two steps of one session would race on it),
    none left unusable by an earlier failed pass."""
    if len({id(c) for c in caches}) != len(caches):
        raise ValueError(f"a session can take only one step per {what}")
    for cache in caches:
        cache._check_usable()


def _advance(caches: Sequence[SpanCache], lengths: Sequence[int]) -> None:
    """After a pass: each cache holds its new tokens (a multi-token step's ragged runs are compacted)."""
    for cache, n in zip(caches, lengths):
        cache._length += n
        if n > 1:
            cache.compact()


def _last_runs(parts: list, runs: list[int], keep: int) -> list:
    """The trailing runs of ``parts`` that together hold at least the last ``keep`` positions."""
    if keep <= 0:  # transformers' slice [-0:] keeps everything
        return parts
    held, first = 0, len(parts)
    while first > 0 and held < keep:
        first -= 1
        held += runs[first]
    return parts[first:]


class SpanCache:
    """One session's KV cache for one span's layers, addressed by absolute layer index.

    It speaks the small part of transformers' ``Cache`` protocol that attention layers and mask helpers use
    (``update``, ``get_seq_length``, ``get_query_offset``, ``get_mask_sizes``), and reuses transformers' own
    per-layer storage, so sliding-window layers keep only their window exactly as the full model does.
    """

    # Read by transformers' mask helpers: a growing cache is never compiled, so masks may be skipped.
    is_compileable = False

    def __init__(self, layers: Mapping[int, DynamicLayer]):
        self._layers = dict(layers)
        self._length = 0
        self._broken = False
        # Sees every layer's new keys/values as they are appended (the prefix cache records prompt
        # blocks this way: a sliding layer drops them from its own storage once they leave the window).
        self.observer: KVObserver | None = None

    @property
    def length(self) -> int:
        """Tokens this session has run through the span; also the absolute position of the next token."""
        return self._length

    @property
    def layer_indices(self) -> list[int]:
        return list(self._layers)

    @property
    def nbytes(self) -> int:
        """Bytes of memory the cached keys and values hold (whole storages, including views' bases)."""
        total = 0
        for layer in self._layers.values():
            if layer.is_initialized and layer.keys is not None:
                total += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        return total

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append one layer's new keys/values; returns the keys/values its attention should see."""
        if self.observer is not None:
            self.observer(layer_idx, key_states, value_states)
        return self._layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return self._length

    def get_query_offset(self, layer_idx: int | None = None) -> int:
        return self._length

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self._layers[layer_idx].get_mask_sizes(query_length)

    def compact(self) -> None:
        """Let sliding-window layers hold only their window. After a step of several tokens they keep
        a view of the window into everything the step saw; copying it frees the rest, so a cache never
        holds more than the positions it was reserved for (:meth:`LayerSpan.kv_cache_bytes`)."""
        for layer in self._layers.values():
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.is_initialized and layer.keys is not None:
                if layer.keys.untyped_storage().nbytes() > layer.keys.nbytes:
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()

    def restore(self, blocks: Sequence[Mapping[int, tuple[torch.Tensor, torch.Tensor]]], length: int) -> None:
        """Start this empty cache from a prefix computed earlier: ``blocks`` are consecutive runs of
        positions ``[0, length)``, each layer's keys and values ``[1, kv_heads, run, head_dim]``. The
        cache then holds what it would after running those positions itself. The blocks are only
        read: every layer gets new tensors (concatenated, or cloned), and updates concatenate rather
        than write in place, so whatever else holds the blocks never sees this session's tokens."""
        if self._length or self._broken:
            raise ValueError("only an empty cache can start from a cached prefix")
        runs = [next(iter(b.values()))[0].shape[-2] for b in blocks if b]
        if self._layers and sum(runs) != length:
            raise ValueError(f"the cached blocks hold {sum(runs)} positions, not {length}")
        for index, layer in self._layers.items() if length else ():
            parts = [b[index] for b in blocks]
            if isinstance(layer, DynamicSlidingWindowLayer):
                parts = _last_runs(parts, runs, layer.sliding_window - 1)
            keys = torch.cat([k for k, _ in parts], dim=-2)
            values = torch.cat([v for _, v in parts], dim=-2)
            layer.lazy_initialization(keys, values)
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = length
                # What update keeps after a step that ends at ``length``.
                keys, values = keys[:, :, -layer.sliding_window + 1:, :], values[:, :, -layer.sliding_window + 1:, :]
            layer.keys, layer.values = keys, values
        self._length = length
        self.compact()

    def _check_usable(self) -> None:
        if self._broken:
            raise RuntimeError("this cache was left half-updated by a failed step; replay the session into a new one")
