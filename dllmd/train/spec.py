"""The wire shapes of training: a job as submitted, and what a coordinator asks of its workers."""

from __future__ import annotations

from dataclasses import dataclass

from dllmd.net.schema import bounded

PARALLELISMS_BUILT = ("data",)
BACKENDS = ("zmq", "torch")


@dataclass
class NodeRef:
    name: str = bounded(max_len=64)
    address: str = bounded(max_len=256)
    public_key: str = bounded(max_len=64)


@dataclass
class ShardRef:
    id: str = bounded(max_len=64)  # the public key of the node the shard was pushed to
    node: str = bounded(max_len=64)
    rows: int = bounded(lo=0, hi=2**40)
    sha256: str = bounded("", max_len=64)


@dataclass
class JobSpec:
    model: str = bounded(max_len=128)
    dataset: str = bounded(max_len=128)
    nodes: list[NodeRef] = bounded(max_len=256)
    shards: list[ShardRef] = bounded(max_len=256)
    batch_size: int = bounded(8, lo=1, hi=1_000_000)  # rows (sequences) per global step
    micro_batch_size: int = bounded(1, lo=1, hi=65536)
    epochs: int = bounded(1, lo=0, hi=100_000)
    max_steps: int = bounded(0, lo=0, hi=100_000_000)  # 0: run the epochs
    lr: float = bounded(1e-4, lo=0.0, hi=10.0)
    warmup_steps: int = bounded(0, lo=0, hi=100_000_000)
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e9)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)
    checkpoint_every: int = bounded(0, lo=0, hi=100_000_000)  # 0: only at the end and on stop
    seed: int = bounded(0, lo=0, hi=2**32 - 1)
    dtype: str = bounded("float32", max_len=16)
    plaintext: bool = False
    backend: str = bounded("zmq", max_len=8)


@dataclass
class WorkerPrepareArgs:
    job: str = bounded(max_len=64)
    model: str = bounded(max_len=128)
    dataset: str = bounded(max_len=128)
    dtype: str = bounded("float32", max_len=16)
    micro_batch_size: int = bounded(1, lo=1, hi=65536)
    lr: float = bounded(1e-4, lo=0.0, hi=10.0)
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e9)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)
    plaintext: bool = False
    backend: str = bounded("zmq", max_len=8)


@dataclass
class RingArgs:
    job: str = bounded(max_len=64)
    generation: int = bounded(lo=0, hi=2**62)
    rank: int = bounded(lo=0, hi=255)
    members: list[NodeRef] = bounded(max_len=256)  # address = the member's ring endpoint


@dataclass
class BackupArgs:
    job: str = bounded(max_len=64)
    shard: str = bounded(max_len=64)
    holder: NodeRef  # a node that holds the shard's rows now


@dataclass
class RowsArgs:
    job: str = bounded(max_len=64)
    shard: str = bounded(max_len=64)
    start: int = bounded(0, lo=0, hi=2**40)
    count: int = bounded(1, lo=1, hi=2**24)


@dataclass
class StepArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    shards: list[str] = bounded(max_len=256)  # the rows tensor's shard column indexes this list


@dataclass
class ApplyArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    lr: float = bounded(lo=0.0, hi=10.0)


@dataclass
class JobArgs:
    job: str = bounded(max_len=64)


@dataclass
class ResumeArgs:
    job: str = bounded(max_len=64)
    nodes: list[NodeRef] = bounded([], max_len=256)  # current addresses (a restarted node may have moved)


@dataclass
class StateArgs:
    job: str = bounded(max_len=64)
    names: list[str] = bounded(max_len=4096)


@dataclass
class LoadStateArgs:
    job: str = bounded(max_len=64)
    names: list[str] = bounded(max_len=4096)
    optimizer_step: int = bounded(0, lo=0, hi=2**40)


@dataclass
class MetricsArgs:
    job: str = bounded(max_len=64)
    after_step: int = bounded(-1, lo=-1, hi=2**40)
    limit: int = bounded(1000, lo=1, hi=10000)


@dataclass
class CheckpointReadArgs:
    job: str = bounded(max_len=64)
    step: int = bounded(lo=0, hi=2**40)
    file: str = bounded(max_len=64)
    offset: int = bounded(0, lo=0, hi=2**44)


@dataclass
class NoArgs:
    pass
