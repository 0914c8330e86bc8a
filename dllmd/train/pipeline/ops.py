"""A node's pipeline-stage operations (``train.links``, ``train.pipe``, ``train.stage_step``, ...), beside
the data-parallel worker's in :mod:`dllmd.train.service`, which routes ``train.prepare`` with a
stage plan here and shares the rest (ring, rows, backup, reset, state, release) with them.

Checkpoint parts: each stage writes its own part of a checkpoint on its own node
(``<home>/jobs/<job>/parts/stage-K/step-N/``, the layout of :mod:`dllmd.train.checkpoint`, signed by
this node's key); ``train.fetch_part`` copies one from the node holding it, so that a part always
lives on two nodes; ``train.load_part`` loads this stage's part, copying it first when this node
has none.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig

from dllmd import hardware
from dllmd.config import bind_host
from dllmd.models.span import LayerSpan, expected_weight_bytes
from dllmd.net.chunked import int8_tensor
from dllmd.net.messages import training as S
from dllmd.net.schema import Op
from dllmd.net.server import Call, Operation, RpcServer
from dllmd.train.checkpoint import Checkpoints
from dllmd.train.collective import RingCollective
from dllmd.train.optim import OptimConfig
from dllmd.train.pipeline import schedule
from dllmd.train.pipeline.links import SEND_TIMEOUT_S, PipeLinks
from dllmd.train.pipeline.parts import part_root
from dllmd.train.pipeline.stage import StageSpec, StageWorker, stage_memory_bytes
from dllmd.train.pipeline.torchdist import TorchPipelineGroup
from dllmd.train.ring import RingSocket


class StageOps:
    def __init__(self, service):
        self.service = service

    def handlers(self) -> list[tuple[Op, object]]:
        """The operations the service registers like its own (``train.pipe`` is registered apart: it
        needs to know who sent it)."""
        return [(S.TRAIN_LINKS, self.links), (S.TRAIN_STAGE_STEP, self.step),
                (S.TRAIN_STAGE_APPLY, self.apply), (S.TRAIN_SAVE_PART, self.save_part),
                (S.TRAIN_READ_PART, self.read_part), (S.TRAIN_FETCH_PART, self.fetch_part),
                (S.TRAIN_LOAD_PART, self.load_part), (S.TRAIN_STAGE_EVALUATE, self.evaluate)]

    def register(self, server: RpcServer) -> None:
        async def pipe(call: Call):
            return await self.service._rpc(functools.partial(self.pipe, sender=call.caller.public_key))(call)

        server.register(Operation(S.TRAIN_PIPE, pipe))

    def _stage(self, job: str) -> StageWorker:
        worker = self.service._worker(job)
        if not isinstance(worker, StageWorker):
            raise ValueError(f"job {job} runs a data-parallel replica on this node, not a pipeline stage")
        return worker

    def parts(self, job: str, stage: int, trusted: list[str] | None = None) -> Checkpoints:
        return Checkpoints(part_root(self.service.home, job, stage), self.service.identity, trusted)

    # --- preparing a stage -----------------------------------------------------------------------

    async def prepare(self, a: S.WorkerPrepareArgs, config_path: Path, shard, admins: list[str]) -> dict:
        """Load the stage's span (only its tensors), bind its ring sockets, check its memory."""
        plan = a.stage
        config = AutoConfig.from_pretrained(config_path.parent)
        layers = int(config.num_hidden_layers)
        if not (0 <= plan.start < plan.end <= layers) or plan.index >= plan.count or plan.count < 2:
            raise ValueError(f"stage {plan.index} of {plan.count} with layers [{plan.start}, {plan.end}) does not "
                             f"fit {a.model}'s {layers} layers (a pipeline has at least two stages)")
        if plan.schedule not in S.SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(S.SCHEDULES)}, not {plan.schedule!r}")
        embed, head = plan.index == 0, plan.index == plan.count - 1
        if embed != (plan.start == 0) or head != (plan.end == layers):
            raise ValueError("the first stage must start at layer 0 and the last end at the last layer")
        manifest, files = await asyncio.to_thread(self.service.models.verified_span, a.model, plan.start, plan.end,
                                                  embed, head, admins)
        if manifest.quantization is not None:
            raise ValueError(f"{a.model} is stored quantized; training needs its full-precision weights")
        seq_len = shard.tokens.shape[1] if shard else 2048
        in_flight = schedule.in_flight(schedule.actions(plan.schedule, plan.index, plan.count, plan.micro_batches))
        params = expected_weight_bytes(config, plan.start, plan.end, embed=embed, head=head, dtype=torch.float32) // 4
        need = stage_memory_bytes(params, in_flight, a.micro_batch_size, seq_len, config.to_dict(),
                                  plan.end - plan.start, head, plan.recompute)
        device = hardware.best_device()
        free = hardware.gpus()[0]["memory_free"] if device.type == "cuda" else psutil.virtual_memory().available
        name = self.service.config.name
        if need > free:
            raise ValueError(f"node {name} has {free / 2**30:.1f} GiB free but stage {plan.index} of {a.model} "
                             f"(layers {plan.start}-{plan.end - 1}) with AdamW needs about {need / 2**30:.1f} GiB: "
                             f"add stages, lower --micro-batch-size, use --schedule 1f1b or --recompute")
        tied = bool(getattr(config, "tie_word_embeddings", False)) and (embed or head)
        if a.backend == "torch":
            group = TorchPipelineGroup(bind_host(self.service.config.listen), plan.count, plan.index, tied)
            collectives, links, ports = [group.ring] + ([group.tied] if tied else []), group.links, [group.port] * 2
        else:
            sockets = [self._ring_socket(a.plaintext, offset) for offset in range(2 if tied else 1)]
            collectives, links = [RingCollective(s) for s in sockets], PipeLinks(a.job, self._send)
            ports = [c.port for c in collectives] + [0]
        spec = StageSpec(job=a.job, model=a.model, dataset=a.dataset, plan=plan, dtype=a.dtype,
                         micro_batch_size=a.micro_batch_size,
                         optim=OptimConfig(lr=a.lr, grad_clip=a.grad_clip, weight_decay=a.weight_decay))
        source = self.service.models.tensor_source(a.model, files)

        def build() -> StageWorker:
            span = LayerSpan(config, plan.start, plan.end, embed=embed, head=head, tensors=source,
                             dtype=torch.float32, device=device)
            return StageWorker(spec, span, collectives[0], collectives[1] if tied else None, links)

        try:
            worker = await asyncio.to_thread(build)
        except Exception:
            for collective in collectives:
                collective.close()
            raise
        worker.shards.directory = self.service.spares_directory(a.job)
        held = await asyncio.to_thread(worker.shards.adopt)
        if shard is not None:
            worker.shards[self.service.identity.public_key] = shard
        self.service.workers[a.job] = worker
        return {"ring_port": ports[0], "tied_port": ports[1] if tied else 0, "spares": held,
                "rows": int(shard.tokens.shape[0]) if shard else 0, "seq_len": seq_len, "device": str(device),
                "params": sum(p.numel() for p in worker.params.values()), "memory_needed": need}

    def _ring_socket(self, plaintext: bool, offset: int) -> RingSocket:
        config = self.service.config
        port = config.ring_port + offset if config.ring_port else 0  # the tied ring: the next port
        return RingSocket(self.service.identity, bind_host(config.listen), port, plaintext=plaintext,
                          authorized=self.service.keys.admits)

    async def _send(self, node: S.NodeRef, args: dict, tensors: list[torch.Tensor]) -> None:
        await self.service.call(node, S.TRAIN_PIPE.name, args, tensors, timeout=SEND_TIMEOUT_S)

    # --- a step ----------------------------------------------------------------------------------

    async def links(self, a: S.LinksArgs, _tensors) -> dict:
        worker = self._stage(a.job)
        worker.links.form(a.generation, a.previous, a.next)
        if worker.tied is not None:
            if a.tied_rank < 0 or len(a.tied_members) != 2:
                raise ValueError("a stage holding a tied embedding needs its two-member tied ring")
            members = self.service.ring_members(a.tied_members)
            await worker.tied.form(a.generation, a.tied_rank, members)
        return {"generation": a.generation}

    async def pipe(self, a: S.PipeArgs, tensors: list[torch.Tensor], sender: str) -> dict:
        if a.kind not in S.PIPE_KINDS:
            raise ValueError(f"a pipeline message is one of {', '.join(S.PIPE_KINDS)}, not {a.kind!r}")
        self._stage(a.job).links.deliver(a.generation, a.step, a.micro, a.kind, tensors, sender)
        return {}

    async def step(self, a: S.StageStepArgs, tensors: list[torch.Tensor]) -> S.StageStepped:
        worker = self._stage(a.job)
        rows = self.service.step_rows(worker.shards, a.step, a.shards, tensors) if worker.spec.first else []
        return await worker.step(a.step, a.micro_batches, rows)

    async def apply(self, a: S.StageApplyArgs, _tensors) -> dict:
        return await self._stage(a.job).apply(a.step, a.lr, a.grad_norm)

    async def evaluate(self, a: S.EvaluateArgs, tensors: list[torch.Tensor]) -> S.Evaluated:
        worker = self._stage(a.job)
        if a.eval_data:
            raise ValueError("a pipeline scores held-out rows of its own dataset (--eval-fraction) only")
        rows = self.service.step_rows(worker.shards, a.step, a.shards, tensors) if worker.spec.first else []
        sums = await worker.evaluate(a.step, a.micro_batches, rows)
        return S.Evaluated(sums.nll, sums.tokens, sums.correct)

    # --- checkpoint parts ------------------------------------------------------------------------

    async def save_part(self, a: S.SavePartArgs, _tensors) -> S.PartInfo:
        """Write this stage's part of checkpoint ``step`` on this node (weights, moments, RNG)."""
        worker = self._stage(a.job)
        async with worker.lock:  # not while a step changes the state
            plan = worker.spec.plan
            tensors = {n: worker.state_tensor(n) for n in worker.state_names()}
            state = {**a.state, "stage": plan.index, "stages": plan.count, "start": plan.start, "end": plan.end,
                     "optimizer_step": worker.optimizer_step(),
                     "torch_rng": torch.get_rng_state().numpy().tobytes().hex()}
            config = self.service.models.config_path(worker.spec.model).read_bytes()
            store = self.parts(a.job, plan.index)
            described = await asyncio.to_thread(store.write, a.step, tensors, config, state)
        return S.PartInfo(stage=plan.index, step=a.step, bytes=described["bytes"],
                          signer=self.service.identity.public_key)

    async def read_part(self, a: S.PartReadArgs, _tensors) -> tuple[S.CheckpointChunk, list[torch.Tensor]]:
        store = self.parts(a.job, a.stage, [a.signer])
        reply, chunk = await asyncio.to_thread(store.read_chunk, a.step, a.file, a.offset)
        return reply, [int8_tensor(chunk)]

    async def fetch_part(self, a: S.FetchPartArgs, _tensors) -> S.PartInfo:
        """Copy stage ``stage``'s part of checkpoint ``step`` from ``holder`` (signed by ``signer``)."""
        store = self.parts(a.job, a.stage, [a.signer])
        described = await store.copy_from(a.step, self._reader(a.holder, a.job, a.stage, a.step, a.signer))
        return S.PartInfo(stage=a.stage, step=a.step, bytes=described["bytes"], signer=a.signer)

    def _reader(self, holder: S.NodeRef, job: str, stage: int, step: int, signer: str):
        async def read(file: str, offset: int):
            chunk, tensors = await self.service.invoke(holder, S.TRAIN_READ_PART,
                                                       {"job": job, "stage": stage, "step": step, "file": file,
                                                        "offset": offset, "signer": signer}, timeout=120)
            if len(tensors) != 1 or tensors[0].dtype != torch.int8:
                raise ValueError(f"{holder.name} sent a malformed chunk of a checkpoint part")
            return chunk, tensors[0].numpy().tobytes()
        return read

    async def load_part(self, a: S.LoadPartArgs, _tensors) -> S.PartInfo:
        """Load this stage's part of checkpoint ``step``, copying it from ``holder`` first if needed."""
        worker = self._stage(a.job)
        index = worker.spec.plan.index
        store = self.parts(a.job, index, [a.signer])
        if a.step not in store.steps():
            await store.copy_from(a.step, self._reader(a.holder, a.job, index, a.step, a.signer))
        tensors, state = await asyncio.to_thread(store.read, a.step)
        if set(tensors) != set(worker.state_names()) or (state["start"], state["end"]) != (worker.spec.plan.start,
                                                                                          worker.spec.plan.end):
            raise ValueError(f"the part of stage {index} at step {a.step} holds other layers than this stage")
        torch.set_rng_state(torch.frombuffer(bytearray(bytes.fromhex(state["torch_rng"])), dtype=torch.uint8))
        async with worker.lock:
            await asyncio.to_thread(worker.load_state, tensors, state["optimizer_step"])
        return S.PartInfo(stage=index, step=a.step, bytes=store.describe(a.step)["bytes"], signer=a.signer)
