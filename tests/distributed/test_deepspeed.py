"""DeepSpeed ZeRO stages 0-3 (+ CPU offload) on 2 CPU ranks (gloo) follow the 1-process trajectory like
the torch backend; a checkpoint resumes exactly; the config comes from the spec or the user's JSON.
Skipped when deepspeed is not installed (`make setup` installs it with the dev extra)."""
from __future__ import annotations


import pytest

deepspeed = pytest.importorskip("deepspeed")

from tests.distributed.conftest import chat_records, dist_spec, metrics, write_matrix  # noqa: E402
from tests.distributed.ranks import run_in_ranks  # noqa: E402
from tests.distributed.test_equality import matches_one_process  # noqa: E402

pytestmark = pytest.mark.distributed

METHODS = ("lora", "dora", "full")
DS_STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero2+offload", "zero3+offload")


def _distributed(strategy: str) -> dict:
    name, _, offload = strategy.partition("+")
    return {"strategy": name, "backend": "deepspeed",
            "offload": ("parameters" if name == "zero3" else "optimizer") if offload else "none"}


def _combos():
    for method in METHODS:
        for strategy in DS_STRATEGIES:
            if method != "lora" and strategy in ("ddp", "zero1"):
                continue  # stage 0/1 with lora covers the replicated path; the sharded stages get every method
            yield method, strategy


def test_deepspeed_matches_one_process_and_resumes(tiny_models, tmp_path):
    """One pair of ranks runs every DeepSpeed combination plus a ZeRO-3 stop/resume (one test, so test
    workers never run it twice); docs/distributed.md's DeepSpeed table is rewritten from it."""
    from tests.conftest import write_jsonl
    from tuneforge.spec import build_spec
    from tuneforge.training.recipe import train

    root = tmp_path
    data = write_jsonl(root / "train.jsonl", chat_records())
    model = tiny_models["llama"]
    for method in METHODS:
        train(build_spec(dist_spec(model, data, root / f"single-{method}", method)))
    jobs = [{**dist_spec(model, data, root / f"{m}-{s}", m, world=2, distributed=_distributed(s)), "_name": f"{m}/{s}"}
            for m, s in _combos()]
    # resume: stop after 2 of 4 steps, then continue (ZeRO-3: DeepSpeed's sharded checkpoint)
    cut = dist_spec(model, data, root / "resume-zero3", "lora", world=2, distributed=_distributed("zero3"), save_every=1)
    jobs += [{**cut, "_name": "resume/stop", "_train": {"stop_after": 2}},
             {**cut, "_name": "resume/resume", "_train": {"resume": True}}]
    results = run_in_ranks(jobs, root / "results")
    problems = {}
    for m, s in _combos():
        problem = matches_one_process(root, f"{m}-{s}", m, results[f"{m}/{s}"])
        results[f"{m}/{s}"]["ok"] = problem is None
        if problem:
            problems[f"{m}/{s}"] = problem
    write_matrix("deepspeed", DS_STRATEGIES, METHODS + ("qlora",), results,
                 {("qlora", s): "4-bit weights" for s in DS_STRATEGIES})
    assert not problems, problems
    assert results["resume/stop"]["ok"] and results["resume/stop"]["status"] == "stopped", results["resume/stop"]
    assert results["resume/resume"]["ok"], results["resume/resume"].get("trace")
    assert (root / "resume-zero3" / "checkpoints" / "step-000004" / "deepspeed" / "state").is_dir()
    single, resumed = metrics(root / "single-lora"), metrics(root / "resume-zero3")
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
