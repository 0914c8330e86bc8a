"""Where a hidden state crosses the network: the ordered push of a pass's outputs to the next stage.

A stage pushes each pass's hidden states to the next stage as one ``session.forward`` per next hop,
without holding up the next pass (a dead next stage would otherwise stall every session here for the
send timeout), yet in order: each push to a hop is sent after the one before it. The next stage
answers each push as soon as it has queued the steps; a push not answered within its deadline means
the next stage cannot be reached from here, though the client may reach it fine (a cut link, a
partition: zmq would queue the bytes forever), and the steps' sessions are told so at once
(``next_hop_unreachable``: the client routes around the next stage) rather than the client waiting
out its step timeout with no idea whom to blame.
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
# The answer to a push comes once it has crossed the link: allow for a slow one (8 Mbit/s) on top.
PUSH_ANSWER_BYTES_PER_S = 1 << 20

Hop = tuple[str, str]  # (address, public key) of the next stage
Onward = tuple[PendingStep, dict, torch.Tensor]  # the step, its trace so far, the hidden state to send
Unreachable = Callable[[PendingStep, str], None]  # a step whose next stage could not be reached, and why


class Forwarder:
    def __init__(self, peers: ConnectionPool, unreachable: Unreachable):
        self.peers = peers
        self.unreachable = unreachable
        self._pushes: dict[Hop, asyncio.Task] = {}  # the latest push to each next stage
        self._answers: set[asyncio.Task] = set()  # pushes sent, their answers awaited

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
        timeout = PUSH_TIMEOUT_S + sum(p.numel() * p.element_size() for p in tensors) / PUSH_ANSWER_BYTES_PER_S
        try:
            answer = await self.peers.get(*hop).request_sent(SESSION_FORWARD.name, {"items": items}, tensors,
                                                             timeout=timeout)
        except (CallError, zmq.ZMQError) as exc:
            self._unreachable(hop, steps, exc)
            return
        # Sent: the next push to this hop may go now (it arrives after this one); the answer is awaited
        # beside it.
        task = asyncio.ensure_future(self._answered(hop, steps, answer))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answered(self, hop: Hop, steps: list[Onward], answer) -> None:
        try:
            reply = await answer
        except (CallError, zmq.ZMQError) as exc:
            self._unreachable(hop, steps, exc)
            return
        if reply.error is not None:  # the next stage refused the whole message
            self._unreachable(hop, steps, f"{reply.error['code']}: {reply.error['message']}")

    def _unreachable(self, hop: Hop, steps: list[Onward], why) -> None:
        # The connection stays in the pool: other sessions may be using it, and zmq reconnects.
        for pending, _, _ in steps:
            self.unreachable(pending, f"could not reach the next stage {hop[0]}: {why}")
