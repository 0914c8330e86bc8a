"""How much privacy a job has spent: a typed wrapper over Opacus' Rényi-DP accountant.

The mechanism is the subsampled Gaussian: each step samples every unit (a dataset row for DP-SGD,
a client for client-level DP in federated rounds) with probability ``sample_rate``, clips each
unit's contribution to norm C and adds N(0, (noise_multiplier * C)^2) to their sum. Opacus
composes the Rényi divergence of such steps and converts it to (epsilon, delta). Epsilon depends
only on the number of steps, so a resumed job continues the accounting from its step count.

Opacus (which imports torch) is imported when epsilon is first computed, not with this module.
"""

from __future__ import annotations

import math


class PrivacyAccountant:
    """Epsilon at ``delta`` after n steps of the subsampled Gaussian mechanism."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float):
        if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
            raise ValueError(f"the noise multiplier must be a positive number, not {noise_multiplier}: without "
                             f"noise nothing is private")
        if not math.isfinite(sample_rate) or not 0 < sample_rate <= 1:
            raise ValueError(f"the sample rate must be in (0, 1], not {sample_rate}")
        if not math.isfinite(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), not {delta} (usually well below 1 / the number of units)")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)

    def epsilon(self, steps: int) -> float:
        """Epsilon spent by ``steps`` steps (0 for none)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, not {steps}")
        if steps == 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]  # what n equal step() calls record
        return float(accountant.get_epsilon(delta=self.delta))

    def steps_within(self, budget: float, limit: int) -> int:
        """The most steps, at most ``limit``, whose epsilon stays <= ``budget`` (epsilon grows with
        the steps, so a bisection finds it in log2(limit) evaluations)."""
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"the epsilon budget must be a positive number, not {budget}")
        if limit < 0:
            raise ValueError(f"the step limit must be >= 0, not {limit}")
        if self.epsilon(limit) <= budget:
            return limit
        within, over = 0, limit  # epsilon(within) <= budget < epsilon(over)
        while over - within > 1:
            middle = (within + over) // 2
            if self.epsilon(middle) <= budget:
                within = middle
            else:
                over = middle
        return within
