"""A contiguous span of a causal LM's decoder layers, loaded on its own and run exactly like the full model.

A node holding layers ``[start, end)`` builds only those modules (plus the embeddings when it is the first
span, the final norm and head when it is the last), reads only their tensors, keeps a :class:`SpanCache` per
session, and turns positions into rotary cos/sin and attention masks by itself: nothing is inferred from
layer 0, which this node may not have.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from dllmd.models.cache import SpanCache, _advance, _broken_on_failure, _check_one_step_each
from dllmd.models.families import SLIDING_ATTENTION, FamilyAdapter, adapter_for
from dllmd.models.quantized import QuantizedLinear, QuantizedWeight, check_device
from dllmd.models.ragged import BatchCache, PackedCache, PackedMasks, ragged_attention_on
from dllmd.models.slicing import check_slice, slice_tensor, sliced_config
from dllmd.net.messages.tensor import TensorSlice

TensorSource = Callable[[Sequence[str]], Mapping[str, torch.Tensor]]
"""Given checkpoint tensor names, returns those tensors (e.g. read lazily from mmapped safetensors)."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor-parallel member's partial result with the other members' (the same on every member)."""

EMBED_TENSOR = "model.embed_tokens.weight"
HEAD_TENSOR = "lm_head.weight"


def _cache_keyword(function: Callable) -> str:
    """The name under which ``function`` takes the KV cache. transformers 5.x renamed ``past_key_values``
    to ``cache`` and keeps the old name working through a wrapper that builds and files a deprecation
    warning on every call: thirty layers a token, between matmuls. Older 5.x releases know only the old
    name (a ``cache=`` there would vanish into ``**kwargs``), so the signature decides."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


MASK_CACHE_KEYWORD = _cache_keyword(create_causal_mask)


def _reduce_after(module: nn.Module, reduce: Callable) -> None:
    """Make ``module`` return ``reduce`` of what its forward returns."""
    forward = module.forward

    def forward_then_reduce(*args, **kwargs):
        return reduce(forward(*args, **kwargs))

    module.forward = forward_then_reduce


class SpanLoadError(ValueError):
    """A span's tensors are missing from the checkpoint or have an unexpected shape."""


def _check_span(config, start: int, end: int, embed: bool, head: bool) -> None:
    n_layers = config.num_hidden_layers
    if not 0 <= start <= end <= n_layers:
        raise ValueError(f"layer span [{start}, {end}) is not inside the model's {n_layers} layers")
    if embed and start != 0:
        raise ValueError(f"only a span starting at layer 0 can hold the embeddings (got start={start})")
    if head and end != n_layers:
        raise ValueError(f"only a span ending at layer {n_layers} can hold the head (got end={end})")
    if start == end and not (embed or head):
        raise ValueError("an empty layer span without embeddings or head has nothing to run")


def _head_source_tensor(config) -> str:
    """Tied models keep a single matrix: the head reads the embedding weights."""
    return EMBED_TENSOR if getattr(config, "tie_word_embeddings", False) else HEAD_TENSOR


class _SpanModules(nn.Module):
    """The span's modules, named so that ``model.`` + state-dict key is the checkpoint name (head aside)."""

    def __init__(self, config, adapter: FamilyAdapter, start: int, end: int, embed: bool, head: bool):
        super().__init__()
        self.embed_tokens = adapter.embedding(config) if embed else None
        # Keyed by absolute index: the layer's own layer_idx addresses cache slots and layer types.
        self.layers = nn.ModuleDict({str(i): adapter.decoder_layer(config, i) for i in range(start, end)})
        self.norm = adapter.final_norm(config) if head else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if head else None

    def checkpoint_names(self, config) -> dict[str, str]:
        """Module state-dict key -> checkpoint tensor name, in load order."""
        names = {}
        for key in self.state_dict():
            names[key] = _head_source_tensor(config) if key == "lm_head.weight" else f"model.{key}"
        return names


def _skeleton(config, adapter: FamilyAdapter, start: int, end: int, embed: bool, head: bool) -> _SpanModules:
    # Meta tensors have shapes but no storage: nothing the size of the model is ever allocated.
    with torch.device("meta"):
        return _SpanModules(config, adapter, start, end, embed, head)


def span_tensor_names(config, start: int, end: int, embed: bool, head: bool) -> list[str]:
    """The HF checkpoint tensor names a span ``[start, end)`` needs, each once, in a stable order.

    Names come from transformers' own module classes (built on the meta device), so family differences such
    as Phi3's fused ``qkv_proj`` or Gemma2's extra norms need no table here.
    """
    _check_span(config, start, end, embed, head)
    modules = _skeleton(config, adapter_for(config), start, end, embed, head)
    return list(dict.fromkeys(modules.checkpoint_names(config).values()))


def projection_weight_names(config, start: int, end: int) -> list[str]:
    """Checkpoint names of the linear projections' weights in decoder layers ``[start, end)``: what a
    quantized model stores quantized (embeddings, norms and the head are not among them)."""
    modules = _skeleton(config, adapter_for(config), start, end, False, False)
    return [f"model.layers.{path}.weight" for path, module in modules.layers.named_modules()
            if isinstance(module, nn.Linear)]


def expected_weight_bytes(config, start: int, end: int, *, embed: bool, head: bool, dtype: torch.dtype,
                          tensor_slice: TensorSlice | None = None, quantized: bool = False) -> int:
    """Bytes a span's weights will hold once loaded in ``dtype``, from its modules' shapes alone (built
    on the meta device, nothing read): what a node checks against its memory cap before it reads a
    tensor. Exact for full-precision weights (as :attr:`LayerSpan.weight_bytes` counts them); the
    packed size of ``quantized`` projections is known only from their stored parts, so they are left
    out and the figure is a floor."""
    _check_span(config, start, end, embed, head)
    if tensor_slice is not None:
        check_slice(config, tensor_slice, embed, head)
        config = sliced_config(config, tensor_slice)
    modules = _skeleton(config, adapter_for(config), start, end, embed, head)
    skipped = {f"layers.{path}.weight" for path, module in modules.layers.named_modules()
               if quantized and isinstance(module, nn.Linear)}
    if embed and head and getattr(config, "tie_word_embeddings", False):
        skipped.add("lm_head.weight")  # the embedding matrix, held once
    elements = sum(p.numel() for name, p in modules.named_parameters() if name not in skipped)
    return elements * torch.empty((), dtype=dtype).element_size()


class LayerSpan(nn.Module):
    """Layers ``[start, end)`` of a causal LM, optionally with embeddings (first span) and norm + head (last).

    ``tensors`` is asked exactly once, for exactly :func:`span_tensor_names`. Run steps with :meth:`forward`
    and one :meth:`new_cache` per session.

    With a ``tensor_slice`` the span holds one tensor-parallel member's part of every layer
    (:mod:`dllmd.models.slicing`); its attention, MLP and embedding outputs are partial sums that
    :meth:`attach`'s ``reduce`` adds up with the other members' before anything else reads them, and its
    head yields the logits of the member's vocabulary rows only.
    """

    def __init__(self, config, start: int, end: int, *, embed: bool, head: bool, tensors: TensorSource,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 tensor_slice: TensorSlice | None = None):
        super().__init__()
        _check_span(config, start, end, embed, head)
        self.adapter = adapter_for(config)
        if tensor_slice is not None:
            check_slice(config, tensor_slice, embed, head)
        self.tensor_slice = tensor_slice
        self.vocab_size = config.vocab_size  # of the whole model: what token ids are checked against
        self.model_config = config
        # A private copy (sliced for a tensor-parallel member): the attention kernel choice and the
        # slice's head counts must not leak into the caller's config.
        self.config = sliced_config(config, tensor_slice) if tensor_slice is not None else copy.deepcopy(config)
        self.config._attn_implementation = self.adapter.attention_implementation()
        self.start, self.end, self.embed, self.head = start, end, embed, head
        self.dtype, self.device = dtype, torch.device(device)
        self._reduce: Reduce | None = None

        self.parts = _skeleton(self.config, self.adapter, start, end, embed, head)
        self._load(tensors)
        if embed:
            self.adapter.restore_embedding_buffers(self.parts.embed_tokens)
        # Rotary tables depend only on the config, so they are computed, never loaded.
        self.rotary_emb = self.adapter.rotary_embedding(self.model_config).to(self.device)
        self._check_materialized()

        self.layer_types = {i: self.adapter.layer_type(self.config, i) for i in range(start, end)}
        first_layer = next(iter(self.parts.layers.values()), None)
        self._cache_kw = _cache_keyword(type(first_layer).forward) if first_layer is not None else "cache"
        self._first_layer_of_type: dict[str, int] = {}
        for index, layer_type in self.layer_types.items():
            self._first_layer_of_type.setdefault(layer_type, index)
        self.softcap = self.adapter.final_logit_softcap(self.config) if head else None
        if tensor_slice is not None:
            self._hook_reductions()

    def attach(self, reduce: Reduce) -> None:
        """Give a tensor-parallel member the group's sum, which every partial result goes through."""
        self._reduce = reduce

    def _reduced(self, partial: torch.Tensor) -> torch.Tensor:
        if self._reduce is None:
            raise RuntimeError("this tensor-parallel slice is not connected to its group yet")
        return self._reduce(partial)

    def _hook_reductions(self) -> None:
        """Sum the partial outputs where Megatron does: after attention's output projection and after
        the MLP's down projection, before the residual add (and any post-norm) of transformers' own
        decoder layer reads them, so the layer code runs unchanged on every member. The modules' own
        ``forward`` is wrapped rather than hooked: a module with a hook takes torch's slow call path, a few
        microseconds sixty times a token."""
        for layer in self.parts.layers.values():
            _reduce_after(layer.self_attn, lambda out: (self._reduced(out[0]), *out[1:]))
            _reduce_after(layer.mlp, self._reduced)

    def _load(self, tensors: TensorSource) -> None:
        names = self.parts.checkpoint_names(self.config)
        wanted = list(dict.fromkeys(names.values()))
        provided = tensors(wanted)
        expected = self.parts.state_dict()
        state, converted, quantized = {}, {}, {}
        # A quantized span owns copies of its other tensors (norms, biases: small), so that nothing
        # keeps the store's memory maps alive: pages read from them while packing the projections
        # would otherwise stay resident, as much again as the packed weights.
        owned = any(isinstance(t, QuantizedWeight) for t in provided.values())
        for key, name in names.items():
            if name not in provided:
                raise SpanLoadError(f"tensor {name!r} needed by layers [{self.start}, {self.end}) is missing "
                                    f"from the checkpoint")
            tensor = provided[name]
            if self.tensor_slice is not None:
                tensor = slice_tensor(self.model_config, self.tensor_slice, name, tensor)
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise SpanLoadError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                                    f"{tuple(expected[key].shape)} for this {self.config.model_type} config")
            if isinstance(tensor, QuantizedWeight):
                quantized[key] = tensor
            elif name not in converted:
                # Once per name: a tied head and embedding in one span share one converted matrix.
                converted[name] = tensor.to(device=self.device, dtype=self.dtype, copy=owned)
            if not isinstance(tensor, QuantizedWeight):
                state[key] = converted[name]
        # assign=True adopts the tensors instead of copying them into the (storage-less) meta parameters.
        missing, unexpected = self.parts.load_state_dict(state, strict=False, assign=True)
        if set(missing) != set(quantized) or unexpected:
            raise SpanLoadError(f"the span's modules and tensors disagree: {sorted(set(missing) - set(quantized))[:3]} "
                                f"not provided, {unexpected[:3]} not used")
        for key, weight in quantized.items():
            self._install_quantized(key, weight)

    def _install_quantized(self, key: str, weight: QuantizedWeight) -> None:
        """Replace the linear layer whose weight ``key`` is with one that computes on the stored parts."""
        path = key.removesuffix(".weight")
        parent_path, _, attribute = path.rpartition(".")
        parent = self.parts.get_submodule(parent_path)
        linear = getattr(parent, attribute)
        if not isinstance(linear, nn.Linear):
            raise SpanLoadError(f"{key} is stored quantized but belongs to a {type(linear).__name__}, not a linear layer")
        check_device(weight.q, self.device)
        bias = linear.bias.detach() if linear.bias is not None else None
        setattr(parent, attribute, QuantizedLinear(weight, bias, self.device))

    def _check_materialized(self) -> None:
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_meta:
                raise SpanLoadError(f"{name} was never materialized; the {self.adapter.family} adapter misses it")

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as held: parameters (a matrix two of them share, as a tied embedding
        and head in one span do, counted once), and quantized projections in their packed form."""
        packed = sum(m.nbytes for m in self.modules() if isinstance(m, QuantizedLinear))
        held = {(p.data_ptr(), p.numel(), p.dtype): p.numel() * p.element_size() for p in self.parameters()}
        return packed + sum(held.values())

    @property
    def layer_indices(self) -> range:
        return range(self.start, self.end)

    def kv_cache_bytes(self, positions: int) -> int:
        """The most memory one session's cache of this span holds for ``positions`` tokens: keys and
        values of every layer, a sliding-window layer's capped at its window (plus the one new token a
        decode step adds before the window is trimmed)."""
        config = self.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per_position = 2 * heads * head_dim * torch.empty((), dtype=self.dtype).element_size()
        window = self.adapter.sliding_window(config)
        return sum(per_position * (min(positions, window) if kind == SLIDING_ATTENTION and window else positions)
                   for kind in self.layer_types.values())

    def new_cache(self) -> SpanCache:
        """An empty KV cache for one session of this span."""
        window = self.adapter.sliding_window(self.config)
        return SpanCache({
            i: DynamicSlidingWindowLayer(sliding_window=window) if layer_type == SLIDING_ATTENTION else DynamicLayer()
            for i, layer_type in self.layer_types.items()
        })

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor, cache: SpanCache,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Run one step (a prefill chunk or a decode token) of one session through the span.

        ``inputs`` are token ids ``[batch, seq]`` (int64) for the embedding span, else hidden states
        ``[batch, seq, hidden]`` in the span's dtype. ``position_ids`` ``[batch, seq]`` are absolute and must
        continue the cache (the first equals ``cache.length``); pass them on the CPU, as they come off the wire,
        so checking them never waits for an accelerator. Inputs on another device are moved to the span's.
        Returns hidden states, or float32 logits ``[batch, seq, vocab]`` for the head span (only the last
        ``logits_to_keep`` positions when it is > 0).
        """
        cache._check_usable()
        hidden = self._input_hidden(inputs.to(self.device, non_blocking=True))
        self._check_positions(hidden, position_ids, cache)
        position_ids = position_ids.to(self.device, non_blocking=True)
        with _broken_on_failure([cache]):
            hidden = self._run_layers(hidden, position_ids, cache)
        _advance([cache], [hidden.shape[1]])
        if not self.head:
            return hidden
        return self._logits(hidden, logits_to_keep)

    @torch.inference_mode()
    def forward_batch(self, inputs: torch.Tensor, caches: Sequence[SpanCache]) -> torch.Tensor:
        """One decode step for several sessions at once: row ``b`` of ``inputs`` (``[batch, 1]`` token ids
        or ``[batch, 1, hidden]`` states) continues ``caches[b]``. Returns ``[batch, 1, hidden]`` states, or
        float32 logits ``[batch, 1, vocab]`` for the head span. Each row equals a lone :meth:`forward` of
        that session up to matmul rounding (weights are read once for the whole batch)."""
        if inputs.shape[0] != len(caches) or inputs.dim() < 2 or inputs.shape[1] != 1:
            raise ValueError(f"a batched step takes one token per session: inputs {tuple(inputs.shape)} for "
                             f"{len(caches)} caches")
        _check_one_step_each(caches, "batch")
        hidden = self._input_hidden(inputs.to(self.device, non_blocking=True))
        position_ids = torch.tensor([[c.length] for c in caches], dtype=torch.long).to(self.device, non_blocking=True)
        with _broken_on_failure(caches):
            if self.layer_types:
                batch_cache = BatchCache(caches)
                rotary = self._rotary(hidden, position_ids)
                with ragged_attention_on(self.config):
                    for index, layer in zip(self.layer_indices, self.parts.layers.values()):
                        # No masks: one new token sees every key its session's cache keeps.
                        hidden = layer(hidden, attention_mask=None, position_ids=position_ids,
                                       position_embeddings=rotary[self.layer_types[index]], **{self._cache_kw: batch_cache})
        _advance(caches, [1] * len(caches))
        if not self.head:
            return hidden
        return self._logits(hidden, 1)

    @property
    def packable(self) -> bool:
        """Whether prefill chunks of several sessions may share a pass (:meth:`forward_packed`). Not with a
        dynamic rotary embedding: its tables follow the longest position in the pass, so a session
        would see the frequencies another session's length chose."""
        rope = getattr(self.rotary_emb, "rope_type", "default")
        kinds = set(rope.values()) if isinstance(rope, dict) else {rope}  # Gemma3: one per layer type
        return self.tensor_slice is None and not kinds & {"dynamic", "longrope"}

    @torch.inference_mode()
    def forward_packed(self, inputs: Sequence[torch.Tensor], caches: Sequence[SpanCache],
                       keeps: Sequence[int]) -> list[torch.Tensor]:
        """Steps of several sessions (prefill chunks of any lengths) as one pass: session ``b``'s
        ``inputs[b]`` (``[1, seq_b]`` ids or ``[1, seq_b, hidden]`` states) continues ``caches[b]``. The
        tokens are packed into one sequence, so every projection and MLP reads its weights once for all
        of them; attention runs per session on its own cache under the mask its lone step would use.
        Returns each session's output as :meth:`forward` would (``keeps[b]`` as its ``logits_to_keep``),
        equal to it up to matmul rounding."""
        if not len(inputs) == len(caches) == len(keeps) or not inputs:
            raise ValueError(f"a packed pass takes one input, cache and keep per session: {len(inputs)}, "
                             f"{len(caches)}, {len(keeps)}")
        _check_one_step_each(caches, "pass")
        parts = [self._input_hidden(x.to(self.device, non_blocking=True)) for x in inputs]
        lengths = [part.shape[1] for part in parts]
        positions = [torch.arange(c.length, c.length + n).unsqueeze(0) for c, n in zip(caches, lengths)]
        for part, position, cache in zip(parts, positions, caches):
            self._check_positions(part, position, cache)
        hidden = torch.cat(parts, dim=1)
        packed_positions = torch.cat(positions, dim=1).to(self.device, non_blocking=True)
        with _broken_on_failure(caches):
            if self.layer_types:
                # Built before attention is rerouted: the mask format follows the config's attention.
                masks = [self._masks(part, position.to(self.device), cache)
                         for part, position, cache in zip(parts, positions, caches)]
                rotary = self._rotary(hidden, packed_positions)
                packed_cache = PackedCache(caches, lengths)
                with ragged_attention_on(self.config):
                    for index, layer in zip(self.layer_indices, self.parts.layers.values()):
                        layer_type = self.layer_types[index]
                        hidden = layer(hidden, attention_mask=PackedMasks([m[layer_type] for m in masks]),
                                       position_ids=packed_positions, position_embeddings=rotary[layer_type],
                                       **{self._cache_kw: packed_cache})
        _advance(caches, lengths)
        outputs = list(hidden.split(lengths, dim=1))
        if not self.head:
            return outputs
        return [self._logits(out, keep) for out, keep in zip(outputs, keeps)]

    def forward_training(self, inputs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Whole sequences through the span with autograd and without a KV cache (pipeline training):
        token ids ``[batch, seq]`` (embedding span) or hidden states in, hidden states or float32
        logits (head span) out. The same modules, masks and rotary tables as :meth:`forward`, so the
        stages of a pipeline compute what transformers' own model computes, bit for bit."""
        hidden = self._input_hidden(inputs.to(self.device))
        hidden = self._run_layers(hidden, position_ids.to(self.device), None)
        return self._logits(hidden, 0) if self.head else hidden

    def _input_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.embed:
            if inputs.dtype != torch.long or inputs.dim() != 2:
                raise ValueError(f"the first span takes int64 token ids [batch, seq], got {inputs.dtype} "
                                 f"{tuple(inputs.shape)}")
            if self.tensor_slice is None:
                return self.parts.embed_tokens(inputs)
            # Vocabulary-parallel: each member embeds the ids in its rows and zeros elsewhere; the sum has
            # exactly one non-zero term per id, so it equals the whole table's lookup bit for bit.
            lo, hi = self.tensor_slice.vocab_lo, self.tensor_slice.vocab_hi
            inside = (inputs >= lo) & (inputs < hi)
            local = self.parts.embed_tokens((inputs - lo).clamp(0, hi - lo - 1))
            return self._reduced(local * inside.unsqueeze(-1).to(local.dtype))
        if inputs.dim() != 3 or inputs.shape[-1] != self.config.hidden_size or inputs.dtype != self.dtype:
            raise ValueError(f"span [{self.start}, {self.end}) takes hidden states [batch, seq, "
                             f"{self.config.hidden_size}] in {self.dtype}, got {inputs.dtype} {tuple(inputs.shape)}")
        return inputs

    @staticmethod
    def _check_positions(hidden: torch.Tensor, position_ids: torch.Tensor, cache: SpanCache) -> None:
        batch, seq = hidden.shape[:2]
        well_formed = position_ids.dim() == 2 and position_ids.shape[0] in (1, batch) and position_ids.shape[1] == seq
        if position_ids.is_floating_point() or not well_formed:
            raise ValueError(f"position_ids must be integers [batch, seq] = {tuple(hidden.shape[:2])}, "
                             f"got {tuple(position_ids.shape)}")
        # The cache stores keys in arrival order; a step that does not continue it would attend wrongly.
        if bool((position_ids[:, 0] != cache.length).any()):
            raise ValueError(f"position_ids start at {position_ids[:, 0].tolist()} but this session's cache "
                             f"holds {cache.length} tokens")

    def _run_layers(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache: SpanCache | None) -> torch.Tensor:
        if not self.layer_types:
            return hidden
        masks = self._masks(hidden, position_ids, cache)
        rotary = self._rotary(hidden, position_ids)
        for index, layer in zip(self.layer_indices, self.parts.layers.values()):
            layer_type = self.layer_types[index]
            hidden = layer(hidden, attention_mask=masks[layer_type], position_ids=position_ids,
                           position_embeddings=rotary[layer_type], **{self._cache_kw: cache})
        return hidden

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not self.adapter.rotary_per_layer_type:
            # One table serves every layer: compute it once per step, not once per layer type.
            any_type = next(iter(self._first_layer_of_type))
            shared = self.adapter.rotary_cos_sin(self.rotary_emb, hidden, position_ids, any_type)
            return dict.fromkeys(self._first_layer_of_type, shared)
        return {layer_type: self.adapter.rotary_cos_sin(self.rotary_emb, hidden, position_ids, layer_type)
                for layer_type in self._first_layer_of_type}

    def _masks(self, hidden: torch.Tensor, position_ids: torch.Tensor,
               cache: SpanCache | None) -> dict[str, torch.Tensor | None]:
        if hidden.shape[1] == 1:
            # One query token sees every cached key: full layers keep all of them and sliding layers keep only
            # the last window - 1, so the mask would be all-true. No mask lets SDPA/eager skip building it.
            return dict.fromkeys(self._first_layer_of_type)
        masks = {}
        for layer_type, first_index in self._first_layer_of_type.items():
            make_mask = create_sliding_window_causal_mask if layer_type == SLIDING_ATTENTION else create_causal_mask
            # layer_idx points the helper at this span's own layers; by default it would look at layer 0.
            masks[layer_type] = make_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                          position_ids=position_ids, layer_idx=first_index,
                                          **{MASK_CACHE_KEYWORD: cache})
        return masks

    def _logits(self, hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        hidden = self.parts.norm(hidden)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:, :]
        logits = self.parts.lm_head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
