"""Where activations and their gradients cross a stage boundary: a stage's links to its neighbours.

A stage sends micro-batch i's activations to the next stage, and their gradient back to the
previous one, as ``train.pipe`` requests over the daemons' encrypted peer connections (CURVE, peer
role). The receiving daemon files each in this mailbox, keyed by (step, micro-batch, kind), until
the stage's schedule asks for it, so the two sides never need to meet in time. Sends run as tasks:
compute goes on while a message is on its way, and the step ends only when every send was
acknowledged.

Links are formed with a generation, like the ring: after a failure the coordinator forms them
again with a new one, and whatever the old pipeline still delivers is dropped.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

import torch

from dllmd.net.messages import training as S

# Waiting for a neighbour starts when this stage runs out of work, and the neighbour may still be
# computing several micro-batches: a last resort. A dead neighbour is noticed by the coordinator
# (its connection drops), which then resets the others.
RECEIVE_TIMEOUT_S = 1800.0
SEND_TIMEOUT_S = 600.0
MAX_WAITING_MESSAGES = 4096  # a pipeline step holds at most 2 per micro-batch; more is a confused peer

Send = Callable[[S.NodeRef, dict, list[torch.Tensor]], Awaitable[object]]
Key = tuple[int, int, str]  # step, micro-batch, kind


class LinkError(RuntimeError):
    """A neighbour's message did not come, or could not be sent (a peer died, or the links were reset)."""


class PipeLinks:
    def __init__(self, job: str, send: Send):
        self.job = job
        self._send = send
        self.generation = 0
        self.previous: S.NodeRef | None = None
        self.next: S.NodeRef | None = None
        self._mailbox: dict[Key, list[torch.Tensor]] = {}
        self._waiting: dict[Key, asyncio.Future] = {}
        self._sends: list[asyncio.Task] = []
        self.bytes_sent = 0

    def form(self, generation: int, previous: S.NodeRef | None, next_: S.NodeRef | None) -> None:
        self.fail_pending(LinkError(f"the pipeline was formed again (generation {generation})"))
        self.generation, self.previous, self.next = generation, previous, next_
        self._mailbox.clear()

    def deliver(self, generation: int, step: int, micro: int, kind: str, tensors: list[torch.Tensor],
                sender: str) -> None:
        """A neighbour's message (the ``train.pipe`` handler); one of an older pipeline is dropped, one
        from another node than the neighbour it must come from refused."""
        if generation != self.generation:
            return
        backward = kind == "gradient"
        expected = self.next if backward else self.previous
        if expected is None or sender != expected.public_key:
            raise ValueError(f"a pipeline {kind} from a node that is not this stage's "
                             f"{'next' if backward else 'previous'} stage")
        key = (step, micro, kind)
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(tensors)
            return
        if len(self._mailbox) >= MAX_WAITING_MESSAGES:
            raise ValueError(f"more than {MAX_WAITING_MESSAGES} pipeline messages wait unread")
        self._mailbox[key] = tensors

    async def receive(self, step: int, micro: int, kind: str, timeout: float = RECEIVE_TIMEOUT_S) -> list[torch.Tensor]:
        key = (step, micro, kind)
        if key in self._mailbox:
            return self._mailbox.pop(key)
        future = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise LinkError(f"no {kind} of micro-batch {micro} (step {step}) within {timeout:g} s") from None
        finally:
            self._waiting.pop(key, None)

    def send(self, kind: str, step: int, micro: int, tensors: list[torch.Tensor]) -> None:
        """Queue micro-batch ``micro``'s activations (to the next stage) or gradient (to the previous)."""
        node = self.previous if kind == "gradient" else self.next
        if node is None:
            raise LinkError(f"this stage has no neighbour to send a {kind} to")
        args = {"job": self.job, "generation": self.generation, "step": step, "micro": micro, "kind": kind}
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        self._sends.append(asyncio.ensure_future(self._send(node, args, tensors)))

    async def flush(self) -> None:
        """Wait until every message sent so far was acknowledged; the first failure is raised. The sends
        stay listed while awaited, so that a reset (:meth:`fail_pending`) cancels them rather than
        leaving this wait to a dead neighbour's send timeout."""
        sends = list(self._sends)
        if not sends:
            return
        try:
            results = await asyncio.gather(*sends, return_exceptions=True)
        finally:
            self._sends = [t for t in self._sends if t not in sends]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise LinkError(f"a neighbour did not take a pipeline message: {failed}") from None

    def fail_pending(self, error: Exception) -> None:
        """Wake every wait with ``error`` and forget unsent work (a reset, or a new pipeline)."""
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        for task in self._sends:
            task.cancel()
        self._sends = []
