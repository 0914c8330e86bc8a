"""What runs next at a stage: admission of arriving steps, then batching.

A step is admitted only if it fits what its session opened with (its input's shape and dtype, its
position, its reservation); an admitted step waits in the :class:`StepScheduler`, which runs the
pending decode steps of different sessions as one batched forward pass (continuous batching:
sessions join and leave between passes) and, in between, the pending prefill chunks of different
sessions packed into one pass (up to MAX_PACKED_TOKENS), so a long prompt never stalls the sessions
that are decoding for more than one pass.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from dllmd.inference.sessions import Session
from dllmd.models.span import LayerSpan
from dllmd.net.messages.inference import MAX_BATCH, MAX_STEP_TOKENS, StepItem
from dllmd.net.server import HandlerError
from dllmd.net.wire import ErrorCode

MAX_ALL_LOGITS_TOKENS = 512  # "all" logits are [seq, vocab] fp32: keep replies small
# Tokens of one packed prefill pass: four 128-token chunks, or the whole prompts of many short
# requests. Bigger passes read the weights no less often per token and only delay the decode passes
# waiting behind them.
MAX_PACKED_TOKENS = 512


@dataclass
class PendingStep:
    session: Session
    item: StepItem
    inputs: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.inputs.shape[1]


def admit(span: LayerSpan, session: Session, item: StepItem, inputs: torch.Tensor) -> PendingStep:
    """The step as it will run, or HandlerError saying why it cannot (the session is then ended)."""
    check_input(span, inputs)
    tokens = inputs.shape[1]
    if tokens > MAX_STEP_TOKENS:
        raise HandlerError(ErrorCode.TOO_LARGE, f"at most {MAX_STEP_TOKENS} tokens per step; send long prompts "
                                                f"in chunks")
    if session.logits == "all" and tokens > MAX_ALL_LOGITS_TOKENS:
        raise HandlerError(ErrorCode.TOO_LARGE, f"logits='all' is limited to {MAX_ALL_LOGITS_TOKENS} tokens per step")
    # Steps queue up (a prompt's chunks arrive back to back): each must continue the one before.
    if item.start != session.queued_position:
        raise HandlerError(ErrorCode.CONFLICT, f"step starts at position {item.start} but the session is at "
                           f"{session.queued_position}; replay the session")
    if item.start + tokens > session.positions:
        raise HandlerError(ErrorCode.TOO_LARGE, f"position {item.start + tokens} is past the {session.positions} "
                                                f"positions this session reserved when it opened")
    session.queued_position += tokens
    session.touch()
    return PendingStep(session, item, inputs)


def check_input(span: LayerSpan, inputs: torch.Tensor) -> None:
    """Token ids for the first stage, hidden states of the span's dtype and width for the others."""
    if span.embed:
        if inputs.dtype != torch.int64 or inputs.dim() != 2 or inputs.shape[0] != 1 or inputs.shape[1] == 0:
            raise HandlerError(ErrorCode.BAD_ARGS, f"the first stage takes int64 token ids [1, seq]; got "
                                                   f"{str(inputs.dtype).removeprefix('torch.')} {list(inputs.shape)}")
        if int(inputs.max()) >= span.vocab_size or int(inputs.min()) < 0:
            raise HandlerError(ErrorCode.BAD_ARGS, f"token ids must be in [0, {span.vocab_size})")
        return
    hidden = span.config.hidden_size
    if (inputs.dtype != span.dtype or inputs.dim() != 3 or inputs.shape[0] != 1 or inputs.shape[1] == 0
            or inputs.shape[2] != hidden):
        raise HandlerError(ErrorCode.BAD_ARGS, f"stage [{span.start}, {span.end}) takes "
                           f"{str(span.dtype).removeprefix('torch.')} hidden states [1, seq, {hidden}]; got "
                           f"{str(inputs.dtype).removeprefix('torch.')} {list(inputs.shape)}")


class StepScheduler:
    """Pending steps of every session at this node, and the choice of what runs next.

    The oldest pending step decides: a decode step runs together with every other pending decode
    step of the same model, one per session; a prefill chunk runs packed with the other sessions'
    pending prefill chunks of that model (up to MAX_PACKED_TOKENS), where the span allows it; a step
    of a session that asked to run alone runs by itself. A session's steps always run in arrival order."""

    def __init__(self):
        self._pending: deque[PendingStep] = deque()
        self.ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, step: PendingStep) -> None:
        self._pending.append(step)
        self.ready.set()

    def queued_for(self, model: str) -> int:
        return sum(1 for p in self._pending if p.session.model == model)

    def take(self, live: Callable[[Session], bool],
             packable: Callable[[Session], bool] = lambda _: False) -> list[PendingStep]:
        """The next pass: one step alone, a batch of decode steps, or prefill chunks packed together
        (where ``packable`` says a session's span takes them). Steps of ended sessions are dropped."""
        self._pending = deque(p for p in self._pending if live(p.session))
        if not self._pending:
            self.ready.clear()
            return []
        first = self._pending[0]
        if self._batchable(first):
            return self._gather(first, self._batchable, MAX_BATCH)
        if first.tokens > 1 and first.session.batching and packable(first.session):
            return self._gather(first, lambda p: p.tokens > 1 and p.session.batching, MAX_PACKED_TOKENS)
        self._pending.popleft()
        return [first]

    def _gather(self, first: PendingStep, joins: Callable[[PendingStep], bool], budget: int) -> list[PendingStep]:
        """``first`` and, in arrival order, every other session's next step that ``joins`` and fits
        ``budget`` tokens (the first always fits)."""
        batch, seen, kept, tokens = [], set(), deque(), 0
        for pending in self._pending:
            session = pending.session
            fits = pending is first or (len(batch) < MAX_BATCH and tokens + pending.tokens <= budget)
            if fits and session.id not in seen and joins(pending) and session.model == first.session.model:
                batch.append(pending)
                tokens += pending.tokens
            else:
                kept.append(pending)
            seen.add(session.id)  # later steps of a session wait for its earlier ones
        self._pending = kept
        return batch

    @staticmethod
    def _batchable(pending: PendingStep) -> bool:
        return pending.tokens == 1 and pending.session.batching
