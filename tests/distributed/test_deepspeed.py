"""DeepSpeed ZeRO stages 0-3 (+ CPU offload) on 2 CPU ranks (gloo) follow the 1-process trajectory like
the torch backend (validation losses included); a checkpoint resumes exactly; the config comes from the
spec or the user's JSON. The runs are conftest.rank_runs'. Skipped when deepspeed is not installed
(`make setup` installs it with the dev extra)."""
from __future__ import annotations

import pytest

deepspeed = pytest.importorskip("deepspeed")

from tests.distributed.conftest import deepspeed_combos, full_matrix, metrics, write_matrix  # noqa: E402
from tests.distributed.test_equality import matrix_check  # noqa: E402

pytestmark = pytest.mark.distributed

DS_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero2+offload", "zero3+offload")


def test_deepspeed_matches_one_process_and_resumes(rank_runs, one_process_runs, pytestconfig):
    """Every method at every stage with `-m long` (docs/distributed.md's DeepSpeed table is then rewritten from
    these runs); LoRA at every stage and full and DoRA at some in the default suite."""
    root, results = rank_runs
    full = full_matrix(pytestconfig)
    problems, cells = matrix_check(rank_runs, one_process_runs, deepspeed_combos(full), prefix="ds-")
    if full:
        write_matrix("deepspeed", DS_STRATEGIES, ("lora", "dora", "full", "qlora"), cells,
                     {("qlora", s): "4-bit weights" for s in DS_STRATEGIES})
    assert not problems, problems
    for m, s in (("lora", "zero3"), ("full", "zero1")):  # validation ran mid-run and at the end
        assert [x["step"] for x in metrics(root / f"ds-{m}-{s}") if "eval_loss" in x] == [2, 4]
    # resume: stop after 2 of 4 steps, then continue (ZeRO-3: DeepSpeed's sharded checkpoint)
    assert results["ds-resume/stop"]["ok"] and results["ds-resume/stop"]["status"] == "stopped", results["ds-resume/stop"]
    assert results["ds-resume/resume"]["ok"], results["ds-resume/resume"].get("trace")
    assert (root / "ds-resume-zero3" / "checkpoints" / "step-000004" / "deepspeed" / "state").is_dir()
    # DeepSpeed's CPU all-reduce op (inference only) was not compiled: its build takes ~40 s and a compiler
    assert not list((root / "torch-extensions").glob("*shm*")), list((root / "torch-extensions").iterdir())
    single, resumed = metrics(one_process_runs / "single-lora"), metrics(root / "ds-resume-zero3")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(single, resumed):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4, (a, b)


def test_config_from_spec_and_from_user_json(tmp_path):
    from tuneforge.distributed.deepspeed import deepspeed_config
    from tuneforge.errors import SpecError
    from tuneforge.spec import DistributedSpec

    d = DistributedSpec(strategy="zero3", backend="deepspeed", offload="parameters", nproc=2)
    cfg = deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_clipping"] == 1.0
    user = {"zero_optimization": {"stage": 3, "overlap_comm": False}, "gradient_clipping": 1.0}
    merged = deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None, user=user)
    assert merged["zero_optimization"]["overlap_comm"] is False  # the user's own settings stay
    with pytest.raises(SpecError, match="stage"):
        deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None, user={"zero_optimization": {"stage": 1}})
    with pytest.raises(SpecError, match="optimizer"):
        deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None, user={"optimizer": {"type": "Adam"}})
    with pytest.raises(SpecError, match="gradient_clipping"):
        deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None, user={"gradient_clipping": 5.0})
    # a Hugging Face template's "auto" values are filled from the spec, not refused
    hf = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": 1000}}
    filled = deepspeed_config(d, batch_size=4, max_grad_norm=1.0, autocast_dtype=None, user=hf)
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_clipping"] == 1.0
    assert "fp16" not in filled and "bf16" not in filled


def test_buckets_are_sized_to_the_model_unless_the_user_set_them():
    from tuneforge.distributed.deepspeed import size_buckets

    zero3 = size_buckets({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                 "stage3_prefetch_bucket_size": 1000}}, 576)["zero_optimization"]
    assert zero3 == {"stage": 3, "reduce_bucket_size": 576 * 576, "allgather_bucket_size": 576 * 576,
                     "stage3_prefetch_bucket_size": 1000, "stage3_param_persistence_threshold": 5760}
    zero2 = size_buckets({"zero_optimization": {"stage": 2}}, 64)["zero_optimization"]
    assert zero2 == {"stage": 2, "reduce_bucket_size": 4096, "allgather_bucket_size": 4096}
