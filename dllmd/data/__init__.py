"""``dllmctl shard-data``, the part without a network: from a DATA_URI to one packed shard per node.

The pipeline, one module a step::

    result = read_samples(uri, field="text", include=["*.py"], strict=False)    # sources.py
    tokenizer = load_data_tokenizer(model_dir)                                   # packing.py
    samples = tokenize_samples(tokenizer, result.samples)
    pieces = split_samples(samples, seq_len=2048)                                # pieces.py
    assignment = assign(pieces.samples, node_ids, "dht", seed=0, replicas=2,     # strategies.py
                        groups=pieces.groups)
    shards = pack_shards(pieces.samples, assignment, seq_len=2048, eos_id=eos_id(tokenizer))

* **read** (:mod:`.sources`): a directory (a code repository: ``.gitignore`` honoured, ``.git`` and
  binaries skipped), a JSONL file or a plain text file becomes :class:`Sample` s, each with a stable
  id (a relative path, a record id, ``NAME:LINE``). What cannot be used is listed in
  ``result.skipped`` with a reason, for the CLI to show as warnings; nothing here prints.
* **tokenize** (:mod:`.packing`): the model's own tokenizer, in batches, no special tokens.
* **split** (:mod:`.pieces`): a sample longer than one sequence becomes pieces ``ID#0``, ``ID#1`` ...
  of one sequence each, so that placing pieces balances tokens, not files (:mod:`.balance`).
* **assign** (:mod:`.strategies`): node id -> sample indices. Why each strategy exists:

  - ``round_robin``: the most even split by tokens, when nothing else matters;
  - ``hash``: a sample's node depends only on its id, so the split is the same across runs and
    independent of reading order, and new samples do not move old ones;
  - ``random``: a seeded IID split, balanced by tokens (the usual data-parallel assumption);
  - ``semantic``: similar samples together (TF-IDF + balanced bisecting k-means), for locality or
    deliberately non-IID shards as in federated learning;
  - ``dht``: rendezvous hashing with ``replicas`` copies; when a node joins or leaves, only about
    1/n of the placements move, and only to or from that node, so little data is re-sent.

* **pack** (:mod:`.packing`): per node, its samples' ids with an EOS after each, cut into rows of
  ``seq_len``; the last row is EOS-padded and ``valid_tokens`` marks where the real stream ends.

Every step is deterministic: the same input, nodes, strategy and seed give the same shards.
Problems a user can fix raise :class:`DataError` with a message saying what to do.
"""

import importlib

# Where each public name lives. Resolved on first use: packing pulls in torch and transformers (seconds),
# which code that only needs DataError or STRATEGIES (the CLI's help) must not pay for.
_HOME = {
    "DataError": "errors",
    "STRATEGIES": "errors",
    **dict.fromkeys(("Packed", "SampleSpan", "TokenizedSample", "eos_id", "load_data_tokenizer", "pack", "pack_shards",
                     "tokenize_samples"), "packing"),
    **dict.fromkeys(("Pieces", "piece_digest", "split_samples"), "pieces"),
    **dict.fromkeys(("Sample", "Skipped", "SourceResult", "read_samples"), "sources"),
    **dict.fromkeys(("assign", "node_tokens", "skew", "stable_hash"), "strategies"),
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"dllmd.data.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
