"""The round trips between the live nodes, as each node measures them (``peers.ping``): what the
group planner reads to put tensor-parallel groups among nodes with fast links."""

from __future__ import annotations

import asyncio
import math

import zmq

from dllmd.net.client import CallError, RpcClient
from dllmd.net.identity import Identity
from dllmd.net.messages.node import MAX_PEERS_PINGED, PEERS_PING, PeerArgs, PeerRtt, PingPeersArgs
from dllmctl.cluster.registry import NodeEntry
from dllmctl.placement.groups import Latency, link_latency

PINGS_PER_PEER = 5
REUSE_S = 600.0  # a round trip measured this recently is taken as it is (links change slowly)


async def measure_links(identity: Identity, entries: list[NodeEntry], count: int = PINGS_PER_PEER,
                        max_age_s: float = REUSE_S) -> Latency:
    """Round trips in ms between every pair of ``entries``, measured by each node to the others at the
    addresses registered here (a link neither end could measure is left out; one that failed counts
    as infinitely slow). Nodes that do not answer are skipped."""
    names = {entry.public_key: entry.name for entry in entries}
    ctx = zmq.Context()
    try:
        replies = await asyncio.gather(*(_ask(identity, entry, entries, count, max_age_s, ctx) for entry in entries))
    finally:
        ctx.destroy(linger=0)
    measured = {(entry.name, names[rtt.public_key]): rtt.rtt_ms if not rtt.error else math.inf
                for entry, rtts in zip(entries, replies) for rtt in rtts if rtt.public_key in names}
    return link_latency(measured)


async def _ask(identity: Identity, entry: NodeEntry, entries: list[NodeEntry], count: int, max_age_s: float,
               ctx: zmq.Context) -> list[PeerRtt]:
    others = [PeerArgs(e.public_key, e.address) for e in entries if e.public_key != entry.public_key]
    rtts: list[PeerRtt] = []
    for start in range(0, len(others), MAX_PEERS_PINGED):
        batch = others[start:start + MAX_PEERS_PINGED]
        try:
            async with RpcClient(identity, entry.address, entry.public_key, ctx=ctx) as client:
                # Every ping of the batch may take up to its timeout (2 s), the first one connecting.
                reply, _ = await client.invoke(PEERS_PING, PingPeersArgs(batch, count, max_age_s),
                                               timeout=5.0 + 2.0 * (count + 1))
        except CallError:
            return rtts
        rtts.extend(reply.peers)
    return rtts
