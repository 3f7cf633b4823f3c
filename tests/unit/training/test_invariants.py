"""Golden invariants of the loop: gradient accumulation, exact resume, atomic checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_spec
from tuneforge import api
from tuneforge.errors import CheckpointError


def losses(run_dir) -> list[float]:
    return [json.loads(l)["train_loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_grad_accum_matches_big_batch(tiny_models, chat_file, tmp_path):
    # Uneven lengths: a mean of micro-batch means would differ; a sum / total-targets does not.
    a = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=4)
    b = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=4)
    api.train(a, progress=False)
    api.train(b, progress=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == 4
    assert la == pytest.approx(lb, abs=1e-5)
    assert la[-1] < la[0]
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        # Adam divides by sqrt(v): float-rounding differences in tiny gradients move weights ~1e-5.
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_token_budget_split_matches_unsplit(tiny_models, chat_file, tmp_path, packing):
    """micro_batch_tokens changes how a step is computed, not what: same losses and weights."""
    a = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "a", batch_size=8, max_steps=3, packing=packing)
    b = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "b", batch_size=8, max_steps=3, packing=packing,
                  micro_batch_tokens=24)
    sa, sb = api.train(a, progress=False), api.train(b, progress=False)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)
    assert sa.tokens_seen == sb.tokens_seen
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


def test_resume_is_exact(tiny_models, chat_file, tmp_path):
    # Dropout on, so RNG state must be restored too; 2 steps per epoch so resume crosses an epoch.
    kw = dict(batch_size=4, max_steps=10, save_every=3)
    straight = tiny_spec(tiny_models["qwen2"], chat_file, tmp_path / "straight", **kw)
    straight["adapter"]["dropout"] = 0.1
    split = {**straight, "output_dir": str(tmp_path / "split")}
    api.train(straight, progress=False)
    first = api.train(split, progress=False, stop_after=5)
    assert first.status == "stopped" and not (tmp_path / "split" / "adapter").exists()
    second = api.train(split, progress=False, resume=True)
    assert second.status == "succeeded" and second.steps == 10
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    ws, wp = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    for k in ws:
        torch.testing.assert_close(ws[k], wp[k], atol=1e-6, rtol=1e-5)


def test_adamw_8bit_trains_and_resumes_exactly(tiny_models, chat_file, tmp_path):
    kw = dict(batch_size=4, max_steps=6, save_every=2, optimizer="adamw_8bit")
    straight = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "straight", **kw)
    straight["adapter"]["r"] = 64  # lora_A is 64 x 64 = 4096 elements: bitsandbytes' smallest 8-bit tensor
    split = {**straight, "output_dir": str(tmp_path / "split")}
    api.train(straight, progress=False)
    api.train(split, progress=False, stop_after=3)
    state = torch.load(next((tmp_path / "split" / "checkpoints").glob("step-*")) / "optimizer.pt", weights_only=True)
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in state["state"].values()]
    dtypes = {m[k].dtype for m in moments for k in ("state1", "state2") if k in m}
    assert torch.uint8 in dtypes  # moments stored in 8 bits (bitsandbytes keeps tensors under 4096 in fp32)
    api.train(split, progress=False, resume=True)
    la, lb = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert la[-1] < la[0]
    assert lb == pytest.approx(la, abs=1e-6)


def test_half_written_checkpoint_is_ignored(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=4)
    api.train(spec, progress=False, stop_after=2)
    # A crash mid-save leaves only a temporary folder: resume must use the last complete one.
    (tmp_path / "run" / "checkpoints" / ".tmp-step-000003").mkdir()
    summary = api.train(spec, progress=False, resume=True)
    assert summary.steps == 4


def test_existing_run_needs_resume_or_overwrite(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=1)
    api.train(spec, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        api.train(spec, progress=False)
    assert api.train(spec, progress=False, overwrite=True).steps == 1


def test_resume_refuses_a_changed_spec(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=4)
    api.train(spec, progress=False, stop_after=2)
    spec["training"]["lr"] = 0.5
    with pytest.raises(CheckpointError, match="training.lr"):
        api.train(spec, progress=False, resume=True)


def test_resume_without_checkpoint_is_a_clear_error(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "none", max_steps=1)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        api.train(spec, progress=False, resume=True)


def test_outputs_and_summary(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=3, eval_every=2)
    spec["data"] = {"train": str(chat_file), "validation_split": 0.25}
    s = api.train(spec, progress=False)
    run = tmp_path / "run"
    for name in ("spec.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "adapter/adapter_config.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    for key in ("method", "model", "model_path", "trainable_params", "total_params", "train_examples", "train_tokens",
                "steps", "tokens_per_second", "peak_rss_mb", "final_train_loss", "final_eval_loss", "wall_seconds"):
        assert getattr(s, key) is not None, key
    assert s.train_examples == 6 and s.validation_examples == 2
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "eval_loss" in rows[1] and "eval_loss" in rows[2] and "eval_loss" not in rows[0]
    assert all({"train_loss", "lr"} <= set(r) for r in rows)
    # The resolved spec reproduces the run.
    from tuneforge.spec import load_spec

    assert load_spec(run / "spec.yaml").training.max_steps == 3


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_checkpointing_changes_memory_not_math(tiny_models, chat_file, tmp_path, every):
    plain = tiny_spec(tiny_models["phi3"], chat_file, tmp_path / "plain", max_steps=3, gradient_checkpointing=False)
    ckpt = tiny_spec(tiny_models["phi3"], chat_file, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True,
                     checkpoint_every=every)
    for spec in (plain, ckpt):  # dropout on: the recompute must redraw the same masks
        spec["adapter"]["dropout"] = 0.1
    api.train(plain, progress=False)
    api.train(ckpt, progress=False)
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
