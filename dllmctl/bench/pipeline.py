"""Many sessions at once, WAN links, and failover: what pipelining, batching and replicas buy.

- ``sessions``: K concurrent sessions (K = 1, 4, 16...) with different prompts; aggregate decode
  tokens/s, the ratio to K = 1 measured in the same run, and each stage's utilization (compute
  time / wall time, from the node's own counters) and mean batch size.
- ``wan``: one session whose every link crosses a delay proxy (``dllmctl.bench.wan``); per-token
  latency against the bound compute + (N + 1) x delay + 5 ms for N stages.
- ``failover``: kill -9 a stage of a local cluster mid-generation, time from the kill to the next
  token, bring the node back; median over runs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

from dllmctl.cluster import local as local_cluster
from dllmctl.bench.wan import DelayProxy
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.cluster.live import query_nodes
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.session import Generation
from dllmd.net.pool import ConnectionPool
from dllmctl.inference.stages import live_stages
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.client import RpcClient
from dllmd.net.identity import Identity

TOPICS = ["a robot", "the sea", "a lighthouse keeper", "a city at night", "an old map", "a talking cat",
          "the first snow", "a lost key", "a garden on Mars", "a violin", "a train journey", "a dragon's egg",
          "a clock tower", "a desert storm", "a letter never sent", "the last library"]
WAN_SLACK_MS = 5.0


def bench_prompts(tokenizer, count: int) -> list[list[int]]:
    from dllmctl.inference.tokens import encode_prompt

    return [encode_prompt(tokenizer, f"Write a story about {TOPICS[i % len(TOPICS)]}" + " please" * (i // 4))
            for i in range(count)]


def _median(values) -> float:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else 0.0


async def _busy(user: Identity, nodes: list[NodeEntry], model: str) -> dict[str, float]:
    rows = await query_nodes(user, nodes)
    return {r["name"]: s["busy_s"] for r in rows if r["status"] == "up" for s in r["serving"] if s["model"] == model}


async def concurrent_sessions(user: Identity, nodes: list[NodeEntry], model: str, num_layers: int,
                              prompts: list[list[int]], new_tokens: int, parallelism: str = "pipeline") -> dict:
    async with ConnectionPool(user) as pool:
        stages = await live_stages(user, nodes, model)
        assigned: dict[str, int] = {}
        busy_before = await _busy(user, nodes, model)
        started = time.perf_counter()
        results: list[Generation] = await asyncio.gather(*(
            generate_with_failover(pool, lambda: live_stages(user, nodes, model), model, num_layers, prompt,
                                   new_tokens, set(), SamplingParams(), parallelism=parallelism, assigned=assigned,
                                   stages=stages)
            for prompt in prompts))
        wall = time.perf_counter() - started
        busy_after = await _busy(user, nodes, model)
    tokens = sum(len(r.token_ids) for r in results)
    ttft = statistics.median(r.first_token_s for r in results)
    batches: dict[str, list[int]] = {}
    for r in results:
        for step in r.stage_batch[1:]:
            for (node, size) in zip((s["node"] for s in r.routes[-1]), step):
                batches.setdefault(node, []).append(size)
    return {
        "sessions": len(prompts),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "aggregate_tokens_per_second": round(tokens / wall, 3),
        # Without the prompts: tokens after each session's first, over the time after the median first token.
        "decode_tokens_per_second": round((tokens - len(results)) / (wall - ttft), 3),
        "utilization": {n: round((busy_after[n] - busy_before.get(n, 0.0)) / wall, 3) for n in busy_after},
        "mean_batch": {n: round(statistics.mean(v), 2) for n, v in sorted(batches.items())},
        "time_to_first_token_ms": round(ttft * 1000, 2),
    }


def sessions_sweep(user: Identity, nodes: list[NodeEntry], model: str, num_layers: int, tokenizer,
                   counts: list[int], new_tokens: int, parallelism: str = "pipeline") -> dict:
    prompts = bench_prompts(tokenizer, max(counts))
    asyncio.run(concurrent_sessions(user, nodes, model, num_layers, prompts[:1], 3, parallelism))  # warm-up
    runs = [asyncio.run(concurrent_sessions(user, nodes, model, num_layers, prompts[:k], new_tokens, parallelism))
            for k in counts]
    for key in ("aggregate", "decode"):
        first = runs[0][f"{key}_tokens_per_second"]
        for run in runs:
            run[f"{key}_ratio_to_first"] = round(run[f"{key}_tokens_per_second"] / first, 2) if first else None
    return {"model": model, "parallelism": parallelism, "new_tokens": new_tokens, "runs": runs}


def _proxy_for(node: NodeEntry, delay_s: float) -> DelayProxy:
    endpoint = urlparse(node.address.replace("tcp://", "http://"))
    return DelayProxy((endpoint.hostname, endpoint.port), delay_s=delay_s)


async def _ping_ms(user: Identity, node: NodeEntry, count: int = 15) -> float:
    async with RpcClient(user, node.address, node.public_key) as client:
        await client.call("ping")
        times = []
        for _ in range(count):
            started = time.perf_counter()
            await client.call("ping")
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


async def _link_delay_ms(user: Identity, nodes: list[NodeEntry], proxied: list[NodeEntry]) -> float:
    """The one-way delay the proxies really add (half the extra ping round trip): asyncio wakes a
    little late, so a 25 ms link is ~25.5 ms. The latency bound is checked against what the links are."""
    extra = [await _ping_ms(user, p) - await _ping_ms(user, n) for n, p in zip(nodes, proxied)]
    return statistics.mean(extra) / 2


def wan(user: Identity, nodes: list[NodeEntry], model: str, num_layers: int, prompt: list[int], new_tokens: int,
        delay_ms: float, parallelism: str = "pipeline") -> dict:
    """Every message of the session crosses one delayed link: the client and each stage reach a
    node only through that node's proxy. (A tensor-parallel group's own reductions do not: its
    members sit on one fast link by design, and their links were made when the group formed.)"""
    proxies = {n.name: _proxy_for(n, delay_ms / 1000) for n in nodes}
    try:
        proxied = [NodeEntry(n.name, proxies[n.name].address, n.public_key) for n in nodes]

        async def run() -> Generation:
            async with ConnectionPool(user) as pool:
                find = lambda: live_stages(user, proxied, model)  # noqa: E731
                await generate_with_failover(pool, find, model, num_layers, prompt, 2, set(), SamplingParams(),
                                             parallelism=parallelism)
                return await generate_with_failover(pool, find, model, num_layers, prompt, new_tokens, set(),
                                                    SamplingParams(), parallelism=parallelism)

        result = asyncio.run(run())
        link_ms = asyncio.run(_link_delay_ms(user, nodes, proxied))
    finally:
        for proxy in proxies.values():
            proxy.close()
    stages = len(result.routes[-1])
    per_token = [s * 1000 for s in result.step_seconds[1:]]
    compute = [sum(ms) for ms in result.stage_compute_ms[1:]]
    bound = [c + (stages + 1) * link_ms + WAN_SLACK_MS for c in compute]
    nominal = [c + (stages + 1) * delay_ms + WAN_SLACK_MS for c in compute]
    return {"delay_ms_one_way": delay_ms, "measured_link_delay_ms": round(link_ms, 3), "stages": stages,
            "per_token_ms": _median(per_token), "nominal_bound_ms": _median(nominal),
            "compute_ms": _median(compute), "bound_ms": _median(bound),
            "within_bound": sum(p <= b for p, b in zip(per_token, bound)) / len(per_token),
            "meets_target": _median(per_token) <= _median(bound), "route": result.routes[-1]}


def failover(user: Identity, registry: Registry, cluster_dir: Path, model_dir: Path, model: str, num_layers: int,
             prompt: list[int], runs: int, new_tokens: int = 16, kill_after: int = 4) -> dict:
    """Kill -9 the first stage of the route after ``kill_after`` tokens; stall = kill to next token."""
    stalls, detect, identical = [], [], 0
    reference = None
    for run in range(runs + 1):
        result, killed = Generation(prompt_tokens=len(prompt)), {}

        def on_token(_token: int) -> None:
            if run and len(result.token_ids) == kill_after and not killed:
                victim = result.routes[-1][run % len(result.routes[-1])]
                local_cluster.kill(cluster_dir, victim["node"])
                killed.update(victim, at=time.perf_counter())
            elif killed and "next" not in killed:
                killed["next"] = time.perf_counter()

        async def go() -> None:
            async with ConnectionPool(user) as pool:
                await generate_with_failover(pool, lambda: live_stages(user, list(registry.nodes.values()), model),
                                             model, num_layers, prompt, new_tokens, set(), SamplingParams(),
                                             on_token=on_token, result=result)

        asyncio.run(go())
        if not run:
            reference = result.token_ids
            continue
        identical += result.token_ids == reference
        stalls.append((killed["next"] - killed["at"]) * 1000)
        detect.append(result.failovers[0]["stall_s"] * 1000 if result.failovers else None)
        local_cluster.restart(cluster_dir, killed["node"], registry)
        span = Span(killed["node"], killed["start"], killed["end"], killed["start"] == 0,
                              killed["end"] == num_layers)
        asyncio.run(deploy(user, registry.nodes, model_dir, [span]))
    return {"runs": runs, "identical_runs": identical, "stall_ms_median": _median(stalls),
            "stall_ms_max": round(max(stalls), 1), "rebuild_ms_median": _median(detect),
            "stalls_ms": [round(s, 1) for s in stalls]}

