"""Pipeline training's pure parts as tables (no network): what each stage runs, in which order, how
many micro-batches it holds, the bubble a simulation with fixed costs leaves; and which layers each
stage is planned to hold."""

from __future__ import annotations

import pytest

from dllmctl.placement.layout import ModelShape, NodeCapacity, PlanError
from dllmctl.placement.training import TrainingLoad, plan_stages, stages_from_counts, training_shape
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


# --- which layers each stage holds ------------------------------------------------------------------

MB = 2**20
MODEL = ModelShape.uniform("m", 12, 10 * MB, 20 * MB, 20 * MB)  # fp32 bytes
LOAD = TrainingLoad(tokens_per_micro_batch=512, in_flight=2, activation_bytes_per_token=256 * 24, vocab=1000)


def _nodes(*specs):
    return [NodeCapacity(f"n{i}", int(free * MB), gflops) for i, (free, gflops) in enumerate(specs)]


def test_training_holds_five_fp32_copies_and_the_activations_in_flight():
    shape = training_shape(MODEL, LOAD)
    activations = 2 * 512 * 256 * 24
    assert shape.layer_bytes == (50 * MB + activations,) * 12
    assert shape.embed_bytes == 100 * MB and shape.head_bytes == 100 * MB + 512 * 1000 * 8
    half = training_shape(MODEL, TrainingLoad(512, 2, 256 * 24, 1000, weight_itemsize=2))  # bf16 stored: fp32 trained
    assert half.layer_bytes[0] - activations == 100 * MB


def test_a_layer_s_estimated_activations_are_what_autograd_saves():
    """The planner's per-token estimate against autograd's saved tensors of real Llama layers (the
    difference of a 3-layer and a 1-layer model: one layer's share), within 2%."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dllmd.train.footprint import layer_activation_bytes
    from dllmd.train.memory import SavedActivations

    config = LlamaConfig(hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=2,
                         vocab_size=300, max_position_embeddings=64)
    saved = {}
    for layers in (1, 3):
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with SavedActivations(model.parameters()).counting() as seen:
            model(torch.randint(0, 300, (2, 32)), labels=torch.randint(0, 300, (2, 32)))
        saved[layers] = sum(seen.values())
    per_token = (saved[3] - saved[1]) / 2 / 64
    assert layer_activation_bytes(config.to_dict()) == pytest.approx(per_token, rel=0.02)


def test_memory_balanced_stages_even_out_each_stage_s_share_of_its_memory():
    """Untied, 1F1B: stage 0 keeps two micro-batches in flight, stage 1 one. Balanced by memory the
    worst stage fills less of its node than under the compute plan, and no split does better."""
    from dllmctl.placement.layout import span_bytes
    from dllmctl.placement.training import plan_stages_by_memory

    nodes = [_nodes((4096, 100), (4096, 100))]
    held = [2, 1]
    spans = plan_stages_by_memory(MODEL, LOAD, held, nodes)
    shapes = [training_shape(MODEL, LOAD, h) for h in held]

    def worst(split):
        return max(span_bytes(shapes[s], a, b) for s, (a, b) in enumerate(split))

    every = [[(0, k), (k, 12)] for k in range(1, 12)]
    assert worst(spans) == min(worst(split) for split in every)
    assert worst(spans) < worst(plan_stages(training_shape(MODEL, LOAD), nodes))
    # A node with half the memory gets about half the bytes.
    small = plan_stages_by_memory(MODEL, LOAD, held, [_nodes((2048, 100), (4096, 100))])
    assert small[0][1] < spans[0][1]
    with pytest.raises(PlanError, match="does not fit"):
        plan_stages_by_memory(MODEL, LOAD, held, [_nodes((300, 100), (300, 100))])


@pytest.mark.parametrize("replicas, want", [
    ([_nodes((4096, 100), (4096, 100))], [(0, 7), (7, 12)]),  # equal: the head's stage holds fewer layers
    ([_nodes((4096, 300), (4096, 100))], [(0, 10), (10, 12)]),  # by speed
    ([_nodes((420, 300), (4096, 100))], [(0, 4), (4, 12)]),  # 80% of 420 MB: embeddings + 4 layers
    # Two replicas: each position as strong as its weaker node.
    ([_nodes((4096, 300), (4096, 100)), _nodes((4096, 100), (4096, 100))], [(0, 7), (7, 12)]),
])
def test_stages_are_planned_by_speed_under_each_position_s_memory(replicas, want):
    assert plan_stages(training_shape(MODEL, LOAD), replicas) == want


def test_stage_plans_that_cannot_be_met_are_refused():
    shape = training_shape(MODEL, LOAD)
    with pytest.raises(PlanError, match="do not fit"):
        plan_stages(shape, [_nodes((300, 100), (300, 100))])
    with pytest.raises(PlanError, match="at most that many stages"):
        plan_stages(shape, [_nodes(*[(4096, 100)] * 13)])
    with pytest.raises(PlanError, match="does not split into 2 stages"):  # the slow node's share rounds to nothing
        plan_stages(shape, [_nodes((4096, 1), (4096, 1e6))])
    assert stages_from_counts([3, 2], 5) == [(0, 3), (3, 5)]
    with pytest.raises(PlanError, match="adds up to 6"):
        stages_from_counts([3, 3], 5)
    with pytest.raises(PlanError, match="two stages or more"):
        stages_from_counts([5], 5)


# --- the links' mailbox ------------------------------------------------------------------------------

def test_links_take_messages_in_any_order_only_from_the_right_neighbour_of_this_generation():
    import asyncio

    import torch

    from dllmd.net.messages.training import NodeRef
    from dllmd.train.pipeline.links import LinkError, PipeLinks

    before, after = NodeRef("a", "tcp://a:1", "key-a"), NodeRef("c", "tcp://c:1", "key-c")

    async def scenario():
        links = PipeLinks("job", lambda *_: asyncio.sleep(0))
        links.form(2, before, after)
        hidden = [torch.ones(1, 2, 4), torch.zeros(1, 2, dtype=torch.int64)]
        links.deliver(2, 0, 1, "activation", hidden, "key-a")  # before it is asked for
        assert (await links.receive(0, 1, "activation")) is hidden
        waiting = asyncio.ensure_future(links.receive(0, 0, "gradient", timeout=5))
        await asyncio.sleep(0)
        links.deliver(1, 0, 0, "gradient", [torch.ones(1)], "key-c")  # an older pipeline's: dropped
        with pytest.raises(ValueError, match="not this stage's next stage"):
            links.deliver(2, 0, 0, "gradient", [torch.ones(1)], "key-a")
        links.deliver(2, 0, 0, "gradient", [torch.full((1,), 7.0)], "key-c")
        assert float((await waiting)[0]) == 7.0
        stuck = asyncio.ensure_future(links.receive(0, 2, "activation", timeout=5))
        await asyncio.sleep(0)
        links.fail_pending(LinkError("reset"))  # a reset wakes every wait
        with pytest.raises(LinkError, match="reset"):
            await stuck
        with pytest.raises(LinkError, match="within"):
            await links.receive(0, 3, "activation", timeout=0.01)

    asyncio.run(scenario())



def test_a_reset_ends_a_flush_that_waits_on_a_dead_neighbour():
    """A send to a neighbour that died is never acknowledged: the reset must end the stage's wait for
    it at once (the coordinator drops a stage whose step outlives the reset), not its send timeout."""
    import asyncio

    import torch

    from dllmd.net.messages.training import NodeRef
    from dllmd.train.pipeline.links import LinkError, PipeLinks

    async def scenario():
        links = PipeLinks("job", lambda *_: asyncio.sleep(3600))  # never answered
        links.form(1, NodeRef("a", "tcp://a:1", "key-a"), NodeRef("c", "tcp://c:1", "key-c"))
        links.send("activation", 0, 0, [torch.ones(1, 2, 4), torch.zeros(1, 2, dtype=torch.int64)])
        flushing = asyncio.ensure_future(links.flush())
        await asyncio.sleep(0.01)
        links.fail_pending(LinkError("reset"))
        with pytest.raises(LinkError, match="did not take"):
            await asyncio.wait_for(flushing, 2)

    asyncio.run(scenario())
