"""How a worker sums gradients with its peers: the encrypted ring (``zmq``, the default; small
buffers take the tree over the same links) or
torch.distributed (``torch``: gloo, or nccl on GPUs) for trusted datacenter links.

Both expose the same calls, so a job definition does not change with the backend. ``allreduce``
sums any contiguous 1-D CPU tensor in place (float32 gradients, but also the int8 and float16
payloads of compressed jobs, ``dllmd.train.compression``) and answers the bytes this worker sent. Only the
ring survives a lost node (it is re-formed by the coordinator); a torch process group cannot be
re-formed with fewer ranks, so a torch job fails when a node dies and is resumed from its last
checkpoint instead.
"""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import torch

from dllmd.train.allreduce import allreduce
from dllmd.train.ring import RingError, RingMember, RingSocket

TORCH_TIMEOUT = timedelta(minutes=30)
# Waiting for a peer's chunk starts when this worker's compute ends, and a slower worker may still be
# computing for minutes: the timeout is a last resort. Dead peers are noticed by the coordinator
# (their connection drops), which then resets the ring.
RING_TIMEOUT_S = 1800.0


def ring_bytes(flat: torch.Tensor, size: int) -> int:
    """What one member of a ring of ``size`` sends to sum ``flat``: 2(n-1)/n of it."""
    return 2 * (size - 1) * (flat.numel() * flat.element_size()) // size if size > 1 else 0


class RingCollective:
    name = "zmq"

    def __init__(self, ring: RingSocket):
        self.ring = ring
        self.rank, self.size = 0, 1
        # One collective at a time on the ring's links, which carry their chunks in order: callers that
        # start several at once (overlapped buckets, PowerSGD's two sums) do so in the same order on
        # every rank, and the lock (first come, first served) keeps that order on the wire.
        self._turn = asyncio.Lock()

    @property
    def port(self) -> int:
        return int(self.ring.endpoint.rsplit(":", 1)[1])

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        self.rank, self.size = rank, len(members)
        self.ring.form(generation, members[(rank - 1) % self.size], members[(rank + 1) % self.size], members, rank)

    async def allreduce(self, flat: torch.Tensor, step: int) -> int:
        async with self._turn:
            stats = await allreduce(self.ring, flat, self.rank, self.size, step, timeout=RING_TIMEOUT_S)
        return stats.bytes_sent

    def abort(self, reason: str) -> None:
        self.ring.fail_pending(RingError(reason))

    def close(self) -> None:
        self.ring.close()


def torch_all_reduce(flat: torch.Tensor, group=None) -> None:
    """Sum ``flat`` in place over ``group`` (the whole process group by default), on the GPU under nccl."""
    import torch.distributed as dist

    if torch.cuda.is_available():  # nccl reduces on the GPU
        on_gpu = flat.cuda()
        dist.all_reduce(on_gpu, group=group)
        flat.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(flat, group=group)


class TorchCollective:
    """One torch.distributed process group per daemon process: a node runs one torch-backend job at a time."""

    name = "torch"
    active: "TorchCollective | None" = None

    def __init__(self, host: str):
        if TorchCollective.active is not None:
            raise ValueError("this node already runs a --backend torch job (one process group per daemon); "
                             "use --backend zmq or wait for it to end")
        self.host = host
        with socket.socket() as probe:  # a free port for rank 0's rendezvous store
            probe.bind((host if host not in ("0.0.0.0", "*") else "", 0))
            self.port = probe.getsockname()[1]
        self.size = 1
        TorchCollective.active = self

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        import torch.distributed as dist

        if generation > 1:
            raise RingError("a torch.distributed job cannot continue without a lost node; resume it from its "
                            "checkpoint")
        self.size = len(members)
        if self.size == 1:
            return
        master = members[0].endpoint  # tcp://host:port of rank 0's rendezvous port
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        await asyncio.to_thread(dist.init_process_group, backend, init_method=master, rank=rank,
                                world_size=self.size, timeout=TORCH_TIMEOUT)

    async def allreduce(self, flat: torch.Tensor, step: int) -> int:
        """Sum ``flat``; the bytes a ring would send for it (gloo and nccl pick their own algorithm and
        do not say what they sent: for a large buffer it is a ring's, or close to it)."""
        if self.size == 1:
            return 0
        await asyncio.to_thread(torch_all_reduce, flat)
        return ring_bytes(flat, self.size)

    def abort(self, reason: str) -> None:
        pass  # gloo and nccl time out on their own

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        TorchCollective.active = None


class LocalGroup:
    """Workers of one process summing with each other, for the one-process references
    (:mod:`dllmd.train.diloco.simulate`) and tests: ``member(rank)`` is a collective like the ring's.

    Each member awaits its ``allreduce`` until every member of the group gave its tensor of that tag;
    the sum, taken in rank order, is then copied into every member's tensor (bitwise the same on
    every member, as the ring's all-gather makes it)."""

    def __init__(self, size: int):
        self.size = size
        self._calls: dict[int, tuple[dict[int, torch.Tensor], asyncio.Event]] = {}

    def member(self, rank: int) -> "LocalMember":
        return LocalMember(self, rank)

    async def _allreduce(self, rank: int, flat: torch.Tensor, tag: int) -> int:
        given, done = self._calls.setdefault(tag, ({}, asyncio.Event()))
        given[rank] = flat
        if len(given) == self.size:
            total = given[0].clone()
            for other in range(1, self.size):
                total.add_(given[other])
            for tensor in given.values():
                tensor.copy_(total)
            del self._calls[tag]
            done.set()
        else:
            await done.wait()
        return ring_bytes(flat, self.size)


class LocalMember:
    name = "local"

    def __init__(self, group: LocalGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    async def allreduce(self, flat: torch.Tensor, step: int) -> int:
        return await self.group._allreduce(self.rank, flat, step)

    def abort(self, reason: str) -> None:
        pass

    def close(self) -> None:
        pass
