"""A job's held-out loss (``JobSpec.eval_tokens``): what it is scored on, checked at submit, and the
score itself, taken on the coordinator's replica at every checkpoint and at the end with the one
definition of a held-out loss (:mod:`dllmd.inference.perplexity`)."""

from __future__ import annotations

import torch

from dllmd.inference.perplexity import heldout_nll
from dllmd.net.messages.training import JobSpec


def refusal(spec: JobSpec, config: dict) -> str | None:
    """Why ``spec``'s held-out text cannot be scored with a model of ``config``, or None."""
    if spec.parallelism != "data":
        return (f"--eval-text is scored on the coordinator's whole replica: built for --parallelism data, "
                f"not {spec.parallelism}")
    vocab = int(config["vocab_size"])
    if not all(0 <= t < vocab for t in spec.eval_tokens):
        return f"the held-out text must be token ids of {spec.model}'s vocabulary (0-{vocab - 1})"
    if not 1 < spec.eval_window <= int(config.get("max_position_embeddings", spec.eval_window)):
        return f"--eval-window {spec.eval_window} is more than {spec.model}'s positions"
    return None


def score(model: torch.nn.Module, spec: JobSpec) -> float:
    """The held-out text's mean token loss under ``model``, in windows of ``eval_window`` (stride half)."""
    return heldout_nll(model, spec.eval_tokens, spec.eval_window, max(1, spec.eval_window // 2))
