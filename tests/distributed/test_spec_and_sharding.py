"""Without processes: the `distributed` spec section, what it refuses up front, and rank-aware batching."""
from __future__ import annotations

import random

import pytest

from tuneforge.data.batching import step_groups
from tuneforge.errors import SpecError
from tuneforge.spec import build_spec


def _spec(**distributed) -> dict:
    return {"model": "m", "data": {"train": "t.jsonl"}, "distributed": distributed}


@pytest.mark.parametrize("distributed,method,precision,message", [
    ({"strategy": "zero3", "nproc": 2}, "qlora", "auto", "4-bit base weights cannot be sharded"),
    ({"strategy": "zero1", "backend": "deepspeed", "nproc": 2}, "qlora", "auto", "cannot be sharded by DeepSpeed"),
    ({"strategy": "zero2", "nproc": 2}, "lora", "fp16", "use precision bf16"),
    ({"strategy": "ddp", "nproc": 2}, "ia3", "auto", "ia3 is not supported with several processes"),
    ({"strategy": "ddp", "offload": "parameters", "nproc": 2}, "lora", "auto", "offload: parameters needs strategy zero2"),
    ({"strategy": "zero3", "offload": "optimizer", "nproc": 2}, "lora", "auto", "FSDP2 offloads parameters"),
    ({"strategy": "zero2", "backend": "deepspeed", "offload": "parameters", "nproc": 2}, "lora", "auto",
     "needs strategy zero3 with DeepSpeed"),
    ({"strategy": "none", "nproc": 2}, "lora", "auto", "strategy: none runs one process"),
    ({"nproc": 2, "nnodes": 2, "node_rank": 2}, "lora", "auto", "node_rank: 2 is not below nnodes=2"),
    ({"nproc": 2, "deepspeed_config": "ds.json"}, "lora", "auto", "only backend deepspeed reads it"),
])
def test_refused_up_front_with_one_clear_message(distributed, method, precision, message):
    raw = {**_spec(**distributed), "method": method, "training": {"precision": precision}}
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        build_spec(raw)


def test_qlora_is_allowed_with_replicated_weights():
    spec = build_spec({**_spec(strategy="zero1", nproc=2), "method": "qlora"})
    assert spec.distributed.world_size == 2


def test_overrides_create_the_section_and_default_to_ddp():
    spec = build_spec({"model": "m", "data": {"train": "t.jsonl"}},
                      ["distributed.nproc=2", "distributed.master_port=29600"])
    assert (spec.distributed.strategy, spec.distributed.nproc, spec.distributed.master_port) == ("ddp", 2, 29600)
    assert build_spec({"model": "m", "data": {"train": "t.jsonl"}}).distributed is None  # absent: one process


def test_a_multi_rank_spec_outside_a_launch_is_a_clear_error(monkeypatch):
    import torch

    from tuneforge.distributed import SingleDevice, build_strategy

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    d = build_spec(_spec(strategy="zero3", nproc=2)).distributed
    with pytest.raises(SpecError, match="launches them"):
        build_strategy(d, torch.device("cpu"))
    assert isinstance(build_strategy(None, torch.device("cpu")), SingleDevice)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_ranks_split_the_one_process_steps(world, group_by_length):
    """Each epoch every example is seen once across the ranks, and step k of the ranks together is
    exactly step k of one process with grad_accum x world."""
    lengths = [random.Random(i).randint(5, 300) for i in range(103)]
    for epoch in (0, 1):
        one = step_groups(lengths, 3, 2 * world, 7, epoch, group_by_length)
        per_rank = [step_groups(lengths, 3, 2, 7, epoch, group_by_length, r, world) for r in range(world)]
        assert all(len(p) == len(one) for p in per_rank)
        for k, step in enumerate(one):
            mine = sorted(i for r in range(world) for mb in per_rank[r][k] for i in mb)
            assert mine == sorted(i for mb in step for i in mb)
        seen = [i for p in per_rank for step in p for mb in step for i in mb]
        assert sorted(seen) == list(range(len(lengths)))
    assert step_groups(lengths, 3, 2, 7, 0) == step_groups(lengths, 3, 2, 7, 0, True, 0, 1)  # 1 rank: unchanged
