"""One node's part of a data-parallel job: a full replica, the shards it computes, and its ring.

The coordinator drives it step by step. ``step`` computes the summed gradient of this worker's rows
of the global batch (micro-batch by micro-batch) and all-reduces it; the result is kept, not
applied. Only when every worker has reported its step does the coordinator send ``apply``, so a
node dying mid-step leaves all survivors at the last completed step, with identical weights.

A DP-SGD worker (``WorkerSpec.privacy``) sums clipped per-example gradients instead, and adds the
step's seeded noise to the all-reduced sum before it keeps it (``dllmd.train.privacy``). A job that
communicates less (``WorkerSpec.comm``) sums through a compressing reducer with error feedback
(``dllmd.train.compression``), or bucket by bucket during the backward (``dllmd.train.overlap``);
DiLoCo's worker is :class:`dllmd.train.diloco.worker.DiLoCoWorker`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dllmd.failpoints import failpoint
from dllmd.net.messages.training import CommPlan, PrivacyPlan
from dllmd.train.compression import reducer_for
from dllmd.train.heldout import EvalSums, score_rows
from dllmd.train.model import load_causal_lm, loss_sum, parameters, row_targets
from dllmd.train.optim import OptimConfig, TrainingState, apply_update, flatten_grads, make_optimizer, squared_norm
from dllmd.train.overlap import OverlappedBackward
from dllmd.train.privacy.clipping import clipped_gradient_sum
from dllmd.train.privacy.dpsgd import apply_private_update, batch_loss, privatize
from dllmd.train.ring import RingMember
from dllmd.train.spares import ShardSet


@dataclass
class ShardRows:
    """A shard's packed rows in memory: int32 ``[rows, seq_len]`` and where its real stream ends;
    ``origin``: for a subset of a shard (a federated client's trained or held-out rows), each row's index
    in the whole shard, which says where its targets stop."""
    tokens: torch.Tensor
    valid_tokens: int
    origin: torch.Tensor | None = None

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(indices, dtype=torch.long)
        tokens = self.tokens[index]
        offsets = (index if self.origin is None else self.origin[index]) * self.tokens.shape[1]
        return tokens, row_targets(tokens, offsets, torch.full_like(offsets, self.valid_tokens))

    def subset(self, indices) -> "ShardRows":
        index = torch.as_tensor(indices, dtype=torch.long)
        origin = index if self.origin is None else self.origin[index]
        return ShardRows(self.tokens[index], self.valid_tokens, origin)


def micro_batch(shards: Mapping[str, ShardRows], rows: Sequence[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of ``(shard, row)`` pairs, in their order: one forward pass of a micro-batch,
    whichever shards its rows come from (every shard of a dataset has the same row length)."""
    parts = [shards[shard].batch([index]) for shard, index in rows]
    return torch.cat([tokens for tokens, _ in parts]), torch.cat([labels for _, labels in parts])


def micro_batches(shards: Mapping[str, ShardRows], rows: Sequence[tuple[str, int]],
                  size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``rows`` as consecutive micro-batches of ``size`` rows."""
    for start in range(0, len(rows), size):
        yield micro_batch(shards, rows[start:start + size])


def private_gradients(model: torch.nn.Module, shards: Mapping[str, ShardRows], rows: Sequence[tuple[str, int]],
                      micro_batch_size: int, clip: float) -> torch.Tensor:
    """DP-SGD's flat buffer of ``rows``: their clipped per-example gradients summed, the summed token
    loss and the token count (all zero for no rows: a Poisson batch can miss a worker's shards)."""
    total, count = clipped_gradient_sum(model, micro_batches(shards, rows, micro_batch_size), clip)
    return flatten_grads(model, total, count)


@dataclass
class WorkerSpec:
    job: str
    model: str
    dataset: str
    dtype: str = "float32"
    micro_batch_size: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    plaintext: bool = False
    backend: str = "zmq"
    privacy: PrivacyPlan | None = None  # DP-SGD: per-example clipping, seeded noise, no global clip
    comm: CommPlan | None = None  # DiLoCo, compression, overlap (None: none of them)


class TrainWorker(TrainingState):
    def __init__(self, spec: WorkerSpec, model: torch.nn.Module, collective):
        self.spec = spec
        self.model = model
        self.params = dict(parameters(model))  # name -> parameter, in the fixed order
        self.state_params = self.params  # checkpoints name them as the model does
        self.optimizer = make_optimizer(model, spec.optim)
        self.collective = collective  # RingCollective or TorchCollective
        self.reducer = reducer_for(spec.comm, collective, [p.shape for p in self.params.values()])
        self.overlap = (OverlappedBackward(list(self.params.values()), collective, spec.comm.bucket_bytes)
                        if spec.comm is not None and spec.comm.overlap else None)
        self.shards = ShardSet()  # the service gives it the job's spares directory
        self.eval_shards: dict[str, ShardRows] = {}  # this node's shard of --eval-data, never trained on
        self._pending: tuple[int, torch.Tensor] | None = None  # (step, summed buffer) awaiting apply
        self.lock = asyncio.Lock()  # one step or apply at a time
        self.last_used = time.monotonic()

    @classmethod
    def build(cls, spec: WorkerSpec, config_dir, files, device, collective) -> "TrainWorker":
        return cls(spec, load_causal_lm(config_dir, files, device), collective)

    async def form_ring(self, generation: int, rank: int, members: list[RingMember]) -> None:
        self._pending = None
        self.reducer.discard()
        await self.collective.form(generation, rank, members)

    async def step(self, step: int, rows: list[tuple[str, int]]) -> dict:
        async with self.lock:
            failpoint("train.step", step)
            self._pending = None
            self.reducer.discard()
            started = time.perf_counter()
            if self.overlap is not None:
                batches = list(micro_batches(self.shards, rows, self.spec.micro_batch_size))
                self.optimizer.zero_grad(set_to_none=True)
                flat, overlapped = await self.overlap.gradients(self.model, batches, self.spec.dtype, step)
                compute_s, comm_s, exposed_s, sent = (overlapped.compute_s, overlapped.comm_s, overlapped.exposed_s,
                                                      overlapped.bytes_sent)
            else:
                flat = await asyncio.to_thread(self._gradients, rows, step)
                compute_s = time.perf_counter() - started
                reduced = await self.reducer.reduce(flat, step)
                comm_s = exposed_s = reduced.seconds
                sent = reduced.bytes_sent
            tokens = float(flat[-1])
            if self.spec.privacy is not None:  # the noise goes on the global sum, once: every worker holds it
                await asyncio.to_thread(privatize, flat, self.spec.privacy, step)
                norm = math.sqrt(squared_norm(flat[:-2]))
            else:
                norm = math.sqrt(squared_norm(flat[:-2])) / tokens if tokens else None
            self._pending = (step, flat)
            loss, scale = batch_loss(flat), failpoint("train.loss", step)
            if scale is not None and loss is not None:
                loss *= scale
            return {"step": step, "rows": len(rows), "loss": loss, "tokens": int(tokens),
                    "grad_norm": norm, "compute_s": compute_s, "comm_s": comm_s, "comm_exposed_s": exposed_s,
                    "bytes_sent": sent}

    async def evaluate(self, shards: Mapping[str, ShardRows], rows: list[tuple[str, int]]) -> EvalSums:
        """Held-out rows under the current weights (between steps: the lock keeps a step out)."""
        async with self.lock:
            return await asyncio.to_thread(score_rows, self.model, shards, rows, self.spec.micro_batch_size,
                                           self.spec.dtype)

    def _gradients(self, rows: list[tuple[str, int]], step: int) -> torch.Tensor:
        """The summed loss gradient over this worker's rows (zero if it has none this step)."""
        failpoint("train.compute", step)
        if self.spec.privacy is not None:
            return private_gradients(self.model, self.shards, rows, self.spec.micro_batch_size,
                                     self.spec.privacy.clip)
        self.optimizer.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        for tokens, labels in micro_batches(self.shards, rows, self.spec.micro_batch_size):
            loss, n = loss_sum(self.model, tokens, labels, self.spec.dtype)
            loss.backward()
            total += float(loss.detach())
            count += n
        return flatten_grads(self.model, total, count)

    async def apply(self, step: int, lr: float) -> dict:
        async with self.lock:
            if self._pending is None or self._pending[0] != step:
                raise ValueError(f"step {step} was not computed here (or was reset); nothing to apply")
            _, flat = self._pending
            self._pending = None
            if self.spec.privacy is not None:
                result = await asyncio.to_thread(apply_private_update, self.model, self.optimizer, flat, lr)
            else:
                result = await asyncio.to_thread(apply_update, self.model, self.optimizer, flat, lr,
                                                 self.spec.optim.grad_clip)
            self.reducer.commit()
            return {"step": step, "loss": result.loss, "grad_norm": result.grad_norm}

    def reset(self, reason: str) -> None:
        """Drop a half-done step (a peer died): the replica stays at the last applied step."""
        self.collective.abort(reason)
        self._pending = None
        self.reducer.discard()

    # --- this worker's own state (error feedback; DiLoCo's inner AdamW): checkpoints hold every worker's

    def local_state_names(self) -> list[str]:
        return [f"local.{name}" for name in self.reducer.state()]

    def local_state_tensor(self, name: str) -> torch.Tensor:
        return self.reducer.state()[name.removeprefix("local.")].detach().cpu()

    def load_local_state(self, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
        self.reducer.load({name.removeprefix("local."): tensor for name, tensor in tensors.items()})

    def close(self, keep_spares: bool = False) -> None:
        self.shards.close(keep_spares)
        if self.overlap is not None:
            self.overlap.close()
        self.collective.close()
