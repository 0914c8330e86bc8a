"""A DP job's privacy as its coordinator keeps it: the accountant for the job's sampling rate, what
the workers are told (:class:`PrivacyPlan`), epsilon after each step, and the budget.

Epsilon is a function of the steps taken (every step samples at the same rate with the same noise),
so metrics, ``jobs show``, checkpoints and a resumed job all compute it from the step count.
"""

from __future__ import annotations

from dllmd.net.messages import training as S
from dllmd.train import schedule
from dllmd.train.privacy.settings import PrivacySettings


class JobPrivacy:
    def __init__(self, spec: S.JobSpec):
        self.settings = PrivacySettings.of(spec)
        self.seed = spec.dp_seed
        rows = {s.id: s.rows for s in spec.shards if s.rows}
        if spec.parallelism == "federated":  # client-level: the unit sampled, clipped and noised is a client
            clients = len(rows) or len(spec.nodes)  # before the clients report their rows: every node
            self.batch_size = min(spec.clients_per_round or clients, clients)
            rate = self.batch_size / clients
        else:
            self.batch_size = spec.batch_size
            rate = schedule.sample_rate(rows, spec.batch_size)
        self.accountant = self.settings.accountant(rate)

    @classmethod
    def of(cls, spec: S.JobSpec) -> "JobPrivacy | None":
        """The job's privacy, or None when it trains without DP."""
        return cls(spec) if PrivacySettings.of(spec).enabled else None

    @property
    def sample_rate(self) -> float:
        return self.accountant.sample_rate

    def plan(self) -> S.PrivacyPlan:
        return S.PrivacyPlan(clip=self.settings.clip, noise_multiplier=self.settings.noise_multiplier,
                             expected_batch_size=self.batch_size, seed=self.seed)

    def spent(self, steps: int) -> S.PrivacySpent:
        s = self.settings
        return S.PrivacySpent(epsilon=self.accountant.epsilon(steps), delta=s.delta, steps=steps, clip=s.clip,
                              noise_multiplier=s.noise_multiplier, sample_rate=self.sample_rate,
                              epsilon_budget=s.epsilon_budget)

    def metrics(self, steps: int) -> dict:
        """What a step's metrics row adds: epsilon after ``steps`` steps, at the job's delta."""
        return {"epsilon": self.accountant.epsilon(steps), "delta": self.settings.delta}

    def over_budget(self, step: int) -> str | None:
        """Why step ``step`` (0-based) must not be taken, when it would take epsilon past the budget."""
        budget = self.settings.epsilon_budget
        if not budget:
            return None
        after = self.accountant.epsilon(step + 1)
        if after <= budget:
            return None
        return (f"epsilon {self.accountant.epsilon(step):.4g} spent in {step} steps (delta {self.settings.delta:g}); "
                f"step {step + 1} would spend {after:.4g}, over the budget of {budget:g}")
