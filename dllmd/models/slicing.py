"""A tensor-parallel member's slice of a span: which rows and columns of each checkpoint tensor it keeps.

Megatron's split, applied to transformers' own modules: attention by KV-head groups (the query, key and
value projections keep the rows of the member's heads, the output projection the matching columns),
the MLP by intermediate columns (gate and up keep rows, down keeps columns), the embeddings and head by
vocabulary rows. A member's modules are built from a *sliced config* (fewer heads, a narrower MLP, a
smaller vocabulary), so the modules themselves are transformers' unchanged classes; what a member
computes after the output and down projections is a partial sum that the group adds up
(:mod:`dllmd.inference.tensor_group`).

Biases of row-split outputs (query/key/value, gate/up) are sliced with their rows; the bias of a
column-split projection (output, down) is added once, by rank 0, so the group's sum counts it once.
"""

from __future__ import annotations

import copy
import re

import torch

from dllmd.models.quantization import QuantizationError
from dllmd.models.quantized import QuantizedWeight
from dllmd.net.messages.tensor import TensorSlice

_LAYER_TENSOR = re.compile(r"^model\.layers\.\d+\.(?P<part>.+)$")


class SliceError(ValueError):
    """A slice that does not fit the model (heads or columns out of range, a family we cannot split)."""


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_slice(config, s: TensorSlice, embed: bool, head: bool) -> None:
    """Raise :class:`SliceError` unless ``s`` names a non-empty part of this model."""
    heads, columns = kv_heads(config), config.intermediate_size
    if not 0 <= s.rank < s.size:
        raise SliceError(f"rank {s.rank} is not in a group of {s.size}")
    if not 0 <= s.kv_lo < s.kv_hi <= heads:
        raise SliceError(f"KV heads [{s.kv_lo}, {s.kv_hi}) are not a non-empty range of the model's {heads}")
    if not 0 <= s.mlp_lo < s.mlp_hi <= columns:
        raise SliceError(f"MLP columns [{s.mlp_lo}, {s.mlp_hi}) are not a non-empty range of the model's {columns}")
    if (embed or head) and not 0 <= s.vocab_lo < s.vocab_hi <= config.vocab_size:
        raise SliceError(f"vocabulary rows [{s.vocab_lo}, {s.vocab_hi}) are not a non-empty range of the "
                         f"model's {config.vocab_size}")


def sliced_config(config, s: TensorSlice):
    """The config a member's modules are built from: its heads, its MLP columns, its vocabulary rows."""
    sliced = copy.deepcopy(config)
    groups = config.num_attention_heads // kv_heads(config)
    sliced.head_dim = head_dim(config)  # explicit: fewer heads must not change the per-head width
    sliced.num_key_value_heads = s.kv_hi - s.kv_lo
    sliced.num_attention_heads = sliced.num_key_value_heads * groups
    sliced.intermediate_size = s.mlp_hi - s.mlp_lo
    if s.vocab_hi > s.vocab_lo:
        sliced.vocab_size = s.vocab_hi - s.vocab_lo
        pad = getattr(config, "pad_token_id", None)
        # The padding row only matters to training; outside this slice it would not even be a valid index.
        sliced.pad_token_id = pad - s.vocab_lo if pad is not None and s.vocab_lo <= pad < s.vocab_hi else None
    return sliced


def slice_tensor(config, s: TensorSlice, name: str, tensor):
    """The part of checkpoint tensor ``name`` that member ``s`` keeps (a view of whole rows, a copy of
    columns); a :class:`~dllmd.models.quantized.QuantizedWeight` is sliced in its stored form."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return _rows(tensor, slice(s.vocab_lo, s.vocab_hi))
    match = _LAYER_TENSOR.match(name)
    if match is None:
        return tensor  # the final norm: every member keeps it whole
    part = match["part"]
    dim = head_dim(config)
    q_groups = config.num_attention_heads // kv_heads(config)
    q_rows = slice(s.kv_lo * q_groups * dim, s.kv_hi * q_groups * dim)
    kv_rows = slice(s.kv_lo * dim, s.kv_hi * dim)
    mlp = slice(s.mlp_lo, s.mlp_hi)
    if part in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
        return _rows(tensor, q_rows)
    if part in ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                "self_attn.v_proj.bias"):
        return _rows(tensor, kv_rows)
    if part == "self_attn.o_proj.weight":
        return _columns(tensor, q_rows)
    if part in ("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias"):
        return _rows(tensor, mlp)
    if part == "mlp.down_proj.weight":
        return _columns(tensor, mlp)
    if part in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
        return tensor if s.rank == 0 else torch.zeros_like(tensor)
    if part == "self_attn.qkv_proj.weight":  # Phi3: [query heads | key heads | value heads] in one matrix
        queries = config.num_attention_heads * dim
        keys = kv_heads(config) * dim
        return _cat([_rows(tensor, q_rows), _rows(tensor, _shifted(kv_rows, queries)),
                     _rows(tensor, _shifted(kv_rows, queries + keys))])
    if part == "mlp.gate_up_proj.weight":  # Phi3: [gate | up] in one matrix
        columns = config.intermediate_size
        return _cat([_rows(tensor, mlp), _rows(tensor, _shifted(mlp, columns))])
    if part.startswith(("self_attn.", "mlp.")) and not part.startswith(("self_attn.q_norm", "self_attn.k_norm")):
        raise SliceError(f"{name}: no tensor-parallel split is known for this tensor of a "
                         f"{config.model_type} layer")
    return tensor  # norms, per-head q/k norms: whole on every member


def _shifted(rows: slice, offset: int) -> slice:
    return slice(rows.start + offset, rows.stop + offset)


def _rows(tensor, rows: slice):
    return tensor.rows(rows) if isinstance(tensor, QuantizedWeight) else tensor[rows]


def _columns(tensor, columns: slice):
    if isinstance(tensor, QuantizedWeight):
        try:
            return tensor.columns(columns)
        except QuantizationError as exc:
            raise SliceError(str(exc)) from None
    # Copied, not a view: a matmul against a strided column slice of a row-major matrix ran ~40% slower
    # here (SmolLM2's down projection, one row, one thread: 38 us against 26), and the view kept every
    # page of the whole matrix mapped, the other members' columns too.
    return tensor[:, columns].contiguous()


def _cat(parts: list):
    return QuantizedWeight.cat(parts) if isinstance(parts[0], QuantizedWeight) else torch.cat(parts)
