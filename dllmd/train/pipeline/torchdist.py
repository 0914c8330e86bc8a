"""A pipeline stage's links and rings under ``--backend torch``: one torch.distributed process group
(gloo on CPU, NCCL on CUDA) over every node of the job, for datacenter links its operator trusts.

World ranks are the job's node order (replica-major: rank r * P + s is stage s of replica r); the
coordinator's ``train.ring`` gives each node its rank and the whole member list, and rank 0's
rendezvous port. Inside that group: one group per stage over its replicas (the stage's gradient
sums), one per replica over its first and last stage (tied embeddings), and point-to-point sends
between neighbours for the activations and their gradients.

The stages run the same schedule tables (:mod:`.schedule`) and the same :class:`StageWorker` as on
the encrypted links; only the transport changes, so the two backends compute the same weights.
``torch.distributed.pipelining``'s schedules were tried on gloo (torch 2.13, 2 and 3 stages): GPipe
and 1F1B run without hanging and, with ``scale_grads=False``, give one process's gradients. They are
still not used, because a schedule there splits a batch into equal micro-batches (a replica's rows
here need not divide evenly), labels travelling with the activations need static shapes (its shape
inference runs the forward on uninitialised buffers), and one stage loop for both backends keeps the
checkpoint parts, held-out scoring, recomputation and the per-stage compute/wait clock (the measured
bubble) in one place. docs/training.md has the details.

Each message is a fixed-size int64 header (tensor count; each tensor's dtype, rank and shape), then
the tensors, all with one tag per (micro-batch, kind), so a receiver allocates exactly what comes and
checks it first. Sends are ``isend``: compute goes on while they travel; a step's ``flush`` waits for
them. A process group cannot be formed again with fewer ranks: a failure interrupts the job, and
``jobs resume`` continues it from the last complete checkpoint.
"""

from __future__ import annotations

import asyncio
import math

import torch

from dllmd.net.messages import training as S
from dllmd.train.collective import TorchCollective, torch_all_reduce
from dllmd.train.pipeline.links import LinkError
from dllmd.train.ring import RingMember

MAX_TENSORS = 2  # activations and their labels
MAX_DIMS = 4
HEADER = 1 + MAX_TENSORS * (2 + MAX_DIMS)
MAX_ELEMENTS = 2**31  # one activation tensor; more is a confused peer
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)


class TorchPipelineGroup:
    """This node's share of the job's process group: its rank, its stage's group, its replica's tied
    pair, and its links to its neighbours."""

    def __init__(self, host: str, stages: int, stage: int, tied: bool):
        self.world = TorchCollective(host)  # one process group per daemon: refuses a second torch job
        self.stages, self.stage = stages, stage
        self.world_rank, self.keys = -1, []
        self.stage_groups: list = []
        self.tied_groups: list = []
        self.ring = _StageRing(self)
        self.tied = _TiedPair(self) if tied else None
        self.links = TorchLinks(self)

    @property
    def port(self) -> int:
        return self.world.port

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        """Join the job's process group (every node at once), then make every stage's and every tied
        pair's group: ``new_group`` is collective, so every rank makes each, in the same order."""
        if len(members) % self.stages or not 0 <= rank < len(members) or rank % self.stages != self.stage:
            raise ValueError(f"stage {self.stage} of {self.stages} cannot be rank {rank} of {len(members)}")
        await self.world.form(generation, rank, members)
        self.world_rank, self.keys = rank, [m.public_key for m in members]
        await asyncio.to_thread(self._groups, len(members) // self.stages)

    def _groups(self, replicas: int) -> None:
        import torch.distributed as dist

        p = self.stages
        self.stage_groups = [dist.new_group([r * p + s for r in range(replicas)]) for s in range(p)]
        self.tied_groups = [dist.new_group([r * p, r * p + p - 1]) for r in range(replicas)]

    def rank_of(self, node: S.NodeRef) -> int:
        try:
            return self.keys.index(node.public_key)
        except ValueError:
            raise LinkError(f"{node.name} is not a member of this job's process group") from None

    def close(self) -> None:
        self.world.close()


class _StageRing:
    """The collective over this stage's replicas (the stage's gradient sums); forming it joins the job."""

    name = "torch"

    def __init__(self, group: TorchPipelineGroup):
        self.group = group

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        await self.group.form(generation, rank, members)

    async def allreduce(self, flat: torch.Tensor, step: int) -> int:
        g = self.group
        replicas = len(g.keys) // g.stages
        if replicas == 1:
            return 0
        await asyncio.to_thread(torch_all_reduce, flat, g.stage_groups[g.stage])
        return 2 * (replicas - 1) * flat.numel() * flat.element_size() // replicas

    def abort(self, reason: str) -> None:
        pass  # a blocked gloo or nccl call ends when its peer's connection drops, or at the group's timeout

    def close(self) -> None:
        self.group.close()


class _TiedPair(_StageRing):
    """The two ends of this node's replica, summing the tied embedding's gradient."""

    async def form(self, generation: int, rank: int, members: list[RingMember]) -> None:
        pass  # made with the stage groups when the job's process group is joined

    async def allreduce(self, flat: torch.Tensor, step: int) -> int:
        g = self.group
        await asyncio.to_thread(torch_all_reduce, flat, g.tied_groups[g.world_rank // g.stages])  # a 1-D slice
        return flat.numel() * flat.element_size()

    def close(self) -> None:
        pass  # the stage ring closes the process group


class TorchLinks:
    """:class:`PipeLinks`' calls over torch.distributed point-to-point sends."""

    def __init__(self, group: TorchPipelineGroup):
        self.group = group
        self.generation = 0
        self.previous: S.NodeRef | None = None
        self.next: S.NodeRef | None = None
        self._works: list = []
        self.bytes_sent = 0

    def form(self, generation: int, previous: S.NodeRef | None, next_: S.NodeRef | None) -> None:
        self.generation, self.previous, self.next = generation, previous, next_
        self._works = []

    def deliver(self, generation: int, step: int, micro: int, kind: str, tensors: list[torch.Tensor],
                sender: str) -> None:
        raise ValueError("this stage's pipeline runs over torch.distributed (--backend torch): it takes no "
                         "train.pipe messages")

    def _peer(self, kind: str, sending: bool) -> int:
        backward = kind == S.PIPE_KINDS[1]
        node = (self.previous if backward else self.next) if sending else (self.next if backward else self.previous)
        if node is None:
            raise LinkError(f"this stage has no neighbour to {'send' if sending else 'receive'} a {kind} "
                            f"{'to' if sending else 'from'}")
        return self.group.rank_of(node)

    def send(self, kind: str, step: int, micro: int, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        if not 0 < len(tensors) <= MAX_TENSORS:
            raise LinkError(f"a pipeline message carries 1 to {MAX_TENSORS} tensors, not {len(tensors)}")
        peer, tag = self._peer(kind, sending=True), _tag(kind, micro)
        device = _device()
        payload = [t.detach().contiguous().to(device) for t in tensors]
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0] = len(payload)
        for i, t in enumerate(payload):
            if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
                raise LinkError(f"cannot send a {t.dtype} tensor of {t.dim()} dimensions over the pipeline")
            at = 1 + i * (2 + MAX_DIMS)
            header[at], header[at + 1] = DTYPES.index(t.dtype), t.dim()
            header[at + 2:at + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        for t in [header.to(device), *payload]:
            self._works.append((dist.isend(t, peer, tag=tag), t))  # the tensor lives until the send is done
        self.bytes_sent += sum(t.numel() * t.element_size() for t in payload)

    async def receive(self, step: int, micro: int, kind: str, timeout: float | None = None) -> list[torch.Tensor]:
        peer, tag = self._peer(kind, sending=False), _tag(kind, micro)
        try:
            return await asyncio.to_thread(_receive, peer, tag)
        except RuntimeError as exc:  # gloo: the peer's connection closed, or the group's timeout
            raise LinkError(f"no {kind} of micro-batch {micro} (step {step}) from rank {peer}: {exc}") from None

    async def flush(self) -> None:
        works, self._works = self._works, []
        if not works:
            return
        try:
            await asyncio.to_thread(lambda: [work.wait() for work, _ in works])
        except RuntimeError as exc:
            raise LinkError(f"a neighbour did not take a pipeline message: {exc}") from None

    def fail_pending(self, error: Exception) -> None:
        self._works = []  # a blocked receive cannot be cancelled: it ends when its peer's connection does


def _tag(kind: str, micro: int) -> int:
    return micro * len(S.PIPE_KINDS) + S.PIPE_KINDS.index(kind)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _receive(peer: int, tag: int) -> list[torch.Tensor]:
    """One message from ``peer``: its header, checked, then tensors of exactly the shapes it names."""
    import torch.distributed as dist

    device = _device()
    header = torch.zeros(HEADER, dtype=torch.int64, device=device)
    dist.recv(header, peer, tag=tag)
    header = header.cpu().tolist()
    count, tensors = header[0], []
    if not 0 < count <= MAX_TENSORS:
        raise LinkError(f"rank {peer} sent a pipeline header for {count} tensors")
    for i in range(count):
        at = 1 + i * (2 + MAX_DIMS)
        dtype, dims = header[at], header[at + 1]
        shape = header[at + 2:at + 2 + dims] if 0 <= dims <= MAX_DIMS else []
        if not 0 <= dtype < len(DTYPES) or not 0 <= dims <= MAX_DIMS or any(d < 0 for d in shape) \
                or math.prod(shape) > MAX_ELEMENTS:
            raise LinkError(f"rank {peer} sent a malformed pipeline header {header}")
        tensor = torch.empty(shape, dtype=DTYPES[dtype], device=device)
        dist.recv(tensor, peer, tag=tag)
        tensors.append(tensor)
    return tensors
