"""``dllmctl bench relays``: the latency relays add per token, on loopback and through WAN links.

A temporary cluster on this machine: two stages serving a model from the local store (split in
half) and N relay daemons (``relay = true``). Each daemon's keys are set as a real deployment has
them: the user is a client of the relays, the relays are ``relay`` keys of the stages and of each
other, the stages are peers of the relays (the hops they may dial). One greedy generation runs
direct, then through 1..N relays; with ``wan_delay_ms`` every node is reached only through its own
delay proxy (``dllmctl.bench.wan``), so each extra hop a relay puts in the path crosses one more
delayed link. Figures: median decode ms per token for each relay count, the added ms against direct
and per relay, and whether the relayed tokens equal the direct ones (they must: relays only forward).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from transformers import AutoConfig

from dllmctl.bench.pipeline import _link_delay_ms, _median, _proxy_for
from dllmctl.cluster import local as local_cluster
from dllmctl.cluster.registry import NodeEntry, Registry
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.stages import live_stages
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmd.net.identity import Identity
from dllmd.net.keys import AuthorizedKeys, Role
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.pool import ConnectionPool

STAGES = 2
PROMPT_TOKENS = 24


def _set_relay_keys(user: Identity, stages: list[local_cluster.LocalNode], relays: list[local_cluster.LocalNode]) -> None:
    """The keys of a real relayed deployment (``cluster up`` made every node a peer and the user an
    admin everywhere); the daemons notice the rewritten files at their next handshake."""
    for relay in relays:
        keys = AuthorizedKeys(Path(relay.home) / "authorized_keys.toml")
        keys.authorize(user.public_key, Role.CLIENT, "dllmctl user")
        for other in relays:
            if other.public_key != relay.public_key:
                keys.authorize(other.public_key, Role.RELAY, other.name)
    for stage in stages:
        keys = AuthorizedKeys(Path(stage.home) / "authorized_keys.toml")
        for relay in relays:
            keys.authorize(relay.public_key, Role.RELAY, relay.name)


def _prompt(vocab: int) -> list[int]:
    return [(i * 37 + 11) % (vocab - 5) + 5 for i in range(PROMPT_TOKENS)]


async def _decode_ms(user: Identity, stages: list[NodeEntry], relays: list[NodeEntry], model: str, num_layers: int,
                     prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Tokens and per-token decode ms of one greedy generation (after a warm-up one on the same path)."""
    async with ConnectionPool(user) as pool:
        route = await live_stages(user, stages, model)
        find = lambda: live_stages(user, stages, model)  # noqa: E731
        await generate_with_failover(pool, find, model, num_layers, prompt, 2, set(), SamplingParams(),
                                     stages=route, relays=relays)
        result = await generate_with_failover(pool, find, model, num_layers, prompt, new_tokens, set(),
                                              SamplingParams(), stages=route, relays=relays)
    return result.token_ids, [s * 1000 for s in result.step_seconds[1:]]


def _sweep(user: Identity, stages: list[NodeEntry], relays: list[NodeEntry], model: str, num_layers: int,
           prompt: list[int], new_tokens: int) -> dict:
    rows, direct_tokens = [], None
    for count in range(len(relays) + 1):
        tokens, per_token = asyncio.run(_decode_ms(user, stages, relays[:count], model, num_layers, prompt,
                                                   new_tokens))
        direct_tokens = direct_tokens if count else tokens
        rows.append({"relays": count, "per_token_ms": _median(per_token), "identical_to_direct": tokens == direct_tokens})
    direct = rows[0]["per_token_ms"]
    for row in rows[1:]:
        row["added_ms"] = round(row["per_token_ms"] - direct, 3)
        row["added_ms_per_relay"] = round(row["added_ms"] / row["relays"], 3)
    return {"runs": rows}


def run(user: Identity, model: str, model_dir: Path, relays: int, new_tokens: int,
        wan_delay_ms: float | None) -> dict:
    config = AutoConfig.from_pretrained(model_dir)
    num_layers = config.num_hidden_layers
    prompt = _prompt(config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="dllm-bench-relays-") as tmp:
        registry = Registry(Path(tmp) / "cluster.toml")
        settings = [{}] * STAGES + [{"relay": True}] * relays
        started = local_cluster.up(STAGES + relays, Path(tmp), user, registry, settings=settings)
        try:
            stage_nodes, relay_nodes = started[:STAGES], started[STAGES:]
            _set_relay_keys(user, stage_nodes, relay_nodes)
            entries = [NodeEntry(n.name, n.address, n.public_key) for n in started]
            half = num_layers // 2
            spans = [Span(stage_nodes[0].name, 0, half, True, False),
                     Span(stage_nodes[1].name, half, num_layers, False, True)]
            asyncio.run(deploy(user, {e.name: e for e in entries}, model_dir, spans))
            stages, relay_entries = entries[:STAGES], entries[STAGES:]
            report = {"model": model, "new_tokens": new_tokens,
                      "loopback": _sweep(user, stages, relay_entries, model, num_layers, prompt, new_tokens)}
            if wan_delay_ms is not None:
                report["wan"] = _wan(user, entries, model, num_layers, prompt, new_tokens, wan_delay_ms)
            return report
        finally:
            local_cluster.down(Path(tmp), registry)


def _wan(user: Identity, entries: list[NodeEntry], model: str, num_layers: int, prompt: list[int], new_tokens: int,
         delay_ms: float) -> dict:
    """Every node behind its own delay proxy: the client, the relays and the stages reach a node only
    through it, so each hop is one delayed link."""
    proxies = [_proxy_for(e, delay_ms / 1000) for e in entries]
    try:
        proxied = [NodeEntry(e.name, p.address, e.public_key) for e, p in zip(entries, proxies)]
        link_ms = asyncio.run(_link_delay_ms(user, entries[:1], proxied[:1]))
        report = _sweep(user, proxied[:STAGES], proxied[STAGES:], model, num_layers, prompt, new_tokens)
    finally:
        for proxy in proxies:
            proxy.close()
    return {"delay_ms_one_way": delay_ms, "measured_link_delay_ms": round(link_ms, 3), **report}
