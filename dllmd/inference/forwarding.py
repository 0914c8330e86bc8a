"""Where a hidden state crosses the network: the ordered push of a pass's outputs to the next stage.

A stage pushes each pass's hidden states to the next stage as one one-way ``session.forward`` per
next hop, without holding up the next pass (a dead next stage would otherwise stall every session
here for the send timeout), yet in order: each push to a hop waits for the one before it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import torch
import zmq

from dllmd.inference.scheduler import PendingStep
from dllmd.net.client import CallError
from dllmd.net.codec import encoded_bytes
from dllmd.net.messages.inference import SESSION_FORWARD
from dllmd.net.pool import ConnectionPool

PUSH_TIMEOUT_S = 5.0

Hop = tuple[str, str]  # (address, public key) of the next stage
Onward = tuple[PendingStep, dict, torch.Tensor]  # the step, its trace so far, the hidden state to send
Unreachable = Callable[[PendingStep, str], None]  # a step whose next stage could not be reached, and why


class Forwarder:
    def __init__(self, peers: ConnectionPool, unreachable: Unreachable):
        self.peers = peers
        self.unreachable = unreachable
        self._pushes: dict[Hop, asyncio.Task] = {}  # the latest push to each next stage

    def push_in_order(self, hop: Hop, steps: list[Onward]) -> None:
        previous = self._pushes.get(hop)

        async def push() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await self._push(hop, steps)

        task = self._pushes[hop] = asyncio.ensure_future(push())
        task.add_done_callback(lambda done: self._pushes.get(hop) is done and self._pushes.pop(hop))

    async def _push(self, hop: Hop, steps: list[Onward]) -> None:
        items, tensors = [], []
        for pending, trace, hidden in steps:
            encoding, parts = pending.session.hops.encode(hidden)
            trace["hop_bytes"].append(encoded_bytes(parts))
            item = pending.item
            items.append({"session": item.session, "step": item.step, "start": item.start, "final": item.final,
                          "encoding": encoding, **trace})
            tensors.extend(parts)
        try:
            await self.peers.get(*hop).send_oneway(SESSION_FORWARD.name, {"items": items}, tensors,
                                                   timeout=PUSH_TIMEOUT_S)
        except (CallError, zmq.ZMQError) as exc:
            # The connection stays in the pool: other sessions may be using it, and zmq reconnects.
            for pending, _, _ in steps:
                self.unreachable(pending, f"could not reach the next stage {hop[0]}: {exc}")
