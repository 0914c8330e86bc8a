"""How many nodes hold each layer of a model: ``nodes list`` shows it, a rebalance restores it. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class CoverageRun:
    """Layers ``[start, end)``, each held by ``count`` nodes."""

    start: int
    end: int
    count: int

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "count": self.count}


def layer_coverage(num_layers: int, ranges: Iterable[tuple[int, int]]) -> list[CoverageRun]:
    """Consecutive layers of ``[0, num_layers)`` with the same number of holders, as runs.

    ``ranges`` are the ``(start, end)`` spans that serve the model; layers outside ``[0, num_layers)``
    are ignored (a node may still serve a span of a model re-imported with fewer layers).
    """
    counts = [0] * num_layers
    for start, end in ranges:
        for layer in range(max(start, 0), min(end, num_layers)):
            counts[layer] += 1
    runs: list[CoverageRun] = []
    for layer, count in enumerate(counts):
        if runs and runs[-1].count == count:
            runs[-1] = CoverageRun(runs[-1].start, layer + 1, count)
        else:
            runs.append(CoverageRun(layer, layer + 1, count))
    return runs


def uncovered(runs: list[CoverageRun]) -> list[CoverageRun]:
    """The runs no node serves: a route through the model cannot exist while there are any."""
    return [run for run in runs if run.count == 0]


def describe_coverage(runs: list[CoverageRun]) -> str:
    """``layers 0-9 x2, 10-29 x1`` (inclusive ranges, as tables show layers)."""
    parts = [f"{run.start}-{run.end - 1} x{run.count}" if run.end - run.start > 1 else f"{run.start} x{run.count}"
             for run in runs]
    return "layers " + ", ".join(parts) if parts else "no layers"
