"""The planner and compare know task preference: a pair is one row (prompt once, both replies) or two, DPO
with an adapter adds a reference forward per micro-batch, a precomputed reference (full fine-tuning) does not."""
from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tuneforge.spec import build_spec

pytestmark = pytest.mark.timeout(300)

PAIRS = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": f" no, not today number {i}"} for i in range(12)]


def _spec(model="m", train="t", **over):
    raw = {"model": str(model), "task": "preference", "data": {"train": str(train)}, "method": "lora",
           "device": "cpu", "adapter": {"r": 4, "alpha": 8},
           "training": {"max_steps": 2, "batch_size": 3, "max_seq_len": 64, "save_every": 1000, "eval_every": 1000}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return build_spec(raw)


def test_a_pair_is_two_rows_and_dpo_adds_a_reference_forward(tmp_path):
    from tuneforge.models.tiny import make_config
    from tuneforge.planning.estimate import count_params, load_config, step_flops
    from tuneforge.planning.plan import micro_batch, reference_pass

    # one row per pair (the prompt once, then both replies): at most two reply rows long, or as the data say
    assert micro_batch(_spec()) == (3, 128)
    assert micro_batch(_spec(), longest=40, longest_shared=52) == (3, 52)
    assert micro_batch(_spec(training__micro_batch_tokens=256)) == (2, 128)  # 2 pairs of 2 x 64 fit 256 tokens
    # TRL's layout: one row per reply
    assert micro_batch(_spec(preference__shared_prompt=False)) == (6, 64)
    assert micro_batch(_spec(preference__shared_prompt=False, training__micro_batch_tokens=256)) == (4, 64)
    assert reference_pass(_spec(), "lora") and not reference_pass(_spec(), "full")
    assert not reference_pass(_spec(preference__loss="orpo"), "lora")
    assert not reference_pass(_spec(preference__reference="precomputed"), "lora")

    (tmp_path / "config.json").write_text(make_config("llama", vocab_size=300).to_json_string())
    config = load_config(str(tmp_path))
    counts = count_params(config, "lora", _spec().adapter)
    plain = step_flops(counts, config, "lora", 6 * 64, 64)
    with_reference = step_flops(counts, config, "lora", 6 * 64, 64, reference_pass=True)
    assert with_reference == pytest.approx(1.5 * plain)  # LoRA: forward + input gradients, then one more forward


def test_plan_and_compare_train_preference_runs(tiny_models, tmp_path):
    from tuneforge import api
    from tuneforge.planning.plan import data_lengths

    train = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    spec = _spec(tiny_models["llama"], train)
    p = api.plan(spec, methods=("lora", "full", "prompt_tuning"), use_cache=False)
    assert (p.rows, p.total_steps) == (3, 2)
    longer_reply, shared = data_lengths(spec)  # the prompt counted once: shorter than two reply rows
    assert p.seq_len == max(shared) < 2 * max(longer_reply)
    rows = {r.method: r for r in p.rows_}
    assert set(rows) == {"lora", "full"}  # prompt tuning cannot train pairs: not planned
    assert all(r.predicted_step_seconds and r.predicted_peak_mb for r in rows.values())

    out = api.compare(spec, methods=("lora",), out=tmp_path / "cmp", steps=2)  # full's precomputed path: tested in
    results = json.loads((out.parent / "compare.json").read_text())["results"]  # tests/unit/training
    assert set(results) == {"lora"}
    assert all(r["eval_loss"] is not None and r["eval_reward_accuracy"] is not None for r in results.values())
