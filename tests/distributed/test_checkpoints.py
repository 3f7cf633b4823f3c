"""Checkpoints every rank takes part in: stopping and resuming continues exactly (same data order,
same weights) under replicated (ddp, zero1: gathered optimizer state) and sharded (zero2/zero3:
torch.distributed.checkpoint) strategies, across an epoch boundary."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tests.distributed.conftest import chat_records, dist_spec, metrics
from tests.distributed.ranks import run_in_ranks

pytestmark = pytest.mark.distributed

STRATEGIES = ("ddp", "zero1", "zero3", "zero3+offload")


def _resumed_runs(tiny_models, root):
    data = write_jsonl(root / "train.jsonl", chat_records())
    jobs = []
    for s in STRATEGIES:
        name, _, offload = s.partition("+")
        d = {"strategy": name, "offload": "parameters" if offload else "none"}
        # 13 examples, global batch 4: 4 steps per epoch, so step 6 is in the second epoch
        spec = dist_spec(tiny_models["llama"], data, root / f"{s}-whole", world=2, distributed=d, max_steps=6,
                         save_every=1)
        jobs.append({**spec, "_name": f"{s}/whole"})
        cut = dist_spec(tiny_models["llama"], data, root / f"{s}-cut", world=2, distributed=d, max_steps=6, save_every=1)
        jobs.append({**cut, "_name": f"{s}/stop", "_train": {"stop_after": 3}})
        jobs.append({**cut, "_name": f"{s}/resume", "_train": {"resume": True}})
    return root, run_in_ranks(jobs, root / "results")


def test_resume_equals_uninterrupted(tiny_models, tmp_path):
    """All strategies in one pair of ranks (one test, so test workers never run the ranks twice)."""
    root, results = _resumed_runs(tiny_models, tmp_path)
    for strategy in STRATEGIES:
        _check(root, results, strategy)


def _check(root, results, strategy):
    for part in ("whole", "stop", "resume"):
        assert results[f"{strategy}/{part}"]["ok"], results[f"{strategy}/{part}"].get("trace")
    assert results[f"{strategy}/stop"]["status"] == "stopped" and results[f"{strategy}/stop"]["steps"] == 3
    whole, cut = metrics(root / f"{strategy}-whole"), metrics(root / f"{strategy}-cut")
    assert [m["step"] for m in cut] == list(range(1, 7))
    for a, b in zip(whole, cut):  # the resumed steps drew the same batches as the uninterrupted run
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6), (a, b)
    wa = load_file(root / f"{strategy}-whole" / "adapter" / "adapter_model.safetensors")
    wb = load_file(root / f"{strategy}-cut" / "adapter" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    state = json.loads((root / f"{strategy}-cut" / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["world_size"] == 2
    sharded = (root / f"{strategy}-cut" / "checkpoints" / "step-000006" / "sharded").is_dir()
    assert sharded == strategy.startswith("zero3")
