"""Smaller tensors on the wire: the one blockwise int8 codec, and the encodings a hidden state may
travel in between stages (``fp32``: as computed; ``fp16``; ``int8``: blockwise).

Blockwise int8 splits the last dimension into blocks of ``block`` values; each block travels as
int8 values and one float32 scale (its largest magnitude / 127), so an outlier only coarsens its own
block. A value comes back within half a step (scale / 2) of what was sent; bytes per value are
1 + 4 / block (64: 0.27x fp32). The same codec serves any tensor whose last dimension the block
divides (hidden states, tensor-parallel partial sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HOP_ENCODINGS = ("fp32", "fp16", "int8")
DEFAULT_BLOCK = 64
FP16_MAX = 65504.0


class CodecError(ValueError):
    """Parts that do not decode (wrong count, dtype or shape): the message says what was expected."""


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise CodecError(f"a block of {block} does not divide the last dimension ({x.shape[-1]})")
    return x.detach().to(torch.float32).reshape(*x.shape[:-1], -1, block)


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each block's largest magnitude, float32 [..., n / block]: what a default scale is made of."""
    return _blocks(x, block).abs().amax(dim=-1)


def quantize_blockwise(x: torch.Tensor, block: int,
                       scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., n] (n a multiple of ``block``) as int8 values [..., n] and float32 scales [..., n / block].

    ``scales`` (float32 [..., n / block]) replaces each block's own largest magnitude / 127: peers that
    agreed on one scale per block can add their int8 values without decoding them (gradient sums)."""
    blocks = _blocks(x, block)
    if scales is None:
        scales = blocks.abs().amax(dim=-1) / 127.0
    elif scales.dtype != torch.float32 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise CodecError(f"scales must be float32 {list(blocks.shape[:-1])}, got {_name(scales.dtype)} "
                         f"{list(scales.shape)}")
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block stays zero
    values = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return values.reshape(x.shape), scales


def dequantize_blockwise(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor :func:`quantize_blockwise` encoded, in ``dtype``."""
    if values.dtype != torch.int8 or scales.dtype != torch.float32:
        raise CodecError(f"blockwise int8 travels as int8 values and float32 scales, got "
                         f"{_name(values.dtype)} and {_name(scales.dtype)}")
    if values.dim() == 0 or tuple(scales.shape[:-1]) != tuple(values.shape[:-1]) or scales.shape[-1] == 0 \
            or values.shape[-1] < scales.shape[-1] or values.shape[-1] % scales.shape[-1]:
        raise CodecError(f"scales {list(scales.shape)} do not match int8 values {list(values.shape)}")
    block = values.shape[-1] // scales.shape[-1]
    blocks = values.to(torch.float32).reshape(*values.shape[:-1], -1, block) * scales.unsqueeze(-1)
    return blocks.reshape(values.shape).to(dtype)


@dataclass(frozen=True)
class HopCodec:
    """How one session's hidden states travel between its stages."""

    encoding: str = "fp32"
    block: int = DEFAULT_BLOCK  # int8 only

    def __post_init__(self):
        if self.encoding not in HOP_ENCODINGS:
            raise CodecError(f"activations must be one of {', '.join(HOP_ENCODINGS)}, got {self.encoding!r}")
        if self.block < 1:
            raise CodecError(f"the int8 block must be at least 1 value, got {self.block}")

    def check_width(self, width: int) -> None:
        if self.encoding == "int8" and width % self.block:
            divisors = [b for b in (128, 64, 32, 16) if width % b == 0]
            raise CodecError(f"int8 blocks of {self.block} do not divide the hidden size {width}"
                             + (f"; use a block of {' or '.join(map(str, divisors))}" if divisors else ""))

    def encode(self, hidden: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
        """The encoding actually used (fp16 sends fp32 where a value would overflow it) and the parts."""
        if self.encoding == "int8":
            return "int8", list(quantize_blockwise(hidden, self.block))
        if self.encoding == "fp16" and hidden.dtype != torch.float16:
            if hidden.numel() and float(hidden.abs().amax()) > FP16_MAX:
                return "fp32", [hidden]  # an outlier beyond fp16's range: exact rather than infinite
            return "fp16", [hidden.to(torch.float16)]
        return "fp32", [hidden]


def parts_of(encoding: str) -> int:
    """Tensors one step carries in ``encoding``."""
    if encoding not in HOP_ENCODINGS:
        raise CodecError(f"unknown hidden-state encoding {encoding!r}; known: {', '.join(HOP_ENCODINGS)}")
    return 2 if encoding == "int8" else 1


def decode(encoding: str, parts: list[torch.Tensor], dtype: torch.dtype, width: int | None = None,
           max_tokens: int | None = None) -> torch.Tensor:
    """A hidden state from the parts one step carried in ``encoding``, in the receiving span's ``dtype``.
    With ``width``, a compressed step must be ``[1, seq <= max_tokens, width]`` before it is expanded."""
    if len(parts) != parts_of(encoding):
        raise CodecError(f"{encoding} carries {parts_of(encoding)} tensor(s) per step, got {len(parts)}")
    if width is not None and encoding != "fp32":
        shape = list(parts[0].shape)
        if len(shape) != 3 or shape[0] != 1 or not 0 < shape[1] <= (max_tokens or shape[1]) or shape[2] != width:
            raise CodecError(f"an {encoding} step carries hidden states [1, seq <= {max_tokens}, {width}], "
                             f"got {shape}")
    if encoding == "int8":
        return dequantize_blockwise(parts[0], parts[1], dtype)
    (hidden,) = parts
    if encoding == "fp16":
        if hidden.dtype != torch.float16:
            raise CodecError(f"an fp16 step carries float16, got {_name(hidden.dtype)}")
        return hidden.to(dtype)
    return hidden  # fp32: as the sending stage computed it (its dtype is checked on admission)


def encoded_bytes(parts: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- a tensor-parallel partial sum as one message ------------------------------------------------

_PARTIAL_TAGS = {"fp32": 0, "fp16": 1, "int8": 2}  # "fp32": the partial as computed, in its own dtype


def pack_partial(partial: torch.Tensor, hops: HopCodec) -> bytes:
    """One member's partial of a reduction in ``hops``' encoding: a tag byte (the encoding used: fp16
    falls back past its range, so members may differ), then the parts' bytes."""
    encoding, parts = hops.encode(partial.detach().cpu().contiguous())
    return bytes([_PARTIAL_TAGS[encoding]]) + b"".join(p.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                                       for p in parts)


def unpack_partial(payload, like: torch.Tensor, block: int) -> torch.Tensor:
    """A packed partial of ``like``'s shape and dtype, dequantized to float32; CodecError when the
    bytes do not hold one."""
    data = memoryview(payload)
    if len(data) < 1 or data[0] not in _PARTIAL_TAGS.values():
        raise CodecError("a partial sum must start with its encoding's tag")
    encoding = next(name for name, tag in _PARTIAL_TAGS.items() if tag == data[0])
    body, numel, shape = data[1:], like.numel(), like.shape
    sizes = {"fp32": [numel * like.element_size()], "fp16": [numel * 2],
             "int8": [numel, numel // block * 4] if block and shape and shape[-1] % block == 0 else [-1]}[encoding]
    if len(body) != sum(sizes):
        raise CodecError(f"an {encoding} partial of {list(shape)} is {sum(sizes)} bytes, got {len(body)}")

    def part(offset: int, size: int, dtype: torch.dtype, part_shape) -> torch.Tensor:
        return torch.frombuffer(bytearray(body[offset:offset + size]), dtype=torch.uint8).view(dtype).reshape(part_shape)

    if encoding == "int8":
        values = part(0, sizes[0], torch.int8, shape)
        scales = part(sizes[0], sizes[1], torch.float32, (*shape[:-1], shape[-1] // block))
        return dequantize_blockwise(values, scales)
    return part(0, sizes[0], like.dtype if encoding == "fp32" else torch.float16, shape).to(torch.float32)
