"""Parameter, byte and FLOP arithmetic of the planner against hand-computed values."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.planning.estimate import NF4_BYTES_PER_WEIGHT, count_params, load_config, static_bytes, step_flops
from tuneforge.spec import AdapterSpec

DATA = Path(__file__).parents[2] / "data"

# The tiny llama of tests/conftest.py: hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, untied head.
H, I, L, KV = 64, 128, 2, 32
LAYER_LINEARS = {"q": (H, H), "k": (H, KV), "v": (H, KV), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}
PER_LAYER = sum(a * b for a, b in LAYER_LINEARS.values())  # 36,864 weights
NORMS_PER_LAYER = 2 * H


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tuneforge.models.tiny import make_config

    folder = tmp_path_factory.mktemp("config-only")
    config = make_config("llama", vocab_size=300)
    (folder / "config.json").write_text(config.to_json_string())
    return load_config(str(folder))  # a folder holding only config.json: no weights are read


def test_full_counts_every_weight_by_hand(tiny_config):
    V = 300
    c = count_params(tiny_config, "full", AdapterSpec())
    expected = 2 * V * H + L * (PER_LAYER + NORMS_PER_LAYER) + H
    assert c.total == c.trainable == expected
    assert c.quantizable == L * PER_LAYER
    assert c.head_params == V * H
    assert c.matmul_params == L * PER_LAYER + V * H


def test_adapter_counts_by_hand(tiny_config):
    base = count_params(tiny_config, "full", AdapterSpec()).total
    r = 4
    lora = r * sum(a + b for a, b in LAYER_LINEARS.values()) * L  # A (r x in) + B (out x r) per linear
    dora_magnitude = sum(b for _, b in LAYER_LINEARS.values()) * L  # one magnitude per output feature
    ia3 = (KV + KV + I) * L  # peft's llama targets: k, v outputs and down_proj's input (feedforward)
    adapter = AdapterSpec(r=r, alpha=8)
    for method, trainable in (("lora", lora), ("qlora", lora), ("dora", lora + dora_magnitude), ("ia3", ia3),
                              ("prompt_tuning", 20 * H)):
        c = count_params(tiny_config, method, adapter)
        assert (method, c.trainable) == (method, trainable)
        assert c.total == base + trainable


def test_bytes_follow_the_engine_storage(tiny_config):
    adapter = AdapterSpec(r=4, alpha=8)
    full = count_params(tiny_config, "full", adapter)
    s = static_bytes(full, "full", torch.float32)
    assert (s.weights, s.gradients, s.optimizer) == (4 * full.total, 4 * full.total, 8 * full.total)

    lora = count_params(tiny_config, "lora", adapter)
    s = static_bytes(lora, "lora", torch.bfloat16)  # frozen base in bf16, adapter and its state fp32
    assert s.base_weights == 2 * (lora.total - lora.trainable)
    assert (s.trainable_weights, s.gradients, s.optimizer) == (4 * lora.trainable, 4 * lora.trainable, 8 * lora.trainable)
    s8 = static_bytes(lora, "lora", torch.bfloat16, optimizer="adamw_8bit")
    assert s8.optimizer == 2 * lora.trainable + 8 * -(-lora.trainable // 256)

    q = static_bytes(lora, "qlora", torch.bfloat16)  # linears NF4, embeddings / head / norms bf16
    frozen_other = lora.total - lora.trainable - lora.quantizable
    assert q.base_weights == int(lora.quantizable * NF4_BYTES_PER_WEIGHT) + 2 * frozen_other
    assert NF4_BYTES_PER_WEIGHT == pytest.approx(0.5 + 1 / 64 + 4 / 16384)


def test_flops_by_hand(tiny_config):
    c = count_params(tiny_config, "lora", AdapterSpec(r=4))
    T, rows = 32, 2
    tokens = rows * T
    attention = 2 * 2 * 4 * 16 * tokens * T / 2 * L
    forward = 2 * L * PER_LAYER * tokens + attention + 2 * 300 * H * tokens
    assert step_flops(c, tiny_config, "lora", tokens, T) == pytest.approx(2 * forward)
    assert step_flops(c, tiny_config, "full", tokens, T) == pytest.approx(3 * forward)
    recompute = 2 * L * PER_LAYER * tokens + attention
    assert step_flops(c, tiny_config, "lora", tokens, T, gradient_checkpointing=True) == pytest.approx(2 * forward + recompute)


@pytest.mark.parametrize("name, total", [("phi3-mini", 3_821_079_552), ("phi3-medium", 13_960_238_080)])
def test_phi3_configs_match_their_published_sizes(name, total):
    """Built on the meta device from config.json alone: 3.8B and 14B parameters without a byte of weights."""
    assert json.loads((DATA / name / "config.json").read_text())["model_type"] == "phi3"
    c = count_params(load_config(str(DATA / name)), "full", AdapterSpec())
    assert c.total == total


def test_row_lengths_are_the_quartiles_below_the_longest_row():
    """Variable-length data: the probe also steps at the examples' length quartiles (capped at the row length);
    fixed-length, packed or unknown data: only the longest row."""
    from tuneforge.planning.plan import row_lengths

    lengths = list(range(1, 101))  # 1..100
    assert row_lengths(lengths, 128, packing=False) == (75, 50, 25)
    assert row_lengths(lengths, 60, packing=False) == (50, 25)  # 75 is capped to the row's 60: that is the row
    assert row_lengths([256] * 8, 256, packing=False) == ()
    assert row_lengths(lengths, 128, packing=True) == ()
    assert row_lengths(None, 128, packing=False) == ()


def test_packed_attention_is_counted_per_document(tiny_config):
    """A packed row of 8 documents of 128 tokens costs the decoder of 1,024 tokens but attention of 8 x 128^2,
    as models/attention.py computes it; so its FLOPs lie between 8 rows of 128 and one row of 1,024."""
    counts = count_params(tiny_config, "lora", AdapterSpec())
    per_document = step_flops(counts, tiny_config, "lora", 1024, 128)
    one_row = step_flops(counts, tiny_config, "lora", 1024, 1024)
    assert per_document == step_flops(counts, tiny_config, "lora", 8 * 128, 128) < one_row


def test_per_rank_bytes_by_hand():
    """What one of 2 ranks holds: ddp and zero1 (torch's ZeroRedundancyOptimizer runs under DDP) keep a second copy
    of the gradients in DDP's buckets; ZeRO divides the optimizer state, then the gradients, then the weights."""
    from types import SimpleNamespace

    from tuneforge.planning.plan import per_rank

    static = SimpleNamespace(weights=400, gradients=400, optimizer=800)
    assert per_rank(static, "none", 2, 4) == (400, 400, 800, 0)
    assert per_rank(static, "ddp", 2, 4) == (400, 400, 800, 400)
    assert per_rank(static, "zero1", 2, 4) == (400, 400, 400, 400)
    assert per_rank(static, "zero2", 2, 4) == (400, 200, 400, 0)
    assert per_rank(static, "zero3", 2, 4) == (200, 200, 400, 200)  # + one gathered layer and its prefetch
