"""A stage's prefix cache: the keys and values of prompt blocks that recent sessions computed, so
that a later session of the same client starting with the same blocks (a system prompt, a chat
history) prefills only the rest.

- **Blocks.** Prompts are matched in whole blocks of ``PREFIX_BLOCK_TOKENS`` tokens. The client
  names block i by a chain hash over blocks 0..i, so one key stands for the whole prefix up to
  that block, and sends the hashes in ``session.open``: every stage keys its cache the same way,
  later stages (which see only hidden states) included, and no stage learns tokens from them
  (the client keys the hash with a secret of its own).
- **Keys are per client.** An entry is keyed by (model, the caller's public key, chain hash), and
  a lookup only ever sees the caller's own entries. Shared across clients, a hit's shorter time to
  first token would tell one client what another sent (a system prompt, a document).
- **Hits.** ``session.open`` answers how many leading blocks the stage holds and keeps references
  to them. The client starts the session at the smallest count any stage reported (each stage
  must continue from the same position), and at its first step the stage builds the session's
  cache from that many blocks (:meth:`SpanCache.restore`: concatenated copies, never the blocks
  themselves, so the session cannot change them).
- **Misses.** The session's own steps add the blocks it computes past its start: its cache
  records every layer's new keys/values, cut into blocks, each stored as soon as every layer of
  the span has it (so at most one step's blocks wait outside the cache's accounting).
  Recording happens as keys are appended, before a
  sliding-window layer trims them, so sliding layers are cached exactly too (at restore they keep
  only their window).
- **Memory.** The cached tensors' bytes are counted. The cache holds at most its limit (a fraction
  of the node's KV budget) and never more than what sessions leave unreserved, so cache and
  sessions together stay within the budget: a session that opens makes the cache evict, least
  recently used first. Lookups and stores touch a prefix's blocks deepest first, so its tail goes
  before its head (which other prompts may share, and without which the tail never hits), and a
  session never evicts the rest of its own prefix to store a deeper block: a cache too small for a
  whole prompt keeps its longest prefix.
- **Reloads.** Blocks belong to the span that computed them: a reload or unload drops the model's
  blocks and starts a new *epoch* of it; a session records the epoch it opened in, and a pass of
  the old span still queued on the compute thread cannot store into the new one.
- **Not cached:** tensor-parallel groups (every member would have to hit the same blocks); the
  leader reports no cached tokens, so the session prefills everything.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dllmd.models.cache import SpanCache
from dllmd.models.span import LayerSpan
from dllmd.net.messages.inference import PREFIX_BLOCK_TOKENS, PREFIX_HASH_BYTES
from dllmd.net.server import HandlerError
from dllmd.net.wire import ErrorCode

LayerKV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # absolute layer index -> keys, values of a block
BlockKey = tuple[str, str, bytes]  # model, client public key, chain hash


@dataclass(frozen=True)
class CachedBlock:
    layers: LayerKV  # [1, kv_heads, PREFIX_BLOCK_TOKENS, head_dim] each, never written to
    nbytes: int


@dataclass
class SessionPrefix:
    """One session's use of the prefix cache at this stage."""

    model: str
    client: str
    hashes: list[bytes]
    held: list[CachedBlock]  # the leading blocks cached when it opened, kept until its first step
    cached_tokens: int  # what the stage told the client it may skip
    layered: bool  # False for a span without layers: there is nothing to cache, any prefix "hits"
    begun: bool = False
    epoch: int = 0  # of the model's span when the session opened (:meth:`PrefixCache.drop_model`)


class PrefixCache:
    """Cached prompt blocks of every model this node serves, least recently used first. Blocks arrive
    from the compute thread; lookups come from the event loop."""

    def __init__(self, limit_bytes: int, room: Callable[[], int] | None = None):
        self.limit_bytes = limit_bytes
        self._room = room  # what sessions leave unreserved of the node's KV budget
        self._blocks: OrderedDict[BlockKey, CachedBlock] = OrderedDict()
        self._bytes = 0
        self._epochs: dict[str, int] = {}  # model -> how many times its blocks were dropped
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.limit_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def budget(self) -> int:
        room = self._room() if self._room is not None else self.limit_bytes
        return max(0, min(self.limit_bytes, room))

    def held(self, model: str) -> tuple[int, int]:
        """Bytes and blocks cached for ``model``."""
        with self._lock:
            blocks = [b for key, b in self._blocks.items() if key[0] == model]
        return sum(b.nbytes for b in blocks), len(blocks)

    def lookup(self, model: str, client: str, hashes: list[bytes]) -> list[CachedBlock]:
        """The longest run of leading blocks cached for this client (touched)."""
        with self._lock:
            found = []
            for digest in hashes:
                block = self._blocks.get((model, client, digest))
                if block is None:
                    break
                found.append(block)
            self._touch(model, client, hashes[:len(found)])
            return found

    def store(self, model: str, client: str, hashes: list[bytes], blocks: dict[int, CachedBlock]) -> None:
        """Add ``blocks`` (by index) of the prefix ``hashes`` names, head first, while room can be made
        without evicting the rest of this prefix (a block is worth nothing without the blocks before
        it); then touch the prefix. (A session's recorder adds its blocks one by one: :meth:`extend`.)"""
        with self._lock:
            own = {(model, client, digest) for digest in hashes}
            budget = self.budget()
            for index, digest in enumerate(hashes[:max(blocks, default=-1) + 1]):
                key = (model, client, digest)
                if key in self._blocks:  # this session started from it, or another one stored it first
                    continue
                if index not in blocks or not self._make_room(blocks[index].nbytes, budget, own):
                    break
                self._blocks[key] = blocks[index]
                self._bytes += blocks[index].nbytes
            self._touch(model, client, hashes)

    def extend(self, prefix: SessionPrefix, index: int, block: CachedBlock, own: set[BlockKey]) -> bool:
        """Add block ``index`` of ``prefix`` as a session completes it, in order: only where the block
        before it is held (a block is worth nothing without it), never by evicting a block of ``own``
        (the prefix's keys), and only in the epoch the session opened in. O(1) but the eviction, so
        a long prompt's blocks cost no more one by one than at once; the prefix held is touched
        (deepest first) with its last block, or with the first that finds no room. Returns whether
        the block is held now."""
        model, client, hashes = prefix.model, prefix.client, prefix.hashes
        with self._lock:
            if prefix.epoch != self._epochs.get(model, 0):
                return False
            if index and (model, client, hashes[index - 1]) not in self._blocks:
                return False
            key = (model, client, hashes[index])
            if key not in self._blocks:  # else another session stored it first
                if not self._make_room(block.nbytes, self.budget(), own):
                    # The prompt's tail does not fit: what is held of it ends touched head last, as a
                    # whole prefix would (later blocks stop at the check above, so this runs once).
                    self._touch(model, client, hashes[:index])
                    return False
                self._blocks[key] = block
                self._bytes += block.nbytes
            if index == len(hashes) - 1:
                self._touch(model, client, hashes)
            return True

    def shrink(self) -> None:
        """Evict until the cache fits its budget again (after a session reserved memory)."""
        with self._lock:
            self._make_room(0, self.budget(), set())

    def _touch(self, model: str, client: str, hashes: list[bytes]) -> None:
        # Deepest first, so the head of a prefix ends most recently used and is evicted last.
        for digest in reversed(hashes):
            key = (model, client, digest)
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _make_room(self, nbytes: int, budget: int, keep: set[BlockKey]) -> bool:
        """Evict least recently used blocks (none of ``keep``) until ``nbytes`` more fit in ``budget``."""
        if nbytes > budget:
            return False
        while self._bytes + nbytes > budget:
            victim = next((key for key in self._blocks if key not in keep), None)
            if victim is None:
                return False
            self._bytes -= self._blocks.pop(victim).nbytes
        return True

    def drop_model(self, model: str) -> None:
        """Forget ``model``'s blocks: its span was replaced or unloaded, they no longer match it. Stores
        of sessions opened before are refused from now on (a new epoch)."""
        with self._lock:
            self._epochs[model] = self._epochs.get(model, 0) + 1
            for key in [k for k in self._blocks if k[0] == model]:
                self._bytes -= self._blocks.pop(key).nbytes

    # --- sessions ---------------------------------------------------------------------------------

    def open_session(self, span: LayerSpan, model: str, client: str, hashes: list[bytes], prompt_tokens: int,
                     usable: bool = True) -> SessionPrefix | None:
        """What a session opening with ``hashes`` may skip here, or None when it gets no prefix caching
        (none asked, the cache is off, or the span is a tensor-parallel slice: ``usable`` False)."""
        check_hashes(hashes, prompt_tokens)
        if not hashes or not self.enabled or not usable:
            return None
        layered = bool(span.layer_types)
        with self._lock:
            epoch = self._epochs.get(model, 0)
        held = self.lookup(model, client, hashes) if layered else []
        cached_blocks = len(held) if layered else len(hashes)
        return SessionPrefix(model, client, list(hashes), held, cached_blocks * PREFIX_BLOCK_TOKENS, layered,
                             epoch=epoch)

    def begin(self, prefix: SessionPrefix, cache: SpanCache, start: int) -> int:
        """At a session's first step, starting at ``start``: build its cache from that many cached
        tokens and record the blocks it computes after them. Returns the position it continues from."""
        if start % PREFIX_BLOCK_TOKENS:
            raise HandlerError(ErrorCode.BAD_ARGS, f"a session's first step starts at 0 or a block boundary (a "
                                                   f"multiple of {PREFIX_BLOCK_TOKENS}), not {start}")
        if start > prefix.cached_tokens:
            raise HandlerError(ErrorCode.CONFLICT, f"the first step starts at {start}, but this stage holds only "
                                                   f"{prefix.cached_tokens} cached prompt tokens; replay the session")
        used = prefix.held[:start // PREFIX_BLOCK_TOKENS]
        prefix.held, prefix.begun = [], True  # what the session does not use may be evicted now
        cache.restore([b.layers for b in used], start)
        if prefix.layered and start // PREFIX_BLOCK_TOKENS < len(prefix.hashes):
            cache.observer = BlockRecorder(self, prefix, list(cache.layer_indices), start // PREFIX_BLOCK_TOKENS)
        return start


def check_hashes(hashes: list[bytes], prompt_tokens: int) -> None:
    """Hostile or broken clients get a clear error, never a cache keyed by garbage."""
    if any(len(h) != PREFIX_HASH_BYTES for h in hashes):
        raise HandlerError(ErrorCode.BAD_ARGS, f"prefix hashes are {PREFIX_HASH_BYTES} bytes each")
    if len(hashes) * PREFIX_BLOCK_TOKENS > prompt_tokens:
        raise HandlerError(ErrorCode.BAD_ARGS, f"{len(hashes)} prefix blocks of {PREFIX_BLOCK_TOKENS} tokens are "
                                               f"longer than the {prompt_tokens}-token prompt")


@dataclass
class BlockRecorder:
    """Watches a session's cache: cuts each layer's appended keys/values into blocks, and stores each
    block once every layer of the span has it (:meth:`PrefixCache.extend`: a cache too small for the
    whole prompt keeps its longest prefix; a block after one that did not fit is not stored)."""

    cache: PrefixCache
    prefix: SessionPrefix
    layers: list[int]
    first_block: int
    _next: dict[int, int] = field(default_factory=dict)  # layer -> the next block it fills
    _tail: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # positions short of a block
    _pending: dict[int, LayerKV] = field(default_factory=dict)  # block -> the layers that have it so far
    _own: set[BlockKey] | None = None  # the prefix's keys, built once

    def __call__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        block = self._next.get(layer, self.first_block)
        if block >= len(self.prefix.hashes):
            return
        if layer in self._tail:
            tail_keys, tail_values = self._tail.pop(layer)
            keys, values = torch.cat([tail_keys, keys], dim=-2), torch.cat([tail_values, values], dim=-2)
        size = PREFIX_BLOCK_TOKENS
        while keys.shape[-2] >= size and block < len(self.prefix.hashes):
            # Clones: a block owns exactly its bytes, and pins nothing of the step's tensors.
            self._add(block, layer, keys[:, :, :size].clone(), values[:, :, :size].clone())
            keys, values = keys[:, :, size:], values[:, :, size:]
            block += 1
        self._next[layer] = block
        if keys.shape[-2] and block < len(self.prefix.hashes):
            self._tail[layer] = (keys, values)

    def _add(self, block: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        layers = self._pending.setdefault(block, {})
        layers[layer] = (keys, values)
        if len(layers) < len(self.layers):
            return
        del self._pending[block]
        # Blocks complete in order, so the ones before this were offered already (stored, or found
        # no room: then this one is not stored either).
        if self._own is None:
            self._own = {(self.prefix.model, self.prefix.client, digest) for digest in self.prefix.hashes}
        self.cache.extend(self.prefix, block, CachedBlock(layers, sum(k.nbytes + v.nbytes for k, v in layers.values())),
                          self._own)
