"""Checkpoints every rank takes part in: stopping and resuming continues exactly (same data order,
same weights) under replicated (ddp; zero1: each rank's optimizer shard) and sharded (zero3:
torch.distributed.checkpoint) strategies, across an epoch boundary. The runs are conftest.rank_runs'."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.distributed.conftest import RESUME_STRATEGIES, metrics

pytestmark = pytest.mark.distributed


def test_resume_equals_uninterrupted(rank_runs):
    root, results = rank_runs
    for strategy in RESUME_STRATEGIES:
        _check(root, results, strategy)


def _check(root, results, strategy):
    for part in ("whole", "stop", "resume"):
        assert results[f"resume-{strategy}/{part}"]["ok"], results[f"resume-{strategy}/{part}"].get("trace")
    stop = results[f"resume-{strategy}/stop"]
    assert stop["status"] == "stopped" and stop["steps"] == 3
    run_whole, run_cut = root / f"resume-{strategy}-whole", root / f"resume-{strategy}-cut"
    whole, cut = metrics(run_whole), metrics(run_cut)
    assert [m["step"] for m in cut] == list(range(1, 7))
    for a, b in zip(whole, cut):  # the resumed steps drew the same batches as the uninterrupted run
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6), (strategy, a, b)
    wa = load_file(run_whole / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_cut / "adapter" / "adapter_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6, strategy
    last = run_cut / "checkpoints" / "step-000006"
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    assert (last / "sharded").is_dir() == strategy.startswith("zero3")
    # zero1: each rank's own optimizer shard, never a gathered optimizer.pt
    shards = sorted(p.name for p in last.glob("optimizer*.pt"))
    assert shards == (["optimizer-rank00000.pt", "optimizer-rank00001.pt"] if strategy == "zero1"
                      else [] if strategy.startswith("zero3") else ["optimizer.pt"]), (strategy, shards)
