"""Choosing the next token at the last stage."""

from __future__ import annotations

import pytest
import torch

from dllmd.inference.sampling import sample_next
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
