"""Choosing the next token at the last stage: greedy, seeded sampling, the penalties (against transformers'
processor and OpenAI's definition), the history a replay rebuilds, stop strings and the model's defaults."""

from __future__ import annotations

import pytest
import torch

from dllmd.inference.sampling import TokenHistory, apply_penalties, opened_history, penalized, sample_next
from dllmd.net.messages.inference import SamplingParams

GREEDY = SamplingParams()


def test_greedy_is_argmax_and_ties_go_to_the_first_index():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(49152, generator=generator)
        assert sample_next(logits, GREEDY, 0) == int(torch.argmax(logits))
    tied = torch.zeros(10)
    tied[[3, 7]] = 5.0
    assert sample_next(tied, GREEDY, 0) == 3 == int(torch.argmax(tied))
    assert sample_next(torch.tensor([1.0, 9.0, 2.0], dtype=torch.bfloat16), GREEDY, 0) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused_not_sampled(bad):
    logits = torch.randn(100)
    logits[42] = bad
    with pytest.raises(ValueError, match="non-finite"):
        sample_next(logits, GREEDY, 0)
    with pytest.raises(ValueError, match="no finite"):
        sample_next(torch.full((100,), float("-inf")), SamplingParams(temperature=0.7), 0)


def test_seeded_sampling_depends_only_on_seed_and_step():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    assert sample_next(logits, params, 3) == sample_next(logits.clone(), params, 3)
    assert len({sample_next(logits, params, step) for step in range(40)}) > 1


def _logits(seed: int, vocab: int = 300) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3  # positive and negative


def test_repetition_penalty_is_transformers_processor_on_the_same_logits():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    prompt, generated = [5, 17, 17, 299, 42], [42, 8, 8, 8]
    for penalty in (1.3, 0.7, 2.0):
        params = SamplingParams(repetition_penalty=penalty)
        logits = _logits(int(penalty * 10))
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + generated]), logits[None].clone())[0]
        got = apply_penalties(logits, params, TokenHistory.of(prompt, generated))
        assert torch.equal(got, want)
        # Greedy with a penalty picks the penalized argmax, as generate(do_sample=False, repetition_penalty=...).
        assert sample_next(logits, params, 0, TokenHistory.of(prompt, generated)) == int(torch.argmax(want))


def test_frequency_and_presence_penalties_are_openais_over_generated_tokens():
    """mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over the sampled tokens."""
    prompt, generated = [1, 2, 3], [3, 9, 9, 9, 4]
    logits = _logits(3)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=-1.25)
    counts = torch.zeros(300)
    for token in generated:
        counts[token] += 1
    want = logits - counts * 0.5 - (counts > 0).float() * -1.25
    assert torch.allclose(apply_penalties(logits, params, TokenHistory.of(prompt, generated)), want, atol=1e-6, rtol=0)
    assert penalized(params) and not penalized(SamplingParams(temperature=0.7))


def test_history_rebuilt_for_a_replay_samples_what_one_session_samples():
    """A failover's replay hands the new last stage prompt + tokens so far: it must sample the same tokens."""
    params = SamplingParams(temperature=0.9, top_k=40, seed=11, repetition_penalty=1.4, frequency_penalty=0.3)
    prompt = [7, 7, 12, 100]
    steps = [_logits(100 + step) for step in range(12)]
    for logits in steps:
        logits[42] = 12.0  # a token the model would repeat
    once, history = [], TokenHistory.of(prompt)
    for step, logits in enumerate(steps):
        once.append(sample_next(logits, params, step, history))
    wire = torch.tensor(prompt + once[:5])  # what session.open carries after 5 tokens
    replayed = opened_history(params, True, [wire], len(prompt) + 5, 5, 300)
    again = once[:5] + [sample_next(steps[step], params, step, replayed) for step in range(5, 12)]
    assert again == once and replayed == history
    assert once.count(42) < 4 and once != [sample_next(logits, SamplingParams(temperature=0.9, top_k=40, seed=11), step)
                    for step, logits in enumerate(steps)]  # the penalties changed something


@pytest.mark.parametrize("tensors, prompt_tokens, replayed, samples_here, needle", [
    ([], 3, 0, True, "needs its tokens"),
    ([torch.tensor([1, 2])], 3, 0, True, "int64 tensor \\[3\\]"),
    ([torch.tensor([1.0, 2.0, 3.0])], 3, 0, True, "int64"),
    ([torch.tensor([1, 2, 300])], 3, 0, True, "in \\[0, 300\\)"),
    ([torch.tensor([1, 2, 3])], 3, 4, True, "replayed"),
    ([torch.tensor([1, 2, 3])], 3, 0, False, "only the stage that samples"),
])
def test_a_bad_history_at_the_open_is_refused(tensors, prompt_tokens, replayed, samples_here, needle):
    with pytest.raises(ValueError, match=needle):
        opened_history(SamplingParams(repetition_penalty=1.2), samples_here, tensors, prompt_tokens, replayed, 300)


def test_stop_strings_end_the_text_before_them_and_are_never_half_streamed():
    from dllmctl.inference.text import TextStream, check_stops
    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer()
    ids = tokenizer("Once upon a time. The end. More text")["input_ids"]
    stream = TextStream(tokenizer, ["The end", "zzz"])
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    assert "".join(deltas) == stream.sent == "Once upon a time. " and stream.stopped
    assert not any("The" in d for d in deltas)
    plain = TextStream(tokenizer, ["zzz"])  # a stop that never comes: the text is whole, the held tail released
    assert "".join([plain.push(t) for t in ids] + [plain.finish()]) == tokenizer.decode(ids) and not plain.stopped
    assert check_stops(["a"] * 5) and check_stops([""]) and check_stops(["x" * 257]) and not check_stops(["\n"])


def test_model_defaults_follow_generation_config(tmp_path):
    from dllmctl.inference.defaults import SamplingDefaults, model_defaults

    assert model_defaults(tmp_path) == SamplingDefaults(0.7, 0.9, 50, 1.0)
    config = tmp_path / "generation_config.json"
    config.write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.8, "repetition_penalty": 1.05}')
    assert model_defaults(tmp_path) == SamplingDefaults(0.6, 0.8, 50, 1.05)
    config.write_text('{"do_sample": false, "top_k": 20}')
    assert model_defaults(tmp_path) == SamplingDefaults(0.0, 0.9, 20, 1.0)  # the model asks for greedy
    config.write_text('{"temperature": -3, "top_k": "many", "top_p": true}')  # unusable values are ignored
    assert model_defaults(tmp_path) == SamplingDefaults()
    config.write_text("{not json")
    assert model_defaults(tmp_path) == SamplingDefaults()
