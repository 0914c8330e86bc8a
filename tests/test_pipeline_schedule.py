"""Pipeline schedules as tables (no network): what each stage runs, in which order, how many
micro-batches it holds, and the bubble a simulation with fixed costs leaves."""

from __future__ import annotations

import pytest

from dllmd.train.pipeline import schedule as S


def _names(actions):
    return " ".join(str(a) for a in actions)


@pytest.mark.parametrize("stage, want", [
    (0, "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"),
    (1, "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5"),
    (2, "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 B5"),
    (3, "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5"),
])
def test_1f1b_warms_up_alternates_and_drains(stage, want):
    assert _names(S.one_f_one_b(stage, 4, 6)) == want


def test_1f1b_tables():
    assert _names(S.one_f_one_b(0, 3, 4)) == "F0 F1 F2 B0 F3 B1 B2 B3"
    assert _names(S.one_f_one_b(1, 3, 4)) == "F0 F1 B0 F2 B1 F3 B2 B3"
    assert _names(S.one_f_one_b(2, 3, 4)) == "F0 B0 F1 B1 F2 B2 F3 B3"
    assert _names(S.one_f_one_b(0, 4, 2)) == "F0 F1 B0 B1"  # fewer micro-batches than stages
    assert _names(S.gpipe(1, 3, 3)) == "F0 F1 F2 B0 B1 B2"
    assert S.actions("1f1b", 0, 2, 0) == []


@pytest.mark.parametrize("schedule", S.SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(1, 1), (2, 1), (2, 4), (3, 4), (3, 7), (4, 2), (5, 16)])
def test_every_micro_batch_runs_once_each_way_backwards_in_order(schedule, stages, micro):
    for stage in range(stages):
        actions = S.actions(schedule, stage, stages, micro)
        forwards = [a.micro for a in actions if a.kind == S.FORWARD]
        backwards = [a.micro for a in actions if a.kind == S.BACKWARD]
        assert forwards == list(range(micro)) and backwards == list(range(micro))  # the same order: same sums
        seen = set()
        for a in actions:  # a backward only after its own forward
            assert a.kind == S.FORWARD or a.micro in seen
            seen.add(a.micro)
    S.simulate(schedule, stages, micro)  # no deadlock


@pytest.mark.parametrize("stages, micro", [(2, 4), (3, 4), (4, 8), (3, 1)])
def test_in_flight_is_bounded_by_the_stages_for_1f1b_and_by_the_micro_batches_for_gpipe(stages, micro):
    for stage in range(stages):
        assert S.in_flight(S.one_f_one_b(stage, stages, micro)) == min(stages - stage, micro)
        assert S.in_flight(S.gpipe(stage, stages, micro)) == micro
    assert S.max_in_flight("1f1b", stages, micro) == min(stages, micro)


@pytest.mark.parametrize("schedule", S.SCHEDULES)
@pytest.mark.parametrize("stages, micro", [(2, 4), (3, 4), (4, 8), (2, 1)])
@pytest.mark.parametrize("backward_cost", [1.0, 2.0])
def test_balanced_stages_leave_the_theoretical_bubble(schedule, stages, micro, backward_cost):
    timeline = S.simulate(schedule, stages, micro, 1.0, backward_cost)
    assert timeline.makespan == pytest.approx((micro + stages - 1) * (1.0 + backward_cost))
    assert timeline.bubble == pytest.approx(S.theoretical_bubble(stages, micro))


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="schedule must be one of"):
        S.actions("interleaved", 0, 2, 2)
    with pytest.raises(ValueError, match="no stage 2 of 2"):
        S.gpipe(2, 2, 4)
    assert S.theoretical_bubble(3, 0) == 0.0
