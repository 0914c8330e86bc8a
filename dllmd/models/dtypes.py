"""The floating-point types weights are stored, loaded and trained in, by name (as on the wire, in
manifests and on command lines). Importing this module does not import torch."""

from __future__ import annotations

WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # a model is imported, stored and served in one of these
TRAIN_DTYPES = ("float32", "bfloat16")  # fp32 master weights; bfloat16 runs under autocast


def torch_dtype(name: str):
    """The torch dtype called ``name`` (one of WEIGHT_DTYPES); ValueError naming the choices otherwise."""
    import torch

    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, name)
