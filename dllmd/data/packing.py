"""Samples to token ids with the model's tokenizer, and token ids to fixed-length training sequences.

Packing concatenates each sample's ids followed by one EOS token (the separator a model learns "a
new document starts here" from) and cuts the stream into rows of ``seq_len`` tokens; a sample
longer than a row simply continues on the next. The last row is padded with EOS rather than
dropped, so a small dataset loses nothing: ``valid_tokens`` says where the real stream ends, and a
trainer masks the loss after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # torch and transformers load only where tokenizing or packing happens
    import torch
    from transformers import PreTrainedTokenizerBase

from dllmd.data.errors import DataError
from dllmd.data.sources import Sample

TOKENIZE_BATCH = 256  # samples per call: enough for the Rust tokenizer to use every core


@dataclass(frozen=True, eq=False)  # ids is an array: compare ``ids.tolist()`` instead
class TokenizedSample:
    id: str
    ids: np.ndarray
    """int32 token ids of the text alone: no BOS, no EOS (packing adds the separators)."""

    @property
    def packed_tokens(self) -> int:
        """Tokens this sample takes in a packed stream: its ids and the EOS after them."""
        return len(self.ids) + 1


@dataclass(frozen=True)
class SampleSpan:
    sample_id: str
    start: int
    """Offset of the sample's first token in the flat stream, ``Packed.tokens.reshape(-1)``."""
    length: int
    """Its token count; the EOS at ``start + length`` is not counted."""


@dataclass(eq=False)  # holds a tensor: compare with ``torch.equal``
class Packed:
    tokens: torch.Tensor
    """int32 ``[rows, seq_len]``; read row after row, it is the flat stream of samples and EOS tokens."""
    spans: list[SampleSpan]
    """One per sample, in packing order."""
    valid_tokens: int
    """Length of the real stream; the EOS tokens after it only fill the last row."""
    eos_id: int
    """The separator after each sample (and the padding of the last row)."""

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def padding(self) -> int:
        return self.tokens.numel() - self.valid_tokens


def load_data_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the model in ``model_dir``; samples must be tokenized exactly as the model was trained."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"the model in {model_dir} has no usable tokenizer ({exc}); shard-data needs the model's "
                        "own tokenizer: import the model together with its tokenizer files (tokenizer.json, "
                        "tokenizer_config.json)") from None
    eos_id(tokenizer)
    return tokenizer


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id packing puts between samples."""
    if tokenizer.eos_token_id is None:
        raise DataError("the model's tokenizer has no EOS token, which packing needs to separate samples; "
                        "set eos_token in its tokenizer_config.json")
    return int(tokenizer.eos_token_id)


def tokenize_samples(tokenizer: PreTrainedTokenizerBase, samples: Sequence[Sample],
                     progress: Callable[[int], None] = lambda done: None) -> list[TokenizedSample]:
    """Each sample's token ids (no special tokens), in the same order, tokenized in batches;
    ``progress`` hears how many samples each batch finished."""
    tokenized = []
    for start in range(0, len(samples), TOKENIZE_BATCH):
        batch = samples[start:start + TOKENIZE_BATCH]
        for sample, ids in zip(batch, _encode_batch(tokenizer, [sample.text for sample in batch])):
            tokenized.append(TokenizedSample(sample.id, np.asarray(ids, dtype=np.int32)))
        progress(len(batch))
    return tokenized


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    if tokenizer.is_fast:
        # The Rust tokenizer itself, in parallel: no offsets or Python-side BatchEncoding, and no warning
        # for every text over the model's context (packing, not the tokenizer, cuts sequences).
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def pack(samples: Sequence[TokenizedSample], seq_len: int, eos_id: int) -> Packed:
    """Samples in order, each followed by ``eos_id``, cut into rows of ``seq_len``; the last row EOS-padded."""
    if seq_len < 1:
        raise DataError(f"the sequence length must be at least 1 token, not {seq_len}")
    separator = np.array([eos_id], dtype=np.int32)
    parts: list[np.ndarray] = []
    spans = []
    offset = 0
    for sample in samples:
        spans.append(SampleSpan(sample.id, offset, len(sample.ids)))
        parts += (sample.ids, separator)
        offset += sample.packed_tokens
    rows = -(-offset // seq_len)
    flat = np.full(rows * seq_len, eos_id, dtype=np.int32)
    if parts:
        flat[:offset] = np.concatenate(parts)
    import torch

    return Packed(torch.from_numpy(flat.reshape(rows, seq_len)), spans, offset, eos_id)


def pack_shards(samples: Sequence[TokenizedSample], assignment: Mapping[str, Sequence[int]], seq_len: int,
                eos_id: int) -> dict[str, Packed]:
    """One :class:`Packed` per node from :func:`~dllmd.data.strategies.assign`'s node -> sample indices."""
    return {node: pack([samples[i] for i in indices], seq_len, eos_id) for node, indices in assignment.items()}
