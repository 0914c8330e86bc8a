"""In which order each pipeline stage runs its micro-batches: pure data, no I/O.

A schedule is one list of actions per stage, ``F i`` (forward of micro-batch i) and ``B i`` (its
backward). Stage s can run ``F i`` once stage s-1 has (it needs the activations), and ``B i`` once
stage s+1 has run its ``B i`` (it needs their gradient); the last stage's backward starts from its
own loss.

* GPipe: every forward, then every backward. M micro-batches' activations are held at once.
* 1F1B (PipeDream-flush): stage s runs P-1-s forwards to fill the pipeline, then alternates one
  forward and one backward, then drains the backwards. At most P-s micro-batches are in flight on
  stage s, whatever M is: activation memory is bounded by the stage count.

Both run the backwards in micro-batch order 0..M-1, so each stage accumulates its gradients in the
same order under either schedule: the two give bitwise the same weights. Both leave the same bubble,
``(P-1)/(M+P-1)`` of each stage's time, when every stage takes as long as the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FORWARD, BACKWARD = "F", "B"
SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Action:
    kind: str  # FORWARD or BACKWARD
    micro: int

    def __str__(self) -> str:
        return f"{self.kind}{self.micro}"


def gpipe(stage: int, stages: int, micro_batches: int) -> list[Action]:
    _check(stage, stages, micro_batches)
    return ([Action(FORWARD, i) for i in range(micro_batches)]
            + [Action(BACKWARD, i) for i in range(micro_batches)])


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[Action]:
    _check(stage, stages, micro_batches)
    warmup = min(stages - 1 - stage, micro_batches)
    actions = [Action(FORWARD, i) for i in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        actions += [Action(FORWARD, forward), Action(BACKWARD, backward)]
        forward, backward = forward + 1, backward + 1
    actions += [Action(BACKWARD, i) for i in range(backward, micro_batches)]
    return actions


_BY_NAME: dict[str, Callable[[int, int, int], list[Action]]] = {"gpipe": gpipe, "1f1b": one_f_one_b}


def actions(schedule: str, stage: int, stages: int, micro_batches: int) -> list[Action]:
    """Stage ``stage``'s actions for one step under ``schedule`` (one of :data:`SCHEDULES`)."""
    if schedule not in _BY_NAME:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    return _BY_NAME[schedule](stage, stages, micro_batches)


def in_flight(stage_actions: list[Action]) -> int:
    """The most micro-batches whose forward ran and whose backward did not yet: activations held."""
    held = most = 0
    for action in stage_actions:
        held += 1 if action.kind == FORWARD else -1
        most = max(most, held)
    return most


def max_in_flight(schedule: str, stages: int, micro_batches: int) -> int:
    """What the busiest stage (the first) holds: what a stage's memory must be planned for."""
    return in_flight(actions(schedule, 0, stages, micro_batches))


def theoretical_bubble(stages: int, micro_batches: int) -> float:
    """The share of each stage's step spent idle on balanced stages, with free communication."""
    return (stages - 1) / (micro_batches + stages - 1) if micro_batches else 0.0


@dataclass(frozen=True)
class Timeline:
    """When each action of each stage ran, in a simulation with fixed costs."""

    starts: list[list[float]]  # per stage, per action
    makespan: float
    busy: list[float]  # per stage

    @property
    def bubble(self) -> float:
        """The mean share of the makespan the stages spend idle."""
        return 1 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0


def simulate(schedule: str, stages: int, micro_batches: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> Timeline:
    """Run every stage's actions as early as their inputs allow; raises ValueError on a deadlock (a
    schedule whose actions wait on each other). What the tests check schedules with."""
    plan = [actions(schedule, s, stages, micro_batches) for s in range(stages)]
    done: dict[tuple[int, str, int], float] = {}  # (stage, kind, micro) -> finish time
    starts: list[list[float]] = [[] for _ in range(stages)]
    clock, position = [0.0] * stages, [0] * stages
    remaining = sum(len(p) for p in plan)
    while remaining:
        progressed = False
        for s in range(stages):
            if position[s] == len(plan[s]):
                continue
            action = plan[s][position[s]]
            if action.kind == FORWARD:
                needs = [(s - 1, FORWARD, action.micro)] if s > 0 else []
                cost = forward_cost
            else:
                needs = [(s, FORWARD, action.micro)] + ([(s + 1, BACKWARD, action.micro)] if s < stages - 1 else [])
                cost = backward_cost
            if any(n not in done for n in needs):
                continue
            start = max([clock[s], *(done[n] for n in needs)])
            starts[s].append(start)
            clock[s] = done[(s, action.kind, action.micro)] = start + cost
            position[s] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            raise ValueError(f"{schedule} deadlocks with {stages} stages and {micro_batches} micro-batches")
    return Timeline(starts, max(clock), [micro_batches * (forward_cost + backward_cost)] * stages)


def _check(stage: int, stages: int, micro_batches: int) -> None:
    if stages < 1 or not 0 <= stage < stages or micro_batches < 0:
        raise ValueError(f"no stage {stage} of {stages} with {micro_batches} micro-batches")
