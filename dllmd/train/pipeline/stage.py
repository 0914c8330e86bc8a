"""One node's part of a pipeline job: a stage's layer span, its AdamW state, and its step.

The stage runs its schedule's actions for a step (micro-batches forward, then backward, in the
schedule's order), receiving activations from the previous stage and gradients from the next over
its :class:`PipeLinks`. The first stage reads the rows and embeds them; every stage passes each
micro-batch's labels on with its activations, so every stage knows the token count and the last
computes the summed loss. Then, as a data-parallel worker does, it sums its gradients over the
replicas of this stage (the ring; size 1 in a plain pipeline) and, for tied embeddings, between its
replica's first and last stage (a ring of two), and keeps them. ``apply`` steps AdamW with the
global gradient norm the coordinator added up from every stage's part.

Exactness: the span's modules compute what transformers' full model computes (see
:meth:`LayerSpan.forward_training`), each stage accumulates its gradients in micro-batch order
under either schedule, and the tied pair's sum is one ring's, bitwise equal on both ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from dllmd.failpoints import failpoint
from dllmd.models.span import LayerSpan
from dllmd.net.messages import training as S
from dllmd.train.footprint import LOGITS_BYTES_PER_VOCAB, layer_activation_bytes
from dllmd.train.heldout import EvalSums, token_sums
from dllmd.train.memory import SavedActivations
from dllmd.train.model import autocast, parameters, summed_cross_entropy
from dllmd.train.optim import OptimConfig, TrainingState, clip_and_step, flatten_grads, make_optimizer, mean_gradients, squared_norm
from dllmd.train.pipeline import schedule
from dllmd.train.pipeline.links import LinkError, PipeLinks
from dllmd.train.spares import ShardSet
from dllmd.train.worker import micro_batch

ACTIVATION, GRADIENT, EVALUATION = S.PIPE_KINDS


@dataclass
class StageSpec:
    job: str
    model: str
    dataset: str
    plan: S.StagePlan
    dtype: str = "float32"
    micro_batch_size: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def first(self) -> bool:
        return self.plan.index == 0

    @property
    def last(self) -> bool:
        return self.plan.index == self.plan.count - 1


def stage_memory_bytes(params: int, in_flight: int, micro_batch: int, seq_len: int, config: dict, layers: int,
                       head: bool, recompute: bool) -> int:
    """A rough peak for one stage: fp32 weights, gradients, two moments and the flat buffer the
    gradients are summed in, plus the saved activations of its in-flight micro-batches (only their
    inputs when recomputing, and one micro-batch's whole graph during its backward) and the head's
    logits."""
    per_micro = micro_batch * seq_len * layer_activation_bytes(config) * layers
    inputs = micro_batch * seq_len * int(config["hidden_size"]) * 4
    activations = (in_flight * inputs + per_micro) if recompute else in_flight * per_micro
    logits = micro_batch * seq_len * int(config["vocab_size"]) * LOGITS_BYTES_PER_VOCAB if head else 0
    return params * 4 * 5 + activations + logits


@dataclass
class _Saved:
    """What a micro-batch's backward needs from its forward."""

    inputs: torch.Tensor
    labels: torch.Tensor
    output: torch.Tensor | None  # None when recomputing: the backward runs the forward again
    activation_bytes: int


class StageWorker(TrainingState):
    def __init__(self, spec: StageSpec, span: LayerSpan, collective, tied, links: PipeLinks):
        self.spec = spec
        self.span = span.train()
        self.params = dict(parameters(span))  # name -> parameter, in the fixed order of the flat buffer
        self.optimizer = make_optimizer(span, spec.optim)
        self.collective = collective  # the ring over this stage's replicas
        self.tied = tied  # the ring of this replica's first and last stage (tied embeddings), or None
        self.links = links
        self.shards = ShardSet()  # the service gives it the job's spares directory
        # Parameter name -> its name in the model's checkpoint (a tied head is the embedding matrix).
        names = {f"parts.{key}": name for key, name in span.parts.checkpoint_names(span.config).items()}
        self.state_params = {names[n]: p for n, p in self.params.items()}
        self._tied_range = self._tied_slice() if tied is not None else None
        self._saved_activations = SavedActivations(self.params.values())
        self._pending: tuple[int, torch.Tensor] | None = None
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()

    def _tied_slice(self) -> tuple[int, int]:
        """Where the embedding matrix (first stage) or its tied copy, the head (last), lies in the flat buffer."""
        wanted = "parts.embed_tokens.weight" if self.spec.first else "parts.lm_head.weight"
        offset = 0
        for name, param in self.params.items():
            if name == wanted:
                return offset, offset + param.numel()
            offset += param.numel()
        raise ValueError(f"stage {self.spec.plan.index} has no {wanted} to tie")

    async def form_ring(self, generation: int, rank: int, members) -> None:
        self._pending = None
        await self.collective.form(generation, rank, members)

    # --- a step --------------------------------------------------------------------------------

    async def step(self, step: int, micro_batches: int, rows: list[tuple[str, int]]) -> S.StageStepped:
        async with self.lock:
            failpoint("train.stage_step", step)
            self._pending = None
            plan = self.spec.plan
            b = self.spec.micro_batch_size
            if self.spec.first:
                micro_batches = (len(rows) + b - 1) // b
            started = time.perf_counter()
            clock = _Clock()
            self.links.bytes_sent = 0
            self.optimizer.zero_grad(set_to_none=True)
            saved: dict[int, _Saved] = {}
            loss, tokens, held, peak = 0.0, 0, 0, 0
            for action in schedule.actions(plan.schedule, plan.index, plan.count, micro_batches):
                i = action.micro
                if action.kind == schedule.FORWARD:
                    if self.spec.first:
                        ids, labels = micro_batch(self.shards, rows[i * b:(i + 1) * b])
                        inputs = ids.long()
                    else:
                        inputs, labels = await clock.waiting(self._activation(step, i))
                    output, count, saved_bytes = await clock.computing(self._forward, inputs, labels)
                    tokens += count
                    if self.spec.last:
                        loss += float(output.detach())
                    else:
                        self.links.send(ACTIVATION, step, i, [output.detach(), labels])
                    saved[i] = _Saved(inputs, labels, None if plan.recompute else output, saved_bytes)
                    held += saved_bytes
                    peak = max(peak, held)
                else:
                    micro = saved.pop(i)
                    grad = None if self.spec.last else await clock.waiting(self._gradient(step, i))
                    input_grad, recomputed = await clock.computing(self._backward, micro, grad)
                    peak = max(peak, held + recomputed)
                    held -= micro.activation_bytes
                    if not self.spec.first:
                        self.links.send(GRADIENT, step, i, [input_grad])
            sent = self.links.bytes_sent
            await clock.waiting(self.links.flush())
            pipeline_s = time.perf_counter() - started
            flat = await asyncio.to_thread(flatten_grads, self.span, loss, tokens)
            reduced = time.perf_counter()
            await self.collective.allreduce(flat, step)
            if self.tied is not None:
                lo, hi = self._tied_range
                await self.tied.allreduce(flat[lo:hi], step)
            comm_s = time.perf_counter() - reduced
            grads, mean_loss, global_tokens = mean_gradients(flat)
            # The tied copy on the last stage is the first stage's matrix: count it once, there.
            own = grads[:self._tied_range[0]] if self.tied is not None and not self.spec.first else grads
            self._pending = (step, grads)
            return S.StageStepped(step=step, micro_batches=micro_batches, rows=len(rows), tokens=global_tokens,
                                  loss=mean_loss if self.spec.last else None, squared_norm=squared_norm(own),
                                  compute_s=clock.compute_s, wait_s=clock.wait_s, pipeline_s=pipeline_s, comm_s=comm_s,
                                  bytes_sent=sent, activation_bytes=peak)

    async def evaluate(self, step: int, micro_batches: int, rows: list[tuple[str, int]]) -> EvalSums:
        """A forward-only pass of held-out rows through the pipeline, micro-batch by micro-batch: the
        first stage embeds its rows, each stage passes its output on (kind ``evaluation``), the last
        scores the logits. The last stage's sums are the whole model's (every stage holds the weights of
        the same step); the others return zeros."""
        async with self.lock:
            b = self.spec.micro_batch_size
            if self.spec.first:
                micro_batches = (len(rows) + b - 1) // b
            total = EvalSums()
            for i in range(micro_batches):
                if self.spec.first:
                    ids, labels = micro_batch(self.shards, rows[i * b:(i + 1) * b])
                    inputs = ids.long()
                else:
                    inputs, labels = await self._activation(step, i, EVALUATION)
                output = await asyncio.to_thread(self._score, inputs, labels)
                if self.spec.last:
                    total = total + output
                else:
                    self.links.send(EVALUATION, step, i, [output, labels])
            await self.links.flush()
            return total

    @torch.no_grad()
    def _score(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | EvalSums:
        """One micro-batch forward, no graph: hidden states, or on the last stage its sums."""
        positions = torch.arange(inputs.shape[1])[None]
        self.span.eval()
        try:
            with autocast(self.span.device, self.spec.dtype):
                output = self.span.forward_training(inputs, positions)
        finally:
            self.span.train()
        return token_sums(output, labels) if self.spec.last else output

    async def _activation(self, step: int, micro: int, kind: str = ACTIVATION) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = await self.links.receive(step, micro, kind)
        hidden_size = self.span.config.hidden_size
        if (len(tensors) != 2 or tensors[0].dim() != 3 or tensors[0].shape[-1] != hidden_size
                or not tensors[0].is_floating_point() or tensors[1].dtype != torch.int64
                or tuple(tensors[1].shape) != tuple(tensors[0].shape[:2])):
            raise ValueError(f"the previous stage sent malformed activations for micro-batch {micro}")
        return tensors[0].to(self.span.dtype), tensors[1]

    async def _gradient(self, step: int, micro: int) -> torch.Tensor:
        tensors = await self.links.receive(step, micro, GRADIENT)
        if len(tensors) != 1 or not tensors[0].is_floating_point():
            raise ValueError(f"the next stage sent a malformed gradient for micro-batch {micro}")
        return tensors[0]

    def _forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """One micro-batch forward: the output (hidden states, or the summed loss on the last stage),
        its target count and the activation bytes it keeps for the backward."""
        count = int((labels != -100).sum())
        if self.spec.plan.recompute:
            with torch.no_grad():
                output = self._run(inputs, labels)
            return output, count, inputs.numel() * inputs.element_size()
        if not self.spec.first:
            inputs.requires_grad_()
        with self._saved_activations.counting() as saved:
            output = self._run(inputs, labels)
        saved.setdefault(inputs.untyped_storage().data_ptr(), inputs.untyped_storage().nbytes())  # held till B
        return output, count, sum(saved.values())

    def _run(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs.shape[1])[None]
        with autocast(self.span.device, self.spec.dtype):
            output = self.span.forward_training(inputs, positions)
        return summed_cross_entropy(output, labels)[0] if self.spec.last else output

    def _backward(self, micro: _Saved, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
        """One micro-batch backward; the gradient of its inputs (None on the first stage, whose inputs
        are token ids) and the bytes a recomputed forward held."""
        output, recomputed = micro.output, 0
        if output is None:
            if not self.spec.first:
                micro.inputs.requires_grad_()
            with self._saved_activations.counting() as saved:
                output = self._run(micro.inputs, micro.labels)
            recomputed = sum(saved.values())
        if grad is None:
            output.backward()
        else:
            if tuple(grad.shape) != tuple(output.shape):
                raise ValueError(f"the next stage sent a gradient of shape {tuple(grad.shape)} for activations "
                                 f"of shape {tuple(output.shape)}")
            output.backward(grad.to(output.device, output.dtype))
        return (None if self.spec.first else micro.inputs.grad.detach()), recomputed

    async def apply(self, step: int, lr: float, grad_norm: float) -> dict:
        async with self.lock:
            if self._pending is None or self._pending[0] != step:
                raise ValueError(f"step {step} was not computed here (or was reset); nothing to apply")
            _, grads = self._pending
            self._pending = None
            await asyncio.to_thread(clip_and_step, list(self.params.values()), self.optimizer, grads, grad_norm, lr,
                                    self.spec.optim.grad_clip)
            return {"step": step}

    def reset(self, reason: str) -> None:
        """Drop a half-done step (a peer died): the stage stays at the last applied step."""
        self.collective.abort(reason)
        if self.tied is not None:
            self.tied.abort(reason)
        self.links.fail_pending(LinkError(reason))
        self._pending = None

    def close(self, keep_spares: bool = False) -> None:
        self.shards.close(keep_spares)
        self.links.fail_pending(RuntimeError("the stage was released"))
        self.collective.close()
        if self.tied is not None:
            self.tied.close()


class _Clock:
    """A step's time: computing (forward and backward passes, off the event loop) and waiting."""

    def __init__(self):
        self.compute_s = self.wait_s = 0.0

    async def computing(self, fn, *args):
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self.compute_s += time.perf_counter() - started

    async def waiting(self, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.wait_s += time.perf_counter() - started
