"""Preference runs at 2 ranks (gloo, CPU) follow the 1-process trajectory of the same global batch: the DPO loss
is normalised by the pairs of the whole step across ranks, an epoch's last step (13 pairs: one rank gets an empty
micro-batch) included, for DDP and FSDP2 (zero3), with validation on the way. The ranks are the shared harness's
(tests/distributed/ranks.py: spawned once, leaving without the interpreter's teardown)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import tiny_spec, write_jsonl

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(400)]

PAIRS = [{"prompt": f"Say {w} please", "chosen": f" {w}" * (1 + i % 3), "rejected": f" no, not {w} today"}
         for i, w in enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                                "juliet", "kilo", "lima", "mike"])]
STRATEGIES = ("ddp", "zero3")


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process(tiny_models, tmp_path):
    from tests.distributed.ranks import run_in_ranks
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    valid = write_jsonl(tmp_path / "valid.jsonl", PAIRS[:5])

    def spec(out, world, strategy=None) -> dict:
        s = tiny_spec(tiny_models["llama"], data, out, batch_size=2, grad_accum=2 // world, max_steps=4, eval_every=2)
        s.update(task="preference", preference={"beta": 0.5})
        s["data"]["validation"] = str(valid)
        if strategy:
            s["distributed"] = {"strategy": strategy, "nproc": world, "timeout_seconds": 60}
        return s

    train(build_spec(spec(tmp_path / "one", 1)), overwrite=True)
    results = run_in_ranks([{**spec(tmp_path / s, 2, s), "_name": s} for s in STRATEGIES], tmp_path / "ranks")
    one = _rows(tmp_path / "one")
    for strategy in STRATEGIES:
        assert results[strategy]["ok"], results[strategy].get("trace")
        rows = _rows(tmp_path / strategy)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        for a, b in zip(one, rows):
            for key in ("train_loss", "grad_norm", "reward_accuracy", "reward_margin", "eval_loss",
                        "eval_reward_margin"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], abs=1e-4), (strategy, a["step"], key)
