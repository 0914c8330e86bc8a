"""Fewer bytes per all-reduce: a worker's flat buffer (gradient sums, or DiLoCo's pseudo-gradient,
then the loss sum and token count) summed over the ring in float16, blockwise int8 or PowerSGD's
low-rank factors, each with error feedback, so that every worker still ends with the same sum.

``reducer_for`` picks the reducer a job's plan asks for; ``reducers.py`` says how each one sums."""

from __future__ import annotations

import torch

from dllmd.net.messages.training import CommPlan
from dllmd.train.compression.powersgd import PowerSGDReducer
from dllmd.train.compression.reducers import Fp16Reducer, Int8Reducer, Reducer


def reducer_for(plan: CommPlan | None, collective, shapes: list[torch.Size]) -> Reducer:
    """The reducer of ``plan`` over ``collective``, for a buffer laid out as ``shapes`` (then 2 extras)."""
    method = plan.compress if plan is not None else "none"
    if method == "none":
        return Reducer(collective)
    if method == "fp16":
        return Fp16Reducer(collective)
    if method == "int8":
        return Int8Reducer(collective, plan.block)
    if method == "powersgd":
        return PowerSGDReducer(collective, shapes, plan.rank, plan.seed)
    raise ValueError(f"unknown compression {method!r}")
