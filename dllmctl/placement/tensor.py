"""How a tensor-parallel group divides one span: each member's KV heads, MLP columns and vocabulary rows.

Decode is bound by reading weights, so a member's time for a part of a layer is its bytes of that part
over its speed. Every part ends in a reduction that waits for the slowest member (attention, the MLP,
the head's gather), so a pass takes the sum of each part's slowest member, and each part is split in
proportion to the members' weights (their measured throughput) by itself: KV heads (whole heads: a
head's queries, keys, values and its columns of the output projection stay together), MLP columns in
blocks, vocabulary rows in blocks. Evening out the heads' granularity with the MLP instead (the
lighter attention member takes more columns) balances each member's bytes but makes it wait in both
parts (SmolLM2's 3 KV heads on 2 equal members: 48.0-49.3 ms per token that way, 47.1-47.8 with each
part split by itself, docs/tensor.md). That byte-balanced split (``even_bytes``) remains for a member
whose memory, not its speed, bounds its share: it holds no more than its share of the bytes. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dllmctl.placement.layout import PlanError
from dllmd.net.messages.tensor import TensorSlice

BLOCK_PREFERENCE = (64, 128, 32, 16, 8, 4, 2, 1)  # columns (or vocabulary rows) moved as one unit


@dataclass(frozen=True)
class TensorShape:
    """The sizes a tensor-parallel split works with, per decoder layer, from a model's config."""

    kv_heads: int
    queries_per_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    itemsize: int = 4

    @classmethod
    def from_config(cls, config: dict, itemsize: int = 4) -> "TensorShape":
        """From a ``config.json`` mapping (the client reads it from the local model directory)."""
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        return cls(kv_heads=kv, queries_per_kv=heads // kv,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                   vocab=config["vocab_size"], itemsize=itemsize)

    @property
    def kv_head_bytes(self) -> int:
        """One KV head's share of one layer's attention: its queries, key, value and output columns."""
        return self.hidden * self.head_dim * (2 * self.queries_per_kv + 2) * self.itemsize

    @property
    def mlp_column_bytes(self) -> int:
        return 3 * self.hidden * self.itemsize  # gate and up rows, down column

    @property
    def vocab_row_bytes(self) -> int:
        return self.hidden * self.itemsize

    def counts_that_work(self) -> str:
        return f"1 to {self.kv_heads} members (the model has {self.kv_heads} KV heads; each member needs one)"


def block_size(total: int, members: int) -> int:
    """The largest preferred unit that divides ``total`` into at least one block per member."""
    for block in BLOCK_PREFERENCE:
        if total % block == 0 and total // block >= members:
            return block
    return 1


def apportion(total: int, weights: Sequence[float], minimum: int = 0) -> list[int]:
    """``total`` units split in proportion to ``weights`` (largest remainder), each at least ``minimum``."""
    n = len(weights)
    if total < minimum * n:
        raise ValueError(f"{total} units cannot give {n} members {minimum} each")
    spare = total - minimum * n
    weight_sum = sum(weights)
    ideal = [spare * w / weight_sum for w in weights] if weight_sum > 0 else [spare / n] * n
    counts = [int(x) for x in ideal]
    by_remainder = sorted(range(n), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in by_remainder[:spare - sum(counts)]:
        counts[i] += 1
    return [c + minimum for c in counts]


def _bounds(counts: Sequence[int], unit: int = 1) -> list[tuple[int, int]]:
    bounds, lo = [], 0
    for count in counts:
        bounds.append((lo, lo + count * unit))
        lo += count * unit
    return bounds


def member_bytes(shape: TensorShape, layers: int, s: TensorSlice, embed: bool, head: bool,
                 tied: bool) -> int:
    """Weight bytes member ``s`` holds for a span of ``layers`` layers (norms aside)."""
    total = layers * ((s.kv_hi - s.kv_lo) * shape.kv_head_bytes + (s.mlp_hi - s.mlp_lo) * shape.mlp_column_bytes)
    vocab_rows = s.vocab_hi - s.vocab_lo
    tables = (1 if embed else 0) + (1 if head and not (tied and embed) else 0)
    return total + tables * vocab_rows * shape.vocab_row_bytes


def split_span(shape: TensorShape, layers: int, weights: Sequence[float], group: str, embed: bool = False,
               head: bool = False, even_bytes: bool = False) -> list[TensorSlice]:
    """Slices of a span of ``layers`` layers for members of the given relative ``weights`` (in rank order):
    each part (heads, MLP columns, vocabulary rows) in proportion to the weights, or, with ``even_bytes``,
    the columns and rows sized so that every member's bytes in all are (module docstring).

    Raises :class:`PlanError` naming the member counts that work when the model's KV heads cannot give
    every member at least one."""
    members = len(weights)
    if members < 1:
        raise PlanError("a tensor-parallel group needs at least one member")
    if members > shape.kv_heads:
        raise PlanError(f"{members} members cannot split this model's attention: it works with "
                        f"{shape.counts_that_work()}")
    if any(w <= 0 for w in weights):
        raise PlanError("every member of a tensor-parallel group needs a positive weight (throughput)")
    weight_sum = sum(weights)
    share = [w / weight_sum for w in weights]
    heads = apportion(shape.kv_heads, share, minimum=1)
    mlp_block = block_size(shape.intermediate, members)
    vocab_block = block_size(shape.vocab, members)
    uses_vocab = embed or head
    vocab_rows = apportion(shape.vocab // vocab_block, share, minimum=1) if uses_vocab else [0] * members
    mlp_blocks = apportion(shape.intermediate // mlp_block, share, minimum=1)
    if even_bytes:
        mlp_blocks, vocab_rows = _even_bytes(shape, layers, share, heads, mlp_block, vocab_block, head, vocab_rows)
    vocab_bounds = _bounds(vocab_rows, vocab_block)  # block_size divides the vocabulary: no remainder
    return [TensorSlice(group=group, rank=rank, size=members, kv_lo=kv[0], kv_hi=kv[1], mlp_lo=mlp[0],
                        mlp_hi=mlp[1], vocab_lo=vocab[0], vocab_hi=vocab[1])
            for rank, (kv, mlp, vocab) in enumerate(zip(_bounds(heads), _bounds(mlp_blocks, mlp_block),
                                                        vocab_bounds))]


def _even_bytes(shape: TensorShape, layers: int, share: list[float], heads: list[int], mlp_block: int,
                vocab_block: int, head: bool, vocab_rows: list[int]) -> tuple[list[int], list[int]]:
    """MLP blocks (and, with the head, vocabulary rows) that make each member's bytes in all its share:
    what each member should hold, less what its heads and rows already give it."""
    head_tables = 1 if head else 0
    total = layers * (shape.kv_heads * shape.kv_head_bytes + shape.intermediate * shape.mlp_column_bytes)
    total += head_tables * shape.vocab * shape.vocab_row_bytes
    fixed = [layers * h * shape.kv_head_bytes + head_tables * v * vocab_block * shape.vocab_row_bytes
             for h, v in zip(heads, vocab_rows)]
    room = [max(total * p - f, 0.0) for p, f in zip(share, fixed)]
    mlp_blocks = apportion(shape.intermediate // mlp_block, room if sum(room) > 0 else share, minimum=1)
    if head:  # the head's rows are the finest unit: they take up what the MLP blocks left uneven
        layer_part = [layers * (h * shape.kv_head_bytes + m * mlp_block * shape.mlp_column_bytes)
                      for h, m in zip(heads, mlp_blocks)]
        room = [max(total * p - f, 0.0) for p, f in zip(share, layer_part)]
        vocab_rows = apportion(shape.vocab // vocab_block, room if sum(room) > 0 else share, minimum=1)
    return mlp_blocks, vocab_rows


def check_covers(groups: dict[str, list], shape: TensorShape) -> None:
    """Every group's slices (already checked to tile without gaps) reach the end of each dimension: a plan
    file whose members leave heads, columns or vocabulary rows to nobody would compute a wrong sum."""
    for name, members in groups.items():
        last, first = members[-1].tensor_slice, members[0]
        ends = {"KV heads": (last.kv_hi, shape.kv_heads), "MLP columns": (last.mlp_hi, shape.intermediate)}
        if first.embed or first.head:
            ends["vocabulary rows"] = (last.vocab_hi, shape.vocab)
        for what, (got, want) in ends.items():
            if got != want:
                raise PlanError(f"group {name!r} covers {got} of the model's {want} {what}")
