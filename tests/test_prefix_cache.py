"""The prefix cache: a session whose prompt starts with blocks an earlier session of the same client
computed skips them, and generates exactly what it would have without the cache.

In one process: a session restored from cached blocks continues like the full model (sliding windows
crossed included) and leaves the cached tensors untouched; the cache keeps to its budget, least
recently used first. Through three real daemons: hits give the tokens misses give (a plain and a
sliding-window family); the budget holds under many sessions; another client never hits a client's
blocks; hostile hash lists get clear error codes and the daemons keep serving.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dllmctl.inference.prefix import prefix_hashes, prefix_key, usable_cached_tokens
from dllmctl.inference.session import DistributedSession
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmctl.placement.routing import Stage, choose_route
from dllmd.inference.prefix_cache import CachedBlock, PrefixCache
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages.inference import MAX_PREFIX_BLOCKS, PREFIX_BLOCK_TOKENS, SamplingParams
from dllmd.net.messages.node import KEYS_AUTHORIZE, AuthorizeArgs
from dllmd.net.pool import ConnectionPool
from tests.conftest import local_daemons
from tests.test_span_exact import build_chain
from tests.tiny_models import make_tiny_model

BUDGET = 1 << 20  # each node's KV budget
PERCENT = 10  # of which its prefix cache may hold
NEW_TOKENS = 6
TOLERANCE = 1e-4
KEY = bytes(32)


def whole_blocks(tokens: int) -> int:
    """The tokens of ``tokens``' whole blocks: what a prompt's first ``tokens`` can be cached as."""
    return tokens // PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS


def _prompt(length: int, seed: int) -> list[int]:
    return [(i * 37 + seed * 101 + 11) % 300 + 5 for i in range(length)]


def _reference(model, prompt: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the whole model, and its logits over prompt + tokens[:-1]."""
    model.generation_config.eos_token_id = None  # random models emit EOS by chance: generate on regardless
    ids = torch.tensor([prompt])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(tokens), do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    with torch.no_grad():
        full = model(torch.tensor([prompt + tokens[:-1]])).logits[0]
    return want, full


def _check_exact(model, prompt: list[int], tokens: list[int], logits: list[torch.Tensor]) -> None:
    want, full = _reference(model, prompt, tokens)
    assert tokens == want
    for k, step in enumerate(logits):
        assert (step.reshape(-1, step.shape[-1])[-1] - full[len(prompt) - 1 + k]).abs().max().item() < TOLERANCE


# --- in one process ---------------------------------------------------------------------------------

def _run_chain(spans, cache: PrefixCache, prompt: list[int], chunk: int = 20):
    """One session through ``spans`` (each span a stage with the shared ``cache``, as one model per
    node): open, start from what every stage holds, prefill in chunks, decode greedily."""
    hashes = prefix_hashes(prompt, KEY)
    prefixes = [cache.open_session(s, f"m{s.start}", "client", hashes, len(prompt)) for s in spans]
    caches = [s.new_cache() for s in spans]
    start = usable_cached_tokens([p.cached_tokens for p in prefixes], len(prompt))
    for prefix, span_cache in zip(prefixes, caches):
        cache.begin(prefix, span_cache, start)
    position, feed, tokens, logits = start, prompt[start:], [], []
    for _ in range(NEW_TOKENS):
        for i in range(0, len(feed), chunk):
            x = torch.tensor([feed[i:i + chunk]])
            positions = torch.arange(position, position + x.shape[1]).unsqueeze(0)
            for span, span_cache in zip(spans, caches):
                x = span(x, positions, span_cache, 1)
            position += positions.shape[1]
        logits.append(x[0])
        tokens.append(int(x[0, -1].argmax()))
        feed = [tokens[-1]]
    return start, tokens, logits


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_a_session_started_from_cached_blocks_continues_exactly_and_leaves_them_untouched(tmp_path, family):
    source = make_tiny_model(family, tmp_path / family)
    config = AutoConfig.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    spans = build_chain(config, source, [0, 2, config.num_hidden_layers])
    cache = PrefixCache(1 << 24)
    first_prompt = _prompt(45, 1)
    second_prompt = first_prompt[:40] + [9, 8, 7]  # shares whole blocks, far longer than the windows
    start, tokens, logits = _run_chain(spans, cache, first_prompt)
    assert start == 0
    _check_exact(model, first_prompt, tokens, logits)
    frozen = {key: {i: (k.clone(), v.clone()) for i, (k, v) in block.layers.items()}
              for key, block in cache._blocks.items()}
    assert len(frozen) == 45 // PREFIX_BLOCK_TOKENS * len(spans)  # the prompt's whole blocks, at each span
    start, tokens, logits = _run_chain(spans, cache, second_prompt)
    assert start == 40 // PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS
    _check_exact(model, second_prompt, tokens, logits)
    for key, layers in frozen.items():  # copy on use: the second session never wrote into them
        for i, (k, v) in layers.items():
            assert torch.equal(cache._blocks[key].layers[i][0], k) and torch.equal(cache._blocks[key].layers[i][1], v)


def _block(nbytes: int) -> CachedBlock:
    half = torch.zeros(nbytes // 8)
    return CachedBlock({0: (half, half.clone())}, nbytes)


def _digest(i: int) -> bytes:
    return i.to_bytes(16, "big")


def _put(cache: PrefixCache, i: int, client: str = "a") -> None:
    cache.store("m", client, [_digest(i)], {0: _block(1000)})


def _cached(cache: PrefixCache, *indices: int) -> list[bool]:
    """Whether each block is held, without touching it (a lookup would)."""
    return [("m", "a", _digest(i)) in cache._blocks for i in indices]


def test_the_cache_keeps_to_its_budget_and_evicts_the_least_recently_used():
    room = [1 << 30]
    cache = PrefixCache(10_000, room=lambda: room[0])
    for i in range(30):
        _put(cache, i)
        assert cache.nbytes <= 10_000
    assert cache.held("m") == (10_000, 10) and _cached(cache, 19, 20) == [False, True]
    # A lookup touches: block 20 outlives the ones after it, which were stored later.
    cache.lookup("m", "a", [_digest(20)])
    for i in range(30, 39):
        _put(cache, i)
    assert _cached(cache, 20, 21) == [True, False]
    # Sessions reserving memory leave the cache less room; another client and another model see nothing.
    room[0] = 3_500
    cache.shrink()
    assert cache.nbytes <= 3_500
    _put(cache, 300)
    assert cache.nbytes <= 3_500 and len(cache.lookup("m", "a", [_digest(300)])) == 1
    assert cache.lookup("m", "b", [_digest(300)]) == [] and cache.lookup("n", "a", [_digest(300)]) == []
    cache.drop_model("m")
    assert cache.nbytes == 0


def test_a_prefix_loses_its_tail_before_its_head():
    cache = PrefixCache(3_000)
    chain = [_digest(i) for i in range(100, 104)]
    cache.store("m", "a", chain[:2], {0: _block(1000), 1: _block(1000)})
    _put(cache, 1)
    # A session that started from blocks 0-1 adds blocks 2 and 3: the other prompt's block goes, but
    # never block 0 or 1 of its own prefix, so block 3 does not fit.
    assert len(cache.lookup("m", "a", chain[:2])) == 2
    cache.store("m", "a", chain, {2: _block(1000), 3: _block(1000)})
    assert _cached(cache, 100, 101, 102, 103, 1) == [True, True, True, False, False]
    # The prefix was touched deepest first: another prompt's block evicts its tail, not its head.
    _put(cache, 2)
    assert _cached(cache, 100, 101, 102) == [True, True, False]
    # A block that follows a gap is not stored: it could never hit.
    cache.store("m", "a", [_digest(7), _digest(8)], {1: _block(1000)})
    assert _cached(cache, 8) == [False]


def test_a_prompt_longer_than_the_cache_keeps_its_longest_prefix():
    from dllmd.inference.prefix_cache import BlockRecorder, SessionPrefix

    block_bytes = 2 * 16 * PREFIX_BLOCK_TOKENS * 4  # keys and values [1, 1, block, 16] fp32, one layer
    cache = PrefixCache(2 * block_bytes)
    hashes = [_digest(i) for i in range(3)]
    prefix = SessionPrefix("m", "a", hashes, [], 0, True)
    record = BlockRecorder(cache, prefix, [0], 0)
    keys = torch.randn(1, 1, 3 * PREFIX_BLOCK_TOKENS, 16)
    record(0, keys[:, :, :20], keys[:, :, :20])  # steps need not end on block boundaries
    record(0, keys[:, :, 20:], keys[:, :, 20:])
    found = cache.lookup("m", "a", hashes)
    second_block = keys[:, :, PREFIX_BLOCK_TOKENS:2 * PREFIX_BLOCK_TOKENS]
    assert len(found) == 2 and torch.equal(found[1].layers[0][0], second_block)


def test_blocks_are_stored_as_they_complete_and_never_after_a_reload():
    from dllmd.inference.prefix_cache import BlockRecorder, SessionPrefix

    cache = PrefixCache(1 << 20)
    hashes = [_digest(i) for i in range(3)]
    keys = torch.randn(1, 1, 3 * PREFIX_BLOCK_TOKENS, 16)
    record = BlockRecorder(cache, SessionPrefix("m", "a", hashes, [], 0, True), [0, 1], 0)
    # A block is stored once every layer of the span has it, not held back until the prompt's last.
    record(0, keys[:, :, :PREFIX_BLOCK_TOKENS], keys[:, :, :PREFIX_BLOCK_TOKENS])
    assert cache.held("m") == (0, 0)
    record(1, keys[:, :, :PREFIX_BLOCK_TOKENS], keys[:, :, :PREFIX_BLOCK_TOKENS])
    assert cache.held("m")[1] == 1 and len(cache.lookup("m", "a", hashes)) == 1

    # A session opened before the model's span was reloaded records into nothing: its pass may still
    # run on the old span, and its blocks would answer the new span's sessions.
    span = type("Span", (), {"layer_types": {0: "full_attention"}})()
    old = cache.open_session(span, "m", "a", hashes, 3 * PREFIX_BLOCK_TOKENS)
    cache.drop_model("m")
    late = BlockRecorder(cache, old, [0], 0)
    late(0, keys, keys)
    assert cache.held("m") == (0, 0)
    fresh = BlockRecorder(cache, cache.open_session(span, "m", "a", hashes, 3 * PREFIX_BLOCK_TOKENS), [0], 0)
    fresh(0, keys, keys)
    assert cache.held("m")[1] == 3

    # A tail that finds no room leaves the part that fit touched deepest first, as a whole prefix is:
    # another prompt's block then evicts its tail, not its head.
    block_bytes = 2 * keys[:, :, :PREFIX_BLOCK_TOKENS].nbytes
    small = PrefixCache(2 * block_bytes)
    BlockRecorder(small, SessionPrefix("m", "a", hashes, [], 0, True), [0], 0)(0, keys, keys)
    assert _cached(small, 0, 1, 2) == [True, True, False]
    small.store("m", "b", [_digest(9)], {0: CachedBlock({0: (keys[:, :, :PREFIX_BLOCK_TOKENS], keys[:, :, :PREFIX_BLOCK_TOKENS])}, block_bytes)})
    assert _cached(small, 0, 1) == [True, False]


def test_the_share_of_the_budget_is_a_percentage():
    from dllmd.config import ConfigError, NodeConfig

    assert NodeConfig(name="n").prefix_cache_percent == 25 and NodeConfig(name="n", prefix_cache_percent=0)
    for bad in (101, -1, 0.5):
        with pytest.raises(ConfigError, match="prefix_cache_percent"):
            NodeConfig(name="n", prefix_cache_percent=bad)


def test_block_names_are_chained_and_keyed_by_the_client():
    prompt = _prompt(50, 3)
    hashes = prefix_hashes(prompt, KEY)
    assert len(hashes) == 50 // PREFIX_BLOCK_TOKENS and all(len(h) == 16 for h in hashes)
    assert prefix_hashes(prompt[:40], KEY) == hashes[:40 // PREFIX_BLOCK_TOKENS]  # a name covers the prefix before it
    assert prefix_hashes([0] + prompt[1:], KEY)[1] != hashes[1]
    assert prefix_hashes(prompt, bytes([1]) * 32)[0] != hashes[0]
    block = PREFIX_BLOCK_TOKENS
    assert usable_cached_tokens([3 * block, 2 * block, 3 * block], 3 * block + 2) == 2 * block
    assert usable_cached_tokens([3 * block], 3 * block) == 2 * block  # the last token always runs
    assert usable_cached_tokens([], 50) == 0


# --- through real daemons -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    settings = {"memory_budget_bytes": BUDGET, "prefix_cache_percent": PERCENT}
    with local_daemons(tmp_path_factory.mktemp("prefix"), 3, settings) as cluster:
        yield cluster


def _import(cluster, family: str) -> tuple[str, object]:
    from dllmctl.models.importer import import_model

    name = f"tiny-{family}"
    source = make_tiny_model(family, cluster["root"] / f"src-{family}")
    if not (cluster["store"].root / name).exists():
        import_model(source, cluster["store"], cluster["user"], name=name)
    return name, source


def _deploy(cluster, name: str, num_layers: int) -> list[Stage]:
    """Three uneven stages (a fresh load: the nodes' caches of this model start empty)."""
    names = sorted(cluster["registry"].nodes)
    cuts = [(0, 1), (1, num_layers - 1), (num_layers - 1, num_layers)]
    spans = [Span(names[i], a, b, a == 0, b == num_layers) for i, (a, b) in enumerate(cuts)]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / name, spans))
    nodes = cluster["registry"].nodes
    return choose_route([Stage(nodes[s.node], s) for s in spans], num_layers, name)


def _generate(cluster, route, name, prompt, user: Identity | None = None, hashes: list[bytes] | None = None,
              new_tokens: int = NEW_TOKENS):
    """Generate through the route; the result and the cached tokens each stage reported."""
    user = user or cluster["user"]
    hashes = prefix_hashes(prompt, prefix_key(user)) if hashes is None else hashes

    async def run():
        async with ConnectionPool(user) as pool, \
                DistributedSession(pool, route, name, SamplingParams(), prompt_tokens=len(prompt),
                                   max_new_tokens=new_tokens, logits="last", prefix=hashes) as session:
            return await session.generate(prompt, new_tokens, set()), list(session.cached_reported)

    return asyncio.run(run())


def _serving(cluster, name: str) -> list[tuple[dict, dict]]:
    from dllmctl.cluster.live import query_nodes

    rows = asyncio.run(query_nodes(cluster["user"], cluster["registry"].select(None)))
    return [(row, span) for row in rows for span in row["serving"] if span["model"] == name]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hits_generate_exactly_what_misses_generate(cluster, family):
    name, source = _import(cluster, family)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    route = _deploy(cluster, name, model.config.num_hidden_layers)
    system = _prompt(40, 7)  # shared by both prompts: whole blocks, longer than mistral's window
    first, reported = _generate(cluster, route, name, system + [21, 22, 23, 24, 25])
    assert first.cached_tokens == 0 and reported == [0, 0, 0]
    second, reported = _generate(cluster, route, name, system + [31, 32, 33])
    assert second.cached_tokens == whole_blocks(40) and reported == [whole_blocks(40)] * 3
    _check_exact(model, system + [21, 22, 23, 24, 25], first.token_ids, first.logits)
    _check_exact(model, system + [31, 32, 33], second.token_ids, second.logits)
    # The same prompt again: every whole block but the one holding its last token.
    again, reported = _generate(cluster, route, name, system + [31, 32, 33])
    assert again.cached_tokens == whole_blocks(40) and again.token_ids == second.token_ids


def test_the_cache_stays_within_its_budget_under_many_sessions(cluster):
    name, _ = _import(cluster, "llama")
    route = _deploy(cluster, name, 5)
    limit = BUDGET * PERCENT // 100
    prompts = [_prompt(40, 100 + i) for i in range(12)]  # the middle stage holds ~3 of them
    for prompt in prompts:
        _generate(cluster, route, name, prompt, new_tokens=2)
        for row, span in _serving(cluster, name):
            assert row["prefix_cache_limit_bytes"] == limit and span["prefix_cache_bytes"] <= limit
    middle = [span for row, span in _serving(cluster, name) if span["start"] == 1][0]
    assert middle["prefix_cache_bytes"] > limit * 3 // 4  # full, not emptied
    _, newest = _generate(cluster, route, name, prompts[-1], new_tokens=2)
    _, oldest = _generate(cluster, route, name, prompts[0], new_tokens=2)
    assert newest[1] == whole_blocks(40) and oldest[1] == 0  # the least recently used went first


def test_another_client_never_hits_a_clients_blocks(cluster):
    name, _ = _import(cluster, "llama")
    route = _deploy(cluster, name, 5)
    other = Identity.generate()

    async def authorize():
        for node in cluster["registry"].nodes.values():
            async with RpcClient(cluster["user"], node.address, node.public_key) as client:
                await client.invoke(KEYS_AUTHORIZE, AuthorizeArgs(other.public_key, "client", "other"))

    asyncio.run(authorize())
    prompt = _prompt(40, 9)
    mine, _ = _generate(cluster, route, name, prompt)
    # Even with the very names the first client's blocks have, the other client finds nothing...
    theirs, reported = _generate(cluster, route, name, prompt, user=other,
                                 hashes=prefix_hashes(prompt, prefix_key(cluster["user"])))
    assert reported == [0, 0, 0] and theirs.token_ids == mine.token_ids
    # ... while the first client's next session starts from them.
    _, reported = _generate(cluster, route, name, prompt)
    assert reported == [whole_blocks(40)] * 3


def test_hostile_prefix_lists_get_clear_errors_and_the_daemons_keep_serving(cluster):
    name, _ = _import(cluster, "llama")
    route = _deploy(cluster, name, 5)
    last = route[-1].node
    base = {"model": name, "start": 4, "end": 5, "prompt_tokens": 64, "max_new_tokens": 4}

    async def scenario():
        async with RpcClient(cluster["user"], last.address, last.public_key) as client:
            for n, (prefix, code) in enumerate((([b"x" * 15], "bad_args"),  # not a hash
                                                (["text" * 4], "bad_args"),  # not binary
                                                ([b"x" * 16] * (64 // PREFIX_BLOCK_TOKENS + 1), "bad_args"),  # > the 64-token prompt
                                                ([b"x" * 16] * (MAX_PREFIX_BLOCKS + 1), "bad_args"))):
                with pytest.raises(RemoteError) as exc:
                    await client.call("session.open", {**base, "session": f"hostile{n:03d}", "prefix": prefix},
                                      timeout=10)
                assert exc.value.code == code, prefix[:1]
            # A first step past what the stage holds, or off a block boundary, ends that session only.
            for session, start, code in (("hostilefar", 32, "conflict"), ("hostileodd", 5, "bad_args")):
                stream = await client.open_stream("session.open", {**base, "session": session,
                                                                   "prefix": [b"y" * 16] * 4})
                opened = await stream.next(timeout=10)
                assert opened.result["cached_tokens"] == 0
                await client.send_oneway("session.forward", {"items": [{"session": session, "step": 0,
                                                                        "start": start}]}, [torch.zeros(1, 3, 64)])
                with pytest.raises(RemoteError) as exc:
                    await stream.next(timeout=10)
                assert exc.value.code == code

    asyncio.run(scenario())
    first, _ = _generate(cluster, route, name, _prompt(40, 11), new_tokens=3)
    again, reported = _generate(cluster, route, name, _prompt(40, 11), new_tokens=3)
    assert reported == [whole_blocks(40)] * 3 and again.token_ids == first.token_ids


def test_infer_reports_time_to_first_token_and_cached_tokens(cluster, monkeypatch):
    """What ``dllmctl infer --json`` reports, through the path every front end takes."""
    from dllmctl.inference.generation import GenerationRequest, prepare, run

    monkeypatch.setenv("DLLM_DATA_DIR", str(cluster["root"]))  # the client's store is the cluster's
    name, _ = _import(cluster, "mistral")
    _deploy(cluster, name, 7)
    system = "Each node keeps the key and value cache of its own layers for every session it serves. " * 2
    results = []
    for question, cache in (("Hello!", True), ("What is the capital of France?", True),
                            ("What is the capital of France?", False)):
        request = GenerationRequest(model=name, prompt=question, system=system, max_new_tokens=4, prefix_cache=cache,
                                    temperature=0.0)
        results.append(asyncio.run(run(cluster["user"], cluster["registry"].select(None), prepare(request))))
    first, second, uncached = (r.generation for r in results)
    assert first.cached_tokens == 0 and second.cached_tokens >= 32 and uncached.cached_tokens == 0
    assert results[1].token_ids == results[2].token_ids
    assert all(g.time_to_first_token_s > 0 for g in (first, second, uncached))
    # The benchmark runs the same path (its timings are not asserted: it is a benchmark).
    from dllmctl.bench.prefix import prefix_cache

    report = prefix_cache(cluster["user"], cluster["registry"].select(None), name, prefix_tokens=48, new_tokens=2,
                          repeats=1)
    assert report["tokens_identical"] and report["second_cached_tokens"] >= 32 and report["ratio"] > 0
