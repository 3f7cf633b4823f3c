"""Batch order and the token-budget split."""
from __future__ import annotations

import random

import pytest

from tuneforge.data.batching import split_by_tokens, step_groups

LENGTHS = [random.Random(0).randint(5, 300) for _ in range(37)]


def test_step_groups_are_deterministic_and_independent_of_grad_accum():
    a = step_groups(LENGTHS, batch_size=8, grad_accum=1, seed=3, epoch=1)
    assert a == step_groups(LENGTHS, batch_size=8, grad_accum=1, seed=3, epoch=1)
    assert a != step_groups(LENGTHS, batch_size=8, grad_accum=1, seed=3, epoch=2)
    b = step_groups(LENGTHS, batch_size=2, grad_accum=4, seed=3, epoch=1)
    assert [sorted(sum(s, [])) for s in a] == [sorted(sum(s, [])) for s in b]  # same examples per step
    assert sorted(i for s in a for mb in s for i in mb) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("budget", [16, 100, 301, 700, 5000])
def test_split_fits_the_budget_with_fewest_parts(packed, budget):
    ids = list(range(12))

    def cost(part):
        return sum(LENGTHS[i] for i in part) if packed else len(part) * max(LENGTHS[i] for i in part)

    parts = split_by_tokens(ids, LENGTHS, budget, packed)
    assert sorted(i for p in parts for i in p) == ids
    assert all(cost(p) <= budget or len(p) == 1 for p in parts)  # only a lone over-long example may exceed
    if len(parts) > 1 and all(cost(p) <= budget for p in parts):  # one part fewer would not fit
        size = -(-len(ids) // (len(parts) - 1))
        ordered = sorted(ids, key=lambda i: LENGTHS[i], reverse=True)
        assert any(cost(ordered[s : s + size]) > budget for s in range(0, len(ids), size))


def test_no_budget_no_split():
    assert split_by_tokens([3, 1, 2], LENGTHS, None) == [[3, 1, 2]]
