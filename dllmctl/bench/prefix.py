"""The prefix cache's worth: time to first token of a request whose prompt shares a long prefix (a
system prompt) with the one before it, against the first one's, in the same run.

Requests go through :func:`dllmctl.inference.generation.run`, exactly as ``dllmctl infer`` sends
them. The shared prefix starts with a fresh tag, so the first request misses whatever an earlier
run left in the caches; the second request is also run with the cache off, to check it gives the
same tokens and to show what it costs without the cache.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
from dataclasses import replace

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.generation import GenerationRequest, GenerationResult, LocalModel, load_model, prepare, run
from dllmd.net.identity import Identity
from dllmd.net.pool import ConnectionPool

TARGET_RATIO = 0.3  # the second request's time to first token at most this share of the first's
RULES = (
    "You are the assistant of a small workshop that repairs bicycles, radios and sewing machines.",
    "Always greet the customer by name when the name is known, and never invent a name.",
    "Quote prices in euros, including tax, and say that a quote is valid for thirty days.",
    "If a repair needs a part that is not in stock, say how many working days ordering it takes.",
    "Opening hours are Monday to Friday from nine to six, and Saturday from ten to two.",
    "Do not promise a repair date before a technician has looked at the item.",
    "Keep answers short: three sentences at most, unless the customer asks for details.",
    "When a customer is unhappy, apologise once, then describe what the workshop will do next.",
    "Safety first: tell customers to unplug radios and sewing machines before bringing them in.",
    "Payment is by card or bank transfer; the workshop does not take cash for repairs above fifty euros.",
)
QUESTIONS = ("Can you fix my radio by Friday?", "How much does a new bicycle chain cost?")


def shared_system_prompt(tokenizer, tokens: int, tag: str) -> str:
    """A system prompt of at least ``tokens`` tokens, starting with ``tag`` (first: the chat template's
    few tokens before it are all that a new prompt's first block may share with an earlier one's)."""
    text, i = f"{tag}: a conversation.", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " " + RULES[i % len(RULES)]
        i += 1
    return text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _requests(user: Identity, nodes: list[NodeEntry],
                    requests: list[GenerationRequest]) -> list[GenerationResult]:
    async with ConnectionPool(user) as pool:
        return [await run(user, nodes, prepare(r), pool=pool) for r in requests]


def prefix_cache(user: Identity, nodes: list[NodeEntry], model: str, prefix_tokens: int = 200,
                 new_tokens: int = 8, parallelism: str = "pipeline", repeats: int = 3) -> dict:
    """``repeats`` rounds, each with a prefix of its own; times are the rounds' medians."""
    local = load_model(model)
    prompts = [shared_system_prompt(local.tokenizer, prefix_tokens, secrets.token_hex(4)) for _ in range(repeats)]
    rounds = [_round(user, nodes, model, local, system, new_tokens, parallelism) for system in prompts]
    first, second, uncached = (statistics.median(r[key] for r in rounds)
                               for key in ("first_ttft_ms", "second_ttft_ms", "second_uncached_ttft_ms"))
    ratio = round(second / first, 3) if first else None
    return {
        **{key: rounds[0][key] for key in ("prompt_tokens", "shared_prefix_tokens", "second_cached_tokens")},
        "first_ttft_ms": round(first, 2), "second_ttft_ms": round(second, 2),
        "second_uncached_ttft_ms": round(uncached, 2),
        "ratio": ratio, "ratio_to_uncached": round(second / uncached, 3) if uncached else None,
        "tokens_identical": all(r["tokens_identical"] for r in rounds),
        "target_ratio": TARGET_RATIO, "meets_target": ratio is not None and ratio <= TARGET_RATIO,
        "rounds": rounds,
    }


def _round(user: Identity, nodes: list[NodeEntry], model: str, local: LocalModel, system: str, new_tokens: int,
           parallelism: str) -> dict:
    """A cold request, one sharing its system prompt (from the cache), and that one again without it."""
    def request(question: str, cache: bool = True) -> GenerationRequest:
        if not local.has_chat_template:
            return GenerationRequest(model=model, prompt=f"{system}\n{question}", raw=True, max_new_tokens=new_tokens,
                                     parallelism=parallelism, prefix_cache=cache, temperature=0.0)
        return GenerationRequest(model=model, prompt=question, system=system, max_new_tokens=new_tokens,
                                 parallelism=parallelism, prefix_cache=cache, temperature=0.0)  # greedy: comparable

    warm = replace(request("Hello."), system=None, prompt="Hello.", prefix_cache=False)  # connections, first passes
    _, first, second, uncached = asyncio.run(_requests(user, nodes, [warm, request(QUESTIONS[0]), request(QUESTIONS[1]),
                                                                     request(QUESTIONS[1], cache=False)]))
    ids = [prepare(request(q)).prompt_ids for q in QUESTIONS]
    first_ms, second_ms, uncached_ms = (r.generation.time_to_first_token_s * 1000 for r in (first, second, uncached))
    return {"prompt_tokens": [len(i) for i in ids], "shared_prefix_tokens": _common_prefix(*ids),
            "first_ttft_ms": round(first_ms, 2), "first_cached_tokens": first.generation.cached_tokens,
            "second_ttft_ms": round(second_ms, 2), "second_cached_tokens": second.generation.cached_tokens,
            "second_uncached_ttft_ms": round(uncached_ms, 2),
            "tokens_identical": second.token_ids == uncached.token_ids}
