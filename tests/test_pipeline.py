"""Many sessions at once through real daemons, and generation that survives a stage being killed.

- 16 concurrent sessions (different prompts and lengths, greedy and seeded sampling, a prompt long
  enough to be prefilled in chunks) each produce exactly what they produce alone, and the stages
  really did batch them;
- KV caches go back to zero when sessions close or are abandoned, and resident memory to its baseline;
- kill -9 of a serving stage mid-generation with 2 replicas: 20 of 20 runs give the reference tokens;
- the same in private mode (the client's ends replayed with the stages), and private sessions batch.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import Registry
from dllmctl.cluster.live import query_nodes
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.session import PREFILL_CHUNK, DistributedSession, Generation
from dllmd.net.pool import ConnectionPool
from dllmctl.inference.stages import live_stages
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.identity import Identity
from tests.tiny_models import make_tiny_model

NEW_TOKENS = 8
GREEDY = SamplingParams()
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=99)
GREEDY_PENALIZED = SamplingParams(repetition_penalty=1.5)
SEEDED_PENALIZED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=99, repetition_penalty=1.3,
                                  frequency_penalty=0.5, presence_penalty=0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from dllmctl.models.importer import import_model
    from dllmd.models.store import ModelStore

    root = tmp_path_factory.mktemp("pipeline")
    user = Identity.generate()
    registry = Registry(root / "cluster.toml")
    local_cluster.up(4, root / "daemons", user, registry)
    store = ModelStore(root / "models")
    # Sliding windows, grouped-query attention, tied embeddings; a context long enough for chunked prefill.
    source = make_tiny_model("qwen2", root / "src", max_position_embeddings=512)
    import_model(source, store, user, name="pipe")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    yield {"user": user, "registry": registry, "store": store, "root": root, "model": model}
    local_cluster.down(root / "daemons", registry)


def _deploy(cluster, spans: list[tuple[str, int, int]]) -> None:
    n = cluster["model"].config.num_hidden_layers
    assignments = [Span(node, a, b, a == 0, b == n) for node, a, b in spans]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / "pipe", assignments))


def _reference(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


def _prompts(count: int) -> list[list[int]]:
    lengths = [1, 3, 7, 12, 20, 33, PREFILL_CHUNK + 29, 5]  # one prompt goes out in two chunks
    return [[(i * 31 + k * 17) % 300 + 5 for k in range(lengths[i % len(lengths)])] for i in range(count)]


def _serving(cluster) -> dict[str, dict]:
    rows = asyncio.run(query_nodes(cluster["user"], list(cluster["registry"].nodes.values())))
    return {r["name"]: {"rss": r.get("rss_bytes", 0), **next((s for s in r["serving"] if s["model"] == "pipe"), {})}
            for r in rows if r["status"] == "up"}


def test_sixteen_concurrent_sessions_each_match_their_single_session_reference(cluster):
    n = cluster["model"].config.num_hidden_layers
    _deploy(cluster, [("local-1", 0, 1), ("local-2", 1, n - 1), ("local-3", n - 1, n)])
    prompts = _prompts(16)
    samplings = [GREEDY if i % 2 == 0 else SEEDED for i in range(16)]
    user, nodes = cluster["user"], [cluster["registry"].nodes[f"local-{i}"] for i in (1, 2, 3)]

    async def run_all(parallelism: str, concurrent: bool):
        async with ConnectionPool(user) as pool:
            stages = await live_stages(user, nodes, "pipe")

            async def one(prompt, sampling):
                return await generate_with_failover(pool, lambda: live_stages(user, nodes, "pipe"), "pipe", n, prompt,
                                                    NEW_TOKENS, set(), sampling, parallelism=parallelism,
                                                    stages=stages)

            if concurrent:
                return await asyncio.gather(*(one(p, s) for p, s in zip(prompts, samplings)))
            return [await one(p, s) for p, s in zip(prompts, samplings)]

    baseline_rss = {name: row["rss"] for name, row in _serving(cluster).items()}
    alone = asyncio.run(run_all("model", concurrent=False))
    together = asyncio.run(run_all("pipeline", concurrent=True))
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        assert together[i].token_ids == alone[i].token_ids, f"session {i}"
        if sampling is GREEDY:
            assert alone[i].token_ids == _reference(cluster["model"], prompt), f"session {i}"
    assert max(b for g in together for step in g.stage_batch for b in step) > 1, "the stages never batched"
    assert all(b == 1 for g in alone for step in g.stage_batch for b in step)
    assert not any(g.failovers for g in together)

    # Closed sessions hold no cache, and memory is back near where it started.
    after = _serving(cluster)
    for name in ("local-1", "local-2", "local-3"):
        assert after[name]["sessions"] == 0 and after[name]["kv_bytes"] == 0 and after[name]["queued"] == 0
        assert after[name]["rss"] - baseline_rss[name] < 64 * 2**20, f"{name} grew by {after[name]['rss']}"


def test_abandoned_sessions_expire_and_free_their_caches(cluster):
    n = cluster["model"].config.num_hidden_layers
    _deploy(cluster, [("local-1", 0, 2), ("local-2", 2, n)])
    user, nodes = cluster["user"], [cluster["registry"].nodes[f"local-{i}"] for i in (1, 2)]

    async def abandon():
        pool = ConnectionPool(user)
        route = (await live_stages(user, nodes, "pipe"))
        route.sort(key=lambda s: s.span.start)
        for _ in range(3):
            session = DistributedSession(pool, route, "pipe", GREEDY, prompt_tokens=3, max_new_tokens=3, ttl_s=1.0)
            await session.__aenter__()
            await session.generate([5, 6, 7], 3, set())
        pool.close()  # the client vanishes without closing its sessions

    asyncio.run(abandon())
    held = _serving(cluster)
    assert held["local-1"]["sessions"] == 3 and held["local-1"]["kv_bytes"] > 0
    deadline = asyncio.run(_wait_until(lambda: all(_serving(cluster)[n]["kv_bytes"] == 0 for n in ("local-1", "local-2"))))
    assert deadline, "abandoned sessions were not freed within 10 s"


async def _wait_until(condition, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if await loop.run_in_executor(None, condition):
            return True
        await asyncio.sleep(0.5)
    return False


def test_kill_a_serving_stage_mid_generation_twenty_times(cluster):
    """Two replicas of a two-stage layout; each run kills one stage of its route after a few tokens
    (alternately the first and the last), then brings it back for the next run."""
    n = cluster["model"].config.num_hidden_layers
    layout = [("local-1", 0, 2), ("local-2", 2, n), ("local-3", 0, 2), ("local-4", 2, n)]
    _deploy(cluster, layout)
    registry, user, daemons = cluster["registry"], cluster["user"], cluster["root"] / "daemons"
    prompt = [9, 8, 7, 6, 5, 4]
    expected = {"greedy": _reference(cluster["model"], prompt, 12)}
    # With penalties the stage that samples keeps the session's token history: a replay rebuilds it there.
    samplings = {"greedy": GREEDY, "seeded": SEEDED, "greedy-penalized": GREEDY_PENALIZED,
                 "seeded-penalized": SEEDED_PENALIZED}
    ids = torch.tensor([prompt])
    expected["greedy-penalized"] = cluster["model"].generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12,
        repetition_penalty=GREEDY_PENALIZED.repetition_penalty)[0, len(prompt):].tolist()
    assert expected["greedy-penalized"] != expected["greedy"]

    async def generate(sampling, kill_at=None, victim_index=0):
        result, killed = Generation(prompt_tokens=len(prompt)), []

        def on_token(_token):
            if len(result.token_ids) == kill_at and not killed:
                victim = result.routes[-1][victim_index]["node"]
                local_cluster.kill(daemons, victim)
                killed.append(victim)

        async with ConnectionPool(user) as pool:
            await generate_with_failover(pool, lambda: live_stages(user, list(registry.nodes.values()), "pipe"),
                                         "pipe", n, prompt, 12, set(), sampling, on_token=on_token, result=result)
        return result, killed

    expected["seeded"] = asyncio.run(generate(SEEDED))[0].token_ids
    expected["seeded-penalized"] = asyncio.run(generate(SEEDED_PENALIZED))[0].token_ids
    assert expected["seeded-penalized"] != expected["seeded"]
    assert asyncio.run(generate(GREEDY_PENALIZED))[0].token_ids == expected["greedy-penalized"]
    stalls = []
    for run in range(20):
        kind = list(samplings)[run % 4]  # each kind loses its first stage, then its last, at varying tokens
        result, killed = asyncio.run(generate(samplings[kind], kill_at=3 + (run // 2) % 4,
                                              victim_index=(run // 4) % 2))
        assert killed, f"run {run}: nothing was killed"
        assert result.token_ids == expected[kind], f"run {run}: killed {killed[0]}"
        assert result.failovers and result.failovers[0]["suspects"] == killed
        assert killed[0] not in [s["node"] for s in result.routes[-1]]
        stalls.append(result.failovers[0]["stall_s"])
        local_cluster.restart(daemons, killed[0], registry)
        _deploy(cluster, [span for span in layout if span[0] == killed[0]])
    assert all(s is not None for s in stalls)


PRIVATE_LAYOUT = [("local-1", 1, 2), ("local-2", 2, None), ("local-3", 1, 2), ("local-4", 2, None)]


def _deploy_private(cluster):
    """Two replicas of layers 1.. with neither embeddings nor head; the client's ends (layer 0, head)."""
    from dllmctl.inference.private import load_private_ends

    n = cluster["model"].config.num_hidden_layers
    spans = [Span(node, a, b or n, False, False) for node, a, b in PRIVATE_LAYOUT]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / "pipe", spans))
    return load_private_ends(cluster["store"], "pipe", cluster["store"].path("pipe"), 1)


def test_concurrent_private_sessions_are_batched_and_each_gives_its_own_tokens(cluster):
    ends = _deploy_private(cluster)
    n, user = cluster["model"].config.num_hidden_layers, cluster["user"]
    nodes = list(cluster["registry"].nodes.values())
    prompts = _prompts(6)

    async def run_all(parallelism: str, concurrent: bool):
        async with ConnectionPool(user) as pool:
            stages = await live_stages(user, nodes, "pipe")

            async def one(prompt):
                return await generate_with_failover(pool, lambda: live_stages(user, nodes, "pipe"), "pipe", n, prompt,
                                                    NEW_TOKENS, set(), GREEDY, parallelism=parallelism, stages=stages,
                                                    private=ends)

            if concurrent:
                return await asyncio.gather(*(one(p) for p in prompts))
            return [await one(p) for p in prompts]

    together = asyncio.run(run_all("pipeline", concurrent=True))
    for prompt, result in zip(prompts, together):
        assert result.token_ids == _reference(cluster["model"], prompt), f"prompt {prompt}"
    assert max(b for g in together for step in g.stage_batch for b in step) > 1, "the stages never batched"


def test_a_private_session_survives_a_killed_stage(cluster):
    """Private mode (the client runs embeddings, layer 0 and the head) over two replicas of layers 1..:
    killing the first node of the route mid-generation replays the session, the client's own cache
    included, on the replica, and the tokens are the local model's."""
    ends = _deploy_private(cluster)
    n = cluster["model"].config.num_hidden_layers
    registry, user, daemons = cluster["registry"], cluster["user"], cluster["root"] / "daemons"
    prompt = [11, 3, 5, 8, 13, 21, 34]
    result, killed = Generation(prompt_tokens=len(prompt)), []

    def on_token(_token):
        if len(result.token_ids) == 4 and not killed:
            killed.append(result.routes[-1][0]["node"])
            local_cluster.kill(daemons, killed[0])

    async def go():
        async with ConnectionPool(user) as pool:
            await generate_with_failover(pool, lambda: live_stages(user, list(registry.nodes.values()), "pipe"),
                                         "pipe", n, prompt, 10, set(), GREEDY, on_token=on_token, result=result,
                                         private=ends)

    try:
        asyncio.run(go())
        assert killed and result.failovers and result.failovers[0]["suspects"] == killed
        assert killed[0] not in [s["node"] for s in result.routes[-1]]
        assert result.token_ids == _reference(cluster["model"], prompt, 10)
    finally:
        if killed:
            local_cluster.restart(daemons, killed[0], registry)
