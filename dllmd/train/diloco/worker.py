"""A DiLoCo worker: inner AdamW steps on its own rows, applied at once; every ``sync_every`` of them,
the token-weighted mean pseudo-gradient over the ring, then the outer step.

**Inner steps** (``train.inner``) use the same rows of the same global batches a synchronous job
gives this worker, the same summed loss and the same AdamW update (clipped by the local norm), on the
worker's *local* mean gradient: nothing crosses the network. A worker with no rows in a step takes no
step. Each worker's AdamW moments stay its own, across syncs. An inner step the coordinator sends
again (it lost another worker during it) is answered from the first time: taken once.

**The sync** (``train.sync``): each worker puts (outer weights - its weights) x its tokens since the
last sync into the flat buffer, with its loss sum and token count, and the job's reducer sums it
(exact or compressed, with error feedback); dividing by the summed tokens gives the pseudo-gradient
averaged over the workers, each weighted by the tokens it trained on (as a synchronous step weighs
each worker's gradient). It is kept, not applied: **the outer step** (``train.outer``) applies it with
Nesterov SGD to the outer weights, which every worker then continues from. A sync reset by a lost
peer is run again from the same inner weights (nothing was applied; the residual is the old one).
"""

from __future__ import annotations

import asyncio
import math
import time

import torch

from dllmd.failpoints import failpoint
from dllmd.net.messages.training import InnerStepped, OuterApplied, Synced
from dllmd.train.diloco.outer import OuterOptimizer
from dllmd.train.optim import TrainingState, apply_update, squared_norm
from dllmd.train.worker import TrainWorker

OUTER_PREFIX = "optim.outer."
INNER_PREFIX = "local.inner."


class DiLoCoWorker(TrainWorker):
    def __init__(self, spec, model: torch.nn.Module, collective):
        super().__init__(spec, model, collective)
        self.outer = OuterOptimizer(self.params.values(), spec.comm.outer_lr, spec.comm.outer_momentum)
        self.round_tokens, self.round_loss = 0, 0.0  # since the last outer step
        self._last_inner: InnerStepped | None = None

    async def inner_step(self, step: int, rows: list[tuple[str, int]], lr: float) -> InnerStepped:
        async with self.lock:
            if self._last_inner is not None and self._last_inner.step == step:
                return self._last_inner
            failpoint("train.step", step)
            started = time.perf_counter()
            flat = await asyncio.to_thread(self._gradients, rows, step)
            tokens, loss, norm = int(flat[-1]), None, None
            if tokens:
                result = await asyncio.to_thread(apply_update, self.model, self.optimizer, flat, lr,
                                                 self.spec.optim.grad_clip)
                loss, norm = result.loss, result.grad_norm
                self.round_tokens += tokens
                self.round_loss += result.loss * tokens
            self._last_inner = InnerStepped(step=step, rows=len(rows), tokens=tokens, loss=loss, grad_norm=norm,
                                            compute_s=time.perf_counter() - started)
            return self._last_inner

    async def sync(self, step: int) -> Synced:
        async with self.lock:
            self._pending = None
            self.reducer.discard()
            params = list(self.params.values())
            parts = await asyncio.to_thread(self.outer.pseudo_gradient, params, float(self.round_tokens))
            flat = torch.cat([*parts, torch.tensor([self.round_loss, float(self.round_tokens)])]).cpu()
            del parts
            reduced = await self.reducer.reduce(flat, step)
            tokens = float(flat[-1])
            if tokens > 0:
                flat[:-2].div_(tokens)
            self._pending = (step, flat)
            return Synced(step=step, tokens=int(tokens), loss=float(flat[-2]) / tokens if tokens else None,
                          pseudo_grad_norm=math.sqrt(squared_norm(flat[:-2])), comm_s=reduced.seconds,
                          bytes_sent=reduced.bytes_sent)

    async def outer_step(self, step: int) -> OuterApplied:
        async with self.lock:
            if self._pending is None or self._pending[0] != step:
                raise ValueError(f"outer step {step} was not synced here (or was reset); nothing to apply")
            _, flat = self._pending
            self._pending = None
            await asyncio.to_thread(self.outer.step, list(self.params.values()), flat[:-2])
            self.reducer.commit()
            self.round_tokens, self.round_loss = 0, 0.0
            return OuterApplied(step)

    async def apply(self, step: int, lr: float) -> dict:
        raise ValueError("a DiLoCo worker applies its inner steps itself and its outer steps with train.outer")

    # --- state: the outer weights and momentum are shared; every worker's inner AdamW is its own ----

    def state_names(self) -> list[str]:
        return [f"model.{name}" for name in self.params] + [f"{OUTER_PREFIX}{name}.momentum" for name in self.params]

    def state_tensor(self, name: str) -> torch.Tensor:
        if name.startswith(OUTER_PREFIX):
            return self.outer.buffers[self._index(name.removeprefix(OUTER_PREFIX).removesuffix(".momentum"))].cpu()
        return super().state_tensor(name)

    def load_state(self, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
        outer = {n: t for n, t in tensors.items() if n.startswith(OUTER_PREFIX)}
        with torch.no_grad():
            for name, tensor in outer.items():
                self.outer.buffers[self._index(name.removeprefix(OUTER_PREFIX).removesuffix(".momentum"))].copy_(tensor)
        super().load_state({n: t for n, t in tensors.items() if n not in outer}, optimizer_step)
        self.outer.reset_to(list(self.params.values()))  # a checkpoint is taken at a sync: inner = outer

    def _index(self, param_name: str) -> int:
        names = list(self.params)
        if param_name not in self.params:
            raise ValueError(f"no parameter {param_name!r} in this model")
        return names.index(param_name)

    def local_state_names(self) -> list[str]:
        inner = [f"{INNER_PREFIX}{name}.{slot}" for name in self.params for slot in ("exp_avg", "exp_avg_sq")]
        return inner + super().local_state_names()

    def local_state_tensor(self, name: str) -> torch.Tensor:
        if name.startswith(INNER_PREFIX):
            return super().state_tensor("optim." + name.removeprefix(INNER_PREFIX))
        return super().local_state_tensor(name)

    def load_local_state(self, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
        inner = {"optim." + n.removeprefix(INNER_PREFIX): t for n, t in tensors.items() if n.startswith(INNER_PREFIX)}
        if inner:
            TrainingState.load_state(self, inner, optimizer_step)  # the inner AdamW, not the outer weights
        super().load_local_state({n: t for n, t in tensors.items() if not n.startswith(INNER_PREFIX)},
                                 optimizer_step)
