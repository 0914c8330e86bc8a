"""How a worker sums gradients with its peers: the encrypted ring (``zmq``, the default; small
buffers take the tree over the same links) or
torch.distributed (``torch``: gloo, or nccl on GPUs) for trusted datacenter links.

Both expose the same three calls, so a job definition does not change with the backend. Only the
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


class RingCollective:
    name = "zmq"

    def __init__(self, ring: RingSocket):
        self.ring = ring
        self.rank, self.size = 0, 1

    @property
    def port(self) -> int:
        return int(self.ring.endpoint.rsplit(":", 1)[1])

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        self.rank, self.size = rank, len(members)
        self.ring.form(generation, members[(rank - 1) % self.size], members[(rank + 1) % self.size], members, rank)

    async def allreduce(self, flat: torch.Tensor, step: int) -> None:
        await allreduce(self.ring, flat, self.rank, self.size, step, timeout=RING_TIMEOUT_S)

    def abort(self, reason: str) -> None:
        self.ring.fail_pending(RingError(reason))

    def close(self) -> None:
        self.ring.close()


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

    async def allreduce(self, flat: torch.Tensor, step: int) -> None:
        import torch.distributed as dist

        if self.size == 1:
            return
        if torch.cuda.is_available():  # nccl reduces on the GPU
            on_gpu = flat.cuda()
            await asyncio.to_thread(dist.all_reduce, on_gpu)
            flat.copy_(on_gpu.cpu())
        else:
            await asyncio.to_thread(dist.all_reduce, flat)

    def abort(self, reason: str) -> None:
        pass  # gloo and nccl time out on their own

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        TorchCollective.active = None
