"""Distributed generation through real daemons equals the full model run locally.

Three daemons on 127.0.0.1 serve tiny random models of every family split unevenly; greedy token ids
must be identical to transformers' ``generate`` and per-step logits within 1e-4 (fp32).
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from dllmctl.models.deploy import deploy
from dllmctl.placement.layout import Span
from dllmctl.inference.session import DistributedSession
from dllmd.net.pool import ConnectionPool
from dllmctl.placement.routing import RouteError, Stage, choose_route
from dllmd.net.messages.inference import SamplingParams
from dllmd.net.client import RemoteError, RpcClient
from dllmd.net.codec import HopCodec, decode
from tests.conftest import local_daemons
from tests.tiny_models import make_tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2"]
RESERVE = {"prompt_tokens": 16, "max_new_tokens": 16}  # what a session.open reserves
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three real daemons, a user who administers them, and a client-side model store."""
    with local_daemons(tmp_path_factory.mktemp("inference"), 3) as cluster:
        yield cluster


def _import(cluster, family: str) -> tuple[str, object]:
    from dllmctl.models.importer import import_model

    name = f"tiny-{family}"
    source = make_tiny_model(family, cluster["root"] / f"src-{family}")
    if not (cluster["store"].root / name).exists():
        import_model(source, cluster["store"], cluster["user"], name=name)
    return name, source


def _splits(num_layers: int) -> list[list[tuple[int, int]]]:
    """One node; two uneven; three uneven (first stage one layer)."""
    return [[(0, num_layers)], [(0, 2), (2, num_layers)], [(0, 1), (1, num_layers - 1), (num_layers - 1, num_layers)]]


def _deploy(cluster, name: str, cuts: list[tuple[int, int]]) -> list[Stage]:
    names = sorted(cluster["registry"].nodes)
    n = cuts[-1][1]
    spans = [Span(names[i], a, b, a == 0, b == n) for i, (a, b) in enumerate(cuts)]
    asyncio.run(deploy(cluster["user"], cluster["registry"].nodes, cluster["store"].root / name, spans))
    nodes = cluster["registry"].nodes
    return choose_route([Stage(nodes[s.node], s) for s in spans], n, name)


def _generate(cluster, route, name, prompt, sampling=SamplingParams(), new_tokens=NEW_TOKENS, logits="last",
              hops=HopCodec(), private=None):
    async def run():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, name, sampling, prompt_tokens=len(prompt), max_new_tokens=new_tokens,
                                   logits=logits, hops=hops, private=private, history=prompt) as session:
            return await session.generate(prompt, new_tokens, set())

    return asyncio.run(run())


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_logits_match_the_local_model(cluster, family):
    name, source = _import(cluster, family)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers
    prompts = {"one-token": [7], "long": [(i * 37 + 11) % 300 + 5 for i in range(23)]}  # longer than the windows
    for cuts in _splits(num_layers):
        route = _deploy(cluster, name, cuts)
        for label, prompt in prompts.items():
            got = _generate(cluster, route, name, prompt)
            want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False)[0, len(prompt):].tolist()
            assert got.token_ids == want, f"{family} {cuts} {label}"
            with torch.no_grad():
                full = model(torch.tensor([prompt + got.token_ids[:-1]])).logits[0]
            for k, step_logits in enumerate(got.logits):
                diff = (step_logits[-1] - full[len(prompt) - 1 + k]).abs().max().item()
                assert diff < 1e-4, f"{family} {cuts} {label} step {k}: logits differ by {diff}"


@pytest.mark.parametrize("hops", [HopCodec("fp16"), HopCodec("int8", 16)], ids=["fp16", "int8"])
def test_compressed_hops_compute_what_the_local_model_does_with_the_same_rounding(cluster, hops):
    """Each stage boundary encodes and decodes the hidden state; locally, the same spans with the same
    codec between them give the same tokens and logits. The bytes per hop are what the codec says."""
    from dllmd.models.span import LayerSpan
    from transformers import AutoConfig

    name, source = _import(cluster, "llama")
    cuts = _splits(5)[2]
    route = _deploy(cluster, name, cuts)
    prompt = [(i * 37 + 11) % 300 + 5 for i in range(12)]
    got = _generate(cluster, route, name, prompt, new_tokens=6, hops=hops)
    config = AutoConfig.from_pretrained(source)
    spans = [LayerSpan(config, a, b, embed=a == 0, head=b == 5, tensors=cluster["store"].tensor_source(name))
             for a, b in cuts]
    caches, feed, want, logits = [s.new_cache() for s in spans], torch.tensor([prompt]), [], []
    for _ in range(6):
        positions = torch.arange(caches[0].length, caches[0].length + feed.shape[1])[None]
        x = feed
        for i, (span, cache) in enumerate(zip(spans, caches)):
            x = span(x, positions, cache)
            if i < len(spans) - 1:
                x = decode(*hops.encode(x), torch.float32)
        logits.append(x[0, -1])
        want.append(int(x[0, -1].argmax()))
        feed = torch.tensor([[want[-1]]])
    assert got.token_ids == want
    for k, step_logits in enumerate(got.logits):
        assert (step_logits[-1] - logits[k]).abs().max().item() < 1e-4
    per_value = {"fp16": 2, "int8": 1 + 4 / 16}[hops.encoding]
    assert got.hop_bytes[-1] == [int(64 * per_value)] * 2  # a decode step's [1, 1, 64] hidden state, each hop


def test_multi_turn_continues_the_same_session(cluster):
    name, source = _import(cluster, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    route = _deploy(cluster, name, _splits(model.config.num_hidden_layers)[2])
    turn1, turn2 = [3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46]

    async def run():
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, name, SamplingParams(),  # both turns' positions
                                   prompt_tokens=len(turn1) + 6 + len(turn2), max_new_tokens=6) as session:
            first = await session.generate(turn1, 6, set())
            # Turn 2 appends to the same caches: the last generated token, then the new user text.
            second = await session.generate([first.token_ids[-1], *turn2], 6, set())
            return first.token_ids, second.token_ids

    first, second = asyncio.run(run())
    history = turn1 + first
    want1 = model.generate(torch.tensor([turn1]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, 5:].tolist()
    full = history + turn2
    want2 = model.generate(torch.tensor([full]), max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, len(full):]
    assert first == want1 and second == want2.tolist()


def test_seeded_sampling_is_reproducible_across_runs_and_layouts(cluster):
    name, source = _import(cluster, "llama")
    layers = 5
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    prompt = [5, 6, 7, 8]
    runs = []
    for cuts in (_splits(layers)[1], _splits(layers)[2], _splits(layers)[2]):
        runs.append(_generate(cluster, _deploy(cluster, name, cuts), name, prompt, sampling, 16).token_ids)
    assert runs[0] == runs[1] == runs[2]
    other = _generate(cluster, _deploy(cluster, name, _splits(layers)[2]), name, prompt,
                      SamplingParams(temperature=0.9, seed=99), 16).token_ids
    assert other != runs[0]


def test_nodes_report_what_they_serve(cluster):
    from dllmctl.cluster.live import query_nodes

    name, _ = _import(cluster, "llama")
    _deploy(cluster, name, _splits(5)[2])
    rows = asyncio.run(query_nodes(cluster["user"], cluster["registry"].select(None)))
    served = sorted((s["start"], s["end"]) for r in rows for s in r["serving"] if s["model"] == name)
    assert served == [(0, 1), (1, 4), (4, 5)]


def test_bad_input_gets_clear_errors_and_nodes_keep_serving(cluster):
    name, _ = _import(cluster, "llama")
    route = _deploy(cluster, name, _splits(5)[1])
    user = cluster["user"]
    first, second = route[0].node, route[1].node

    async def scenario():
        async with RpcClient(user, second.address, second.public_key) as client:
            # The wrong layers for this node, an unknown model, a malformed session id.
            for args, code in (({"start": 0, "end": 2}, "conflict"), ({"model": "nope"}, "not_found"),
                               ({"session": "../x"}, "bad_args")):
                request = {"session": "abcdefgh12", "model": name, "start": 2, "end": 5, **RESERVE, **args}
                with pytest.raises(RemoteError) as exc:
                    await client.call("session.open", request)
                assert exc.value.code == code
            # A penalized session hands the last stage its tokens so far: exactly [prompt_tokens] int64 ids in
            # the vocabulary; a penalty out of range is refused by the schema.
            penalized = {"session": "penalized1", "model": name, "start": 2, "end": 5, **RESERVE,
                         "sampling": {"repetition_penalty": 1.3}}
            for tensors, needle in (([], "needs its tokens"), ([torch.arange(3)], "int64 tensor [16]"),
                                    ([torch.full((16,), 10**6)], "token ids must be in")):
                with pytest.raises(RemoteError) as exc:
                    await client.call("session.open", penalized, tensors)
                assert exc.value.code == "bad_args" and needle in exc.value.message
            with pytest.raises(RemoteError) as exc:
                await client.call("session.open", {**penalized, "sampling": {"frequency_penalty": 3.0}})
            assert exc.value.code == "bad_args" and "frequency_penalty" in exc.value.message
            # A wrong dtype on the wire ends the session with a message naming what was expected.
            stream = await client.open_stream("session.open", {"session": "wrongdtype1", "model": name,
                                                               "start": 2, "end": 5, **RESERVE})
            await stream.next(timeout=10)
            await client.send_oneway("session.forward", {"items": [{"session": "wrongdtype1", "step": 0, "start": 0}]},
                                     [torch.zeros(1, 3, 64, dtype=torch.bfloat16)])
            with pytest.raises(RemoteError) as exc:
                await stream.next(timeout=10)
            assert exc.value.code == "bad_args" and "float32 hidden states [1, seq, 64]" in exc.value.message
            # An unknown encoding, or an int8 step without its scales, is refused; the node goes on.
            for encoding, tensors in (("int3", [torch.zeros(1, 3, 64)]),
                                      ("int8", [torch.zeros(1, 3, 64, dtype=torch.int8)])):
                with pytest.raises(RemoteError) as exc:
                    await client.call("session.forward", {"items": [{"session": "wrongdtype1", "step": 0, "start": 0,
                                                                     "encoding": encoding}]}, tensors)
                assert exc.value.code == "bad_args"
            # Out-of-range token ids at the first stage.
        async with RpcClient(user, first.address, first.public_key) as client:
            with pytest.raises(RemoteError) as exc:  # int8 blocks that do not divide the hidden size
                await client.call("session.open", {"session": "badblock12", "model": name, "start": 0, "end": 2,
                                                   **RESERVE, "activations": "int8", "activation_block": 48,
                                                   "next_address": second.address, "next_public_key": second.public_key})
            assert exc.value.code == "bad_args" and "do not divide the hidden size 64" in exc.value.message
            stream = await client.open_stream("session.open", {"session": "badtokens1", "model": name, "start": 0,
                                                               **RESERVE, "end": 2, "next_address": second.address,
                                                               "next_public_key": second.public_key})
            await stream.next(timeout=10)
            await client.send_oneway("session.forward", {"items": [{"session": "badtokens1", "step": 0, "start": 0}]},
                                     [torch.tensor([[10**6]])])
            with pytest.raises(RemoteError, match="token ids must be in"):
                await stream.next(timeout=10)

    asyncio.run(scenario())
    assert _generate(cluster, route, name, [1, 2, 3], new_tokens=3).token_ids  # still serving


def test_a_stage_that_holds_the_whole_model_feeds_its_tokens_back(cluster):
    name, source = _import(cluster, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    route = _deploy(cluster, name, _splits(n)[0])
    node = route[0].node
    prompt = [(i * 37 + 11) % 300 + 5 for i in range(9)]
    want = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 9:].tolist()

    async def generate(feed_back: bool, stop_ids=()):
        async with ConnectionPool(cluster["user"]) as pool, \
                DistributedSession(pool, route, name, SamplingParams(), prompt_tokens=len(prompt), max_new_tokens=8,
                                   logits="last", feed_back=feed_back, stop_ids=stop_ids) as session:
            assert session.feed_back == feed_back
            return await session.generate(prompt, 8, set(stop_ids))

    async def tokens_run() -> int:
        async with RpcClient(cluster["user"], node.address, node.public_key) as client:
            info, _ = await client.call("info")
        return next(s["tokens"] for s in info["serving"] if s["model"] == name)

    sent = asyncio.run(generate(False))
    fed = asyncio.run(generate(True))
    assert fed.token_ids == sent.token_ids == want
    for a, b in zip(fed.logits, sent.logits):  # the same passes, whoever sends the next step
        assert (a - b).abs().max().item() < 1e-5
    # A stop id ends the generation at the stage too: it runs no step past it.
    before = asyncio.run(tokens_run())
    stopped = asyncio.run(generate(True, stop_ids=[want[2]]))
    assert stopped.token_ids == want[:3]
    assert asyncio.run(tokens_run()) - before == len(prompt) + 2  # the prompt, then the first two tokens fed back

    async def refused():
        async with RpcClient(cluster["user"], node.address, node.public_key) as client:
            base = {"session": "feedback123", "model": name, "start": 0, "end": n, **RESERVE}
            for args, needle in (({"stop_ids": [1]}, "apply to a session opened with feed_back_until"),
                                 ({"feed_back_until": 4, "stop_ids": [10**6]}, "stop_ids must be token ids"),
                                 ({"feed_back_until": 4, "private": True}, "")):
                with pytest.raises(RemoteError) as exc:
                    await client.call("session.open", {**base, **args})
                assert exc.value.code == "bad_args" and needle in exc.value.message

    asyncio.run(refused())
    part = _deploy(cluster, name, _splits(n)[1])  # a stage without the head cannot sample what it feeds
    async def refused_on_a_part():
        first = part[0].node
        async with RpcClient(cluster["user"], first.address, first.public_key) as client:
            with pytest.raises(RemoteError) as exc:
                await client.call("session.open", {"session": "feedback456", "model": name, "start": 0, "end": 2,
                                                   **RESERVE, "feed_back_until": 4, "next_address": part[1].node.address,
                                                   "next_public_key": part[1].node.public_key})
            assert exc.value.code == "bad_args" and "holds the whole model" in exc.value.message

    asyncio.run(refused_on_a_part())


def test_tampered_file_is_refused_on_deploy(cluster):
    name, source = _import(cluster, "phi3")
    tampered = cluster["store"].root / "tampered-phi3"
    shutil.copytree(cluster["store"].root / name, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    layer_file = tampered / manifest["layers"][0]["file"]
    blob = bytearray(layer_file.read_bytes())
    blob[-1] ^= 0xFF
    layer_file.write_bytes(bytes(blob))
    nodes = cluster["registry"].nodes
    target = sorted(nodes)[0]

    async def forget():  # make the node receive every file again
        async with RpcClient(cluster["user"], nodes[target].address, nodes[target].public_key) as client:
            await client.call("model.remove", {"model": name})

    asyncio.run(forget())
    with pytest.raises(RemoteError, match="does not match its signed sha256"):
        asyncio.run(deploy(cluster["user"], nodes, tampered, [Span(target, 0, 5, True, True)]))


def test_no_route_names_the_missing_layer(cluster):
    registry = cluster["registry"]
    node = registry.nodes[sorted(registry.nodes)[0]]
    with pytest.raises(RouteError, match="no live replica serves layers 2-4 of m"):
        choose_route([Stage(node, Span(node.name, 0, 2, True, False))], 5, "m")


def test_a_session_belongs_to_the_key_that_opened_it(cluster):
    from dllmd.net.identity import Identity

    name, _ = _import(cluster, "llama")
    node = _deploy(cluster, name, _splits(5)[0])[0].node
    user, intruder = cluster["user"], Identity.generate()
    session = "owned-by-the-user-0001"

    async def scenario():
        async with RpcClient(user, node.address, node.public_key) as owner:
            await owner.call("keys.authorize", {"public_key": intruder.public_key, "role": "client"})
            stream = await owner.open_stream("session.open", {"session": session, "model": name, "start": 0,
                                                              "end": 5, **RESERVE})
            await stream.next(timeout=10)
            async with RpcClient(intruder, node.address, node.public_key) as other:
                for op, args, tensors in (("session.forward", {"items": [{"session": session, "step": 0, "start": 0}]},
                                           [torch.tensor([[1, 2]])]), ("session.close", {"session": session}, [])):
                    with pytest.raises(RemoteError) as exc:  # another client's session is not there for it
                        await other.call(op, args, tensors)
                    assert f"no session {session} here" in exc.value.message, (op, exc.value.message)
            closed, _ = await owner.call("session.close", {"session": session})
            assert closed["closed"]
            # Per-model access: the owner narrows the other key to a model this node does not run for it.
            entry, _ = await owner.call("keys.authorize", {"public_key": intruder.public_key, "role": "client",
                                                           "models": ["some-other-model"]})
            assert entry["models"] == ["some-other-model"]
            async with RpcClient(intruder, node.address, node.public_key) as other:
                with pytest.raises(RemoteError) as exc:
                    await other.call("session.open", {"session": "narrowed-key-session", "model": name, "start": 0,
                                                      "end": 5, **RESERVE})
                assert exc.value.code == "forbidden" and "has not allowed your key to run" in exc.value.message
            await owner.call("keys.revoke", {"public_key": intruder.public_key})

    asyncio.run(scenario())
