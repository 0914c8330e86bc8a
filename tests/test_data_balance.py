"""Token balance on real code: an installed package (jinja2, a few dozen files of very different
sizes) cut into pieces and placed on 4 nodes by every strategy, against the bound each one promises."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dllmd.data import TokenizedSample, assign, node_tokens, read_samples, skew, tokenize_samples
from dllmd.data.balance import fill_least_loaded, greedy_bound, random_spread_bound, rebalance
from dllmd.data.pieces import split_samples
from tests.tiny_models import make_tokenizer

NODES = ["alpha", "bravo", "charlie", "delta"]
SEQ_LEN = 2048
CONFIDENCE = 0.99


@pytest.fixture(scope="module")
def package():
    """jinja2's own source (torch depends on it, so it is installed wherever the project is): whole
    files and the same files cut into pieces."""
    spec = importlib.util.find_spec("jinja2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("jinja2 is not installed")
    files = tokenize_samples(make_tokenizer(), read_samples(spec.submodule_search_locations[0],
                                                            include=["*.py"]).samples)
    assert 20 <= len(files) <= 80
    return files, split_samples(files, SEQ_LEN)


def test_a_file_larger_than_a_nodes_share_is_balanced_only_in_pieces():
    files = [TokenizedSample("huge.py", np.ones(9000, dtype=np.int32))] + [
        TokenizedSample(f"small{i}.py", np.ones(1000, dtype=np.int32)) for i in range(3)]
    assert skew(node_tokens(files, assign(files, NODES, "round_robin"))) > 2.9
    pieces = split_samples(files, 1024).samples
    assert skew(node_tokens(pieces, assign(pieces, NODES, "round_robin"))) < 1.05


def test_round_robin_over_pieces_balances_tokens_within_ten_percent(package):
    _, pieces = package
    loads = node_tokens(pieces.samples, assign(pieces.samples, NODES, "round_robin"))
    weights = [p.packed_tokens for p in pieces.samples]
    assert skew(loads) <= min(1.10, greedy_bound(weights, len(NODES)))


def test_random_is_greedy_too_and_keeps_within_one_piece_of_the_mean(package):
    _, pieces = package
    loads = node_tokens(pieces.samples, assign(pieces.samples, NODES, "random", seed=3))
    assert skew(loads) <= min(1.10, greedy_bound([p.packed_tokens for p in pieces.samples], len(NODES)))


@pytest.mark.parametrize("strategy, replicas", [("hash", 1), ("dht", 1), ("dht", 2)])
def test_hashing_strategies_stay_within_their_random_spread(package, strategy, replicas):
    files, pieces = package
    weights = [p.packed_tokens for p in pieces.samples]
    bound = random_spread_bound(weights, len(NODES), replicas, CONFIDENCE)
    loads = node_tokens(pieces.samples, assign(pieces.samples, NODES, strategy, replicas=replicas))
    assert skew(loads) <= bound
    # Pieces are what makes the bound useful: whole files allow several times the spread.
    whole = random_spread_bound([f.packed_tokens for f in files], len(NODES), replicas, CONFIDENCE)
    assert bound - 1 < 0.6 * (whole - 1)


def test_semantic_keeps_a_files_pieces_on_one_node(package):
    _, pieces = package
    assignment = assign(pieces.samples, NODES, "semantic", groups=pieces.groups)
    node_of = {i: node for node, indices in assignment.items() for i in indices}
    by_group: dict[int, set[str]] = {}
    for i, group in enumerate(pieces.groups):
        by_group.setdefault(group, set()).add(node_of[i])
    assert all(len(nodes) == 1 for nodes in by_group.values())
    assert any(pieces.groups.count(g) > 1 for g in by_group)  # some file was cut
    for node, indices in assignment.items():  # and its pieces stay in order on its node
        ids = [pieces.samples[i].id for i in indices]
        assert ids == sorted(ids, key=ids.index)


def test_the_random_spread_bound_holds_for_random_placements():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 2048, size=300)
    bound = random_spread_bound(weights, 4, confidence=0.99)
    over = 0
    for _ in range(400):
        loads = np.bincount(rng.integers(0, 4, size=len(weights)), weights=weights, minlength=4)
        over += skew(loads.tolist()) > bound
    assert over <= 8  # at most 1% expected; 2% allows for the draw
    assert random_spread_bound([5], 4, replicas=4) == 1.0 and random_spread_bound([], 4) == 1.0


def test_greedy_fill_puts_each_item_on_the_least_loaded_node():
    weights = np.array([5, 5, 5, 5, 9, 1], dtype=np.int64)
    owners = np.full(6, -1, dtype=np.int64)
    loads = np.array([0, 3, 0], dtype=np.int64)
    fill_least_loaded(range(6), weights, owners, loads)
    assert owners.tolist() == [0, 2, 1, 0, 2, 1] and loads.tolist() == [10, 9, 14]


def test_rebalance_moves_few_items_and_only_off_the_busiest_node():
    weights = np.array([4] * 12, dtype=np.int64)
    owners = np.array([0] * 6 + [1] * 3 + [2] * 3, dtype=np.int64)  # 24, 12, 12 tokens
    before = owners.copy()
    moves = rebalance(owners, weights, 3, tolerance=0.05)
    assert moves == 2 and np.bincount(owners, weights=weights).tolist() == [16, 16, 16]
    assert all(before[i] == 0 for i in np.flatnonzero(owners != before))
    # Nothing can help when the only item is larger than the gap.
    assert rebalance(np.array([0]), np.array([10]), 2, tolerance=0.05) == 0
