"""Token balance across nodes: the greedy fill that ``round_robin`` and ``random`` place pieces with,
the few moves that restore balance after an update, and how far each strategy may stray.

* **Greedy fill** (list scheduling): each piece, in a given order, goes to the node with the fewest
  tokens so far (ties to the first node). The piece that last landed on the busiest node went to the
  least loaded one, so the busiest ends at most one piece above the mean: skew <= 1 + n * M / W for
  n nodes, W tokens and pieces of at most M (= ``seq_len``) tokens. ``round_robin`` fills largest
  first (with equal pieces that is plain dealing in turn); ``random`` in a seeded order.
* **Rebalance**: an update keeps unchanged pieces where they are, and removed pieces leave holes; when
  the busiest node is over the tolerance, pieces move from it to the least loaded node, each time the
  one that best halves their gap, until it is within the tolerance or no piece can help.
* **Random spread** (``hash``, ``dht``): each piece lands on a node with probability R / n,
  independently of the others, so node loads are sums of independent weighted coin flips. Bernstein's
  inequality with a union bound over the nodes gives the skew that is exceeded with probability at
  most ``1 - confidence`` (:func:`random_spread_bound`). Pieces help here too: the bound shrinks with
  the sum of squared piece sizes, which whole files make large.
"""

from __future__ import annotations

import heapq
import math
from typing import Iterable, Sequence

import numpy as np


def fill_least_loaded(order: Iterable[int], weights: np.ndarray, owners: np.ndarray, loads: np.ndarray) -> None:
    """Place the items ``order`` names, one after another, each on the node with the smallest load
    (``owners[i]`` set; ``loads`` updated in place; ties go to the lower node index)."""
    heap = [(int(load), j) for j, load in enumerate(loads)]
    heapq.heapify(heap)
    for i in order:
        load, j = heapq.heappop(heap)
        owners[i] = j
        loads[j] = load + int(weights[i])
        heapq.heappush(heap, (int(loads[j]), j))


def node_loads(owners: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Tokens per node (int64) of the items whose owner is set (>= 0)."""
    placed = owners >= 0
    return np.bincount(owners[placed], weights=weights[placed], minlength=n).astype(np.int64)


def rebalance(owners: np.ndarray, weights: np.ndarray, n: int, tolerance: float) -> int:
    """Move items from the busiest node to the least loaded one until the skew is at most
    ``1 + tolerance`` or no single move lowers the busiest node; returns how many moved.

    Each move takes the item whose weight is closest to half the two nodes' gap, and only one lighter
    than the gap, so the sum of squared loads falls with every move: it ends, and moves few items."""
    loads = node_loads(owners, weights, n)
    limit = loads.sum() / n * (1 + tolerance)
    moves = 0
    while True:
        busiest, lightest = int(np.argmax(loads)), int(np.argmin(loads))
        gap = int(loads[busiest] - loads[lightest])
        if loads[busiest] <= limit:
            return moves
        candidates = np.flatnonzero((owners == busiest) & (weights < gap))
        if not len(candidates):
            return moves
        pick = int(candidates[np.argmin(np.abs(2 * weights[candidates] - gap))])
        owners[pick] = lightest
        loads[busiest] -= weights[pick]
        loads[lightest] += weights[pick]
        moves += 1


def greedy_bound(weights: Sequence[int], n: int) -> float:
    """The skew a greedy fill cannot exceed: 1 + n * (largest piece) / (all tokens)."""
    total = float(np.sum(weights))
    return 1 + n * float(np.max(weights)) / total if total else 1.0


def random_spread_bound(weights: Sequence[int], n: int, replicas: int = 1, confidence: float = 0.99) -> float:
    """The skew that placing each piece on ``replicas`` of ``n`` nodes uniformly at random exceeds with
    probability at most ``1 - confidence``.

    A node's load is ``sum(w_i * X_i)`` with ``X_i`` ~ Bernoulli(p = R / n), mean ``p W``, variance
    ``s^2 = p (1 - p) sum(w_i^2)``, each term within ``M = max w_i`` of its mean. Bernstein:
    ``P(load - p W >= t) <= exp(-t^2 / (2 s^2 + 2 M t / 3))``; setting ``n`` times that to
    ``1 - confidence`` and solving for t gives the bound ``1 + t / (p W)``."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if not total or replicas >= n:
        return 1.0
    p = replicas / n
    variance = p * (1 - p) * float((w * w).sum())
    c = math.log(n / (1 - confidence))
    linear = float(w.max()) * c / 3
    t = linear + math.sqrt(linear * linear + 2 * variance * c)
    return 1 + t / (p * total)
