"""Tensor-parallel and hybrid inference through real daemons equal the full model run locally.

Four daemons on 127.0.0.1. A tensor-parallel group holds a slice of every layer on each member (KV heads,
MLP columns, vocabulary rows, uneven by weight) and sums the partial results over the members' encrypted
group sockets; a hybrid layout chains two such groups. Greedy tokens must be identical to transformers'
``generate`` and per-step logits within fp32 tolerance, for every family.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmctl.cluster import local as local_cluster
from dllmctl.inference.failover import generate_with_failover
from dllmctl.inference.stages import live_stages
from dllmctl.models.deploy import deploy, undeploy
from dllmctl.placement.layout import PlanError, Span
from dllmctl.placement.routing import RouteError
from dllmctl.placement.tensor import TensorShape, split_span
from dllmd.net.codec import HopCodec
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.identity import Identity
from dllmd.net.pool import ConnectionPool
from tests.conftest import local_daemons
from tests.tiny_models import FAMILIES, make_tiny_model

NEW_TOKENS = 8
LOGITS_TOLERANCE = 1e-4
# Six KV heads (in twelve query heads) can be split 3:2:1; the usual tiny models have two.
TP_CONFIG = dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_daemons(tmp_path_factory.mktemp("tensor"), 4) as cluster:
        yield cluster


def _import(cluster, family: str):
    from dllmctl.models.importer import import_model

    name = f"tp-{family}"
    source = make_tiny_model(family, cluster["root"] / f"src-{family}", **TP_CONFIG)
    if not (cluster["store"].root / name).exists():
        import_model(source, cluster["store"], cluster["user"], name=name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return name, model


def _group_spans(model, nodes: list[str], start: int, end: int, weights: list[float], group: str) -> list[Span]:
    config = model.config
    shape = TensorShape.from_config(config.to_dict())
    n = config.num_hidden_layers
    embed, head = start == 0, end == n
    slices = split_span(shape, end - start, weights, group, embed=embed, head=head)
    return [Span(node, start, end, embed, head, tensor_slice=s) for node, s in zip(nodes, slices)]


def _deploy(cluster, name: str, spans: list[Span]) -> None:
    asyncio.run(undeploy(cluster["user"], list(cluster["registry"].nodes.values()), name))
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / name, spans))


def _generate(cluster, name: str, model, prompt: list[int], parallelism: str, logits: str = "last",
              hops: HopCodec = HopCodec(), sampling: SamplingParams = SamplingParams()):
    nodes = list(cluster["registry"].nodes.values())

    async def run():
        async with ConnectionPool(cluster["user"]) as pool:
            return await generate_with_failover(
                pool, lambda: live_stages(cluster["user"], nodes, name), name, model.config.num_hidden_layers,
                prompt, NEW_TOKENS, set(), sampling, parallelism=parallelism, logits=logits, hops=hops)

    return asyncio.run(run())


def _check_exact(model, prompt: list[int], got, label: str, repetition_penalty: float = 1.0,
                 new_tokens: int = NEW_TOKENS) -> None:
    want = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, repetition_penalty=repetition_penalty)[0, len(prompt):].tolist()
    assert got.token_ids == want, label
    if got.logits:
        with torch.no_grad():
            full = model(torch.tensor([prompt + got.token_ids[:-1]])).logits[0]
        for k, step_logits in enumerate(got.logits):
            diff = (step_logits[-1] - full[len(prompt) - 1 + k]).abs().max().item()
            assert diff < LOGITS_TOLERANCE, f"{label} step {k}: logits differ by {diff}"


PENALIZED = SamplingParams(repetition_penalty=1.5)
PROMPTS = {"one-token": [7], "long": [(i * 37 + 11) % 300 + 5 for i in range(23)]}  # longer than the windows


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_groups_generate_like_the_full_model(cluster, family):
    name, model = _import(cluster, family)
    nodes = sorted(cluster["registry"].nodes)
    n = model.config.num_hidden_layers
    layouts = {
        "2 equal members": _group_spans(model, nodes[:2], 0, n, [1, 1], "g2"),
        "3 members 3:2:1": _group_spans(model, nodes[:3], 0, n, [3, 2, 1], "g3"),
    }
    assert [s.tensor_slice.kv_hi - s.tensor_slice.kv_lo for s in layouts["3 members 3:2:1"]] == [3, 2, 1]
    for label, spans in layouts.items():
        _deploy(cluster, name, spans)
        for prompt_label, prompt in PROMPTS.items():
            # Greedy without logits: the group gathers only each member's best token, never whole logits.
            for logits in ("last", "none"):
                got = _generate(cluster, name, model, prompt, "tensor", logits)
                _check_exact(model, prompt, got, f"{family} {label} {prompt_label} logits={logits}")
    # Greedy with a penalty: the group gathers whole logits, the leader penalizes them as transformers does.
    got = _generate(cluster, name, model, PROMPTS["long"], "tensor", "none", sampling=PENALIZED)
    _check_exact(model, PROMPTS["long"], got, f"{family} penalized", PENALIZED.repetition_penalty)


def test_compressed_partial_sums_stay_within_the_codecs_error(cluster):
    """With --activations fp16 or int8 a group's partial sums travel compressed (every member sums the
    dequantized form of every partial, its own included): the logits stay within the codec's error of
    the exact ones, the same on a second run, and an int8 block that does not divide the width is refused."""
    name, model = _import(cluster, "llama")
    nodes = sorted(cluster["registry"].nodes)
    _deploy(cluster, name, _group_spans(model, nodes[:3], 0, model.config.num_hidden_layers, [3, 2, 1], "gz"))
    prompt = PROMPTS["long"]
    with torch.no_grad():
        exact = model(torch.tensor([prompt])).logits[0, -1]
    for hops, tolerance in ((HopCodec("fp16"), 2e-3), (HopCodec("int8", 16), 5e-2)):
        first = _generate(cluster, name, model, prompt, "tensor", hops=hops)
        again = _generate(cluster, name, model, prompt, "tensor", hops=hops)
        assert first.token_ids == again.token_ids and torch.equal(first.logits[0], again.logits[0])
        error = (first.logits[0][-1] - exact).abs().max().item()
        assert 0 < error < tolerance * exact.abs().max().item(), f"{hops.encoding}: {error}"
    from dllmctl.inference.session import StageFailure
    from dllmd.net.client import RemoteError

    with pytest.raises((RemoteError, StageFailure), match="do not divide the hidden size 96"):
        _generate(cluster, name, model, prompt, "tensor", hops=HopCodec("int8", 64))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_hybrid_two_stages_of_two_members(cluster, family):
    name, model = _import(cluster, family)
    nodes = sorted(cluster["registry"].nodes)
    n = model.config.num_hidden_layers
    cut = n // 2
    spans = (_group_spans(model, nodes[:2], 0, cut, [1, 1], "s0")
             + _group_spans(model, nodes[2:4], cut, n, [2, 1], "s1"))
    _deploy(cluster, name, spans)
    for prompt_label, prompt in PROMPTS.items():
        got = _generate(cluster, name, model, prompt, "hybrid")
        _check_exact(model, prompt, got, f"{family} hybrid {prompt_label}")
        assert [r["node"] for r in got.routes[0]] == [nodes[0], nodes[2]]  # enter each group at member 0
    with pytest.raises(RouteError, match="--parallelism tensor"):
        _generate(cluster, name, model, PROMPTS["one-token"], "tensor")


def test_an_impossible_split_is_refused_with_the_counts_that_work():
    shape = TensorShape(kv_heads=3, queries_per_kv=3, head_dim=64, hidden=576, intermediate=1536, vocab=49152)
    with pytest.raises(PlanError, match="1 to 3 members"):
        split_span(shape, 30, [1, 1, 1, 1], "g")


def test_members_refuse_what_only_their_leader_may_ask(cluster):
    """Sessions enter a group at member 0; a follower's share of a session takes no steps from a caller;
    group.connect links only keys the node trusts as peers, in a group of the size the slice says."""
    from dllmd.net.client import RemoteError, RpcClient
    from dllmd.net.messages import tensor as T
    from dllmd.net.messages.inference import SESSION_FORWARD, SESSION_OPEN, OpenArgs
    from dllmd.net.schema import to_wire
    from dllmctl.inference.session import DistributedSession

    name, model = _import(cluster, "llama")
    nodes, n = sorted(cluster["registry"].nodes), model.config.num_hidden_layers
    _deploy(cluster, name, _group_spans(model, nodes[:2], 0, n, [1, 1], "g"))
    entries, user = cluster["registry"].nodes, cluster["user"]
    follower = entries[nodes[1]]

    async def run():
        stages = [s for s in await live_stages(user, list(entries.values()), name)]
        assert [s.node.name for s in stages] == [nodes[0]]  # followers are not stages
        async with ConnectionPool(user) as pool, \
                DistributedSession(pool, stages, name, SamplingParams(), prompt_tokens=4, max_new_tokens=4) as session:
            async with RpcClient(user, follower.address, follower.public_key) as client:
                with pytest.raises(RemoteError) as refused:
                    await client.call(SESSION_FORWARD.name, {"items": [{"session": session.id, "step": 0, "start": 0}]},
                                      [torch.tensor([[1, 2]])])
                assert refused.value.code == "bad_args"
                args = OpenArgs(session="x" * 16, model=name, start=0, end=n, prompt_tokens=2, max_new_tokens=2)
                stream = await client.open_stream(SESSION_OPEN.name, to_wire(args), timeout=10)
                with pytest.raises(RemoteError) as refused:
                    await stream.next(timeout=10)
                assert refused.value.code == "conflict" and "member 0" in refused.value.message
                members = [T.GroupMemberArgs(public_key=entries[x].public_key, endpoint=f"tcp://127.0.0.1:{9}")
                           for x in nodes[:2]]
                stranger = T.GroupMemberArgs(public_key=Identity.generate().public_key, endpoint="tcp://127.0.0.1:9")
                for bad, code in (([stranger, members[1]], "forbidden"), ([members[0], stranger], "bad_args"),
                                  (members[:1], "bad_args"),
                                  (members, "conflict")):  # already linked
                    with pytest.raises(RemoteError) as refused:
                        await client.invoke(T.GROUP_CONNECT, T.ConnectArgs(model=name, group="g", members=bad))
                    assert refused.value.code == code, bad
            result = await session.generate([5, 6, 7, 8], 4, set())
            return result.token_ids

    got = asyncio.run(run())
    want = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert got == want[0, 4:].tolist()  # the group still serves after all that


def test_a_member_killed_mid_generation_fails_over_to_the_replica_group(cluster):
    """Two groups of two; a follower of the group in use is killed after a few tokens: its leader gives
    the session up, the client moves to the other group and replays, and the tokens are the fault-free
    ones - greedy (the group gathers best tokens) and seeded sampling (it gathers whole logits)."""
    from dllmctl.inference.session import Generation

    name, model = _import(cluster, "qwen2")
    nodes, n = sorted(cluster["registry"].nodes), model.config.num_hidden_layers
    spans = _group_spans(model, nodes[:2], 0, n, [1, 1], "r0") + _group_spans(model, nodes[2:], 0, n, [1, 1], "r1")
    _deploy(cluster, name, spans)
    partner = {nodes[0]: nodes[1], nodes[2]: nodes[3]}
    registry, user, daemons = cluster["registry"], cluster["user"], cluster["root"] / "daemons"
    prompt = PROMPTS["long"]
    # The leader feeds its tokens back itself, so it runs ahead of the client: the run must be long
    # enough that the kill, at the client's third token, lands while the group still has tokens to make.
    new_tokens = 48

    def generate(sampling, kill_at=None):
        result, killed = Generation(prompt_tokens=len(prompt)), []

        def on_token(_token):
            if len(result.token_ids) == kill_at and not killed:
                victim = partner[result.routes[-1][0]["node"]]
                local_cluster.kill(daemons, victim)
                killed.append(victim)

        async def run():
            async with ConnectionPool(user) as pool:
                await generate_with_failover(pool, lambda: live_stages(user, list(registry.nodes.values()), name),
                                             name, n, prompt, new_tokens, set(), sampling, parallelism="tensor",
                                             on_token=on_token, result=result)

        asyncio.run(run())
        return result, killed

    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    expected = {"greedy": generate(SamplingParams())[0].token_ids, "seeded": generate(seeded)[0].token_ids}
    _check_exact(model, prompt, generate(SamplingParams())[0], "fault-free greedy", new_tokens=new_tokens)
    for kind, sampling in (("greedy", SamplingParams()), ("seeded", seeded)):
        result, killed = generate(sampling, kill_at=3)
        assert killed and result.token_ids == expected[kind], kind
        assert result.failovers and result.routes[-1][0]["node"] != result.routes[0][0]["node"]
        local_cluster.restart(daemons, killed[0], registry)
        _deploy(cluster, name, spans)
