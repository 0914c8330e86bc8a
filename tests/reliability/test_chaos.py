"""`dllmctl bench chaos`'s fault schedule (the faults themselves are tested one by one in
tests/test_train.py and test_partitions.py; the whole run is the benchmark): seeded, spread over the
job after its first steps, never more worker faults than there are workers beside the coordinator."""

from __future__ import annotations

import pytest

from dllmctl.bench.chaos import KINDS, schedule


def test_faults_are_seeded_spread_and_leave_the_coordinator_a_job():
    plan = schedule(list(KINDS), 6, 4, 40, seed=3)
    assert plan == schedule(list(KINDS), 6, 4, 40, seed=3)
    steps = [step for _, step in plan]
    assert steps == sorted(steps) and steps[0] > 2 and steps[-1] < 40
    assert sum(kind != "coordinator" for kind, _ in plan) <= 3
    assert [kind for kind, _ in schedule(["kill"], 5, 3, 40, seed=0)] == ["kill", "kill"]  # two workers to lose
    assert all(kind == "coordinator" for kind, _ in schedule(["coordinator"], 4, 2, 40, seed=0))
    with pytest.raises(ValueError, match="--kinds"):
        schedule(["flood"], 2, 3, 40, seed=0)
