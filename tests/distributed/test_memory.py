"""What each strategy keeps per rank, measured from the tensors themselves (FSDP2's local shards,
ZeroRedundancyOptimizer's partition): zero3 holds about half the parameter + optimizer bytes of one
process at 2 ranks, zero1 half the optimizer state, ddp all of both. A zero1 checkpoint writes each rank's
own optimizer shard and never gathers the shards (torch's consolidate_state_dict would put every shard on
every rank: 8.1 GB on one rank for SmolLM2, docs/benchmarks.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def probe(rank: int, world: int, strategy: str, model_dir: str, out: str) -> dict:
    """Runs in each spawned rank (conftest.rank_runs, in a fresh process group): one step of full fine-tuning
    under `strategy`, then the bytes this rank holds; for zero1 also a checkpoint with consolidate_state_dict
    made to fail, and loading it back."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.distributed.torch_strategies import DDPStrategy, FSDPStrategy, ZeroOneStrategy

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # full fine-tuning: every weight trains
    chosen = {"ddp": lambda: DDPStrategy(torch.device("cpu"), 60),
              "zero1": lambda: ZeroOneStrategy(torch.device("cpu"), 60),
              "zero3": lambda: FSDPStrategy(torch.device("cpu"), 60, True, False)}[strategy]()
    try:
        return _one_step_and_checkpoint(rank, strategy, chosen, model, Path(out))
    finally:
        chosen.close()


def _one_step_and_checkpoint(rank: int, name: str, strategy, model, out: Path) -> dict:
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from tuneforge.distributed.strategy import ForwardLoss
    from tuneforge.distributed.torch_strategies import TorchProcessGroup, local_state_bytes
    from tuneforge.training.loss import loss_fn_for
    from tuneforge.training.run_dir import CheckpointDir

    forward = strategy.wrap(ForwardLoss(model, loss_fn_for(model, chunked=False)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = strategy.build_optimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-3), 1e-3, 0.0)
    ids = torch.arange(16).reshape(2, 8) % 200 + 3  # (B, T) = (2, 8)
    loss, _ = forward({"input_ids": ids, "labels": ids})
    loss.backward()
    optimizer.step()
    results = {name: local_state_bytes(model, optimizer)}
    if name != "zero1":
        return results
    folder = out / "zero1-checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    strategy.barrier()

    def gather(*args, **kwargs):
        raise AssertionError("a zero1 checkpoint called consolidate_state_dict")

    consolidate = ZeroRedundancyOptimizer.consolidate_state_dict
    ZeroRedundancyOptimizer.consolidate_state_dict = gather
    try:
        strategy.save_model_and_optimizer(CheckpointDir(folder), model, optimizer)
    finally:
        ZeroRedundancyOptimizer.consolidate_state_dict = consolidate
    strategy.barrier()
    results["zero1_checkpoint"] = {"files": sorted(p.name for p in folder.iterdir()),
                                   "shard_bytes": CheckpointDir(folder).optimizer_shard(rank).stat().st_size}
    # Loading restores this rank's state and learning rate, from the shards and from a checkpoint written
    # gathered (optimizer.pt: how tuneforge saved zero1 before the per-rank shards)
    legacy = out / "zero1-gathered"
    legacy.mkdir(parents=True, exist_ok=True)
    strategy.barrier()
    optimizer.consolidate_state_dict(to=0)
    TorchProcessGroup.save_model_and_optimizer(strategy, CheckpointDir(legacy), model, optimizer)
    strategy.barrier()
    saved = _optimizer_fingerprint(optimizer)
    for source in (folder, legacy):
        for state in optimizer.optim.state.values():
            for v in state.values():
                v.zero_()
        for group in optimizer.param_groups:
            group["lr"] = 123.0
        strategy.load_model_and_optimizer(CheckpointDir(source), model, optimizer)
        results[f"restored_from_{source.name}"] = _optimizer_fingerprint(optimizer) == saved
    return results


def _optimizer_fingerprint(optimizer) -> list:
    """This rank's optimizer state (sums of its tensors) and every group's learning rate, outer and local."""
    local = optimizer.optim
    state = [float(local.state[p][k].double().sum()) for g in local.param_groups for p in g["params"]
             for k in sorted(local.state[p])]
    return state + [g["lr"] for g in optimizer.param_groups] + [g["lr"] for g in optimizer.optim.param_groups]


def _per_rank(results: dict) -> list[dict]:
    """[rank 0's, rank 1's] {strategy: what the probe measured} (the probe ran once per strategy)."""
    for s in ("ddp", "zero1", "zero3"):
        assert results[f"memory/{s}"]["ok"], results[f"memory/{s}"].get("trace")
    return [{k: v for s in ("ddp", "zero1", "zero3") for k, v in results[f"memory/{s}"]["per_rank"][r].items()}
            for r in range(2)]


def test_bytes_per_rank_follow_the_strategy(rank_runs, tiny_models):
    from transformers import AutoModelForCausalLM

    root, results = rank_runs
    ranks = _per_rank(results)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    one = sum(p.numel() * p.element_size() for p in model.parameters())  # 1 process: params; AdamW: 2x that
    for r in ranks:
        assert r["ddp"] == {"parameter_bytes": one, "optimizer_bytes": 2 * one}
        assert r["zero1"]["parameter_bytes"] == one
        assert r["zero1"]["optimizer_bytes"] == pytest.approx(one, rel=0.25)  # whole tensors per rank: uneven
        total3 = r["zero3"]["parameter_bytes"] + r["zero3"]["optimizer_bytes"]
        assert total3 == pytest.approx(3 * one / 2, rel=0.02)  # dim-0 shards, padded: about half of 3x
    assert sum(r["zero1"]["optimizer_bytes"] for r in ranks) == 2 * one  # the partitions add up exactly


def test_zero1_checkpoint_writes_each_ranks_shard_without_gathering(rank_runs):
    """Every rank writes only its own optimizer state: no consolidate_state_dict (it raised if called), one
    file per rank the size of that rank's shard, no whole-optimizer file; loading it (or an older gathered
    optimizer.pt) restores the rank's optimizer state and learning rate."""
    root, results = rank_runs
    ranks = _per_rank(results)
    files = ranks[0]["zero1_checkpoint"]["files"]
    assert files == ["optimizer-rank00000.pt", "optimizer-rank00001.pt", "trainable.safetensors"], files
    for r in ranks:
        own, total = r["zero1"]["optimizer_bytes"], sum(x["zero1"]["optimizer_bytes"] for x in ranks)
        written = r["zero1_checkpoint"]["shard_bytes"]
        assert own <= written < own + 64 * 1024 and written < 0.8 * total, (written, own, total)
        assert r["restored_from_zero1-checkpoint"] and r["restored_from_zero1-gathered"], r
