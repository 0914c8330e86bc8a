"""Rebalancing as a table: current spans + who is there now -> new layout, moves and their cost."""

from __future__ import annotations

import pytest

from dllmctl.placement.coverage import CoverageRun, describe_coverage, layer_coverage, uncovered
from dllmctl.placement.layout import ModelShape, NodeCapacity, PlanError, Span, span_bytes
from dllmctl.placement.planner import plan_layout
from dllmctl.placement.rebalance import Move, plan_rebalance

MB = 2**20
SMOL = ModelShape("smol", (13 * MB,) * 30, 113 * MB, 1, True)  # SmolLM2-like: tied, 30 layers


def node(name, mem_mb=4000, gflops=100.0):
    return NodeCapacity(name, int(mem_mb * MB), gflops)


def held(*spans):
    return [Span(name, a, b, a == 0, b == SMOL.num_layers, span_bytes(SMOL, a, b)) for name, a, b in spans]


def spans(rebalance):
    return [(s.node, s.start, s.end) for s in rebalance.layout.spans]


THREE = held(("a", 0, 10), ("b", 10, 20), ("c", 20, 30))


@pytest.mark.parametrize("nodes, current, expected, moved", [
    # the last node leaves: its neighbour takes its layers
    ([node("a"), node("b")], THREE, [("a", 0, 10), ("b", 10, 30)], 10),
    # the middle node leaves: both neighbours grow into the gap, evenly
    ([node("a"), node("c")], THREE, [("a", 0, 15), ("c", 15, 30)], 10),
    # the first node leaves: the next one takes the embeddings and its layers (a fresh plan would move 15)
    ([node("b"), node("c")], THREE, [("b", 0, 20), ("c", 20, 30)], 10),
    # a faster neighbour takes more of the gap
    ([node("a", gflops=200), node("c")], THREE, [("a", 0, 20), ("c", 20, 30)], 10),
    # a node left and another joined: the newcomer, idle, takes the gap (the neighbour is already busy)
    ([node("a"), node("b"), node("d")], THREE, [("a", 0, 10), ("b", 10, 20), ("d", 20, 30)], 10),
    # two gaps and two newcomers: one each, not both in the first gap
    ([node(n) for n in "abcde"], held(("a", 0, 6), ("c", 12, 18), ("e", 24, 30)),
     [("a", 0, 6), ("b", 6, 12), ("c", 12, 18), ("d", 18, 24), ("e", 24, 30)], 12),
])
def test_a_node_leaves(nodes, current, expected, moved):
    result = plan_rebalance(SMOL, nodes, current)
    assert spans(result) == expected
    assert result.moved_layers == moved
    assert_survivors_keep_their_layers(result, current)


def assert_survivors_keep_their_layers(result, current):
    after = {s.node: (s.start, s.end) for s in result.layout.spans}
    for span in current:
        if span.node in after:
            assert after[span.node][0] <= span.start and span.end <= after[span.node][1], (span, after[span.node])


def test_nothing_changed_moves_nothing():
    nodes = [node("a"), node("b"), node("c")]
    result = plan_rebalance(SMOL, nodes, plan_layout(SMOL, nodes).spans)
    assert not result.changed and result.moves == [] and result.moved_layers == 0
    assert result.layout.spans == plan_layout(SMOL, nodes).spans


def test_a_node_joins_with_one_replica_moves_nothing():
    result = plan_rebalance(SMOL, [node("a"), node("b"), node("c"), node("d")], THREE)
    assert spans(result) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)] and result.moved_layers == 0


def test_a_node_joins_and_fills_the_missing_replica():
    result = plan_rebalance(SMOL, [node("a"), node("b"), node("c"), node("d")], THREE, replicas=2)
    assert spans(result) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30), ("d", 0, 30)]
    assert result.moves == [Move("d", None, (0, 30))] and result.moved_layers == 30


def test_a_replica_loses_a_node_and_its_partner_takes_over():
    nodes = [node(n) for n in "abcd"]
    # a 0-18 + c 18-30, b 0-18 + d 18-30: the last stages run the head too, so they hold fewer layers
    current = plan_layout(SMOL, nodes, 2).spans
    result = plan_rebalance(SMOL, nodes[:3], current, replicas=2)
    assert spans(result) == [("a", 0, 18), ("c", 18, 30), ("b", 0, 30)]
    assert result.moves == [Move("b", (0, 18), (0, 30))] and result.moved_layers == 12


def test_fewer_replicas_drops_spans_and_moves_no_layers():
    nodes = [node(n) for n in "abcd"]
    result = plan_rebalance(SMOL, nodes, plan_layout(SMOL, nodes, 2).spans, replicas=1)
    assert spans(result) == [("a", 0, 18), ("c", 18, 30)]
    assert result.moves == [Move("b", (0, 18), None), Move("d", (18, 30), None)] and result.moved_layers == 0


def test_a_full_neighbour_falls_back_to_a_fresh_plan():
    # b holds its 10 middle layers but cannot add the head, so the last 10 layers need a reshuffle.
    result = plan_rebalance(SMOL, [node("a"), node("b", 170)], THREE)
    assert spans(result) == [("a", 0, 29), ("b", 29, 30)] and result.moved_layers == 20


def test_a_node_whose_memory_shrank_gives_up_layers():
    # b can no longer afford 10 layers (80 MiB usable): it keeps 6 of them, its neighbours take the rest.
    result = plan_rebalance(SMOL, [node("a"), node("b", 100), node("c")], THREE)
    assert spans(result) == [("a", 0, 12), ("b", 12, 18), ("c", 18, 30)] and result.moved_layers == 4


def test_a_joining_node_too_small_for_a_whole_replica():
    current = held(("a", 0, 15), ("b", 15, 30))
    result = plan_rebalance(SMOL, [node("a"), node("b"), node("c", 300)], current, replicas=2)
    assert spans(result) == [("a", 0, 21), ("c", 21, 30), ("b", 0, 30)] and result.moved_layers == 30


@pytest.mark.parametrize("nodes, current, replicas", [
    ([node(f"n{i}", 300 + 200 * i, 50 + 30 * i) for i in range(7)], THREE, 2),
    ([node(f"n{i}", 300 + 200 * i, 50 + 30 * i) for i in range(7)], [], 3),
    ([node(n) for n in "bcdef"], THREE + held(("d", 5, 25)), 2),
    ([node(n) for n in "abcde"], plan_layout(SMOL, [node(n) for n in "abcdef"], 3).spans, 2),
])
def test_every_layer_is_covered_replicas_times_in_chains(nodes, current, replicas):
    result = plan_rebalance(SMOL, nodes, current, replicas)
    coverage = layer_coverage(SMOL.num_layers, [(s.start, s.end) for s in result.layout.spans])
    assert coverage == [CoverageRun(0, SMOL.num_layers, replicas)]
    assert len({s.node for s in result.layout.spans}) == len(result.layout.spans)  # a node serves one span
    budgets = {n.name: int(n.free_memory_bytes * 0.8) for n in nodes}
    for s in result.layout.spans:
        assert s.embed == (s.start == 0) and s.head == (s.end == SMOL.num_layers)
        assert s.bytes == span_bytes(SMOL, s.start, s.end) <= budgets[s.node]
    # Stages must meet exactly for a route: every span but the last is followed by one starting at its end.
    starts = [s.start for s in result.layout.spans]
    assert all(s.end == SMOL.num_layers or s.end in starts for s in result.layout.spans)
    assert sorted(starts).count(0) == replicas


@pytest.mark.parametrize("nodes, replicas, message", [
    ([node("a", 300), node("b", 300)], 1, "layers 18-29 of smol .* do not fit: a, b can hold"),
    ([node("a")], 2, "2 replicas need at least 2 nodes"),
    ([], 1, "no nodes"),
    ([node("a"), node("b", 300), node("c", 300)], 2, "lower --replicas"),
])
def test_impossible_requests_say_what_is_missing(nodes, replicas, message):
    with pytest.raises(PlanError, match=message):
        plan_rebalance(SMOL, nodes, THREE, replicas)


def test_nodes_that_left_are_not_moves():
    result = plan_rebalance(SMOL, [node("a"), node("b")], THREE)
    assert result.moves == [Move("b", (10, 20), (10, 30))]


def test_deterministic_whatever_the_order_of_the_current_spans():
    nodes = [node(f"n{i}", 500 + i * 37, 40 + i) for i in range(6)]
    current = plan_layout(SMOL, nodes, 2).spans
    first = plan_rebalance(SMOL, nodes[1:], current, 2)
    again = plan_rebalance(SMOL, list(nodes[1:]), list(reversed(current)), 2)
    assert spans(first) == spans(again) and first.moves == again.moves


def test_json_shape():
    doc = plan_rebalance(SMOL, [node("a"), node("b")], THREE).to_json()
    assert doc == {"model": "smol", "replicas": 1, "moved_layers": 10,
                   "spans": [{"node": "a", "start": 0, "end": 10, "embed": True, "head": False,
                              "bytes": span_bytes(SMOL, 0, 10)},
                             {"node": "b", "start": 10, "end": 30, "embed": False, "head": True,
                              "bytes": span_bytes(SMOL, 10, 30)}],
                   "moves": [{"node": "b", "from": [10, 20], "to": [10, 30]}]}


# --- coverage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranges, runs, text", [
    ([(0, 10), (10, 30), (0, 30)], [(0, 30, 2)], "layers 0-29 x2"),
    ([(0, 10), (0, 30)], [(0, 10, 2), (10, 30, 1)], "layers 0-9 x2, 10-29 x1"),
    ([(0, 10), (20, 30)], [(0, 10, 1), (10, 20, 0), (20, 30, 1)], "layers 0-9 x1, 10-19 x0, 20-29 x1"),
    ([(0, 29)], [(0, 29, 1), (29, 30, 0)], "layers 0-28 x1, 29 x0"),
    ([(25, 40)], [(0, 25, 0), (25, 30, 1)], "layers 0-24 x0, 25-29 x1"),  # beyond the model: ignored
])
def test_coverage_runs(ranges, runs, text):
    result = layer_coverage(30, ranges)
    assert [(r.start, r.end, r.count) for r in result] == runs
    assert describe_coverage(result) == text
    assert uncovered(result) == [r for r in result if r.count == 0]
