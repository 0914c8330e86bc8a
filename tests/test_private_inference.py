"""Private mode through real daemons: the client runs the embeddings, the first K layers and the head,
the nodes only the layers between; the output is the ordinary mode's (which equals the local model,
tests/test_distributed_inference.py), and a node of a private session refuses token ids.

Three daemons on 127.0.0.1 serve tiny random models of every family, layers K.. split over two or
three of them without embeddings or head.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmctl.inference.private import load_private_ends
from dllmctl.inference.session import DistributedSession
from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Layout, ModelShape, NodeCapacity, PlanError, Span
from dllmctl.placement.planner import plan_private_layout
from dllmctl.placement.routing import Stage, choose_route
from dllmd.inference.sampling import TokenHistory, sample_next
from dllmd.net.client import RemoteError
from dllmd.net.messages.inference import SESSION_FORWARD, SamplingParams
from dllmd.net.pool import ConnectionPool
from dllmd.net.wire import ErrorCode
from tests.conftest import local_daemons
from tests.test_distributed_inference import _generate
from tests.tiny_models import FAMILIES, make_tiny_model

NEW_TOKENS = 8
PROMPT = [(i * 37 + 11) % 300 + 5 for i in range(19)]  # longer than the sliding windows


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_daemons(tmp_path_factory.mktemp("private"), 3) as cluster:
        yield cluster


def _import(cluster, family: str, name: str | None = None):
    from dllmctl.models.importer import import_model

    name = name or f"tiny-{family}"
    source = cluster["root"] / f"src-{family}"
    if not source.exists():
        make_tiny_model(family, source)
    if not (cluster["store"].root / name).exists():
        import_model(source, cluster["store"], cluster["user"], name=name)
    return name, source


def _deploy_private(cluster, name: str, num_layers: int, k: int) -> list[Stage]:
    """Layers k.. over as many nodes as there are layers to split (at most 3), no embeddings, no head."""
    names = sorted(cluster["registry"].nodes)
    rest = num_layers - k
    parts = min(3, rest)
    cuts = [k + rest * i // parts for i in range(parts + 1)]
    spans = [Span(names[i], a, b, False, False) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / name, spans))
    nodes = cluster["registry"].nodes
    return choose_route([Stage(nodes[s.node], s) for s in spans], num_layers, name, first_layer=k)


def _generate_private(cluster, route, name, k, prompt=PROMPT, sampling=SamplingParams(), logits="last"):
    ends = load_private_ends(cluster["store"], name, cluster["store"].path(name), k)
    return _generate(cluster, route, name, prompt, sampling, NEW_TOKENS, logits, private=ends)


@pytest.mark.parametrize("family", FAMILIES)
def test_private_mode_gives_the_local_models_tokens_and_logits(cluster, family):
    name, source = _import(cluster, family)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    route = _deploy_private(cluster, name, n, 1)
    assert all(not s.span.embed and not s.span.head for s in route) and route[0].span.start == 1
    got = _generate_private(cluster, route, name, 1)
    want = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)[0, len(PROMPT):].tolist()
    assert got.token_ids == want, family
    with torch.no_grad():
        full = model(torch.tensor([PROMPT + got.token_ids[:-1]])).logits[0]
    for k, step_logits in enumerate(got.logits):
        diff = (step_logits[-1] - full[len(PROMPT) - 1 + k]).abs().max().item()
        assert diff < 1e-4, f"{family} step {k}: logits differ by {diff}"


def test_seeded_sampling_and_more_client_layers_match_the_local_model(cluster):
    name, source = _import(cluster, "llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    route = _deploy_private(cluster, name, model.config.num_hidden_layers, 2)
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    got = _generate_private(cluster, route, name, 2, sampling=sampling, logits="none")
    ids, want = list(PROMPT), []
    with torch.no_grad():
        for step in range(NEW_TOKENS):  # what an ordinary last stage samples from the same logits
            want.append(sample_next(model(torch.tensor([ids])).logits[0, -1], sampling, step))
            ids.append(want[-1])
    assert got.token_ids == want
    assert got.logits == []
    # With penalties the private client keeps the token history the last stage would have kept.
    penalized = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234, repetition_penalty=1.3,
                               frequency_penalty=0.4, presence_penalty=0.2)
    got = _generate_private(cluster, route, name, 2, sampling=penalized, logits="none")
    ids, want, history = list(PROMPT), [], TokenHistory.of(PROMPT)
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            want.append(sample_next(model(torch.tensor([ids])).logits[0, -1], penalized, step, history))
            ids.append(want[-1])
    assert got.token_ids == want


def test_a_private_session_refuses_token_ids_and_spans_with_embeddings(cluster):
    name, _ = _import(cluster, "llama")
    route = _deploy_private(cluster, name, 5, 1)
    ends = load_private_ends(cluster["store"], name, cluster["store"].path(name), 1)

    async def send_tokens():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, name, SamplingParams(), prompt_tokens=4, max_new_tokens=1,
                                   private=ends) as session:
            item = {"session": session.id, "step": 0, "start": 0, "final": True}
            await session.clients[0].send_oneway(SESSION_FORWARD.name, {"items": [item]},
                                                 [torch.tensor([[5, 6, 7, 8]])], timeout=2)
            return await session.streams[0].next(timeout=5)

    with pytest.raises(RemoteError) as refused:
        asyncio.run(send_tokens())
    assert refused.value.code == ErrorCode.BAD_ARGS

    # An ordinary deployment (embeddings on the first node) cannot carry a private session at all.
    plain, _ = _import(cluster, "llama", "tiny-llama-plain")
    node = sorted(cluster["registry"].nodes)[0]
    spans = [Span(node, 0, 5, True, True)]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / plain, spans))
    whole = [Stage(cluster["registry"].nodes[node], spans[0])]
    plain_ends = load_private_ends(cluster["store"], plain, cluster["store"].path(plain), 1)

    async def open_private():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, whole, plain, SamplingParams(), prompt_tokens=4, max_new_tokens=1,
                                   private=plain_ends):
            pass

    with pytest.raises(RemoteError) as refused:
        asyncio.run(open_private())
    assert refused.value.code == ErrorCode.BAD_ARGS


def test_a_private_plan_leaves_the_ends_and_the_first_layers_to_the_client():
    model = ModelShape.uniform("m", 30, 14_000_000, 113_000_000, 113_000_000, tied=True)
    nodes = [NodeCapacity("a", 10**9, 100.0), NodeCapacity("b", 10**9, 100.0)]
    layout = plan_private_layout(model, nodes, 2)
    assert [(s.start, s.end, s.embed, s.head) for s in layout.spans] == [(2, 16, False, False), (16, 30, False, False)]
    assert Layout.from_json(layout.to_json(), "m", 30).spans == layout.spans  # a plan file deploys the same
    with pytest.raises(PlanError):
        plan_private_layout(model, nodes, 0)


SECRET = ("My account number is 4417 and the biopsy came back positive; please draft a letter to my employer "
          "explaining why I need three weeks off.")


def _recovery(store, name: str, directory, layers: int) -> float:
    from transformers import AutoTokenizer

    from dllmctl.bench.private_recovery import nearest_token_recovery

    ids = AutoTokenizer.from_pretrained(directory)(SECRET)["input_ids"]
    return nearest_token_recovery(store, name, directory, layers, list(ids))


def test_what_a_nearest_neighbour_lookup_recovers_from_the_first_nodes_input(cluster):
    """K = 0 would send raw embeddings: every token comes back. The default K = 1 is reported (a tiny
    random model's residual stream keeps much of its input, a trained model's far less)."""
    name, _ = _import(cluster, "llama")
    directory = cluster["store"].path(name)
    raw, private = _recovery(cluster["store"], name, directory, 0), _recovery(cluster["store"], name, directory, 1)
    print(f"\ntiny llama: nearest-neighbour recovery K=0 {raw:.1%}, K=1 {private:.1%}")
    assert raw > 0.99 and private < raw


SMOLLM2 = Path.home() / ".local/share/dllm/models"


@pytest.mark.skipif(not (SMOLLM2 / "smollm2-135m-instruct").exists(), reason="SmolLM2-135M is not in the local store")
def test_smollm2_after_one_client_layer_gives_almost_no_token_away():
    from dllmd.models.store import ModelStore

    store = ModelStore(SMOLLM2)
    directory = store.path("smollm2-135m-instruct")
    raw, private = (_recovery(store, "smollm2-135m-instruct", directory, k) for k in (0, 1))
    print(f"\nSmolLM2-135M: nearest-neighbour recovery K=0 {raw:.1%}, K=1 {private:.1%}")
    assert raw > 0.99 and private < 0.1
