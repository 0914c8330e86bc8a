"""Federated training's operations: what a job's coordinator asks of the clients (``fed.*``).

A client may belong to another organization: it authorizes the coordinator's node key with the
``federation`` role, which reaches these operations and nothing else (no ``data.*``, no deploy, no
shard push, no ``train.rows``), and only for datasets its owner listed in ``federated_datasets``.
No reply of these operations carries tokens: a client sends back its row count, losses and its
weight update, never its data.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.messages.training import Evaluated
from dllmd.net.schema import Op, bounded
from dllmd.train.federated.secagg.messages import (Advertisement, EncryptedShare, RevealedShare, SecAggConfig,
                                                   UnmaskRequest)


@dataclass
class FedPrepareArgs:
    job: str = bounded(max_len=64)
    model: str = bounded(max_len=128)
    dataset: str = bounded(max_len=128)
    config: dict = bounded(max_len=512)  # the model's config.json: the client builds the architecture from it
    layout: str = bounded(max_len=64)  # sha256 of the parameters' names and shapes, in order
    dtype: str = bounded("float32", max_len=16)
    micro_batch_size: int = bounded(1, lo=1, hi=65536)
    batch_size: int = bounded(8, lo=1, hi=1_000_000)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e9)
    # Held-out rows, scored here and never sent (dllmd.train.heldout): a seeded fraction of this client's
    # rows (never trained on), or every row of its shard of another dataset.
    eval_fraction: float = bounded(0.0, lo=0.0, hi=0.5)
    seed: int = bounded(0, lo=0, hi=2**32 - 1)
    eval_dataset: str = bounded("", max_len=128)


@dataclass
class FedEvaluateArgs:
    """Score this client's held-out rows with the global weights of ``round`` (sent with fed.load)."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)


@dataclass
class FedPrepared:
    rows: int  # sequences of this client's shard it trains on: its weight in FedAvg
    seq_len: int
    params: int
    memory_needed: int
    device: str


@dataclass
class FedLoadArgs:
    """One chunk of the round's global weights (one fp32 tensor), at element ``offset`` of ``total``."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    offset: int = bounded(lo=0, hi=2**40)
    total: int = bounded(lo=1, hi=2**40)


@dataclass
class FedTrainArgs:
    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    local_steps: int = bounded(lo=1, hi=1_000_000)
    lr: float = bounded(lo=0.0, hi=10.0)
    seed: int = bounded(lo=0, hi=2**32 - 1)
    proximal_mu: float = bounded(0.0, lo=0.0, hi=1e6)
    update_clip: float = bounded(0.0, lo=0.0, hi=1e9)
    weight: float = bounded(1.0, lo=0.0, hi=1.0)  # this client's share of the round's mean
    secure: bool = False  # the update leaves only masked (secure aggregation): fed.update refuses it in clear
    noise_std: float = bounded(0.0, lo=0.0, hi=1e9)  # DP with secure aggregation: this client's part of the noise


@dataclass
class FedTrained:
    """A client's round: its update (``weight`` x the clipped change of its weights) is kept until fetched."""

    round: int
    rows: int
    tokens: int  # target tokens over its local steps
    loss_before: float  # the global model's mean loss on this client's first local batch
    loss_after: float  # its last local step's mean loss
    update_norm: float  # before clipping
    clipped: bool
    compute_s: float


@dataclass
class FedUpdateArgs:
    """Elements ``[offset, offset + count)`` of the round's update (plain aggregation)."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    offset: int = bounded(lo=0, hi=2**40)
    count: int = bounded(lo=1, hi=2**28)


@dataclass
class FedAdvertiseArgs:
    """Secure aggregation, step 1: the round's configuration (the clients whose updates are summed)."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    config: SecAggConfig


@dataclass
class FedShareArgs:
    """Step 2: every client's advertisement; the reply is this client's encrypted shares."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    roster: list[Advertisement] = bounded(max_len=4096)


@dataclass
class FedShares:
    shares: list[EncryptedShare]


@dataclass
class FedMaskArgs:
    """Step 3: the shares other clients sealed for this one; it masks its update, which ``fed.update``
    then hands out (the masked vector only)."""

    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    shares: list[EncryptedShare] = bounded(max_len=4096)


@dataclass
class FedUnmaskArgs:
    job: str = bounded(max_len=64)
    round: int = bounded(lo=0, hi=2**40)
    request: UnmaskRequest


@dataclass
class FedReveals:
    reveals: list[RevealedShare]


@dataclass
class FedJobArgs:
    job: str = bounded(max_len=64)


FED_PREPARE = Op("fed.prepare", FedPrepareArgs, FedPrepared)
FED_LOAD = Op("fed.load", FedLoadArgs, dict)
FED_TRAIN = Op("fed.train", FedTrainArgs, FedTrained)
FED_UPDATE = Op("fed.update", FedUpdateArgs, dict)
FED_RELEASE = Op("fed.release", FedJobArgs, dict)
FED_EVALUATE = Op("fed.evaluate", FedEvaluateArgs, Evaluated)
FED_ADVERTISE = Op("fed.secagg_advertise", FedAdvertiseArgs, Advertisement)
FED_SHARE = Op("fed.secagg_share", FedShareArgs, FedShares)
FED_MASK = Op("fed.secagg_mask", FedMaskArgs, dict)
FED_UNMASK = Op("fed.secagg_unmask", FedUnmaskArgs, FedReveals)
