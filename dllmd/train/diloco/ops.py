"""A node's DiLoCo operations (``train.inner``, ``train.sync``, ``train.outer``), beside the
data-parallel worker's in :mod:`dllmd.train.service`, which prepares a :class:`DiLoCoWorker` when the
job's plan asks for ``sync_every`` and shares the rest (ring, rows, backup, reset, state, release)."""

from __future__ import annotations

import torch

from dllmd.net.messages import training as S
from dllmd.net.schema import Op
from dllmd.train.diloco.worker import DiLoCoWorker


class DiLoCoOps:
    def __init__(self, service):
        self.service = service

    def handlers(self) -> list[tuple[Op, object]]:
        return [(S.TRAIN_INNER, self.inner), (S.TRAIN_SYNC, self.sync), (S.TRAIN_OUTER, self.outer)]

    def _worker(self, job: str) -> DiLoCoWorker:
        worker = self.service._worker(job)
        if not isinstance(worker, DiLoCoWorker):
            raise ValueError(f"job {job} does not run DiLoCo (--sync-every) on this node")
        return worker

    async def inner(self, a: S.InnerStepArgs, tensors: list[torch.Tensor]) -> S.InnerStepped:
        worker = self._worker(a.job)
        return await worker.inner_step(a.step, self.service.step_rows(worker.shards, a.step, a.shards, tensors), a.lr)

    async def sync(self, a: S.SyncArgs, _tensors) -> S.Synced:
        return await self._worker(a.job).sync(a.step)

    async def outer(self, a: S.SyncArgs, _tensors) -> S.OuterApplied:
        return await self._worker(a.job).outer_step(a.step)
