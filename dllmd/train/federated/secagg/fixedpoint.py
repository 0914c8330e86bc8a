"""Fixed-point encoding of fp32 update vectors into integers modulo 2**bits, so masks can hide them.

Each element is clamped to [-bound, bound] and rounded to the nearest multiple of ``step``: an integer
``q`` with ``|q| <= levels``, stored as ``q mod 2**bits`` in an int64 tensor. ``levels`` is chosen so the
sum of ``summands`` encodings stays within (-2**(bits-1), 2**(bits-1)): the modular sum never wraps and
decodes to a unique signed integer. Rounding moves each element by at most ``step / 2``, so the decoded
sum of ``count`` encodings is within ``count * step / 2`` of the sum of the clamped inputs (before the
final cast to fp32, which adds half an fp32 ulp of the sum).

The arithmetic runs in float64: fp32 has 24 bits of mantissa, too few for a 31-bit grid.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 16  # elements converted at a time: the float64 temporaries stay in cache


class FixedPoint:
    """The encoding of one round: its clamp ``bound``, how many vectors it may sum, and the modulus."""

    def __init__(self, bound: float, summands: int, bits: int = 32):
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be a positive finite number, got {bound}")
        if not 2 <= bits <= 62:
            raise ValueError(f"bits must be within 2..62, got {bits}")
        if not 1 <= summands <= 2 ** (bits - 1) - 1:
            raise ValueError(f"{summands} summands do not fit {bits} bits")
        levels = (2 ** (bits - 1) - 1) // summands
        self.bound, self.summands, self.bits = float(bound), summands, bits
        self.levels = levels
        self.step = self.bound / levels  # the grid: one unit of the integer encoding
        self.modulus = 2 ** bits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (any float tensor, flattened) as int64 values in [0, 2**bits). Refuses NaN and infinities:
        an update that has them is broken, and clamping would hide it."""
        flat = x.detach().reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("the update has NaN or infinite elements")
        out = torch.empty(flat.numel(), dtype=torch.int64)
        scale, buf = self.levels / self.bound, torch.empty(CHUNK, dtype=torch.float64)
        for lo in range(0, flat.numel(), CHUNK):
            part, grid = out[lo:lo + CHUNK], buf[:min(CHUNK, flat.numel() - lo)]
            # Clamping after scaling is clamping x to the bound, and keeps q within the levels exactly.
            grid.copy_(flat[lo:lo + CHUNK]).mul_(scale).clamp_(-self.levels, self.levels).round_()
            part.copy_(grid).bitwise_and_(self.modulus - 1)  # two's complement: -q becomes 2**bits - q
        return out

    def decode_sum(self, total: torch.Tensor, count: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float sum behind ``total``, the modular sum of ``count`` encodings (``count <= summands``)."""
        if not 1 <= count <= self.summands:
            raise ValueError(f"{count} encodings do not decode: this encoding sums 1..{self.summands}")
        flat = total.reshape(-1)
        out = torch.empty(flat.numel(), dtype=dtype)
        half, buf = self.modulus // 2, torch.empty(CHUNK, dtype=torch.int64)
        for lo in range(0, flat.numel(), CHUNK):
            signed = buf[:min(CHUNK, flat.numel() - lo)]
            # Residues [0, 2**bits) to the signed sum in [-2**(bits-1), 2**(bits-1)).
            signed.copy_(flat[lo:lo + CHUNK]).add_(half).bitwise_and_(self.modulus - 1).sub_(half)
            out[lo:lo + CHUNK] = signed.to(torch.float64).mul_(self.step)
        return out
