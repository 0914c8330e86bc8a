"""PowerSGD (Vogels, Karimireddy and Jaggi, NeurIPS 2019): each matrix of the buffer summed as
rank-R factors, with error feedback and a warm start.

For every 2-D parameter M (n x m) worth compressing (as torch's hook decides: (n + m) R x 2 < n m),
with Q (m x R) from the previous step:

    P_w = M_w Q            all-reduced (summed), then orthogonalized: P
    Q_w = M_w^T P          all-reduced: Q           M's sum is read back as P Q^T

where M_w is this worker's buffer plus its residual. One power iteration per step; Q is kept for the
next step (the warm start, so the iterations add up over steps) and orthogonalized before its use.
Everything else (vectors, and matrices too small to gain) travels uncompressed in the same float32
all-reduce as the P factors, with the loss sum and token count.

The residual is the paper's local one: e_w = M_w - P Q_w^T, what this worker's own share of the
approximation left out (the approximation is linear in the workers' Q_w, so the shares add up to
P Q^T). torch's ``powerSGD_hook`` keeps ``M_w - P Q^T / n`` instead, which leaves the workers the
same residual in total but spreads it differently. Its other state logic is followed: a Q per
matrix kept across steps, the first Q drawn from a seed every worker shares, Gram-Schmidt.

Every worker ends with the same P and Q, hence the same sum, bit for bit: the ring sums P and Q as
it sums gradients, and the orthogonalization is the same deterministic arithmetic everywhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from dllmd.train.compression.reducers import FeedbackReducer, Reduced, call_tag, chunked, unchunked

MIN_COMPRESSION_RATE = 2  # torch's default: compress only where it sends at most half the values
ORTHOGONALIZATION_EPS = 1e-8  # a column of zeros (no gradient at all) stays finite


@dataclass(frozen=True)
class Matrix:
    offset: int  # in the flat buffer
    rows: int
    cols: int
    rank: int


def split(shapes: list[torch.Size], rank: int) -> tuple[list[Matrix], list[tuple[int, int]]]:
    """The parameters (in buffer order) compressed as matrices, and the ``(offset, count)`` ranges
    sent as they are."""
    matrices, plain, offset = [], [], 0
    for shape in shapes:
        count = shape.numel()
        if len(shape) == 2:
            n, m = shape
            r = min(n, m, rank)
            if (n + m) * r * MIN_COMPRESSION_RATE < n * m:
                matrices.append(Matrix(offset, n, m, r))
                offset += count
                continue
        plain.append((offset, count))
        offset += count
    return matrices, plain


def orthogonalize(columns: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``columns`` [n, r], in place."""
    for i in range(columns.shape[1]):
        col = columns[:, i:i + 1]
        col.div_(torch.linalg.vector_norm(col) + ORTHOGONALIZATION_EPS)
        if i + 1 < columns.shape[1]:
            rest = columns[:, i + 1:]
            rest.sub_((col * rest).sum(dim=0, keepdim=True) * col)
    return columns


class PowerSGDReducer(FeedbackReducer):
    method = "powersgd"

    def __init__(self, collective, shapes: list[torch.Size], rank: int, seed: int):
        super().__init__(collective)
        self.matrices, self.plain = split(shapes, rank)
        self.seed = seed
        self.q: list[torch.Tensor] | None = None  # the warm start, as the last applied step left it
        self._pending_q: list[torch.Tensor] | None = None

    def _first_q(self) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)  # the same draws on every worker
        return [torch.randn(m.cols, m.rank, generator=generator) for m in self.matrices]

    async def reduce(self, flat: torch.Tensor, step: int) -> Reduced:
        started = time.perf_counter()
        values, extras = flat[:-2], flat[-2:]
        views = [values[m.offset:m.offset + m.rows * m.cols].view(m.rows, m.cols) for m in self.matrices]

        def factor_p() -> torch.Tensor:
            """This worker's P = M Q of every matrix, beside the values sent as they are."""
            x = self.feedback.add_to(values)
            qs = [orthogonalize(q.clone()) for q in (self.q or self._first_q())]
            ps = [view @ q for view, q in zip(views, qs)]
            return torch.cat([*(x[o:o + c] for o, c in self.plain), *(p.reshape(-1) for p in ps), extras])

        def factor_q() -> tuple[list[torch.Tensor], torch.Tensor]:
            """The summed P orthogonalized, and this worker's Q = M^T P (its residual kept)."""
            offset = 0
            for o, c in self.plain:
                values[o:o + c].copy_(side[offset:offset + c])
                offset += c
            summed_ps = []
            for m in self.matrices:
                summed_ps.append(orthogonalize(side[offset:offset + m.rows * m.rank].view(m.rows, m.rank).clone()))
                offset += m.rows * m.rank
            local_qs = [view.T @ p for view, p in zip(views, summed_ps)]
            lost = torch.zeros_like(values)
            for m, view, p, q in zip(self.matrices, views, summed_ps, local_qs):
                lost[m.offset:m.offset + m.rows * m.cols].view(m.rows, m.cols).copy_(view - p @ q.T)
            self.feedback.keep(lost)
            return summed_ps, torch.cat([q.reshape(-1) for q in local_qs]) if local_qs else torch.zeros(0)

        def decode() -> None:
            pending, offset = [], 0
            for m, view, p in zip(self.matrices, views, summed_ps):
                q = summed_qs[offset:offset + m.cols * m.rank].view(m.cols, m.rank)
                offset += m.cols * m.rank
                view.copy_(p @ q.T)
                pending.append(q.clone())
            self._pending_q = pending
            extras.copy_(side[-2:])

        side = await asyncio.to_thread(factor_p)  # the arithmetic runs beside the event loop
        sent = await self.collective.allreduce(side, call_tag(step, 0))
        summed_ps, summed_qs = await asyncio.to_thread(factor_q)
        sent += await self.collective.allreduce(summed_qs, call_tag(step, 1))
        await asyncio.to_thread(decode)
        return Reduced(sent, time.perf_counter() - started)

    def commit(self) -> None:
        super().commit()
        if self._pending_q is not None:
            self.q, self._pending_q = self._pending_q, None

    def discard(self) -> None:
        super().discard()
        self._pending_q = None

    def state(self) -> dict[str, torch.Tensor]:
        state = super().state()
        if self.q:
            state.update(chunked("powersgd_q", torch.cat([q.reshape(-1) for q in self.q])))
        return state

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        flat_q = unchunked("powersgd_q", tensors)
        super().load({n: t for n, t in tensors.items() if n.partition(".")[0] != "powersgd_q"})
        if flat_q is not None:
            expected = sum(m.cols * m.rank for m in self.matrices)
            if flat_q.numel() != expected:
                raise ValueError(f"a PowerSGD state of {flat_q.numel()} values where this model's is {expected}")
            self.q, offset = [], 0
            for m in self.matrices:
                self.q.append(flat_q[offset:offset + m.cols * m.rank].view(m.cols, m.rank).to(torch.float32).clone())
                offset += m.cols * m.rank
        self._pending_q = None
