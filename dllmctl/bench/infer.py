"""Distributed decoding against transformers' ``generate`` on the whole model, in the same run.

Per token: wall time, split into each stage's compute (measured on the node) and the rest
(transfer, serialization, scheduling); bytes per hop; each node's resident memory.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from dllmctl.bench.rawzmq import raw_exchange_ms
from dllmctl.cluster.registry import NodeEntry
from dllmctl.inference.session import DistributedSession
from dllmd.net.pool import ConnectionPool
from dllmctl.placement.routing import choose_route
from dllmctl.inference.stages import live_stages
from dllmctl.inference.tokens import encode_prompt, load_tokenizer
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.client import RpcClient
from dllmd.net.codec import HopCodec
from dllmd.net.identity import Identity

BENCH_PROMPT = "Generate a story about a robot"


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else 0.0


def load_full_model(model_dir: Path) -> torch.nn.Module:
    """The whole model in this process, from the store's per-layer files, for the baseline."""
    config = AutoConfig.from_pretrained(model_dir)
    # Built for real (not on the meta device): rotary tables are buffers computed at construction.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for path in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).float()
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, _ = model.load_state_dict(state, strict=False)
    if [m for m in missing if not m.endswith("inv_freq")]:
        raise ValueError(f"the store lacks tensors the model needs: {missing[:3]}")
    model.tie_weights()
    return model.eval()


def full_model_rss(model_dir: Path) -> int:
    """Resident memory of a fresh process holding the whole model (and the same libraries a node
    imports), after one forward pass: the fair baseline for a node's resident memory."""
    code = ("import sys, psutil, torch; from pathlib import Path; from dllmctl.bench.infer import load_full_model; "
            "m = load_full_model(Path(sys.argv[1])); import dllmd.node; "
            "m(torch.tensor([[1, 2, 3]])); print(psutil.Process().memory_info().rss)")
    done = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def local_generate(model_dir: Path, prompt_ids: list[int], new_tokens: int) -> dict:
    model = load_full_model(model_dir)
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - started
    # Decode rate, like the distributed figure: the first token (prefill) is reported apart.
    return {"tokens_per_second": round((new_tokens - 1) / (seconds - first), 3),
            "time_to_first_token_ms": round(first * 1000, 2),
            "token_ids": out[0, len(prompt_ids):].tolist(),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "process_rss_bytes": full_model_rss(model_dir)}


async def _node_rss(user: Identity, nodes: list[NodeEntry]) -> dict[str, int]:
    async def one(node: NodeEntry) -> tuple[str, int]:
        async with RpcClient(user, node.address, node.public_key) as client:
            info, _ = await client.call("info")
            return node.name, int(info.get("rss_bytes", 0))

    return dict(await asyncio.gather(*(one(n) for n in nodes)))


async def _group_counters(user: Identity, nodes: list[NodeEntry], model: str) -> dict[str, dict]:
    """Each tensor-parallel member's reduction counters now: node -> {reductions, reduce_s, reduce_wait_s,
    group, rank, size}."""
    async def one(node: NodeEntry) -> tuple[str, dict | None]:
        async with RpcClient(user, node.address, node.public_key) as client:
            info, _ = await client.call("info")
        for span in info.get("serving", []):
            if span.get("model") == model and span.get("tensor_slice"):
                return node.name, {"reductions": span["reductions"], "reduce_s": span["reduce_s"],
                                   "reduce_wait_s": span["reduce_wait_s"], **span["tensor_slice"]}
        return node.name, None

    return {name: row for name, row in await asyncio.gather(*(one(n) for n in nodes)) if row is not None}


def _reduction_report(start: dict[str, dict], before: dict[str, dict], after: dict[str, dict], tokens: int,
                      hidden_bytes: int) -> dict:
    """Per decode token, per member: reductions, their time (blocked in receive apart), bytes sent. The
    counters are read before the one-token session (``start``), after it (``before``) and after the
    measured one (``after``): the one-token session is a prefill alone, taken off the measured session's
    counts so that what is left is its decode tokens'."""
    def decode(key: str, name: str) -> float:
        return (after[name][key] - before[name][key]) - (before[name][key] - start[name][key])

    members = {}
    for name, end in after.items():
        count, seconds, waited = (decode(key, name) for key in ("reductions", "reduce_s", "reduce_wait_s"))
        members[name] = {
            "group": end["group"], "rank": end["rank"],
            "reductions_per_token": round(count / tokens, 2),
            "reduction_ms_per_token": round(seconds * 1000 / tokens, 3),
            "ms_per_reduction": round(seconds * 1000 / count, 4) if count else 0.0,
            "waiting_for_members_ms_per_reduction": round(waited * 1000 / count, 4) if count else 0.0,
            "transfer_ms_per_reduction": round((seconds - waited) * 1000 / count, 4) if count else 0.0,
            "bytes_sent_per_token": int(count / tokens * hidden_bytes * (end["size"] - 1)),
        }
    return members


async def distributed_generate(user: Identity, nodes: list[NodeEntry], model: str, num_layers: int,
                               prompt_ids: list[int], new_tokens: int, parallelism: str = "pipeline",
                               hidden_bytes: int = 0, hops: HopCodec = HopCodec()) -> dict:
    route = choose_route(await live_stages(user, nodes, model), num_layers, model, parallelism=parallelism)
    async with ConnectionPool(user) as pool:
        async with DistributedSession(pool, route, model, SamplingParams(), prompt_tokens=len(prompt_ids),
                                      max_new_tokens=2, parallelism=parallelism, hops=hops, feed_back=True) as warm:
            await warm.generate(prompt_ids, 2, set())
        start = await _group_counters(user, nodes, model)
        async with DistributedSession(pool, route, model, SamplingParams(), prompt_tokens=len(prompt_ids),
                                      max_new_tokens=1, parallelism=parallelism, hops=hops, feed_back=True) as prefill:
            await prefill.generate(prompt_ids, 1, set())  # what the prefill alone adds to the counters
        before = await _group_counters(user, nodes, model)
        async with DistributedSession(pool, route, model, SamplingParams(), prompt_tokens=len(prompt_ids),
                                      max_new_tokens=new_tokens, parallelism=parallelism, hops=hops,
                                      feed_back=True) as session:
            result = await session.generate(prompt_ids, new_tokens, set())
        after = await _group_counters(user, nodes, model)
    decode = result.step_seconds[1:]
    compute = [sum(ms) for ms in result.stage_compute_ms[1:]]
    overhead = [s * 1000 - c for s, c in zip(decode, compute)]
    # N stages: N + 1 messages per token; a stage that holds the whole model feeds its tokens back
    # itself, and only the token's way out to the client remains (off the next token's path).
    messages = 1 if session.feed_back else len(route) + 1
    groups = _reduction_report(start, before, after, len(decode), hidden_bytes) if after else {}
    return {
        "parallelism": parallelism,
        "activations": hops.encoding if hops.encoding != "int8" else f"int8/b{hops.block}",
        "route": [{"node": s.node.name, "start": s.span.start, "end": s.span.end,
                   "members": s.span.tensor_slice.size if s.span.tensor_slice else 1} for s in route],
        "reductions": groups,
        "fed_back": session.feed_back,
        "tokens_per_second": round(len(decode) / sum(decode), 3),
        "time_to_first_token_ms": round(result.first_token_s * 1000, 2),
        "per_token_ms": _median([s * 1000 for s in decode]),
        "compute_ms_per_stage": [_median([ms[i] for ms in result.stage_compute_ms[1:]]) for i in range(len(route))],
        "transfer_and_overhead_ms": _median(overhead),
        "overhead_ms_per_message": round(_median(overhead) / messages, 3),
        "bytes_per_token_per_hop": result.hop_bytes[-1] if result.hop_bytes else [],
        "token_ids": result.token_ids,
        "node_rss_bytes": await _node_rss(user, [s.node for s in route]),
    }


def run(user: Identity, nodes: list[NodeEntry], model_dir: Path, model: str, num_layers: int, new_tokens: int,
        compare_local: bool, parallelism: str = "pipeline", hops: HopCodec = HopCodec()) -> dict:
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = encode_prompt(tokenizer, BENCH_PROMPT)
    hidden_bytes = AutoConfig.from_pretrained(model_dir).hidden_size * 4
    report = {"model": model, "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens,
              "distributed": asyncio.run(distributed_generate(user, nodes, model, num_layers, prompt_ids, new_tokens,
                                                              parallelism, hidden_bytes, hops))}
    if report["distributed"]["reductions"]:
        raw = raw_exchange_ms(hidden_bytes)
        report["raw_zmq_exchange_ms"] = raw
        for member in report["distributed"]["reductions"].values():
            member["ratio_to_raw_exchange"] = round(member["transfer_ms_per_reduction"] / raw, 3) if raw else None
    if compare_local:
        local = local_generate(model_dir, prompt_ids, new_tokens)
        dist = report["distributed"]
        report["local"] = local
        report["ratio_tokens_per_second"] = round(dist["tokens_per_second"] / local["tokens_per_second"], 3)
        report["tokens_identical"] = dist["token_ids"] == local["token_ids"]
        report["node_rss_share_of_local_model"] = {
            name: round(rss / local["process_rss_bytes"], 3) for name, rss in dist["node_rss_bytes"].items()}
    return report
