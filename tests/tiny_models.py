"""Tiny random models of every supported family, saved as complete HF model directories, offline.

Each directory holds a seeded float32 model (``save_pretrained``, safetensors) and a real byte-level BPE
tokenizer trained here on built-in text, with bos/eos/pad tokens and a chat template, so that
``AutoTokenizer`` and ``AutoModelForCausalLM`` load it like any downloaded model.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOKENIZER_VOCAB = 320

_COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-6)

# Odd layer counts make uneven splits; windows of 6-8 tokens are crossed by every "long" test prompt.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(num_hidden_layers=5, tie_word_embeddings=True),
    "mistral": dict(num_hidden_layers=7, sliding_window=8, tie_word_embeddings=False),
    "qwen2": dict(num_hidden_layers=5, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                  tie_word_embeddings=True),
    "qwen3": dict(num_hidden_layers=5, head_dim=16, use_sliding_window=True, sliding_window=6,
                  max_window_layers=3, tie_word_embeddings=False),
    "phi3": dict(num_hidden_layers=5, tie_word_embeddings=False),
    "gemma": dict(num_hidden_layers=5, head_dim=16, num_key_value_heads=1, tie_word_embeddings=True),
    "gemma2": dict(num_hidden_layers=5, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "gemma3_text": dict(num_hidden_layers=7, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2
                        + ["sliding_attention"], tie_word_embeddings=True),
}
FAMILIES = tuple(FAMILY_CONFIGS)


TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "Distributed inference splits the layers of a model across the machines you already own.",
    "Hello! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.",
    "Each node keeps the key and value cache of its own layers for every session it serves.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 and 2024 appear in text, as do symbols: + - * / = ( ) [ ] { }.",
)


@cache
def _tokenizer_json() -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return tokenizer.to_str()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (any text encodes) with special tokens and a chat template."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
                                   chat_template=CHAT_TEMPLATE)


def make_tiny_model(family: str, path, **config_overrides) -> Path:
    """Build, seed and save a tiny random ``family`` model plus its tokenizer in ``path``; returns ``path``."""
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(FAMILIES)}")
    path = Path(path)
    tokenizer = make_tokenizer()
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(family, **{**_COMMON, **special, **FAMILY_CONFIGS[family], **config_overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _widen_weights(model)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _widen_weights(model: torch.nn.Module) -> None:
    """Re-draw weights with a larger spread so a random model's logits separate clearly.

    The default 0.02 init makes nearly uniform logits whose argmax flips on rounding noise; visible structure
    makes "same greedy tokens" a meaningful test. Norm weights get a little noise too, so a wrongly loaded
    norm cannot hide behind all-ones (or all-zeros for Gemma).
    """
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
            else:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
