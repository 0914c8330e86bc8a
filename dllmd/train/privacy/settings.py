"""What a differentially private job may be: its settings, checked in one place for the client
(``dllmctl train``, the MCP tool) and for the coordinator (``jobs.submit``).

DP-SGD is built for data-parallel jobs in float32 on either backend. Refused: pipelines (model,
hybrid), where no stage holds a whole example's gradient to clip; bfloat16, whose autocast the
per-example gradients (torch.func's vmap) are not built under.

A DP job also has a secret seed (``JobSpec.dp_seed``), drawn by the coordinator at submit: it picks
the Poisson batches and the noise. Privacy amplification by sampling assumes an adversary who does
not know which rows a step used, and the noise protects nothing from someone who can draw it again,
so the seed is never the job's public ``--seed`` and ``jobs show`` never shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dllmd.train.privacy.accountant import PrivacyAccountant

DEFAULT_DELTA = 1e-5
PRIVATE_PARALLELISMS = ("data", "federated")  # example-level DP-SGD; client-level DP of federated rounds
PRIVATE_DTYPES = ("float32",)


class PrivacyError(ValueError):
    """Privacy settings that cannot run; the message says why and what to give instead."""


@dataclass(frozen=True)
class PrivacySettings:
    clip: float = 0.0  # each example's gradient norm bound C; 0: differential privacy off
    noise_multiplier: float = 0.0  # z: the noise's std is z * C
    delta: float = DEFAULT_DELTA
    epsilon_budget: float = 0.0  # 0: no budget

    @classmethod
    def of(cls, spec) -> "PrivacySettings":
        """The settings of a ``JobSpec``."""
        return cls(spec.dp_clip, spec.dp_noise_multiplier, spec.dp_delta, spec.dp_epsilon_budget)

    @property
    def enabled(self) -> bool:
        return self.clip > 0 or self.noise_multiplier > 0

    def check(self, parallelism: str, dtype: str) -> None:
        """Refuse settings that are not differential privacy, or a job DP-SGD is not built for."""
        for flag, value in (("--dp-clip", self.clip), ("--dp-noise-multiplier", self.noise_multiplier),
                            ("--dp-epsilon-budget", self.epsilon_budget)):
            if not math.isfinite(value) or value < 0:
                raise PrivacyError(f"{flag} must be a positive number (0: off), not {value}")
        if not math.isfinite(self.delta) or not 0 < self.delta < 1:
            raise PrivacyError(f"--dp-delta must be between 0 and 1 (both excluded), not {self.delta}; "
                               f"usually well below 1 / the dataset's rows")
        if not self.enabled:
            if self.epsilon_budget:
                raise PrivacyError("--dp-epsilon-budget needs differential privacy: give --dp-clip and "
                                   "--dp-noise-multiplier")
            return
        if not self.noise_multiplier:
            raise PrivacyError("--dp-clip needs --dp-noise-multiplier: clipping without noise is not "
                               "differential privacy")
        if not self.clip:
            raise PrivacyError("--dp-noise-multiplier needs --dp-clip: the noise is scaled to the clip norm")
        if parallelism not in PRIVATE_PARALLELISMS:
            raise PrivacyError(f"differential privacy is built for --parallelism data and federated, not {parallelism}: "
                               f"clipping needs each example's whole gradient, and a pipeline stage holds only "
                               f"its layers' part")
        if dtype not in PRIVATE_DTYPES:
            raise PrivacyError(f"differential privacy runs in --dtype float32 only, not {dtype}: per-example "
                               f"gradients (torch.func's vmap) are not built under bfloat16 autocast")

    def accountant(self, sample_rate: float) -> PrivacyAccountant:
        return PrivacyAccountant(self.noise_multiplier, sample_rate, self.delta)
