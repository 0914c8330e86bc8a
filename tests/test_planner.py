"""The planner as a table: inputs -> layout, or a refusal that says what is missing."""

from __future__ import annotations

import pytest

from dllmctl.placement.layout import ModelShape, NodeCapacity, PlanError, span_bytes
from dllmctl.placement.planner import plan_layout

MB = 2**20
SMOL = ModelShape("smol", (13 * MB,) * 30, 113 * MB, 1, True)  # SmolLM2-like: tied, 30 layers


def node(name, mem_mb, gflops=100.0):
    return NodeCapacity(name, int(mem_mb * MB), gflops)


def spans(layout):
    return [(s.node, s.start, s.end) for s in layout.spans]


@pytest.mark.parametrize("nodes, replicas, expected", [
    # equal nodes: an even split of the compute, in the caller's order; the last node also runs the head
    # (the tied 113 MB matrix takes as long as ~6.2 layers), so it holds fewer layers: 12 + 12 + (6 + 6.2)
    ([node("a", 4000), node("b", 4000), node("c", 4000)], 1, [("a", 0, 12), ("b", 12, 24), ("c", 24, 30)]),
    # one node holds everything
    ([node("solo", 4000)], 1, [("solo", 0, 30)]),
    # throughput weighting: twice the GFLOP/s, twice the compute (24 layers against 6 + the head)
    ([node("fast", 4000, 200), node("slow", 4000, 100)], 1, [("fast", 0, 24), ("slow", 24, 30)]),
    # uneven memory: the small node takes what fits (0.8 x 200 MB = 160 MB: embed 113 + 3 layers 39)
    ([node("small", 200), node("big", 4000)], 1, [("small", 0, 3), ("big", 3, 30)]),
    # two replicas: two disjoint chains each covering every layer
    ([node(n, 4000) for n in "abcd"], 2, [("a", 0, 18), ("c", 18, 30), ("b", 0, 18), ("d", 18, 30)]),
])
def test_layouts(nodes, replicas, expected):
    assert spans(plan_layout(SMOL, nodes, replicas)) == expected


def test_more_nodes_than_layers_leaves_some_idle():
    tiny = ModelShape("tiny", (MB,) * 3, MB, MB, False)
    layout = plan_layout(tiny, [node(f"n{i}", 1000) for i in range(5)])
    assert [s.end - s.start for s in layout.spans] == [1, 1, 1]
    assert all(s.end > s.start for s in layout.spans)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_layer_is_covered_exactly_replicas_times(replicas):
    nodes = [node(f"n{i}", 300 + 200 * i, 50 + 30 * i) for i in range(7)]
    layout = plan_layout(SMOL, nodes, replicas)
    coverage = [0] * SMOL.num_layers
    for s in layout.spans:
        for layer in range(s.start, s.end):
            coverage[layer] += 1
        assert s.embed == (s.start == 0) and s.head == (s.end == SMOL.num_layers)
        assert s.bytes == span_bytes(SMOL, s.start, s.end)
    assert coverage == [replicas] * SMOL.num_layers
    assert len({s.node for s in layout.spans}) == len(layout.spans)  # a node serves one span


def test_json_shape():
    from dllmctl.placement.planner import expected_ms

    layout = plan_layout(SMOL, [node("a", 4000)])
    doc = layout.to_json()
    assert doc == {"model": "smol", "replicas": 1,
                   "spans": [{"node": "a", "start": 0, "end": 30, "embed": True, "head": True,
                              "bytes": span_bytes(SMOL, 0, 30),
                              "expected_ms": float(f"{expected_ms(SMOL, layout.spans[0], 100.0):.4g}")}]}
    assert doc["spans"][0]["expected_ms"] > 0


def test_tied_head_stage_counts_the_embeddings_again():
    assert span_bytes(SMOL, 20, 30) == 10 * 13 * MB + 113 * MB + 1
    assert span_bytes(SMOL, 0, 30) == 30 * 13 * MB + 113 * MB + 1


@pytest.mark.parametrize("nodes, replicas, message", [
    ([node("a", 100), node("b", 100)], 1, "more than any node offers"),
    ([node("a", 200), node("b", 200)], 1, "do not fit: a, b can hold"),
    ([node("a", 4000)], 2, "2 replicas need at least 2 nodes"),
    ([], 1, "no nodes"),
    ([node("a", 4000), node("a", 4000)], 1, "unique"),
    ([node("a", 4000), node("b", 300), node("c", 300)], 2, "lower --replicas"),
])
def test_impossible_requests_say_what_is_missing(nodes, replicas, message):
    with pytest.raises(PlanError, match=message):
        plan_layout(SMOL, nodes, replicas)


def test_deterministic():
    nodes = [node(f"n{i}", 500 + i * 37, 40 + i) for i in range(6)]
    assert spans(plan_layout(SMOL, nodes, 2)) == spans(plan_layout(SMOL, list(nodes), 2))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_equal_nodes_get_equal_compute_with_the_head_counted(count):
    """The head is not free (SmolLM2 over 5 nodes: the last stage took 15 ms against 7.7): stages are
    sized by compute, so the slowest is within 15% of the mean."""
    from dllmctl.placement.planner import head_layer_equivalents

    layout = plan_layout(SMOL, [node(f"n{i}", 4000) for i in range(count)])
    work = [s.layers + (head_layer_equivalents(SMOL) if s.head else 0.0) for s in layout.spans]
    assert len(work) == count and max(work) <= 1.15 * sum(work) / len(work), work


# --- tensor-parallel and hybrid layouts ----------------------------------------------------------

def _smol_shape():
    from dllmctl.placement.tensor import TensorShape

    return TensorShape(kv_heads=3, queries_per_kv=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152)


def test_tensor_groups_split_every_dimension_by_speed():
    from dllmctl.placement.groups import plan_groups
    from dllmctl.placement.layout import check_groups
    from dllmctl.placement.tensor import check_covers

    nodes = [node("a", 4000, 300), node("b", 4000, 100), node("c", 4000, 200), node("d", 4000, 100)]
    layout = plan_groups(SMOL, _smol_shape(), nodes, tp=2, replicas=2, stages=1)
    check_groups(layout.spans)
    check_covers(layout.groups(), _smol_shape())
    groups = {name: [s.node for s in members] for name, members in layout.groups().items()}
    assert groups == {"r0": ["a", "c"], "r1": ["b", "d"]}  # the fastest seed each group; chains get both kinds
    fast, slow = layout.groups()["r0"]
    assert fast.bytes > slow.bytes and all(s.start == 0 and s.end == 30 for s in layout.spans)


def test_each_part_of_a_layer_is_split_by_speed_unless_memory_forbids():
    """Attention, the MLP and the head each end in a reduction that waits for the slowest member, so each
    is split by speed alone; the byte-balanced split is what a member too small for its extra head gets."""
    from dllmctl.placement.groups import plan_groups

    def parts(layout):
        return [(s.tensor_slice.kv_hi - s.tensor_slice.kv_lo, s.tensor_slice.mlp_hi - s.tensor_slice.mlp_lo,
                 s.tensor_slice.vocab_hi - s.tensor_slice.vocab_lo, s.bytes) for s in layout.spans]

    roomy = parts(plan_groups(SMOL, _smol_shape(), [node("a", 400), node("b", 400)], tp=2, stages=1))
    assert [p[:3] for p in roomy] == [(2, 768, 24576), (1, 768, 24576)]  # 3 KV heads: one member has two
    tight = parts(plan_groups(SMOL, _smol_shape(), [node("a", 330), node("b", 330)], tp=2, stages=1))
    assert [p[:2] for p in tight] == [(2, 704), (1, 832)] and tight[0][3] < roomy[0][3]
    assert abs(tight[0][3] - tight[1][3]) < 0.01 * tight[0][3]  # each member holds half the bytes


def test_hybrid_chains_groups_and_groups_nearest_nodes():
    from dllmctl.placement.groups import plan_groups

    nodes = [node(n, 4000) for n in "abcd"]
    near = {("a", "c"): 0.1, ("a", "b"): 5.0, ("a", "d"): 5.0, ("b", "d"): 0.1, ("b", "c"): 5.0, ("c", "d"): 5.0}
    layout = plan_groups(SMOL, _smol_shape(), nodes, tp=2, latency=near)
    stages = [(name, [s.node for s in members], members[0].start, members[0].end)
              for name, members in layout.groups().items()]
    assert [members for _, members, _, _ in stages] == [["a", "c"], ["b", "d"]]
    assert stages[0][2] == 0 and stages[0][3] == stages[1][2] and stages[1][3] == 30
    assert all(ms > 0 for ms in layout.expected_ms.values())


def test_group_layouts_refuse_what_cannot_be_met():
    from dllmctl.placement.groups import plan_groups

    nodes = [node(n, 4000) for n in "abcd"]
    with pytest.raises(PlanError, match="1 to 3 members"):
        plan_groups(SMOL, _smol_shape(), nodes, tp=4, stages=1)
    with pytest.raises(PlanError, match="need 6 nodes"):
        plan_groups(SMOL, _smol_shape(), nodes, tp=3, replicas=2, stages=1)
    with pytest.raises(PlanError, match="MiB"):
        plan_groups(SMOL, _smol_shape(), [node("a", 100), node("b", 100)], tp=2, stages=1)


def test_nodes_are_weighed_by_the_rate_they_decode_at():
    """A decode token reads each fp32 weight once for two FLOPs: the stream rate bounds it, not the
    matmul rate, unless the node computes slower than it reads. A node that predates the stream rate
    is scaled as the others scale (a half-upgraded cluster must not plan its old half 20x faster);
    training weighs the matmul rate."""
    from dllmctl.placement.capacity import decode_gflops, decode_rates, node_capacities

    assert decode_gflops({"matmul_gflops": 300.0, "stream_gbps": 30.0}) == 15.0
    assert decode_gflops({"matmul_gflops": 10.0, "stream_gbps": 100.0}) == 10.0

    def row(name, **hardware):
        return {"name": name, "status": "up", "hardware": {"gpus": [], "ram_available": 1 << 30, **hardware}}

    rows = [row("new", matmul_gflops=300.0, stream_gbps=30.0), row("old", matmul_gflops=600.0)]
    assert decode_rates(rows) == {"new": 15.0, "old": 30.0}
    assert decode_rates(rows[1:]) == {"old": 600.0}  # nobody measures streaming: the matmul rate
    assert {c.name: c.gflops for c in node_capacities(rows, rate="matmul")} == {"new": 300.0, "old": 600.0}
    layout = plan_layout(SMOL, [node("a", 4000, decode_gflops({"matmul_gflops": 300.0, "stream_gbps": 30.0}))])
    assert 17 < layout.expected_ms["a"] < 40  # 527 MB of weights at 30 GB/s, plus the layers' overhead
