"""What quantized weights cost in quality and save in memory, against the unquantized model, same run.

- ``quality``: through the registered nodes serving each model, the perplexity of a held-out text
  (:mod:`dllmctl.inference.perplexity`), the share of its positions where the variant's top-1 token
  is the base model's, and free-running greedy generations from a set of prompts compared token by
  token with the base model's (identical answers, and how far each runs before it first differs).
- ``span_memory``: one temporary daemon per model loads the same middle span (no embeddings, no
  head) and computes a few tokens in a route through it; its parameter bytes as held and the
  daemon's resident memory growth over its idle state. A fresh daemon each: memory freed by an
  unload is not reliably given back to the system, so one daemon's second model would be misread.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from dllmctl.bench.pipeline import bench_prompts
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.generation import load_model
from dllmctl.inference.perplexity import PerplexityRequest, PerplexityResult, agreement, perplexity
from dllmctl.inference.stages import live_stages
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.messages.node import INFO
from dllmd.net.pool import ConnectionPool

# The targets, as ratios to the unquantized model (perplexity) or its bytes (memory).
PERPLEXITY_TARGETS = {"int8": 1.02, "int4": 1.10}
MEMORY_TARGETS = {"int8": 0.35, "int4": 0.20}

Progress = Callable[[str], None]


@dataclass
class GreedyAgreement:
    prompts: int
    identical: int  # answers equal to the base model's, token for token
    matched_prefix: float  # mean share of each answer generated before the first differing token


async def greedy_answers(user: Identity, nodes: list[NodeEntry], model: str, prompts: list[list[int]],
                         new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy answer (exactly ``new_tokens`` tokens) through the nodes serving ``model``."""
    local = load_model(model)
    pool = ConnectionPool(user)
    try:
        stages = await live_stages(user, nodes, model)
        answers = []
        for ids in prompts:
            generation = await generate_with_failover(pool, lambda: live_stages(user, nodes, model), model,
                                                      local.num_layers, ids, new_tokens, set(), SamplingParams(),
                                                      stages=stages)
            answers.append(generation.token_ids)
        return answers
    finally:
        pool.close()


def compare_answers(base: list[list[int]], other: list[list[int]]) -> GreedyAgreement:
    def prefix(a: list[int], b: list[int]) -> float:
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return same / max(len(a), 1)

    return GreedyAgreement(len(base), sum(a == b for a, b in zip(base, other)),
                           round(sum(prefix(a, b) for a, b in zip(base, other)) / max(len(base), 1), 4))


def quality(user: Identity, nodes: list[NodeEntry], base: str, variants: dict[str, str], text: str, *,
            window: int, stride: int, max_tokens: int | None, prompts: int, new_tokens: int,
            progress: Progress = lambda _: None) -> dict:
    """``variants``: model name -> its method ("int8", "int4"). Every model must be deployed."""
    scored: dict[str, PerplexityResult] = {}
    answers: dict[str, list[list[int]]] = {}
    prompt_ids = bench_prompts(load_model(base).tokenizer, prompts)
    for name in (base, *variants):
        progress(f"perplexity of {name}")
        scored[name] = asyncio.run(perplexity(user, nodes, PerplexityRequest(name, text, window, stride, max_tokens)))
        progress(f"greedy answers of {name}")
        answers[name] = asyncio.run(greedy_answers(user, nodes, name, prompt_ids, new_tokens))
    report = {"base": {**scored[base].to_dict()}, "variants": []}
    for name, method in variants.items():
        ratio = scored[name].perplexity / scored[base].perplexity
        report["variants"].append({
            **scored[name].to_dict(), "method": method, "perplexity_ratio": round(ratio, 4),
            "target_ratio": PERPLEXITY_TARGETS.get(method), "meets_target": ratio <= PERPLEXITY_TARGETS.get(method, 0),
            "top1_agreement": round(agreement(scored[name], scored[base]), 4),
            "greedy": asdict(compare_answers(answers[base], answers[name])), "greedy_new_tokens": new_tokens})
    return report


async def _rss(user: Identity, node: NodeEntry) -> int:
    async with RpcClient(user, node.address, node.public_key) as client:
        info, _ = await client.invoke(INFO, timeout=30)
    return info.rss_bytes


async def _measure(user: Identity, front: NodeEntry, back: NodeEntry, middles: dict[str, NodeEntry],
                   models: dict[str, Path], start: int, end: int, num_layers: int, prompt: list[int]) -> dict:
    """Deploy every model as front [0, start) / its own middle node [start, end) / back [end, n), run one
    short generation through each (so every weight the middle holds has been read: an unquantized
    span's pages are mapped from the store and count once touched), then read each middle's memory."""
    idle = {name: await _rss(user, node) for name, node in middles.items()}
    params = {}
    for name, directory in models.items():
        node = middles[name]
        spans = [Span(front.name, 0, start, embed=True, head=False), Span(node.name, start, end, embed=False, head=False),
                 Span(back.name, end, num_layers, embed=False, head=True)]
        reports = await deploy(user, {n.name: n for n in (front, back, node)}, directory, spans)
        params[name] = next(r["param_bytes"] for r in reports if r["node"] == node.name)
        await greedy_answers(user, [front, node, back], name, [prompt], 4)
    return {name: {"param_bytes": params[name], "rss_growth_bytes": await _rss(user, node) - idle[name]}
            for name, node in middles.items()}


def span_memory(user: Identity, models: dict[str, Path], base: str, start: int, end: int,
                methods: dict[str, str], progress: Progress = lambda _: None) -> dict:
    """``models``: name -> store directory (``base`` among them); each one's layers [start, end) are
    measured on a fresh daemon of their own (0 < start < end < the model's layer count)."""
    num_layers = load_model(base).num_layers
    prompt = bench_prompts(load_model(base).tokenizer, 1)[0]
    with tempfile.TemporaryDirectory(prefix="dllm-bench-quant-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        progress(f"starting {len(models) + 2} temporary daemons")
        daemons = [NodeEntry(d.name, d.address, d.public_key)
                   for d in local_cluster.up(len(models) + 2, Path(tmp), user, registry)]
        try:
            progress(f"loading layers {start}-{end - 1} of each model and generating through them")
            measured = asyncio.run(_measure(user, daemons[0], daemons[1], dict(zip(models, daemons[2:])), models,
                                            start, end, num_layers, prompt))
        finally:
            local_cluster.down(Path(tmp), registry)
    fp = measured[base]
    rows = []
    for name, m in measured.items():
        if name == base:
            continue
        method = methods[name]
        bytes_ratio = m["param_bytes"] / fp["param_bytes"]
        rss_ratio = m["rss_growth_bytes"] / fp["rss_growth_bytes"]
        target = MEMORY_TARGETS.get(method, 0)
        rows.append({"model": name, "method": method, **m, "param_bytes_ratio": round(bytes_ratio, 4),
                     "rss_beyond_params_bytes": m["rss_growth_bytes"] - m["param_bytes"],
                     "rss_growth_ratio": round(rss_ratio, 4), "target_ratio": target,
                     "meets_target": bytes_ratio <= target and rss_ratio <= target})
    # What the daemon holds beyond the weights (model code, kernel scratch, the first session): about
    # the same for every variant, so a small model's ratios sit above its bytes' ratio.
    base_row = {"model": base, **fp, "rss_beyond_params_bytes": fp["rss_growth_bytes"] - fp["param_bytes"]}
    return {"layers": [start, end], "base": base_row, "variants": rows}
