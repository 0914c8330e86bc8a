"""``dllmctl shard-data`` and the client's dataset records.

Read, tokenize (the model's own tokenizer), cut long samples into pieces of one sequence, assign
pieces to nodes by a strategy, pack each node's pieces into rows of ``seq_len`` tokens, and place
the shards with a two-phase push (:mod:`dllmctl.data.push`). Run again on a changed source, it is
an update: unchanged pieces stay where they are and only what changed is sent
(:mod:`dllmctl.data.updates`). With ``local_only`` every node reads a path on its own disk instead and
keeps all of it (federated learning: private data never leaves its machine); nothing but counts and
hashes comes back.

The dataset record (``<data dir>/datasets/<name>.json``, written atomically after every node
committed) is what ``dllmctl train`` consumes: which node holds which shard, with its sha256.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dllmctl.cluster.registry import NodeEntry
from dllmctl.data.progress import ShardProgress
from dllmctl.data.push import PushError, push_shards
from dllmctl.data.updates import count_changes, describe_nodes, previous_placement, shard_upload
from dllmd.data import (STRATEGIES, DataError, SourceResult, TokenizedSample, assign, eos_id, load_data_tokenizer,
                        node_tokens, pack, read_samples, skew, split_samples, tokenize_samples)
from dllmd.data.shards import NAME, shard_payload
from dllmd.net.client import CallError, RpcClient
from dllmd.net.identity import Identity
from dllmd.models.store import TOKENIZER_FILES

LOCAL_TIMEOUT_S = 600.0



@dataclass
class ShardRequest:
    uri: str
    model: str
    model_dir: Path
    strategy: str
    name: str
    seq_len: int = 2048
    replicas: int = 1
    seed: int = 0
    field: str = "text"
    include: list[str] | None = None
    exclude: list[str] = dataclasses.field(default_factory=list)
    strict: bool = False
    local_only: bool = False
    fresh: bool = False
    """Place every piece anew instead of keeping pieces on the nodes holding them (what is sent is
    still only what each node lacks)."""


def dataset_name(uri: str, name: str | None) -> str:
    chosen = name or Path(uri.removeprefix("file://").rstrip("/")).stem or "dataset"
    if not NAME.match(chosen):
        raise DataError(f"invalid dataset name {chosen!r}: use letters, digits, '.', '_' and '-' (--name)")
    return chosen


def _check(request: ShardRequest, nodes: list[NodeEntry]) -> None:
    if request.strategy not in STRATEGIES:
        raise DataError(f"unknown strategy {request.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not nodes:
        raise DataError("no nodes to shard onto; add some with 'dllmctl nodes add' or 'dllmctl cluster up'")
    if not 8 <= request.seq_len <= 1_048_576:
        raise DataError("--seq-len must be between 8 and 1048576 tokens")
    if request.replicas > len(nodes):
        raise DataError(f"--replicas {request.replicas} needs at least as many nodes (there are {len(nodes)})")


def shard_and_push(user: Identity, nodes: list[NodeEntry], request: ShardRequest,
                   progress: ShardProgress | None = None) -> dict:
    """Shard ``request.uri`` onto ``nodes``; returns the report (and records the dataset)."""
    _check(request, nodes)
    progress = progress or ShardProgress()
    started = time.perf_counter()
    if request.local_only:
        progress.stage("nodes sharding", total=len(nodes))
        report = asyncio.run(_local_only(user, nodes, request, lambda: progress.advance("nodes sharding", 1)))
    else:
        report = place(user, nodes, request, prepare(request, progress), progress)
    report["seconds"] = round(time.perf_counter() - started, 3)
    # Source tokens read, tokenized and placed per second (replicas are not counted twice).
    report["tokens_per_second"] = round(report["tokens"] / report["seconds"], 1) if report["seconds"] else None
    return report


@dataclass
class Prepared:
    """Read and tokenized samples, ready to be assigned (the slow part, done once per source)."""
    source: SourceResult
    samples: list[TokenizedSample]
    eos_id: int


def prepare(request: ShardRequest, progress: ShardProgress) -> Prepared:
    progress.stage("reading")
    source = read_samples(request.uri, field=request.field, include=request.include, exclude=request.exclude,
                          strict=request.strict)
    progress.advance("reading", len(source.samples))
    progress.stage("tokenizing", total=len(source.samples))
    tokenizer = load_data_tokenizer(request.model_dir)
    samples = tokenize_samples(tokenizer, source.samples, lambda done: progress.advance("tokenizing", done))
    return Prepared(source, samples, eos_id(tokenizer))


def place(user: Identity, nodes: list[NodeEntry], request: ShardRequest, prepared: Prepared,
          progress: ShardProgress) -> dict:
    """Cut, assign, pack and push prepared samples by ``request.strategy``, as an update of what the
    nodes hold of ``request.name`` already (:mod:`dllmctl.data.updates`); the dataset's report."""
    progress.stage("assigning")
    pieces = split_samples(prepared.samples, request.seq_len)
    ids = [n.public_key for n in nodes]  # stable node ids: names can be changed, keys cannot
    held = asyncio.run(describe_nodes(user, nodes, request.name))
    previous = {} if request.fresh else previous_placement(held, request.strategy, request.seed, request.replicas)
    by_id = assign(pieces.samples, ids, request.strategy, seed=request.seed, replicas=request.replicas,
                   groups=pieces.groups, previous=previous)
    progress.stage("packing", total=len(nodes))
    shards, uploads = [], []
    for node in nodes:
        chosen = [pieces.samples[i] for i in by_id[node.public_key]]
        blob, meta = shard_payload(pack(chosen, request.seq_len, prepared.eos_id), **_info(request, node))
        sha256 = hashlib.sha256(blob).hexdigest()
        shards.append((node, meta, len(blob), sha256))
        upload = shard_upload(node, blob, meta, chosen, held[node.public_key], sha256)
        if upload is not None:
            uploads.append(upload)
        progress.advance("packing", 1)
    for upload in uploads:
        size = len(upload.patch if upload.patch is not None else upload.blob)
        progress.stage(f"push {upload.node.name}", total=size, unit="bytes")
    asyncio.run(push_shards(user, request.name, uploads, lambda node, count: progress.advance(f"push {node}", count)))
    changes, per_node = count_changes(held, {node.public_key: meta for node, meta, _, _ in shards})
    sent = {u.node.public_key: u.sent for u in uploads}
    rows = [{**_row(node.name, meta, size, sha256), **per_node[node.public_key],
             "sent_bytes": sent.get(node.public_key, 0)} for node, meta, size, sha256 in shards]
    report = _report(request, rows, skipped=[dataclasses.asdict(s) for s in prepared.source.skipped],
                     skew_value=skew(node_tokens(pieces.samples, by_id)), samples=len(prepared.samples),
                     tokens=sum(p.packed_tokens for p in pieces.samples))
    return {**report, "pieces": len(pieces.samples), "changes": changes, "bytes_sent": sum(sent.values())}


def _info(request: ShardRequest, node: NodeEntry) -> dict:
    return {"dataset": request.name, "node": node.name, "node_key": node.public_key, "model": request.model,
            "strategy": "local" if request.local_only else request.strategy, "seed": request.seed,
            "replicas": request.replicas, "source": request.uri, "created": time.time()}


def _row(node: str, meta: dict, size: int, sha256: str) -> dict:
    return {"node": node, "samples": meta["sample_count"], "tokens": meta["tokens"], "sequences": meta["sequences"],
            "bytes": size, "sha256": sha256}


def _report(request: ShardRequest, rows: list[dict], skipped: list[dict], skew_value: float, samples: int,
            tokens: int) -> dict:
    return {"dataset": request.name, "strategy": "local" if request.local_only else request.strategy,
            "seq_len": request.seq_len, "model": request.model, "source": request.uri, "replicas": request.replicas,
            "seed": request.seed, "samples": samples, "tokens": tokens, "nodes": rows, "skew": round(skew_value, 4),
            "skipped": skipped}


async def _local_only(user: Identity, nodes: list[NodeEntry], request: ShardRequest,
                      one_done: Callable[[], None]) -> dict:
    """Every node shards its own copy of ``request.uri`` (a path on that node), then all commit."""
    files = {name: (request.model_dir / name).read_bytes() for name in TOKENIZER_FILES
             if (request.model_dir / name).exists()}
    if "tokenizer.json" not in files and "tokenizer.model" not in files:
        raise DataError(f"model {request.model} has no tokenizer files to send to the nodes; re-import it with "
                        f"its tokenizer")
    clients = {n.name: RpcClient(user, n.address, n.public_key) for n in nodes}

    async def one(node: NodeEntry) -> dict:
        args = {"dataset": request.name, "uri": request.uri, "field": request.field,
                "include": request.include or [], "exclude": request.exclude, "strict": request.strict,
                "seq_len": request.seq_len, "tokenizer_files": list(files),
                "info": json.dumps(_info(request, node)).encode()}
        # Files ride as tensor frames: a header (where args live) is limited to a few KiB.
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.int8) for blob in files.values()]
        result, _ = await clients[node.name].call("data.local", args, tensors, timeout=LOCAL_TIMEOUT_S)
        one_done()
        return result

    try:
        results = await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)
        failures = [f"{n.name}: {r}" for n, r in zip(nodes, results) if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(_quietly(c, "data.abort", request.name) for c in clients.values()))
            raise PushError(f"could not shard {request.uri} locally: {'; '.join(failures)}; no node's data was "
                            f"changed")
        commits = await asyncio.gather(*(c.call("data.commit", {"dataset": request.name}, timeout=60)
                                         for c in clients.values()), return_exceptions=True)
        failures = [f"{name}: {r}" for name, r in zip(clients, commits) if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(_quietly(c, "data.remove", request.name) for c in clients.values()))
            raise PushError(f"commit of {request.name} failed on {'; '.join(failures)}; removed it everywhere")
    finally:
        for client in clients.values():
            client.close()
    rows = [_row(n.name, r, r["bytes"], r["sha256"]) for n, r in zip(nodes, results)]
    skipped = [s for r in results for s in r.get("skipped", [])]
    return _report(request, rows, skipped, skew([row["tokens"] for row in rows]), sum(r["samples"] for r in rows),
                   sum(row["tokens"] for row in rows))


async def _quietly(client: RpcClient, op: str, dataset: str) -> None:
    try:
        await client.call(op, {"dataset": dataset}, timeout=10)
    except CallError:
        pass
