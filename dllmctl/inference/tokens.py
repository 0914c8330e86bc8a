"""The client's side of text: tokenizer, chat template, stop tokens."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptError(ValueError):
    pass


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise PromptError(f"the model in {model_dir} has no usable tokenizer: {exc}") from None


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, raw: bool = False,
                  system: str | None = None, history: list[dict] | None = None) -> list[int]:
    """Token ids for a prompt: through the chat template (with a generation prompt) unless ``raw``."""
    if not prompt and not history:
        raise PromptError("the prompt is empty")
    if raw:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; pass --raw to send the prompt as plain text")
    messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    if prompt:
        messages.append({"role": "user", "content": prompt})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def stop_ids(tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's (which may list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except (FileNotFoundError, ValueError):
        pass
    return ids
