"""Re-sharding a dataset the nodes already hold: what each node has, where its pieces stay, what to send.

Before placing, every node is asked for its shard's piece table (``data.describe``: id and digest of
each piece). Then:

* **placement**: when the nodes' shards were placed by the same strategy and seed, every piece that
  is still in the source stays on the node holding it (``previous`` for
  :func:`dllmd.data.assign`); only new pieces (and those of nodes no longer targeted) are placed.
  ``fresh`` places everything anew, for a strategy whose shards drifted (``semantic`` after many
  removals).
* **transfer**: a node whose new shard is byte for byte its current one (and whose description says
  the same) is left alone; any other node that holds a shard is sent a patch, the tokens of only the
  pieces its shard lacks (:mod:`dllmd.data.patch`), and rebuilds the shard itself; a node without one,
  or one that refuses the patch, gets the whole shard.
* **report**: pieces added, removed, edited (same id, other tokens), moved (unchanged, now on a node
  that did not hold it) and unchanged, and per node what it kept, received and dropped.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Sequence

from dllmctl.cluster.registry import NodeEntry
from dllmctl.data.push import PushError, ShardUpload
from dllmd.data.packing import TokenizedSample
from dllmd.data.patch import held_pieces, make_patch
from dllmd.net.client import CallError, RemoteError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages import data as M
from dllmd.net.messages.node import PING
from dllmd.net.wire import ErrorCode

# What a shard's description says that an unchanged shard must still say (not "created").
INFO_KEYS = ("dataset", "node", "node_key", "model", "strategy", "seed", "replicas", "source", "seq_len", "eos_id")


@dataclass
class Held:
    """A node's committed shard of the dataset, as it described it."""
    sha256: str
    meta: dict

    @property
    def rows(self) -> list:
        rows = self.meta.get("samples")
        return rows if isinstance(rows, list) else []


async def describe_nodes(user: Identity, nodes: Sequence[NodeEntry], dataset: str) -> dict[str, Held | None]:
    """Node key -> its shard of ``dataset`` (None when it has none). A node that does not answer
    fails the whole run here, before anything was sent."""
    async def one(node: NodeEntry) -> Held | None:
        async with RpcClient(user, node.address, node.public_key) as client:
            await client.invoke(PING, timeout=5)
            try:
                reply, tensors = await client.invoke(M.DATA_DESCRIBE, M.DatasetArgs(dataset=dataset), timeout=30)
            except RemoteError as exc:
                if exc.code == ErrorCode.NOT_FOUND:
                    return None
                raise
        meta = json.loads(tensors[0].numpy().tobytes()) if len(tensors) == 1 else None
        if not isinstance(meta, dict):
            raise CallError(f"{node.name} described its shard of {dataset} without a JSON description")
        return Held(reply.sha256, meta)

    results = await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)
    failures = [f"{n.name}: {r}" for n, r in zip(nodes, results) if isinstance(r, BaseException)]
    if failures:
        raise PushError(f"could not place {dataset}: {'; '.join(failures)}; no node's data was changed")
    return {n.public_key: r for n, r in zip(nodes, results)}


def previous_placement(held: dict[str, Held | None], strategy: str, seed: int, replicas: int) -> dict[str, str]:
    """Piece id -> the node key holding it, from the shards placed by this strategy and seed (another
    strategy's placement is not one to keep)."""
    previous: dict[str, str] = {}
    for key, shard in held.items():
        if shard is None or (shard.meta.get("strategy"), shard.meta.get("seed"), shard.meta.get("replicas")) != (
                strategy, seed, replicas):
            continue
        for row in shard.rows:
            if isinstance(row, list) and row and isinstance(row[0], str):
                previous.setdefault(row[0], key)
    return previous


def shard_upload(node: NodeEntry, blob: bytes, meta: dict, pieces: Sequence[TokenizedSample],
                 held: Held | None, sha256: str) -> ShardUpload | None:
    """What to send ``node`` for its new shard (``blob``, ``meta``, its ``pieces``): nothing when it
    holds that shard already, a patch when that is smaller than the shard, else the shard."""
    if held is None:
        return ShardUpload(node, blob, meta)
    if held.sha256 == sha256 and all(held.meta.get(k) == meta.get(k) for k in INFO_KEYS):
        return None
    patch = make_patch(pieces, [row[3] for row in meta["samples"]], held.rows).astype("<i4").tobytes()
    if len(patch) >= len(blob):
        return ShardUpload(node, blob, meta)
    return ShardUpload(node, blob, meta, patch=patch, base=held.sha256)


def count_changes(held: dict[str, Held | None], metas: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """Pieces added, removed, edited, moved and unchanged across the nodes, and per node key the pieces
    it kept, received and dropped, from the shards held before and the new descriptions ``metas``."""
    before = _holders({key: shard.meta for key, shard in held.items() if shard is not None})
    after = _holders(metas)
    totals = dict.fromkeys(("added", "removed", "edited", "moved", "unchanged"), 0)
    for piece_id, (digest, nodes) in after.items():
        if piece_id not in before:
            totals["added"] += 1
        elif before[piece_id][0] != digest or digest is None:
            totals["edited"] += 1
        elif nodes <= before[piece_id][1]:
            totals["unchanged"] += 1
        else:
            totals["moved"] += 1
    totals["removed"] = sum(piece_id not in after for piece_id in before)
    per_node = {}
    for key, meta in metas.items():
        had = held_pieces(held[key].rows) if held.get(key) else {}
        now = {(row[0], row[3]) for row in meta["samples"]}
        kept = sum(piece in had for piece in now)
        per_node[key] = {"kept": kept, "received": len(now) - kept, "dropped": sum(p not in now for p in had)}
    return totals, per_node


def _holders(metas: dict[str, dict]) -> dict[str, tuple[str | None, set[str]]]:
    """Piece id -> (digest, the keys of the nodes whose shards list it)."""
    holders: dict[str, tuple[str | None, set[str]]] = {}
    for key, meta in metas.items():
        for row in meta.get("samples", []):
            if isinstance(row, list) and row and isinstance(row[0], str):
                digest = row[3] if len(row) == 4 and isinstance(row[3], str) else None
                holders.setdefault(row[0], (digest, set()))[1].add(key)
    return holders
