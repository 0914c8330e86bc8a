"""Tensor-parallel groups: each member's slice (carried by ``span.load``), and ``group.connect``, which
links a group's members once every one of them has loaded its slice. Admin only."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import Op, bounded

MAX_GROUP = 64


@dataclass(frozen=True)
class TensorSlice:
    """A tensor-parallel member's part of every layer in its span: KV heads ``[kv_lo, kv_hi)`` (and the
    query heads that attend with them), MLP intermediate columns ``[mlp_lo, mlp_hi)``, and vocabulary
    rows ``[vocab_lo, vocab_hi)`` of the embeddings and head where the span holds them. ``group`` names
    the tensor-parallel group (unique per deployment of a model), ``rank`` orders its members."""

    group: str = bounded(max_len=64)
    rank: int = bounded(lo=0, hi=MAX_GROUP - 1)
    size: int = bounded(lo=1, hi=MAX_GROUP)
    kv_lo: int = bounded(lo=0, hi=65_536)
    kv_hi: int = bounded(lo=0, hi=65_536)
    mlp_lo: int = bounded(lo=0, hi=1 << 24)
    mlp_hi: int = bounded(lo=0, hi=1 << 24)
    vocab_lo: int = bounded(0, lo=0, hi=1 << 24)
    vocab_hi: int = bounded(0, lo=0, hi=1 << 24)



@dataclass
class GroupMemberArgs:
    public_key: str = bounded(max_len=64)
    endpoint: str = bounded(max_len=256)  # the member's group socket, tcp://host:port


@dataclass
class ConnectArgs:
    model: str = bounded(max_len=128)
    group: str = bounded(max_len=64)
    members: list[GroupMemberArgs] = bounded(max_len=MAX_GROUP)  # in rank order, this node among them


@dataclass
class Connected:
    connected: bool
    rank: int
    size: int


GROUP_CONNECT = Op("group.connect", ConnectArgs, Connected)
