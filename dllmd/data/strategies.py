"""Which node gets which sample. Pure functions of the samples, the node ids, the strategy and a seed.

* ``round_robin``: sample i to node i mod n. Even counts; depends on the order of both lists.
* ``hash``: node ``stable_hash(sample id) mod n``. A sample's node does not depend on the other
  samples or their order, so re-reading a grown dataset keeps old samples where they were.
* ``random``: samples in a seeded random order, each to the node with the fewest tokens so far:
  an IID split, balanced by tokens. Same seed, same split.
* ``semantic``: similar samples on the same node, groups balanced by tokens (see
  :mod:`dllmd.data.semantic`): locality, or deliberately non-IID shards for federated runs.
* ``dht``: rendezvous (highest random weight) hashing, each sample on the ``replicas`` nodes with the
  highest weight ``mix64(stable_hash(sample id) XOR stable_hash(node id NUL))``. Adding or removing one of n nodes moves only
  about 1/n of the placements, and only to or from that node; the node order does not matter.

Every strategy but ``dht`` places each sample exactly once. Node loads are counted in packed tokens
(ids + EOS), what a node actually trains on.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Callable, Mapping, Sequence

import numpy as np

from dllmd.data.errors import STRATEGIES, DataError
from dllmd.data.packing import TokenizedSample
from dllmd.data.semantic import balanced_groups, sample_vectors



def assign(samples: Sequence[TokenizedSample], nodes: Sequence[str], strategy: str, *, seed: int = 0,
           replicas: int = 1) -> dict[str, list[int]]:
    """Node id -> indices into ``samples`` (ascending) that it gets, for every node, in ``nodes`` order.

    ``seed`` matters to ``random`` and ``semantic``; ``replicas`` (> 1) only to ``dht``.
    """
    _check(nodes, strategy, replicas)
    owners = _PLACERS[strategy](samples, nodes, seed, replicas)  # [samples, replicas] node indices
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


Placer = Callable[[Sequence[TokenizedSample], Sequence[str], int, int], np.ndarray]


def _round_robin(samples, nodes, seed, replicas) -> np.ndarray:
    return (np.arange(len(samples)) % len(nodes)).reshape(-1, 1)


def _hash(samples, nodes, seed, replicas) -> np.ndarray:
    return np.array([stable_hash(sample.id) % len(nodes) for sample in samples], dtype=np.int64).reshape(-1, 1)


def _random(samples, nodes, seed, replicas) -> np.ndarray:
    # The order comes from hashing the seed with each id rather than from a PRNG stream, so it
    # neither depends on the library version nor on the order the samples were read in.
    order = sorted(range(len(samples)), key=lambda i: stable_hash(f"{seed}\0{samples[i].id}"))
    owners = np.empty((len(samples), 1), dtype=np.int64)
    loads = [(0, j) for j in range(len(nodes))]  # (tokens so far, node index): a heap, ties to the first node
    for i in order:
        tokens, j = heapq.heappop(loads)
        owners[i] = j
        heapq.heappush(loads, (tokens + samples[i].packed_tokens, j))
    return owners


def _semantic(samples, nodes, seed, replicas) -> np.ndarray:
    if not samples:
        return np.empty((0, 1), dtype=np.int64)
    weights = np.array([sample.packed_tokens for sample in samples])
    return balanced_groups(sample_vectors(samples), weights, len(nodes), seed).reshape(-1, 1)


def _dht(samples, nodes, seed, replicas) -> np.ndarray:
    keys = np.array([stable_hash(sample.id) for sample in samples], dtype=np.uint64)
    salts = np.array([stable_hash(f"{node}\0") for node in nodes], dtype=np.uint64)
    # One SHA-256 per sample and per node, then a bijective 64-bit mixer per pair, vectorized: the
    # weights are as independent across nodes as hashing every pair (n x more SHA-256 in Python).
    weights = _mix64(keys[:, None] ^ salts[None, :])
    # Highest weights first; a tie (odds 2^-64) goes to the later node, deterministically.
    return np.argsort(weights, axis=1, kind="stable")[:, ::-1][:, :replicas].astype(np.int64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: every input bit flips about half of the output bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


_PLACERS: dict[str, Placer] = {"round_robin": _round_robin, "hash": _hash, "random": _random,
                               "semantic": _semantic, "dht": _dht}
