"""How a stored model's linear weights are quantized, by name (as in manifests, on the wire and on
command lines). Importing this module does not import torch: the tensors and layers that carry out a
quantization are in :mod:`dllmd.models.quantized`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

QUANT_METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)  # what the int4 kernels take; the largest that divides every matrix wins


class QuantizationError(ValueError):
    """A quantization the model or the device cannot take (bad method, indivisible columns, no kernel)."""


@dataclass(frozen=True)
class Quantization:
    """How a stored model's decoder-layer projections are quantized."""

    method: str  # one of QUANT_METHODS
    group_size: int = 0  # int4: input columns per scale and zero; int8: 0 (one scale per row)

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise QuantizationError(f"unknown quantization {self.method!r}; use one of {', '.join(QUANT_METHODS)}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(f"int4 groups must be one of {INT4_GROUP_SIZES} columns, got {self.group_size}")
        if self.method == "int8" and self.group_size != 0:
            raise QuantizationError("int8 has one scale per row; its group size must be 0")

    @property
    def parts(self) -> tuple[str, ...]:
        return ("qdata", "scale", "zero") if self.method == "int4" else ("qdata", "scale")

    def part_names(self, name: str) -> list[str]:
        return [f"{name}.{part}" for part in self.parts]


def choose_quantization(method: str, input_widths: list[int], source_block: int = 0) -> Quantization:
    """The quantization for a model whose projections take ``input_widths`` columns: int4 gets the
    largest group size that divides them all, or is refused naming the widths.

    ``source_block``: the columns per scale of a source that is quantized already (a GGUF file's 32).
    int4 then takes that group size, because min/max groups that coincide with the source's blocks
    put each block's values back on the grid they came from: a Q4_0/Q4_1 model is stored again, not
    rounded a second time onto a coarser grid (SmolLM2's Q4_1: perplexity x1.53 at g64, x1.0002 at g32).
    """
    if method == "int8":
        return Quantization("int8")
    if method != "int4":
        Quantization(method)  # raises, naming the choices
    preferred = (source_block,) if source_block in INT4_GROUP_SIZES else ()
    for size in preferred + INT4_GROUP_SIZES:
        if all(width % size == 0 for width in input_widths):
            return Quantization("int4", size)
    raise QuantizationError(f"int4 needs every projection's input width to be a multiple of 32; this model has "
                            f"{sorted(set(input_widths))}: use int8")


def parse_quantization(data) -> Quantization | None:
    """A manifest's ``quantization`` field: absent or null for full-precision weights."""
    if data is None:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("method"), str) \
            or not isinstance(data.get("group_size", 0), int) or isinstance(data.get("group_size", 0), bool):
        raise QuantizationError(f"quantization must be {{'method': str, 'group_size': int}}, got {data!r}")
    return Quantization(data["method"], data.get("group_size", 0))
