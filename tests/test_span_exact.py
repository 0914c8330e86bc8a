"""A model cut into layer spans, each with its own cache, generates exactly what the whole model generates.

Every supported family is split 1, 2, 3 and n_layers ways (plus embeddings and head alone), the hidden
state is handed from span to span as it will be between machines, and the chain is compared with the same
model in one process: greedy tokens identical to ``generate`` and every position's logits within 1e-4 of
the full model's forward over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config

from dllmd.models import SUPPORTED_FAMILIES, UnsupportedFamily, adapter_for
from dllmd.models.span import LayerSpan, SpanLoadError, span_tensor_names
from tests.tiny_models import FAMILIES, make_tiny_model

LOGITS_TOLERANCE = 1e-4
NEW_TOKENS = 6
LONG_PROMPT = 21  # longer than every tiny model's sliding window (6-8), so windows slide during prefill


def safetensors_source(model_dir: Path, asked: list[str] | None = None):
    """A tensor source reading only the named tensors from the model's (mmapped) safetensors file."""
    def read(names):
        if asked is not None:
            asked.extend(names)
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
            available = set(checkpoint.keys())
            return {name: checkpoint.get_tensor(name) for name in names if name in available}
    return read


def checkpoint_names(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        return set(checkpoint.keys())


def uneven_bounds(n_layers: int, parts: int) -> list[int]:
    """Span boundaries for ``parts`` spans of unequal size (the first spans are the smaller ones)."""
    return [0] + [n_layers * i // parts for i in range(1, parts)] + [n_layers]


def build_chain(config, model_dir: Path, bounds: list[int]) -> list[LayerSpan]:
    last = len(bounds) - 2
    return [LayerSpan(config, start, end, embed=index == 0, head=index == last, tensors=safetensors_source(model_dir))
            for index, (start, end) in enumerate(zip(bounds, bounds[1:]))]


@dataclass
class Chain:
    """One session through a chain of spans: one cache per span, positions tracked like the client will."""

    spans: list[LayerSpan]

    def __post_init__(self):
        self.caches = [span.new_cache() for span in self.spans]
        self.position = 0
        self.logits: list[torch.Tensor] = []

    def step(self, token_ids: list[int]) -> int:
        """Feed tokens through every span (hidden state handed along); returns the greedy next token."""
        tensor = torch.tensor([token_ids], dtype=torch.long)
        position_ids = torch.arange(self.position, self.position + len(token_ids)).unsqueeze(0)
        for span, cache in zip(self.spans, self.caches):
            tensor = span(tensor, position_ids, cache)
        self.position += len(token_ids)
        self.logits.append(tensor)
        return int(tensor[0, -1].argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Prefill ``prompt`` then decode greedily; the last generated token is not fed back yet."""
        generated = [self.step(prompt)]
        while len(generated) < new_tokens:
            generated.append(self.step([generated[-1]]))
        return generated

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits, dim=1)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("tiny-models")
    models = {}
    for family in FAMILIES:
        model_dir = make_tiny_model(family, root / family)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # Random models emit EOS by chance; generation must run the full length to be compared.
        model.generation_config.eos_token_id = None
        models[family] = (model_dir, model)
    return models


def reference_generate(model, tokens: list[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([tokens])
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=new_tokens)
    return output[0, len(tokens):].tolist()


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits.float()


def prompt(model, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, model.config.vocab_size, (length,), generator=generator).tolist()


SPLITS = {
    "1-span": lambda n: uneven_bounds(n, 1),
    "2-spans": lambda n: uneven_bounds(n, 2),
    "3-spans": lambda n: uneven_bounds(n, 3),
    "every-layer": lambda n: uneven_bounds(n, n),
    # Embeddings alone on the first node, norm + head alone on the last: spans without any layer.
    "bare-ends": lambda n: [0, 0, 2, n, n],
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scenario", ["one-token", "long-prompt", "multi-turn"])
def test_span_chain_generates_like_the_full_model(tiny_models, family, split, scenario):
    model_dir, model = tiny_models[family]
    chain = Chain(build_chain(model.config, model_dir, SPLITS[split](model.config.num_hidden_layers)))

    if scenario == "multi-turn":
        first_turn, second_turn = prompt(model, 9, seed=1), prompt(model, 5, seed=2)
        first_reply = chain.generate(first_turn, NEW_TOKENS)
        assert first_reply == reference_generate(model, first_turn, NEW_TOKENS)
        # Turn 2 goes into the same caches: the last reply token was never fed, so it leads the new prompt.
        history = first_turn + first_reply + second_turn
        generated = chain.generate([first_reply[-1], *second_turn], NEW_TOKENS)
        assert generated == reference_generate(model, history, NEW_TOKENS)
        fed = history + generated[:-1]
    else:
        tokens = prompt(model, 1 if scenario == "one-token" else LONG_PROMPT, seed=0)
        generated = chain.generate(tokens, NEW_TOKENS)
        assert generated == reference_generate(model, tokens, NEW_TOKENS)
        fed = tokens + generated[:-1]

    chain_logits = chain.all_logits()
    assert chain_logits.dtype == torch.float32
    assert chain_logits.shape == (1, len(fed), model.config.vocab_size)
    worst = (chain_logits - reference_logits(model, fed)).abs().max().item()
    assert worst <= LOGITS_TOLERANCE, f"logits differ by {worst:.3g}"
    assert all(cache.length == len(fed) for cache in chain.caches)


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_together_need_exactly_the_checkpoint(tiny_models, family):
    model_dir, model = tiny_models[family]
    config, n_layers = model.config, model.config.num_hidden_layers
    bounds = uneven_bounds(n_layers, 3)
    needed = [span_tensor_names(config, start, end, embed=start == 0, head=end == n_layers)
              for start, end in zip(bounds, bounds[1:])]
    assert set().union(*needed) == checkpoint_names(model_dir)
    middle = needed[1]
    assert middle and all(name.startswith(tuple(f"model.layers.{i}." for i in range(bounds[1], bounds[2])))
                          for name in middle)
    tied = config.tie_word_embeddings
    assert ("lm_head.weight" in needed[-1]) is not tied
    assert ("model.embed_tokens.weight" in needed[-1]) is tied


@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied and untied head
def test_a_span_reads_only_its_own_tensors(tiny_models, family):
    model_dir, model = tiny_models[family]
    config, n_layers = model.config, model.config.num_hidden_layers
    for start, end, embed, head in [(0, 2, True, False), (2, 4, False, False), (4, n_layers, False, True)]:
        asked: list[str] = []
        LayerSpan(config, start, end, embed=embed, head=head, tensors=safetensors_source(model_dir, asked))
        assert asked == span_tensor_names(config, start, end, embed, head)
        assert len(asked) == len(set(asked))


def test_unsupported_family_is_refused_by_name(tmp_path):
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(UnsupportedFamily) as refused:
        adapter_for(config)
    message = str(refused.value)
    assert "'gpt2'" in message and all(family in message for family in SUPPORTED_FAMILIES)
    assert isinstance(refused.value, ValueError)
    with pytest.raises(UnsupportedFamily, match="gpt2"):
        span_tensor_names(config, 0, 1, embed=True, head=False)
    with pytest.raises(UnsupportedFamily, match="gpt2"):
        LayerSpan(config, 0, 1, embed=True, head=False, tensors=lambda names: {})


def test_every_family_of_the_tiny_zoo_has_an_adapter():
    for family in FAMILIES:
        assert adapter_for(AutoConfig.for_model(family)).family == family


def test_missing_tensor_is_a_clear_error(tiny_models):
    model_dir, model = tiny_models["qwen2"]
    full_source = safetensors_source(model_dir)
    missing = "model.layers.1.self_attn.k_proj.bias"

    def without_one(names):
        return {name: tensor for name, tensor in full_source(names).items() if name != missing}

    with pytest.raises(SpanLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*missing"):
        LayerSpan(model.config, 1, 3, embed=False, head=False, tensors=without_one)


def test_misshapen_tensor_is_a_clear_error(tiny_models):
    model_dir, model = tiny_models["llama"]
    full_source = safetensors_source(model_dir)
    wrong = "model.layers.2.mlp.up_proj.weight"

    def with_a_wrong_shape(names):
        tensors = full_source(names)
        tensors[wrong] = tensors[wrong][:-1]
        return tensors

    with pytest.raises(SpanLoadError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*shape"):
        LayerSpan(model.config, 2, 3, embed=False, head=False, tensors=with_a_wrong_shape)


def test_positions_must_continue_the_cache(tiny_models):
    model_dir, model = tiny_models["mistral"]
    span = LayerSpan(model.config, 3, 5, embed=False, head=False, tensors=safetensors_source(model_dir))
    cache = span.new_cache()
    hidden = torch.randn(1, 4, model.config.hidden_size)
    span(hidden, torch.arange(4).unsqueeze(0), cache)
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        span(hidden[:, :1], torch.tensor([[7]]), cache)
    assert cache.length == 4


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_pass_files_no_deprecation_warning(tiny_models, family):
    """A span calls transformers' layers and mask helpers the way their signatures ask: a deprecated
    keyword goes through a wrapper that builds and files a warning on every layer call (~2 ms a token
    on SmolLM2, docs/inference.md)."""
    import warnings

    model_dir, model = tiny_models[family]
    span = LayerSpan(model.config, 0, model.config.num_hidden_layers, embed=True, head=True,
                     tensors=safetensors_source(model_dir))
    cache = span.new_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        span(torch.tensor([[1, 2, 3, 4]]), torch.arange(4).unsqueeze(0), cache)  # prefill: masks built
        span(torch.tensor([[5]]), torch.tensor([[4]]), cache)  # decode: no mask
    assert cache.length == 5


def test_cache_reports_length_and_bounded_memory(tiny_models):
    model_dir, model = tiny_models["mistral"]  # every layer slides over a window of 8
    config = model.config
    span = LayerSpan(config, 0, 2, embed=True, head=False, tensors=safetensors_source(model_dir))
    cache = span.new_cache()
    assert cache.length == 0 and cache.nbytes == 0
    position = 0
    sizes = []
    for _ in range(30):
        span(torch.tensor([[7]]), torch.tensor([[position]]), cache)
        position += 1
        sizes.append(cache.nbytes)
    assert cache.length == 30
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * 2 * config.num_key_value_heads * head_dim * 4  # 2 layers x (keys + values) x fp32
    assert sizes[-1] == sizes[-10] <= config.sliding_window * per_token


def test_replay_into_a_fresh_cache_continues_identically(tiny_models):
    """What a replica does after a failure: run the session's token ids into a new cache, then continue.

    Replayed in the same chunks (the prompt, then one token per step) the replica is bit-identical; in one
    prefill it matches within rounding, because matmuls over 17 rows round differently from 1-row ones.
    """
    model_dir, model = tiny_models["gemma2"]
    bounds = uneven_bounds(model.config.num_hidden_layers, 2)
    tokens = prompt(model, 12, seed=5)
    live = Chain(build_chain(model.config, model_dir, bounds))
    generated = live.generate(tokens, NEW_TOKENS)
    next_token = live.step([generated[-1]])

    same_chunks = Chain(build_chain(model.config, model_dir, bounds))
    same_chunks.step(tokens)
    for token in generated[:-1]:
        same_chunks.step([token])
    assert same_chunks.step([generated[-1]]) == next_token
    assert torch.equal(same_chunks.logits[-1], live.logits[-1])

    one_prefill = Chain(build_chain(model.config, model_dir, bounds))
    one_prefill.step(tokens + generated[:-1])
    assert one_prefill.step([generated[-1]]) == next_token
    assert (one_prefill.logits[-1] - live.logits[-1]).abs().max().item() <= LOGITS_TOLERANCE


def test_a_batch_of_equal_length_prompts(tiny_models):
    model_dir, model = tiny_models["qwen3"]
    config = model.config
    chain = build_chain(config, model_dir, uneven_bounds(config.num_hidden_layers, 2))
    caches = [span.new_cache() for span in chain]
    batch = torch.tensor([prompt(model, 10, seed=7), prompt(model, 10, seed=8)])
    tensor = batch
    for span, cache in zip(chain, caches):
        tensor = span(tensor, torch.arange(10).unsqueeze(0).expand(2, -1), cache)
    with torch.inference_mode():
        expected = model(batch).logits
    assert (tensor - expected).abs().max().item() <= LOGITS_TOLERANCE


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    return smollm2_gguf.parent


def test_smollm2_split_in_three_generates_like_the_full_model(smollm2_dir):
    """The real model, dequantized to fp32: layers 0-9, 10-19 and 20-29 on three 'nodes'."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_GGUF)
    config, weights = model.config, model.state_dict()
    chain = Chain([LayerSpan(config, start, end, embed=start == 0, head=end == 30, tensors=lambda names: weights)
                   for start, end in [(0, 10), (10, 20), (20, 30)]])
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    expected = reference_generate(model, tokens, 16)
    stop = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
               else [model.generation_config.eos_token_id])
    generated = [chain.step(tokens)]
    while len(generated) < len(expected) and generated[-1] not in stop:
        generated.append(chain.step([generated[-1]]))
    assert generated == expected, tokenizer.decode(generated)

    fed = tokens + generated[:-1]
    worst = (chain.all_logits() - reference_logits(model, fed)).abs().max().item()
    assert worst <= LOGITS_TOLERANCE, f"logits differ by {worst:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_decode_of_sessions_at_different_lengths_matches_each_alone(tiny_models, family):
    """Continuous batching: sessions with caches of different lengths (some past the sliding window)
    decode as one batch, and each follows exactly the tokens and logits it produces alone."""
    model_dir, model = tiny_models[family]
    config = model.config
    chain = build_chain(config, model_dir, uneven_bounds(config.num_hidden_layers, 3))
    prompts = [prompt(model, length, seed=length) for length in (1, 4, LONG_PROMPT, 9)]
    alone = [Chain(chain).generate(p, NEW_TOKENS) for p in prompts]
    alone_logits = []
    for p in prompts:
        chain_alone = Chain(chain)
        chain_alone.generate(p, NEW_TOKENS)
        alone_logits.append(chain_alone.logits[1:])  # decode steps only
    sessions = [Chain(chain) for _ in prompts]
    tokens = [[s.step(p)] for s, p in zip(sessions, prompts)]  # prefill each alone
    batched_logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(NEW_TOKENS - 1):
        tensor = torch.tensor([[t[-1]] for t in tokens])
        for index, span in enumerate(chain):
            tensor = span.forward_batch(tensor, [s.caches[index] for s in sessions])
        for row, session in enumerate(sessions):
            batched_logits[row].append(tensor[row:row + 1])
            tokens[row].append(int(tensor[row, -1].argmax()))
    assert tokens == alone
    for got, expected in zip(batched_logits, alone_logits):
        for g, e in zip(got, expected):
            assert (g[0, -1] - e[0, -1]).abs().max().item() <= LOGITS_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_prefill_of_sessions_at_different_lengths_matches_each_alone(tiny_models, family):
    """Prefill chunks of several sessions (caches empty, short, past the sliding window) as one packed
    pass give each session the outputs and the cache its lone step gives: the next decode agrees too."""
    model_dir, model = tiny_models[family]
    config = model.config
    span = build_chain(config, model_dir, [0, config.num_hidden_layers])[0]
    histories = [prompt(model, length, seed=length) if length else [] for length in (0, 3, LONG_PROMPT)]
    chunks = [prompt(model, length, seed=10 + length) for length in (LONG_PROMPT, 5, 1)]

    def primed(history):
        cache = span.new_cache()
        if history:
            span(torch.tensor([history]), torch.arange(len(history))[None], cache)
        return cache

    lone_caches, packed_caches = [primed(h) for h in histories], [primed(h) for h in histories]
    alone = [span(torch.tensor([c]), torch.arange(cache.length, cache.length + len(c))[None], cache, 0)
             for c, cache in zip(chunks, lone_caches)]
    packed = span.forward_packed([torch.tensor([c]) for c in chunks], packed_caches, [0, 0, 0])
    for got, expected in zip(packed, alone):
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= LOGITS_TOLERANCE
    following = torch.tensor([[5], [6], [7]])
    assert torch.allclose(span.forward_batch(following, packed_caches), span.forward_batch(following, lone_caches),
                          atol=LOGITS_TOLERANCE, rtol=0)
    assert [c.length for c in packed_caches] == [c.length for c in lone_caches]


def test_a_batch_refuses_one_session_twice(tiny_models):
    model_dir, model = tiny_models["llama"]
    span = build_chain(model.config, model_dir, [0, model.config.num_hidden_layers])[0]
    cache = span.new_cache()
    with pytest.raises(ValueError, match="only one step per batch"):
        span.forward_batch(torch.tensor([[1], [2]]), [cache, cache])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kv_reservation_bounds_what_a_cache_holds(tiny_models, family):
    """What a stage reserves when a session opens (prompt + new tokens) is never exceeded, with long
    prefill chunks through sliding windows too, and it is not a loose guess: full-attention layers
    hold exactly their positions."""
    model_dir, model = tiny_models[family]
    config = AutoConfig.from_pretrained(model_dir)
    n = config.num_hidden_layers
    span = LayerSpan(config, 0, n, embed=True, head=True, tensors=safetensors_source(model_dir))
    prompt, new_tokens = [(i * 13 + 5) % 300 + 5 for i in range(LONG_PROMPT)], NEW_TOKENS
    chain = Chain([span])
    chain.generate(prompt, new_tokens)
    positions = len(prompt) + new_tokens
    assert chain.caches[0].nbytes <= span.kv_cache_bytes(positions)
    if not span.adapter.sliding_window(config):
        assert chain.caches[0].nbytes == span.kv_cache_bytes(chain.position)
