"""Which node gets which sample (after :mod:`dllmd.data.pieces` cut the long ones into pieces).
Pure functions of the samples, the node ids, the strategy, a seed, and where the samples are now.

* ``round_robin``: the largest sample first, each to the node with the fewest tokens so far (equal
  samples are dealt in turn): the most even split by tokens (see :mod:`dllmd.data.balance`).
* ``hash``: node ``stable_hash(sample id) mod n``. A sample's node does not depend on the other
  samples or their order, so re-reading a grown dataset keeps old samples where they were.
* ``random``: samples in a seeded random order, each to the node with the fewest tokens so far:
  an IID split, balanced by tokens. Same seed, same split.
* ``semantic``: similar samples on the same node, groups balanced by tokens (see
  :mod:`dllmd.data.semantic`): locality, or deliberately non-IID shards for federated runs. The
  pieces of one source sample (``groups``) stay together.
* ``dht``: rendezvous (highest random weight) hashing, each sample on the ``replicas`` nodes with the
  highest weight ``mix64(stable_hash(sample id) XOR stable_hash(node id NUL))``. Adding or removing one of n nodes moves only
  about 1/n of the placements, and only to or from that node; the node order does not matter.

Updates (``previous``: where each sample id is now): ``hash`` and ``dht`` place by id alone, so an
unchanged sample stays put by construction. The others keep every sample that is still on one of
``nodes`` where it is, and place only the new ones: ``round_robin`` and ``random`` greedily onto the
least loaded nodes, then move as few samples as it takes to bring the skew back within
``REBALANCE_TOLERANCE``; ``semantic`` puts each new source sample on the node whose samples are most
like it, among those with room.

Every strategy but ``dht`` places each sample exactly once. Node loads are counted in packed tokens
(ids + EOS), what a node actually trains on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from dllmd.data.balance import fill_least_loaded, node_loads, rebalance
from dllmd.data.errors import STRATEGIES, DataError
from dllmd.data.packing import TokenizedSample
from dllmd.data.semantic import balanced_groups, place_by_similarity, sample_vectors

# An update moves unchanged samples only once the busiest node is this far over the mean: balance
# within 5% costs few moves; exact balance would move samples on every edit.
REBALANCE_TOLERANCE = 0.05


@dataclass(frozen=True)
class _Job:
    """What a placer needs: the samples, how many nodes, and where the samples are now."""
    samples: Sequence[TokenizedSample]
    nodes: Sequence[str]
    seed: int
    replicas: int
    groups: np.ndarray
    """Per sample, its source sample: the pieces of one file share a group."""
    held: np.ndarray
    """Per sample, the index of the node holding it now, or -1."""

    @property
    def weights(self) -> np.ndarray:
        return np.array([sample.packed_tokens for sample in self.samples], dtype=np.int64)


def assign(samples: Sequence[TokenizedSample], nodes: Sequence[str], strategy: str, *, seed: int = 0,
           replicas: int = 1, groups: Sequence[int] | None = None,
           previous: Mapping[str, str] | None = None) -> dict[str, list[int]]:
    """Node id -> indices into ``samples`` (ascending) that it gets, for every node, in ``nodes`` order.

    ``seed`` matters to ``random`` and ``semantic``; ``replicas`` (> 1) only to ``dht``; ``groups``
    (per sample, the source sample it was cut from) only to ``semantic``, which keeps a group on one
    node. ``previous`` maps sample ids to the node id holding them now: an update (see above).
    """
    _check(nodes, strategy, replicas)
    index = {node: j for j, node in enumerate(nodes)}
    previous = previous or {}
    held = np.array([index.get(previous.get(sample.id, ""), -1) for sample in samples], dtype=np.int64)
    job = _Job(samples, nodes, seed, replicas,
               np.arange(len(samples)) if groups is None else np.asarray(groups, dtype=np.int64), held)
    owners = _PLACERS[strategy](job)  # [samples, replicas] node indices
    return {node: np.flatnonzero((owners == j).any(axis=1)).tolist() for j, node in enumerate(nodes)}


def stable_hash(key: str) -> int:
    """The first 8 bytes of the key's SHA-256, big-endian: the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def node_tokens(samples: Sequence[TokenizedSample], assignment: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Packed tokens (ids + one EOS per sample) each node gets."""
    return {node: sum(samples[i].packed_tokens for i in indices) for node, indices in assignment.items()}


def skew(per_node_tokens: Mapping[str, int] | Sequence[int]) -> float:
    """Largest load over the mean load: 1.0 is a perfect balance; the slowest node sets the pace."""
    loads = list(per_node_tokens.values()) if isinstance(per_node_tokens, Mapping) else list(per_node_tokens)
    mean = sum(loads) / len(loads) if loads else 0
    return max(loads) / mean if mean else 1.0


def _check(nodes: Sequence[str], strategy: str, replicas: int) -> None:
    if strategy not in _PLACERS:
        raise DataError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not nodes:
        raise DataError("there are no nodes to place the samples on; add nodes to the cluster first")
    repeated = sorted({node for node in nodes if nodes.count(node) > 1})
    if repeated:
        raise DataError(f"node ids must be unique; {', '.join(repeated)} appear more than once")
    if replicas < 1:
        raise DataError(f"replicas must be at least 1, not {replicas}")
    if replicas > 1 and strategy != "dht":
        raise DataError(f"only the dht strategy keeps replicas; {strategy} places each sample once "
                        "(use --strategy dht or leave out --replicas)")
    if replicas > len(nodes):
        raise DataError(f"{replicas} replicas need at least {replicas} nodes; there are {len(nodes)}")


Placer = Callable[[_Job], np.ndarray]


def _round_robin(job: _Job) -> np.ndarray:
    weights = job.weights
    new = np.flatnonzero(job.held < 0)
    # Largest first, then in reading order: equal pieces are dealt to the nodes in turn.
    return _fill(job, weights, sorted(new, key=lambda i: (-weights[i], i)))


def _hash(job: _Job) -> np.ndarray:
    return np.array([stable_hash(sample.id) % len(job.nodes) for sample in job.samples], dtype=np.int64).reshape(-1, 1)


def _random(job: _Job) -> np.ndarray:
    # The order comes from hashing the seed with each id rather than from a PRNG stream, so it
    # neither depends on the library version nor on the order the samples were read in.
    new = np.flatnonzero(job.held < 0)
    return _fill(job, job.weights, sorted(new, key=lambda i: stable_hash(f"{job.seed}\0{job.samples[i].id}")))


def _fill(job: _Job, weights: np.ndarray, order: list[int]) -> np.ndarray:
    """Kept samples where they are, ``order`` greedily onto the least loaded nodes, then rebalanced."""
    owners = job.held.copy()
    fill_least_loaded(order, weights, owners, node_loads(owners, weights, len(job.nodes)))
    rebalance(owners, weights, len(job.nodes), REBALANCE_TOLERANCE)
    return owners.reshape(-1, 1)


def _semantic(job: _Job) -> np.ndarray:
    if not len(job.samples):
        return np.empty((0, 1), dtype=np.int64)
    # One unit per source sample: its pieces' tokens together, so that a file is judged (and placed) whole.
    order = np.argsort(job.groups, kind="stable")
    _, starts = np.unique(job.groups[order], return_index=True)
    members = np.split(order, starts[1:])
    units = [TokenizedSample(job.samples[rows[0]].id, np.concatenate([job.samples[i].ids for i in rows]))
             for rows in members]
    weights = np.array([sum(job.samples[i].packed_tokens for i in rows) for rows in members], dtype=np.int64)
    # A unit is where any of its pieces is (they were kept together): a file that grew a piece stays put.
    held = np.array([max(job.held[rows]) for rows in members], dtype=np.int64)
    vectors = sample_vectors(units)
    if (held < 0).all():
        unit_owner = balanced_groups(vectors, weights, len(job.nodes), job.seed)
    else:
        unit_owner = place_by_similarity(vectors, weights, held, len(job.nodes), REBALANCE_TOLERANCE)
    owners = np.empty(len(job.samples), dtype=np.int64)
    for rows, node in zip(members, unit_owner):
        owners[rows] = node
    return owners.reshape(-1, 1)


def _dht(job: _Job) -> np.ndarray:
    keys = np.array([stable_hash(sample.id) for sample in job.samples], dtype=np.uint64)
    salts = np.array([stable_hash(f"{node}\0") for node in job.nodes], dtype=np.uint64)
    # One SHA-256 per sample and per node, then a bijective 64-bit mixer per pair, vectorized: the
    # weights are as independent across nodes as hashing every pair (n x more SHA-256 in Python).
    weights = _mix64(keys[:, None] ^ salts[None, :])
    # Highest weights first; a tie (odds 2^-64) goes to the later node, deterministically.
    return np.argsort(weights, axis=1, kind="stable")[:, ::-1][:, :job.replicas].astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: every input bit flips about half of the output bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_PLACERS: dict[str, Placer] = {"round_robin": _round_robin, "hash": _hash, "random": _random,
                               "semantic": _semantic, "dht": _dht}
