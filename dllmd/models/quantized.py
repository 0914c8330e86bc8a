"""Weights kept quantized in memory: int8 (one scale per output row) and int4 (asymmetric, one scale
and zero per group of input columns), for the linear projections of decoder layers.

The store holds a quantized model in a device-neutral form, written at import from the source's
full-precision tensors (:func:`quantize_weight`): ``<name>.qdata`` (int8 values, or two uint4 values
per byte, low nibble first), ``<name>.scale`` and, for int4, ``<name>.zero``. A node reads those
parts (:class:`QuantizedWeight`), takes its tensor-parallel rows or columns of them without
expanding anything, and builds a :class:`QuantizedLinear` that computes with them directly.

The arithmetic is torchao's: int8 scales come from ``Int8Tensor.from_hp`` (per-row, symmetric) and
int4 parameters from its tinygemm group-wise routines (``w = (q - 8) * scale + zero``), so a stored
model dequantizes exactly as torchao would. The matrix products use the kernels torchao itself calls
(PyTorch's ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm``),
which read the packed weights as they are; torchao 0.18's own int4 CPU tensor needs the ``mslk``
package, which does not install here, and its CUDA one only takes bfloat16 models. Those kernels are
fast with bfloat16 activations (on CPU their float32 path is ~10x slower), so a quantized projection
runs its product in bfloat16 and hands back the span's dtype; a shape or device the kernel does not
take (an int4 matrix whose rows are not a multiple of 16, say) dequantizes one matrix per call
instead, which is slower but exact to the stored values.

Embeddings, norms and the head stay in the compute dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dllmd.models.quantization import Quantization, QuantizationError

KERNEL_DTYPE = torch.bfloat16
_INT4_MID = 8  # tinygemm's zero point sits at the middle of [0, 15]


@functools.cache
def _torchao():
    """torchao's quantization package and its utils, imported on first use (dllmd/__init__ quiets its logs)."""
    import torchao.quantization as tq
    from torchao.quantization import utils

    return tq, utils


def quantize_weight(weight: torch.Tensor, q: Quantization) -> dict[str, torch.Tensor]:
    """The stored parts of one ``[out, in]`` weight matrix (computed in float32 on the CPU)."""
    tq, utils = _torchao()
    Int8Tensor, PerRow = tq.Int8Tensor, tq.granularity.PerRow
    get_groupwise_affine_qparams = utils.get_groupwise_affine_qparams
    groupwise_affine_quantize_tensor_from_qparams = utils.groupwise_affine_quantize_tensor_from_qparams

    w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if w.dim() != 2:
        raise QuantizationError(f"only matrices are quantized, got shape {tuple(w.shape)}")
    if q.method == "int8":
        t = Int8Tensor.from_hp(w, PerRow())
        return {"qdata": t.qdata.contiguous(), "scale": t.scale.reshape(-1).to(torch.float32).contiguous()}
    if w.shape[1] % q.group_size:
        raise QuantizationError(f"{w.shape[1]} input columns are not a multiple of int4's group of {q.group_size}")
    scale, zero = get_groupwise_affine_qparams(w, n_bit=4, groupsize=q.group_size, dtype=KERNEL_DTYPE)
    values = groupwise_affine_quantize_tensor_from_qparams(w, scale, zero, n_bit=4, groupsize=q.group_size)
    return {"qdata": pack_nibbles(values), "scale": scale.reshape(w.shape[0], -1).contiguous(),
            "zero": zero.reshape(w.shape[0], -1).contiguous()}


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` integers in [0, 15] as ``[n, k / 2]`` bytes, the even column in the low nibble."""
    v = values.to(torch.uint8)
    return (v[:, 0::2] | (v[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`, as int32 (what the int4 packing kernels take)."""
    low, high = (packed & 0x0F).to(torch.int32), (packed >> 4).to(torch.int32)
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


@dataclass(frozen=True)
class QuantizedWeight:
    """One stored quantized matrix ``[out, in]``: its parts, sliceable by rows and by whole groups of
    columns, as a tensor-parallel member takes its share (:mod:`dllmd.models.slicing`)."""

    q: Quantization
    qdata: torch.Tensor  # int8 [out, in], or uint8 [out, in / 2] for int4
    scale: torch.Tensor  # float32 [out] for int8; bfloat16 [out, in / group] for int4
    zero: torch.Tensor | None = None  # int4: bfloat16 [out, in / group]

    @classmethod
    def from_parts(cls, q: Quantization, name: str, parts: dict[str, torch.Tensor]) -> "QuantizedWeight":
        weight = cls(q, parts[f"{name}.qdata"], parts[f"{name}.scale"], parts.get(f"{name}.zero"))
        weight.check(name)
        return weight

    @property
    def shape(self) -> torch.Size:
        columns = self.qdata.shape[1] * (2 if self.q.method == "int4" else 1)
        return torch.Size((self.qdata.shape[0], columns))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scale, self.zero) if t is not None)

    def check(self, name: str) -> None:
        """Refuse parts whose dtypes or shapes do not agree (a damaged or hand-made file)."""
        rows, columns = self.shape
        if self.q.method == "int8":
            good = (self.qdata.dtype == torch.int8 and self.qdata.dim() == 2 and self.zero is None
                    and tuple(self.scale.shape) == (rows,) and self.scale.is_floating_point())
        else:
            groups = (rows, columns // self.q.group_size)
            good = (self.qdata.dtype == torch.uint8 and self.qdata.dim() == 2 and columns % self.q.group_size == 0
                    and self.zero is not None and tuple(self.scale.shape) == groups
                    and tuple(self.zero.shape) == groups and self.scale.is_floating_point())
        if not good:
            raise QuantizationError(f"{name}: the stored {self.q.method} parts do not fit together "
                                    f"(qdata {self.qdata.dtype} {tuple(self.qdata.shape)}, scale "
                                    f"{tuple(self.scale.shape)}); re-import the model")

    def rows(self, rows: slice) -> "QuantizedWeight":
        return QuantizedWeight(self.q, self.qdata[rows], self.scale[rows],
                               self.zero[rows] if self.zero is not None else None)

    def columns(self, columns: slice) -> "QuantizedWeight":
        start, stop, _ = columns.indices(self.shape[1])
        if self.q.method == "int8":  # a row's scale covers every column of it
            return QuantizedWeight(self.q, self.qdata[:, start:stop], self.scale)
        group = self.q.group_size
        if start % group or stop % group:
            raise QuantizationError(f"columns [{start}, {stop}) split int4 groups of {group}: choose tensor-parallel "
                                    f"slices on multiples of {group} columns, or import with int8")
        groups = slice(start // group, stop // group)
        return QuantizedWeight(self.q, self.qdata[:, start // 2:stop // 2], self.scale[:, groups], self.zero[:, groups])

    @staticmethod
    def cat(weights: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Rows of several weights stacked (a fused projection's sliced parts)."""
        zeros = [w.zero for w in weights]
        return QuantizedWeight(weights[0].q, torch.cat([w.qdata for w in weights]), torch.cat([w.scale for w in weights]),
                               torch.cat(zeros) if zeros[0] is not None else None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix the parts stand for (tests, and the fallback product)."""
        if self.q.method == "int8":
            return (self.qdata.to(torch.float32) * self.scale.to(torch.float32)[:, None]).to(dtype)
        values = unpack_nibbles(self.qdata).to(torch.float32)
        group = self.q.group_size
        rows, columns = self.shape
        grouped = values.reshape(rows, columns // group, group)
        scale, zero = self.scale.to(torch.float32)[..., None], self.zero.to(torch.float32)[..., None]
        return ((grouped - _INT4_MID) * scale + zero).reshape(rows, columns).to(dtype)


class QuantizedLinear(nn.Module):
    """A linear layer over a :class:`QuantizedWeight`: the packed kernel where the device and shape
    allow, else the dequantized matrix per call. Inputs and outputs keep the span's dtype."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, device: torch.device,
                 kernel: str | None = None):
        super().__init__()
        self.method, self.group_size = weight.q.method, weight.q.group_size
        self.out_features, self.in_features = weight.shape
        self.kernel = kernel or _kernel_for(weight, device)
        self.weight_parts: list[str] = []
        for part, tensor in self._kernel_parts(weight, device).items():
            self.register_buffer(part, tensor, persistent=False)
            self.weight_parts.append(part)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def _kernel_parts(self, w: QuantizedWeight, device: torch.device) -> dict[str, torch.Tensor]:
        if self.kernel == "int8pack":
            # A copy, never the store's memory map: the AVX-512 kernel needs the allocator's alignment,
            # and a safetensors tensor starts wherever its header left it (a segfault, not an error).
            return {"qdata": w.qdata.to(device, copy=True).contiguous(),
                    "scale": w.scale.to(device, KERNEL_DTYPE, copy=True)}
        if self.kernel in ("int4pack_cpu", "int4pack_cuda"):
            pack_tinygemm_scales_and_zeros = _torchao()[1].pack_tinygemm_scales_and_zeros
            values = unpack_nibbles(w.qdata).to(device)
            if self.kernel == "int4pack_cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
            else:  # the CUDA kernel takes two values per byte, the even column in the high nibble
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    ((values[:, 0::2] << 4) | values[:, 1::2]).to(torch.uint8), _CUDA_INNER_K_TILES)
            scales_zeros = pack_tinygemm_scales_and_zeros(w.scale.to(device, KERNEL_DTYPE),
                                                          w.zero.to(device, KERNEL_DTYPE), KERNEL_DTYPE)
            return {"packed": packed, "scales_zeros": scales_zeros}
        parts = {"qdata": w.qdata.to(device), "scale": w.scale.to(device)}
        if w.zero is not None:
            parts["zero"] = w.zero.to(device)
        return parts

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as held (packed parts; the bias aside)."""
        return sum(getattr(self, p).numel() * getattr(self, p).element_size() for p in self.weight_parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(flat.to(KERNEL_DTYPE).contiguous(), self.qdata, self.scale)
        elif self.kernel == "int4pack_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(KERNEL_DTYPE).contiguous(), self.packed,
                                                           self.group_size, self.scales_zeros)
        elif self.kernel == "int4pack_cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat.to(KERNEL_DTYPE).contiguous(), self.packed,
                                                   self.group_size, self.scales_zeros)
        else:
            stored = QuantizedWeight(Quantization(self.method, self.group_size), self.qdata, self.scale,
                                     getattr(self, "zero", None))
            y = F.linear(flat, stored.dequantize(x.dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.method}"
                f"{f'/g{self.group_size}' if self.group_size else ''}, kernel={self.kernel}")


_CUDA_INNER_K_TILES = 8
_INT8_CPU_COLUMN_MULTIPLE = 16


def _kernel_for(w: QuantizedWeight, device: torch.device) -> str:
    """The packed kernel for this matrix on this device, or "dequantize" where none takes it."""
    rows, columns = w.shape
    if w.q.method == "int8":
        # aten's int8 CPU kernel vectorizes the reduction 16 columns at a time with no tail: on an
        # AVX-512 machine (torch 2.13) other widths read past the row (wrong sums or a segfault).
        aligned = device.type != "cpu" or columns % _INT8_CPU_COLUMN_MULTIPLE == 0
        return "int8pack" if aligned and _kernel_works("int8pack", device.type) else "dequantize"
    if device.type == "cpu" and rows % 16 == 0 and _kernel_works("int4pack_cpu", "cpu"):
        return "int4pack_cpu"
    if device.type == "cuda" and rows % 8 == 0 and columns % (_CUDA_INNER_K_TILES * 16) == 0 \
            and _kernel_works("int4pack_cuda", "cuda"):
        return "int4pack_cuda"
    return "dequantize"


@functools.cache
def _kernel_works(kernel: str, device_type: str) -> bool:
    """Whether this PyTorch build runs ``kernel`` on ``device_type`` (tried once on a small matrix):
    builds and GPUs differ (tinygemm needs CUDA compute capability 8.0), and the fallback is exact."""
    device = torch.device(device_type)
    try:
        rows, columns, group = 32, 256, 32
        w = QuantizedWeight(Quantization("int8" if kernel == "int8pack" else "int4", 0 if kernel == "int8pack" else group),
                            **_probe_parts(kernel, rows, columns, group))
        layer = QuantizedLinear(w, None, device, kernel=kernel)
        expected = F.linear(torch.ones(1, columns, device=device), w.dequantize().to(device))
        got = layer(torch.ones(1, columns, device=device))
        return bool(torch.allclose(got.float(), expected, rtol=0.05, atol=0.5))
    except (RuntimeError, NotImplementedError, AttributeError, AssertionError):
        return False


def _probe_parts(kernel: str, rows: int, columns: int, group: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    if kernel == "int8pack":
        return {"qdata": torch.randint(-127, 128, (rows, columns), dtype=torch.int8, generator=generator),
                "scale": torch.full((rows,), 0.01)}
    values = torch.randint(0, 16, (rows, columns), dtype=torch.int32, generator=generator)
    shape = (rows, columns // group)
    return {"qdata": pack_nibbles(values), "scale": torch.full(shape, 0.01, dtype=KERNEL_DTYPE),
            "zero": torch.zeros(shape, dtype=KERNEL_DTYPE)}


def check_device(q: Quantization, device: torch.device) -> None:
    """Refuse a quantized span this device cannot run at all (neither a kernel nor the fallback)."""
    if device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"{q.method} weights run on CPU or CUDA; this node computes on {device.type}: "
                                f"deploy the unquantized model here")
