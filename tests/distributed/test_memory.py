"""What each strategy keeps per rank, measured from the tensors themselves (FSDP2's local shards,
ZeroRedundancyOptimizer's partition): zero3 holds about half the parameter + optimizer bytes of one
process at 2 ranks, zero1 half the optimizer state, ddp all of both."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.distributed.ranks import free_port

pytestmark = pytest.mark.distributed


def _probe(rank: int, world: int, model_dir: str, ports: list[int], out: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1"})
    from transformers import AutoModelForCausalLM

    from tuneforge.distributed.strategy import ForwardLoss
    from tuneforge.distributed.torch_strategies import (DDPStrategy, FSDPStrategy, ZeroOneStrategy,
                                                         local_state_bytes)
    from tuneforge.training.loss import loss_fn_for

    results = {}
    for name, port in zip(("ddp", "zero1", "zero3"), ports):
        os.environ["MASTER_PORT"] = str(port)  # a fresh process group (and store) per strategy
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)  # full fine-tuning: every weight trains
        strategy = {"ddp": lambda: DDPStrategy(torch.device("cpu"), 20),
                    "zero1": lambda: ZeroOneStrategy(torch.device("cpu"), 20),
                    "zero3": lambda: FSDPStrategy(torch.device("cpu"), 20, True, False)}[name]()
        forward = strategy.wrap(ForwardLoss(model, loss_fn_for(model, chunked=False)))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = strategy.build_optimizer(params, lambda ps: torch.optim.AdamW(ps, lr=1e-3), 1e-3, 0.0)
        ids = torch.arange(16).reshape(2, 8) % 200 + 3
        loss, _ = forward({"input_ids": ids, "labels": ids})
        loss.backward()
        optimizer.step()
        results[name] = local_state_bytes(model, optimizer)
        strategy.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_bytes_per_rank_follow_the_strategy(tiny_models, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    one = sum(p.numel() * p.element_size() for p in model.parameters())  # 1 process: params; AdamW: 2x that
    mp.spawn(_probe, args=(2, str(tiny_models["llama"]), [free_port() for _ in range(3)], str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["ddp"] == {"parameter_bytes": one, "optimizer_bytes": 2 * one}
        assert r["zero1"]["parameter_bytes"] == one
        assert r["zero1"]["optimizer_bytes"] == pytest.approx(one, rel=0.25)  # whole tensors per rank: uneven
        total3 = r["zero3"]["parameter_bytes"] + r["zero3"]["optimizer_bytes"]
        assert total3 == pytest.approx(3 * one / 2, rel=0.02)  # dim-0 shards, padded: about half of 3x
    assert sum(r["zero1"]["optimizer_bytes"] for r in ranks) == 2 * one  # the partitions add up exactly
