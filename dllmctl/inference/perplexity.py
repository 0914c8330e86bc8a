"""Perplexity of a held-out text through the deployed cluster: how much a layout, a quantization or a
compressed hop changes what the model predicts.

The text is tokenized once and scored in sliding windows, as :mod:`dllmd.inference.perplexity`
defines them (the one definition of a held-out loss, which training jobs score with too). Every
window is one session whose last stage returns the logits of every position (as for
``logits="all"``); the client turns them into the target tokens' log-probabilities. The top-1
prediction of every scored position is kept too, so two runs (a quantized model against the
unquantized one) can be compared token by token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dllmd.inference import perplexity as heldout
from dllmd.inference.perplexity import Window, score  # noqa: F401  (the scoring is dllmd's)
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


def windows(tokens: int, window: int, stride: int) -> list[Window]:
    """The sliding windows over ``tokens`` ids (:func:`dllmd.inference.perplexity.windows`), refused as a
    request's mistake."""
    try:
        return heldout.windows(tokens, window, stride)
    except heldout.WindowError as exc:
        raise GenerationError(str(exc), exc.field) from None


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
