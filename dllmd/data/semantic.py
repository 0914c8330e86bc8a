"""Similar samples together, in groups of equal token counts: the ``semantic`` strategy.

Each sample becomes a TF-IDF vector of its token ids hashed into ``VECTOR_DIM`` buckets (no model
needed, and any tokenizer works). The groups come from balanced bisecting k-means: 2-means splits
the samples along the axis between its two centroids, the cut falls where the token counts match
the number of nodes on each side, and each side is split again until there is one group per node.

Why not k-means with k = nodes and then balancing? Clusters rarely come in equal sizes, and packing
k clusters onto nodes by size puts unrelated clusters together to fill them up. Cutting along the
2-means axis moves only the samples nearest the boundary, the least typical of either side, and
every cut is balanced within one sample.

An update (:func:`place_by_similarity`) keeps every sample in its group and adds each new one to the
most similar group that has room, so similar code keeps landing together without moving anything.

Memory: ``samples x VECTOR_DIM x 4`` bytes (4 KiB a sample), fine up to some 100 000 samples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dllmd.data.packing import TokenizedSample

VECTOR_DIM = 1024
KMEANS_ITERATIONS = 25


def sample_vectors(samples: Sequence[TokenizedSample], dim: int = VECTOR_DIM) -> np.ndarray:
    """float32 ``[samples, dim]``: L2-normalized TF-IDF of each sample's token ids (id mod ``dim``)."""
    counts = np.zeros((len(samples), dim), dtype=np.float32)
    for row, sample in enumerate(samples):
        counts[row] = np.bincount(sample.ids % dim, minlength=dim)
    document_frequency = np.count_nonzero(counts, axis=0)
    # Rare tokens say more about a sample than ones every sample has; log1p damps repeated tokens.
    idf = np.log((1 + len(samples)) / (1 + document_frequency)) + 1
    vectors = np.log1p(counts) * idf.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def balanced_groups(vectors: np.ndarray, weights: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """Group index (0 .. n_groups - 1) per row of ``vectors``; each group's ``weights`` sum to about
    total / n_groups (within one row's weight per level of bisection)."""
    groups = np.zeros(len(vectors), dtype=np.int64)
    rng = np.random.default_rng(seed)
    _bisect(vectors, weights.astype(np.float64), np.arange(len(vectors)), 0, n_groups, groups, rng)
    return groups


def place_by_similarity(vectors: np.ndarray, weights: np.ndarray, held: np.ndarray, n_groups: int,
                        slack: float) -> np.ndarray:
    """Group per row for an update: rows with a group (``held`` >= 0) keep it; each new row, largest
    first, joins the group whose rows are most like it (cosine to the sum of their vectors) among the
    groups it fits in, up to ``1 + slack`` times the mean weight, or the lightest group when none has room."""
    groups = held.copy()
    kept = groups >= 0
    loads = np.bincount(groups[kept], weights=weights[kept], minlength=n_groups).astype(np.float64)
    sums = np.zeros((n_groups, vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, groups[kept], vectors[kept])
    capacity = float(weights.sum()) / n_groups * (1 + slack)
    for row in sorted(np.flatnonzero(~kept), key=lambda r: (-weights[r], r)):
        similarity = sums @ vectors[row] / np.maximum(np.linalg.norm(sums, axis=1), 1e-12)
        fits = loads + weights[row] <= capacity
        group = int(np.argmax(np.where(fits, similarity, -np.inf))) if fits.any() else int(np.argmin(loads))
        groups[row] = group
        loads[group] += weights[row]
        sums[group] += vectors[row]
    return groups


def _bisect(vectors: np.ndarray, weights: np.ndarray, rows: np.ndarray, first_group: int, n_groups: int,
            groups: np.ndarray, rng: np.random.Generator) -> None:
    if n_groups == 1 or len(rows) <= 1:
        groups[rows] = first_group
        return
    left_groups = n_groups // 2
    score = _two_means_score(vectors[rows], rng)
    ordered = rows[np.argsort(-score, kind="stable")]
    cut = _balanced_cut(weights[ordered], left_groups / n_groups)
    _bisect(vectors, weights, ordered[:cut], first_group, left_groups, groups, rng)
    _bisect(vectors, weights, ordered[cut:], first_group + left_groups, n_groups - left_groups, groups, rng)


def _two_means_score(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, similarity to one 2-means (cosine) centroid minus the other: high on one side, low on the other."""
    start = vectors[rng.integers(len(vectors))]
    centroids = np.stack([start, vectors[np.argmin(vectors @ start)]])  # a random row and the row least like it
    side = None
    for _ in range(KMEANS_ITERATIONS):
        new_side = np.argmax(vectors @ centroids.T, axis=1)
        if (side is not None and np.array_equal(new_side, side)) or np.all(new_side == new_side[0]):
            break
        side = new_side
        centroids = np.stack([_unit(vectors[side == 0].sum(axis=0)), _unit(vectors[side == 1].sum(axis=0))])
    return vectors @ (centroids[0] - centroids[1])


def _balanced_cut(weights: np.ndarray, fraction: float) -> int:
    """How many leading rows to take so that their weight is closest to ``fraction`` of the total."""
    cumulative = np.cumsum(weights)
    target = cumulative[-1] * fraction
    above = int(np.searchsorted(cumulative, target))  # the first prefix reaching the target has above + 1 rows
    below_weight = cumulative[above - 1] if above else 0.0
    return above + 1 if above < len(weights) and cumulative[above] - target < target - below_weight else above


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)
