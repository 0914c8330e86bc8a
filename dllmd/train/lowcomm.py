"""What a job that communicates less may be: DiLoCo (``--sync-every``), compressed all-reduces
(``--compress``) and all-reduces overlapped with the backward (``--overlap``), checked in one place
for the client (``dllmctl train``, the MCP tool) and for the coordinator (``jobs.submit``).

Built for data-parallel jobs. Refused, each with the reason: pipelines and hybrids (their stages'
rings sum each stage's part exactly; DiLoCo's data dimension of a hybrid would need every stage of a
replica to take its inner steps together and sync as one: not built); federated jobs (their rounds
already train locally: ``--local-steps``); differential privacy (DP-SGD's guarantee counts one noised
global gradient per step: local steps between syncs, or a compressed sum whose error feedback carries
clipped gradients into later steps, would need their own analysis); compression and overlap on
``--backend torch`` (torch.distributed sums exact float32 buffers; the compressed sums and the
per-bucket all-reduces are built on the ring); overlap with compression (int8 and PowerSGD need the
whole buffer, or at least every block's agreed scale, before they send anything) and with DiLoCo (its
inner steps send nothing to overlap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dllmd.net.messages.training import CommPlan

COMPRESSIONS = ("none", "fp16", "int8", "powersgd")
DEFAULT_OUTER_LR = 0.7  # DiLoCo's (Douillard et al. 2023) outer Nesterov SGD
DEFAULT_OUTER_MOMENTUM = 0.9
INT8_BLOCK = 64
MAX_POWERSGD_RANK = 256


class LowCommError(ValueError):
    """Settings that cannot run together; the message says why and what to give instead."""


@dataclass(frozen=True)
class Compression:
    method: str = "none"
    rank: int = 0  # powersgd

    @classmethod
    def parse(cls, text: str) -> "Compression":
        """``none``, ``fp16``, ``int8`` or ``powersgd:RANK``."""
        method, _, rank = text.strip().lower().partition(":")
        if method not in COMPRESSIONS:
            raise LowCommError(f"--compress must be none, fp16, int8 or powersgd:RANK, not {text!r}")
        if method != "powersgd":
            if rank:
                raise LowCommError(f"--compress {method} takes no rank; only powersgd:RANK does")
            return cls(method)
        if not rank.isdigit() or not 1 <= int(rank) <= MAX_POWERSGD_RANK:
            raise LowCommError(f"--compress powersgd needs a rank from 1 to {MAX_POWERSGD_RANK}, as powersgd:4; "
                               f"got {text!r}")
        return cls(method, int(rank))

    def __str__(self) -> str:
        return f"powersgd:{self.rank}" if self.method == "powersgd" else self.method


@dataclass(frozen=True)
class LowCommSettings:
    sync_every: int = 0  # 0: every step
    outer_lr: float = DEFAULT_OUTER_LR
    outer_momentum: float = DEFAULT_OUTER_MOMENTUM
    compression: Compression = Compression()
    overlap: bool = False
    bucket_bytes: int = 25 * 2**20

    @classmethod
    def of(cls, spec) -> "LowCommSettings":
        """The settings of a ``JobSpec`` (raises :class:`LowCommError` for a ``compress`` it cannot read)."""
        return cls(spec.sync_every, spec.outer_lr, spec.outer_momentum, Compression.parse(spec.compress),
                   spec.overlap, spec.overlap_bucket_bytes)

    @property
    def diloco(self) -> bool:
        return self.sync_every > 0

    @property
    def enabled(self) -> bool:
        return self.diloco or self.compression.method != "none" or self.overlap

    def check(self, parallelism: str, backend: str, private: bool) -> None:
        """Refuse what is not built, or not meaningful, before anything starts."""
        for flag, value, hi in (("--outer-lr", self.outer_lr, 100.0), ("--outer-momentum", self.outer_momentum, 0.9999)):
            if not math.isfinite(value) or not 0 <= value <= hi:
                raise LowCommError(f"{flag} must be between 0 and {hi:g}, not {value}")
        if not self.diloco and (self.outer_lr != DEFAULT_OUTER_LR or self.outer_momentum != DEFAULT_OUTER_MOMENTUM):
            raise LowCommError("--outer-lr and --outer-momentum are DiLoCo's outer step: give --sync-every too")
        if not self.enabled:
            return
        what = self._named()
        if parallelism != "data":
            reason = ("federated rounds already train locally between syncs (--local-steps)"
                      if parallelism == "federated" else
                      "a pipeline's stages sum each stage's gradient part exactly over their own rings; DiLoCo "
                      "over a hybrid's replicas would need every stage of a replica to take its inner steps and "
                      "sync together")
            raise LowCommError(f"{what} is built for --parallelism data, not {parallelism}: {reason}")
        if private:
            raise LowCommError(f"{what} is not built with differential privacy: DP-SGD's guarantee counts one "
                               f"noised global gradient per step, and local steps or error feedback (which carries "
                               f"clipped gradients into later steps) would need their own analysis")
        compressed = self.compression.method != "none"
        if backend != "zmq" and (compressed or self.overlap):
            raise LowCommError(f"{'--compress' if compressed else '--overlap'} is built on the zmq ring; "
                               f"--backend {backend} sums exact float32 buffers only")
        if self.overlap and compressed:
            raise LowCommError("--overlap is not built with --compress: int8 and PowerSGD need the whole "
                               "gradient (every block's agreed scale, every matrix's factors) before they send")
        if self.overlap and self.diloco:
            raise LowCommError("--overlap has nothing to hide under --sync-every: DiLoCo's inner steps send nothing")

    def _named(self) -> str:
        flags = [f for f, on in (("--sync-every", self.diloco), ("--compress", self.compression.method != "none"),
                                 ("--overlap", self.overlap)) if on]
        return " and ".join(flags)

    def plan(self, seed: int) -> CommPlan:
        return CommPlan(sync_every=self.sync_every, outer_lr=self.outer_lr, outer_momentum=self.outer_momentum,
                        compress=self.compression.method, rank=self.compression.rank, block=INT8_BLOCK, seed=seed,
                        overlap=self.overlap, bucket_bytes=self.bucket_bytes)
