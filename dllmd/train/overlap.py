"""All-reduce the gradient while the backward pass is still running, bucket by bucket, as DDP does.

The flat buffer is cut into buckets of parameters taken in reverse order (the last layers' gradients
are ready first in a backward pass), each a contiguous range of the buffer. Every parameter carries
a hook (``register_post_accumulate_grad_hook``) that, during the *last* micro-batch's backward only
(the earlier ones just accumulate into ``.grad``), copies its finished gradient into its place in
the buffer; the hook that completes a bucket starts that bucket's ring all-reduce on the event loop,
while the backward goes on in its thread. The first bucket also carries the loss sum and token
count, both known once the last micro-batch's forward is done.

The sums are the same sums: each element is added over the same workers by the ring whichever
bucket carries it (bitwise the same on two nodes, where a ring adds two values; with more the chunk
boundaries, and so the order of the additions, move: within float32 rounding). ``comm_exposed_s``
is what the overlap did not hide: from the end of the backward to the last bucket's sum.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from dllmd.train.compression.reducers import call_tag
from dllmd.train.model import loss_sum

EXTRAS = 2  # the loss sum and the token count, after the gradients


@dataclass(frozen=True)
class Bucket:
    lo: int  # [lo, hi) of the flat buffer
    hi: int
    params: tuple[int, ...]  # indexes into the buffer's parameters


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[Bucket]:
    """Buckets of float32 parameters of ``sizes`` (in buffer order), in reverse order, each closed
    once it holds ``bucket_bytes``; the first one also holds the extras at the buffer's end."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    buckets, current, held = [], [], 0
    for index in reversed(range(len(sizes))):
        current.append(index)
        held += sizes[index] * 4
        if held >= bucket_bytes or index == 0:
            hi = offsets[current[0] + 1] + (EXTRAS if not buckets else 0)
            buckets.append(Bucket(offsets[index], hi, tuple(current)))
            current, held = [], 0
    if not buckets:  # no parameters: the extras alone
        buckets.append(Bucket(0, EXTRAS, ()))
    return buckets


@dataclass
class OverlapStats:
    compute_s: float
    comm_s: float  # from the first bucket's all-reduce (or the backward's end, if later) to the last one's end
    exposed_s: float  # from the end of the backward to the last one's end
    bytes_sent: int


@dataclass
class _Step:
    """One step's buckets in flight."""

    flat: torch.Tensor
    step: int
    loop: asyncio.AbstractEventLoop
    remaining: list[int]
    started: set[int] = field(default_factory=set)  # touched on the event loop only
    tasks: list[asyncio.Task] = field(default_factory=list)
    first_launch: float | None = None


class OverlappedBackward:
    """A worker's hooks and buckets; :meth:`gradients` runs one step's micro-batches."""

    def __init__(self, params: list[torch.nn.Parameter], collective, bucket_bytes: int):
        self.params, self.collective = params, collective
        sizes = [p.numel() for p in params]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.total = sum(sizes) + EXTRAS
        self.buckets = plan_buckets(sizes, bucket_bytes)
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket.params}
        self._armed: _Step | None = None
        self._lock = threading.Lock()
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int):
        def ready(param: torch.nn.Parameter) -> None:
            step = self._armed
            if step is None:  # an earlier micro-batch: its gradient only accumulates
                return
            offset = self.offsets[index]
            step.flat[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
            param.grad = None  # the buffer holds it now
            bucket = self.bucket_of[index]
            with self._lock:
                step.remaining[bucket] -= 1
                complete = step.remaining[bucket] == 0
            if complete:
                step.loop.call_soon_threadsafe(self._start, step, bucket)
        return ready

    def _start(self, step: _Step, bucket: int) -> None:
        if bucket in step.started:
            return
        step.started.add(bucket)
        if step.first_launch is None:
            step.first_launch = time.perf_counter()
        b = self.buckets[bucket]
        step.tasks.append(asyncio.ensure_future(self._timed(step.flat[b.lo:b.hi], call_tag(step.step, bucket))))

    async def _timed(self, part: torch.Tensor, tag: int) -> tuple[int, float]:
        sent = await self.collective.allreduce(part, tag)
        return sent, time.perf_counter()

    async def gradients(self, model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: str,
                        step: int) -> tuple[torch.Tensor, OverlapStats]:
        """The all-reduced flat buffer of ``batches`` (this worker's micro-batches of ``step``)."""
        started = time.perf_counter()
        flat = torch.zeros(self.total)
        current = _Step(flat, step, asyncio.get_running_loop(), [len(b.params) for b in self.buckets])

        def backward() -> float:
            total, count = 0.0, 0
            try:
                for i, (tokens, labels) in enumerate(batches):
                    loss, n = loss_sum(model, tokens, labels, dtype)
                    total, count = total + float(loss.detach()), count + n
                    if i == len(batches) - 1:
                        flat[-2], flat[-1] = total, float(count)
                        self._armed = current
                    loss.backward()
            finally:
                self._armed = None
            return time.perf_counter()

        try:
            computed = await asyncio.to_thread(backward)
            for param in self.params:  # a parameter no loss reached leaves its gradient zero (a stale one dropped)
                param.grad = None
            for bucket in range(len(self.buckets)):  # those no hook completed (no rows here, or unused parameters)
                self._start(current, bucket)
            done = await asyncio.gather(*current.tasks)
        finally:  # a failed backward or bucket: the others' all-reduces stop too
            for task in current.tasks:
                task.cancel()
        finished = max(t for _, t in done)
        first = min(current.first_launch or computed, computed)  # a launch the loop ran late still waited
        return flat, OverlapStats(compute_s=computed - started, comm_s=finished - first,
                                  exposed_s=max(0.0, finished - computed), bytes_sent=sum(s for s, _ in done))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
