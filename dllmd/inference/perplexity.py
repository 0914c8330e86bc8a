"""Held-out loss, defined once: the next-token negative log-likelihood of a text scored in sliding
windows (transformers' documented method). ``dllmctl eval perplexity`` scores windows through the
deployed cluster with it; :func:`heldout_nll` scores them with a model in this process (a training
job's held-out loss, ``dllmctl bench train``'s final loss).

Each window of ``window`` tokens starts ``stride`` tokens after the previous one, and only the
tokens no earlier window scored count, each predicted with up to ``window - stride`` tokens of
context before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_WINDOW = 512  # the daemons return "all" logits for at most this many positions per step


class WindowError(ValueError):
    """Windows that cannot be cut as asked; ``field`` names the setting at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    scored_from: int  # positions [scored_from, end) are targets; each is predicted from the one before


def windows(tokens: int, window: int, stride: int) -> list[Window]:
    """The sliding windows over ``tokens`` ids: every id but the first is a target exactly once."""
    if not 2 <= window <= MAX_WINDOW:
        raise WindowError(f"the window must be 2-{MAX_WINDOW} tokens, got {window}", "window")
    if not 1 <= stride <= window - 1:
        raise WindowError(f"the stride must be 1-{window - 1} tokens (less than the window), got {stride}", "stride")
    if tokens < 2:
        raise WindowError("the text must hold at least 2 tokens to score one", "text")
    out, scored_to, begin = [], 1, 0
    while scored_to < tokens:
        end = min(begin + window, tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return out


def score(logits: torch.Tensor, ids: list[int], w: Window) -> tuple[float, list[int]]:
    """Sum of the targets' negative log-probabilities in window ``w`` and the top-1 ids there, from
    the window's logits ``[positions, vocab]`` (position ``i`` predicts id ``begin + i + 1``)."""
    rows = logits[w.scored_from - 1 - w.begin:w.end - 1 - w.begin].to(torch.float32)
    targets = torch.tensor(ids[w.scored_from:w.end])
    nll = torch.nn.functional.cross_entropy(rows, targets, reduction="sum")
    return float(nll), rows.argmax(-1).tolist()


def heldout_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int) -> float:
    """The mean negative log-likelihood per scored token (nats) of ``ids`` under ``model``, here."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for w in windows(len(ids), window, stride):
            logits = model(input_ids=torch.tensor([ids[w.begin:w.end]], device=device)).logits[0]
            total += score(logits.cpu(), ids, w)[0]
    return total / (len(ids) - 1)
