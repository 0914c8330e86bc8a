"""How a worker's flat buffer is summed over its peers: exact (float32), float16 or blockwise int8.

Every reducer sums ``flat`` in place: its values (a gradient sum, or DiLoCo's pseudo-gradient), then
two float32 extras (the loss sum and the token count) that always travel exact. A compressed reducer
keeps **error feedback**: what its compression lost this time (this worker's residual) is added to
its next buffer, so nothing is lost for good, only late (Seide et al. 2014; Karimireddy et al. 2019).
The residual of a reduction is only *pending* until the step is applied (``commit``); a step that is
reset and run again (a peer died) starts from the residual it started from the first time.

**Summing int8 without overflow.** Each block of ``block`` values needs one scale that every worker
uses, or their int8 values could not be added as integers. So the workers first sum each block's
largest magnitude (a float32 all-reduce of one value per block, plus the extras): S. Each worker
then quantizes with the agreed step ``S / (127 - ceil(n / 2))``: its values are at most its own
largest magnitude, and all of those together are S, so even after each worker's rounding (at most
half a step each) the sum of n workers' values, and every partial sum of the ring, stays within
int8's +-127. The int8 all-reduce adds integers: exact, in any order, and every worker decodes the
same integers with the same scales, so replicas stay bitwise identical. The price is resolution:
each worker's values get about log2(n) bits fewer than with a block of its own, which error
feedback carries into the next step. Bytes per value: 1 + 4 / block (both all-reduces), against 4.

**float16** sends every value as half precision, scaled by a power of two (exact) chosen from the
summed largest magnitudes so that no partial sum can overflow; the ring adds half-precision values
in its fixed order, and every worker copies the same reduced chunks: identical results.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import torch

from dllmd.net.codec import block_absmax, dequantize_blockwise, quantize_blockwise

FP16_TARGET = 2.0 ** 15  # a partial sum's bound after scaling: half of float16's largest finite value
MAX_EXPONENT = 100  # float32 holds 2**127: a scale beyond this would overflow what it scales


def call_tag(step: int, call: int) -> int:
    """The ring tag of the ``call``-th all-reduce of ``step``: a step may run several (scales, then
    values; PowerSGD's P, then Q; one per overlapped bucket) and each needs tags of its own."""
    return (step << 16) | call


@dataclass
class Reduced:
    """What one reduction cost this worker."""

    bytes_sent: int
    seconds: float


class ErrorFeedback:
    """One worker's residual: what compression has not delivered yet."""

    def __init__(self):
        self.residual: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    def add_to(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (changed in place) plus what earlier reductions did not deliver."""
        if self.residual is not None:
            values.add_(self.residual)
        return values

    def keep(self, lost: torch.Tensor) -> None:
        """This reduction lost ``lost``: it joins the next buffer once the step is applied."""
        self._pending = lost

    def commit(self) -> None:
        if self._pending is not None:
            self.residual, self._pending = self._pending, None

    def discard(self) -> None:
        self._pending = None


class Reducer:
    """Exact: float32 as computed. The base of the compressed reducers: none keeps state here."""

    method = "none"

    def __init__(self, collective):
        self.collective = collective

    async def reduce(self, flat: torch.Tensor, step: int) -> Reduced:
        started = time.perf_counter()
        sent = await self.collective.allreduce(flat, call_tag(step, 0))
        return Reduced(sent, time.perf_counter() - started)

    def commit(self) -> None:
        """The step this reduction belongs to was applied: keep its error feedback."""

    def discard(self) -> None:
        """The step was reset: forget what its reduction would have kept."""

    def state(self) -> dict[str, torch.Tensor]:
        """This worker's own state (checkpoints hold every worker's)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"an uncompressed job keeps no {', '.join(tensors)}")


class FeedbackReducer(Reducer):
    """A reducer with a residual: its state, commit and discard."""

    def __init__(self, collective):
        super().__init__(collective)
        self.feedback = ErrorFeedback()

    def commit(self) -> None:
        self.feedback.commit()

    def discard(self) -> None:
        self.feedback.discard()

    def state(self) -> dict[str, torch.Tensor]:
        return chunked("residual", self.feedback.residual)

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = [n for n in tensors if n.partition(".")[0] != "residual"]
        if unknown:
            raise ValueError(f"{self.method} compression keeps no {', '.join(sorted(unknown))}")
        residual = unchunked("residual", tensors)
        if residual is not None:
            self.feedback.residual = residual
        self.feedback.discard()


STATE_CHUNK = 8 * 2**20  # values per state tensor: a checkpoint moves each in one message


def chunked(name: str, flat: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A flat state tensor as ``name.0000``, ``name.0001``, ... (a model's residual is as large as its
    weights, more than a message carries)."""
    if flat is None:
        return {}
    return {f"{name}.{i:04d}": part for i, part in enumerate(flat.split(STATE_CHUNK))}


def unchunked(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    parts = sorted(n for n in tensors if n.partition(".")[0] == name)
    if not parts:
        return None
    if parts != [f"{name}.{i:04d}" for i in range(len(parts))]:
        raise ValueError(f"the parts of {name} are not numbered 0 to {len(parts) - 1}")
    return torch.cat([tensors[n].reshape(-1).to(torch.float32) for n in parts])


class Fp16Reducer(FeedbackReducer):
    method = "fp16"

    async def reduce(self, flat: torch.Tensor, step: int) -> Reduced:
        started = time.perf_counter()
        values, extras = flat[:-2], flat[-2:]

        def prepare() -> torch.Tensor:
            x = self.feedback.add_to(values)
            return torch.cat([x.abs().amax().reshape(1) if x.numel() else torch.zeros(1), extras])

        def encode() -> tuple[torch.Tensor, float]:
            scale = _power_of_two_scale(float(side[0]))
            half = (values * scale).to(torch.float16)
            self.feedback.keep(values - half.to(torch.float32) / scale)
            return half, scale

        side = await asyncio.to_thread(prepare)  # the arithmetic runs beside the event loop, as the backward does
        sent = await self.collective.allreduce(side, call_tag(step, 0))
        half, scale = await asyncio.to_thread(encode)
        sent += await self.collective.allreduce(half, call_tag(step, 1))
        values.copy_(half.to(torch.float32) / scale)
        extras.copy_(side[1:])
        return Reduced(sent, time.perf_counter() - started)


def _power_of_two_scale(summed_absmax: float) -> float:
    """2**k bringing ``summed_absmax`` to at most :data:`FP16_TARGET` (and near it: small values keep
    float16's precision instead of falling into its subnormals)."""
    if not summed_absmax > 0 or not math.isfinite(summed_absmax):
        return 1.0
    exponent = math.floor(math.log2(FP16_TARGET / summed_absmax))
    return 2.0 ** max(-MAX_EXPONENT, min(MAX_EXPONENT, exponent))


class Int8Reducer(FeedbackReducer):
    method = "int8"

    def __init__(self, collective, block: int):
        super().__init__(collective)
        self.block = block

    async def reduce(self, flat: torch.Tensor, step: int) -> Reduced:
        started = time.perf_counter()
        values, extras = flat[:-2], flat[-2:]
        count, pad = values.numel(), -values.numel() % self.block

        def prepare() -> tuple[torch.Tensor, torch.Tensor]:
            x = self.feedback.add_to(values)
            padded = torch.cat([x, torch.zeros(pad)]) if pad else x
            return padded, torch.cat([block_absmax(padded, self.block), extras])

        def encode() -> tuple[torch.Tensor, torch.Tensor]:
            scales = (side[:-2] / agreed_levels(self.collective.size)).contiguous()
            quantized, _ = quantize_blockwise(padded, self.block, scales)
            self.feedback.keep((padded - dequantize_blockwise(quantized, scales))[:count])
            return quantized, scales

        def decode() -> None:
            values.copy_(dequantize_blockwise(quantized, scales)[:count])
            extras.copy_(side[-2:])

        padded, side = await asyncio.to_thread(prepare)
        sent = await self.collective.allreduce(side, call_tag(step, 0))
        quantized, scales = await asyncio.to_thread(encode)
        sent += await self.collective.allreduce(quantized, call_tag(step, 1))
        await asyncio.to_thread(decode)
        return Reduced(sent, time.perf_counter() - started)


MAX_INT8_MEMBERS = 200  # past this, the room left for every member's rounding leaves too few levels


def agreed_levels(members: int) -> int:
    """The int8 level the summed largest magnitude maps to, leaving room for every member's rounding."""
    if members > MAX_INT8_MEMBERS:
        raise ValueError(f"int8 sums are built for rings of at most {MAX_INT8_MEMBERS} members, not {members}")
    return 127 - math.ceil(members / 2)
