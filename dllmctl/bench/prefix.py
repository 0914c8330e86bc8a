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
from dataclasses import replace

from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.generation import GenerationRequest, GenerationResult, load_model, prepare, run
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
    """A system prompt of at least ``tokens`` tokens, starting with ``tag``."""
    text, i = f"Conversation {tag}.", 0
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += " " + RULES[i % len(RULES)]
        i += 1
    return text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


async def _requests(user: Identity, nodes: list[NodeEntry], requests: list[GenerationRequest]) -> list[GenerationResult]:
    async with ConnectionPool(user) as pool:
        return [await run(user, nodes, prepare(r), pool=pool) for r in requests]


def prefix_cache(user: Identity, nodes: list[NodeEntry], model: str, prefix_tokens: int = 200,
                 new_tokens: int = 8, parallelism: str = "pipeline") -> dict:
    local = load_model(model)
    system = shared_system_prompt(local.tokenizer, prefix_tokens, secrets.token_hex(4))
    raw = not local.has_chat_template

    def request(question: str, cache: bool = True) -> GenerationRequest:
        if raw:
            return GenerationRequest(model=model, prompt=f"{system}\n{question}", raw=True, max_new_tokens=new_tokens,
                                     parallelism=parallelism, prefix_cache=cache)
        return GenerationRequest(model=model, prompt=question, system=system, max_new_tokens=new_tokens,
                                 parallelism=parallelism, prefix_cache=cache)

    warm = replace(request("Hello."), system=None, prompt="Hello.", prefix_cache=False)  # connections, first passes
    _, first, second, uncached = asyncio.run(_requests(user, nodes, [warm, request(QUESTIONS[0]), request(QUESTIONS[1]),
                                                                     request(QUESTIONS[1], cache=False)]))
    ids = [prepare(request(q)).prompt_ids for q in QUESTIONS]
    ttft = [round(r.generation.time_to_first_token_s * 1000, 2) for r in (first, second, uncached)]
    ratio = round(ttft[1] / ttft[0], 3) if ttft[0] else None
    return {
        "prompt_tokens": [len(i) for i in ids],
        "shared_prefix_tokens": _common_prefix(*ids),
        "first_ttft_ms": ttft[0], "first_cached_tokens": first.generation.cached_tokens,
        "second_ttft_ms": ttft[1], "second_cached_tokens": second.generation.cached_tokens,
        "second_uncached_ttft_ms": ttft[2],
        "ratio": ratio,
        "ratio_to_uncached": round(ttft[1] / ttft[2], 3) if ttft[2] else None,
        "tokens_identical": second.token_ids == uncached.token_ids,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio is not None and ratio <= TARGET_RATIO,
    }
