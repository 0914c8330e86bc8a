"""A trainable replica: transformers' own model class, weights from the model store's files, and
the loss every worker (and the single-process reference) computes the same way."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM


class TrainModelError(ValueError):
    """The model cannot be trained as asked; the message says why."""


def load_causal_lm(config_dir: Path, files: Sequence[Path], device: torch.device | str = "cpu") -> torch.nn.Module:
    """The full model in fp32 (the master weights; bf16 runs use autocast), in training mode."""
    config = AutoConfig.from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)  # the random init is overwritten, but keep it deterministic anyway
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise TrainModelError(f"the model files do not match {config.model_type}'s parameters: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.to(device).train()


def parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters in a fixed order, each once (tied weights appear under their first name)."""
    seen, out = set(), []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def row_targets(tokens: torch.Tensor, row_offsets: torch.Tensor, valid_tokens: torch.Tensor) -> torch.Tensor:
    """Next-token labels for packed rows, -100 where the target is padding after a shard's real end.

    ``row_offsets[i]`` is where row i starts in its shard's flat stream, ``valid_tokens[i]`` where
    that stream ends."""
    seq_len = tokens.shape[1]
    labels = torch.full_like(tokens, -100, dtype=torch.long)
    labels[:, :-1] = tokens[:, 1:].long()
    position = row_offsets[:, None] + torch.arange(1, seq_len + 1)[None, :]  # flat index of each target
    labels[position >= valid_tokens[:, None]] = -100
    labels[:, -1] = -100
    return labels


def autocast(device: torch.device, dtype: str):
    """Where forward passes run: bf16 autocast for ``--dtype bfloat16`` (fp32 master weights), else plain."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over the labelled positions, and their count."""
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, int((labels != -100).sum())


def loss_sum(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, dtype: str) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over the labelled positions, and their count.

    Summing (not averaging) per micro-batch lets any split of a global batch over workers and
    micro-batches add up to the same total; the mean is taken once, over the global token count."""
    device = next(model.parameters()).device
    with autocast(device, dtype):
        logits = model(input_ids=tokens.to(device).long()).logits
    return summed_cross_entropy(logits, labels)
