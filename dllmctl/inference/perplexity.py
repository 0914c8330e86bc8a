"""Perplexity of a held-out text through the deployed cluster: how much a layout, a quantization or a
compressed hop changes what the model predicts.

The text is tokenized once and scored in sliding windows (transformers' documented method): each
window of ``window`` tokens starts ``stride`` tokens after the previous one, and only the tokens no
earlier window scored count, each predicted with up to ``window - stride`` tokens of context before
it. Every window is one session whose last stage returns the logits of every position (as for
``logits="all"``); the client turns them into the target tokens' log-probabilities. The top-1
prediction of every scored position is kept too, so two runs (a quantized model against the
unquantized one) can be compared token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.generation import GenerationError, load_model
from dllmctl.inference.stages import live_stages
from dllmd.net.codec import HopCodec
from dllmd.net.identity import Identity
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.pool import ConnectionPool

DEFAULT_WINDOW = 256
DEFAULT_STRIDE = 128
MAX_WINDOW = 512  # the daemons return "all" logits for at most this many positions per step


@dataclass(frozen=True)
class PerplexityRequest:
    model: str
    text: str
    window: int = DEFAULT_WINDOW
    stride: int = DEFAULT_STRIDE
    max_tokens: int | None = None  # score only the text's first tokens
    parallelism: str = "pipeline"
    hops: HopCodec = HopCodec()  # how hidden states travel between stages


@dataclass
class PerplexityResult:
    model: str
    tokens: int  # of the text (after max_tokens)
    scored: int  # tokens whose log-probability counts (all but the first)
    windows: int
    nll: float  # mean negative log-likelihood per scored token, in nats
    predictions: list[int] = field(default_factory=list)  # top-1 id at each scored position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "scored": self.scored, "windows": self.windows,
                "nll": round(self.nll, 6), "perplexity": round(self.perplexity, 4)}


@dataclass(frozen=True)
class Window:
    begin: int
    end: int
    scored_from: int  # positions [scored_from, end) are targets; each is predicted from the one before


def windows(tokens: int, window: int, stride: int) -> list[Window]:
    """The sliding windows over ``tokens`` ids: every id but the first is a target exactly once."""
    if not 2 <= window <= MAX_WINDOW:
        raise GenerationError(f"the window must be 2-{MAX_WINDOW} tokens, got {window}", "window")
    if not 1 <= stride <= window - 1:
        raise GenerationError(f"the stride must be 1-{window - 1} tokens (less than the window), got {stride}",
                              "stride")
    if tokens < 2:
        raise GenerationError("the text must hold at least 2 tokens to score one", "text")
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


def tokenize(request: PerplexityRequest) -> list[int]:
    tokenizer = load_model(request.model).tokenizer
    ids = tokenizer(request.text, add_special_tokens=False)["input_ids"]
    return ids[:request.max_tokens] if request.max_tokens is not None else ids


async def perplexity(user: Identity, nodes: list[NodeEntry], request: PerplexityRequest,
                     progress: Callable[[int, int], None] = lambda done, total: None) -> PerplexityResult:
    """Score ``request.text`` through the live spans of ``nodes`` (failing over like generation)."""
    model = load_model(request.model)
    ids = tokenize(request)
    plan = windows(len(ids), request.window, request.stride)
    total_nll, predictions = 0.0, []
    pool = ConnectionPool(user)
    try:
        stages = await live_stages(user, nodes, model.name)
        for done, w in enumerate(plan):
            generation = await generate_with_failover(
                pool, lambda: live_stages(user, nodes, model.name), model.name, model.num_layers, ids[w.begin:w.end],
                1, set(), SamplingParams(), parallelism=request.parallelism, logits="all", stages=stages,
                hops=request.hops)
            logits = torch.cat([chunk.reshape(-1, chunk.shape[-1]) for chunk in generation.logits])
            nll, top = score(logits, ids, w)
            total_nll += nll
            predictions.extend(top)
            progress(done + 1, len(plan))
    finally:
        pool.close()
    scored = len(ids) - 1
    return PerplexityResult(model.name, len(ids), scored, len(plan), total_nll / scored, predictions)


def agreement(a: PerplexityResult, b: PerplexityResult) -> float:
    """The fraction of scored positions where two runs over the same text predict the same top-1 id."""
    if a.tokens != b.tokens or len(a.predictions) != len(b.predictions):
        raise ValueError("the two runs scored different texts (tokenizers differ?)")
    return sum(x == y for x, y in zip(a.predictions, b.predictions)) / max(len(a.predictions), 1)
