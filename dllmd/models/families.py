"""One small adapter per architecture family: how to build a span's modules from transformers' own classes.

An adapter never re-implements attention or MLPs. It only knows, for one ``config.model_type``, which
transformers classes to instantiate and the few family quirks that live outside the decoder layer:
Gemma scales embeddings by sqrt(hidden), Gemma2/3 soft-cap the final logits, Gemma3 has one rotary table
per layer type, and sliding-window families attend locally on some (or all) layers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class UnsupportedFamily(ValueError):
    """The model's architecture family has no adapter, so its layers cannot be run as spans."""


@dataclass(frozen=True)
class FamilyAdapter:
    """How to build and drive one architecture family's modules, by name of its transformers classes."""

    family: str
    modeling_module: str
    class_prefix: str
    embedding_class: str | None = None
    """A scaled-embedding class (Gemma); ``None`` means a plain ``nn.Embedding``."""
    rotary_per_layer_type: bool = False
    """Gemma3: local and global layers use different rope bases, so cos/sin depend on the layer type."""
    supports_sdpa: bool = True
    """Gemma2 soft-caps attention scores, which SDPA cannot do, so transformers runs it eagerly."""

    def _modeling(self) -> ModuleType:
        return importlib.import_module(self.modeling_module)

    def _class(self, suffix: str) -> type[nn.Module]:
        return getattr(self._modeling(), f"{self.class_prefix}{suffix}")

    def attention_implementation(self) -> str:
        """The attention kernel transformers itself picks for this family by default."""
        return "sdpa" if self.supports_sdpa else "eager"

    def decoder_layer(self, config, layer_idx: int) -> nn.Module:
        """One decoder layer; ``layer_idx`` is absolute so it addresses the right cache slot and layer type."""
        return self._class("DecoderLayer")(config, layer_idx)

    def rotary_embedding(self, config) -> nn.Module:
        return self._class("RotaryEmbedding")(config)

    def final_norm(self, config) -> nn.Module:
        return self._class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def embedding(self, config) -> nn.Embedding:
        """The token embedding, scaled by sqrt(hidden) for the Gemma families."""
        if self.embedding_class is None:
            return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        scaled = getattr(self._modeling(), self.embedding_class)
        return scaled(config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size**0.5)

    def restore_embedding_buffers(self, embedding: nn.Module) -> None:
        """Refill non-persistent buffers that a meta-device build leaves empty (Gemma's ``embed_scale``)."""
        if self.embedding_class is not None:
            # The forward casts the scale to the weight dtype (a bf16 Gemma scales by 55.5, not 55.4256);
            # storing it in that dtype already keeps spans bit-identical to the full model.
            embedding.embed_scale = torch.tensor(embedding.scalar_embed_scale, dtype=embedding.weight.dtype,
                                                 device=embedding.weight.device)

    def layer_type(self, config, layer_idx: int) -> str:
        """``full_attention`` or ``sliding_attention`` for one absolute layer index."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return layer_types[layer_idx]
        # Mistral and Phi3 have no layer_types: a configured window applies to every layer.
        return SLIDING_ATTENTION if getattr(config, "sliding_window", None) else FULL_ATTENTION

    def sliding_window(self, config) -> int | None:
        return getattr(config, "sliding_window", None)

    def rotary_cos_sin(self, rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                       layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin for absolute ``position_ids``; needs only the config, never the cache."""
        if self.rotary_per_layer_type:
            return rotary(hidden, position_ids, layer_type)
        return rotary(hidden, position_ids)

    def final_logit_softcap(self, config) -> float | None:
        return getattr(config, "final_logit_softcapping", None)


_ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.family: adapter
    for adapter in (
        FamilyAdapter("llama", "transformers.models.llama.modeling_llama", "Llama"),
        FamilyAdapter("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
        FamilyAdapter("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
        FamilyAdapter("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3"),
        FamilyAdapter("phi3", "transformers.models.phi3.modeling_phi3", "Phi3"),
        FamilyAdapter("gemma", "transformers.models.gemma.modeling_gemma", "Gemma",
                      embedding_class="GemmaTextScaledWordEmbedding"),
        FamilyAdapter("gemma2", "transformers.models.gemma2.modeling_gemma2", "Gemma2",
                      embedding_class="Gemma2TextScaledWordEmbedding", supports_sdpa=False),
        FamilyAdapter("gemma3_text", "transformers.models.gemma3.modeling_gemma3", "Gemma3",
                      embedding_class="Gemma3TextScaledWordEmbedding", rotary_per_layer_type=True),
    )
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def adapter_for(config) -> FamilyAdapter:
    """The adapter for ``config.model_type``; raises :class:`UnsupportedFamily` naming it otherwise."""
    family = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(family)
    if adapter is None:
        raise UnsupportedFamily(
            f"model family {family!r} is not supported for layer spans; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        # Encoder variants (EmbeddingGemma) share a model_type but not the causal masks spans rely on.
        raise UnsupportedFamily(f"model family {family!r} with bidirectional attention is not a causal LM; "
                                f"supported causal families: {', '.join(SUPPORTED_FAMILIES)}")
    return adapter
