"""What a reported log-probability means: that of the distribution the token was drawn from (after the grammar,
the temperature and top_p), the model's own at temperature 0; -9999.0 for what could not be drawn."""
from __future__ import annotations

import math

import torch

from tuneforge.serving.sampling import IMPOSSIBLE, decode_step, log_distribution
from tuneforge.serving.sequence import SamplingParams, Sequence

LOGITS = torch.tensor([2.0, 1.0, 0.5, -1.0])


def test_temperature_and_top_p_shape_the_reported_distribution():
    greedy = log_distribution(LOGITS, SamplingParams(temperature=0))
    assert torch.allclose(greedy, torch.log_softmax(LOGITS.double(), -1))  # the model's own
    hot = log_distribution(LOGITS, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, torch.log_softmax(LOGITS.double() / 2, -1))
    nucleus = log_distribution(LOGITS, SamplingParams(temperature=1.0, top_p=0.8))
    probs = torch.softmax(LOGITS.double(), -1)
    kept = probs[:2] / probs[:2].sum()  # the two best reach 0.8; renormalised over them
    assert torch.allclose(nucleus[:2].exp(), kept) and nucleus[2:].eq(float("-inf")).all()


def test_decode_step_reports_the_chosen_token_and_the_best_ones():
    out = []
    seq = Sequence([1], None, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8, seed=0, logprobs=3), set(),
                   out.append, lambda ids: "x")
    seq.generator = torch.Generator().manual_seed(0)
    decode_step(seq, LOGITS.clone())
    (entry,) = out[-1].logprobs
    assert entry.token in (0, 1) and [t for t, _ in entry.top[:2]] == [0, 1]
    assert entry.top[2][1] == IMPOSSIBLE  # outside the nucleus: could not be drawn
    assert math.isclose(sum(math.exp(v) for _, v in entry.top[:2]), 1.0, rel_tol=1e-9)


def test_min_tokens_and_ignore_eos_hold_the_stop_token_back():
    for params in (SamplingParams(max_tokens=3, temperature=0, min_tokens=2), SamplingParams(max_tokens=3, temperature=0,
                                                                                             ignore_eos=True)):
        out = []
        seq = Sequence([1], None, params, {0}, out.append, lambda ids: "".join("ab"[i % 2] for i in ids))
        decode_step(seq, LOGITS.clone())  # token 0 is the best and a stop token: not allowed yet
        assert seq.out_ids == [1] and seq.finish_reason is None
    decode_step(seq, LOGITS.clone())
    decode_step(seq, LOGITS.clone())
    assert seq.finish_reason == "length" and 0 not in seq.out_ids  # ignore_eos: never stopped
