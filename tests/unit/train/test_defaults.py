"""The defaults take the fastest correct path (see docs/benchmarks.md for what each lever buys)."""
from __future__ import annotations

import torch

from tests.conftest import tiny_spec
from tuneforge import api
from tuneforge.spec import JobSpec
from tuneforge.train.recipe import (cpu_has_fast_bf16, resolve_base_dtype, resolve_precision,
                                    uses_gradient_checkpointing)


def test_default_spec_levers():
    spec = JobSpec.model_validate({"model": "m", "data": {"train": "t"}})
    assert spec.training.precision == "auto" and spec.training.base_dtype == "auto"
    assert spec.training.group_by_length is True and spec.training.packing is False
    assert spec.training.micro_batch_tokens is None
    assert spec.training.gradient_checkpointing is None  # auto: on for qlora only
    assert uses_gradient_checkpointing(spec) is False
    assert uses_gradient_checkpointing(spec.model_copy(update={"method": "qlora"})) is True


def test_auto_precision_and_base_dtype():
    cpu = torch.device("cpu")
    fast = cpu_has_fast_bf16()
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if fast else None)
    assert resolve_base_dtype("auto", "lora", torch.bfloat16) == torch.bfloat16
    assert resolve_base_dtype("auto", "full", torch.bfloat16) == torch.float32  # fp32 master weights
    assert resolve_base_dtype("auto", "lora", None) == torch.float32


def test_default_run_uses_fast_paths(tiny_models, chat_file, tmp_path, monkeypatch):
    from tuneforge.train import recipe
    from tuneforge.train.loss import hidden_states_loss_sum

    used = {}
    real_loss_fn_for, real_fuse = recipe.loss_fn_for, recipe.use_fused_lora
    monkeypatch.setattr(recipe, "loss_fn_for", lambda m: used.setdefault("loss", real_loss_fn_for(m)))
    monkeypatch.setattr(recipe, "use_fused_lora", lambda m: used.setdefault("fused", real_fuse(m)))
    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=1)
    del spec["training"]["precision"]
    spec["adapter"]["dropout"] = 0.05
    s = api.train(spec, progress=False)
    assert used["fused"] == 14  # every adapted linear of the 2-layer model
    from tuneforge.methods.dropout import ByteDropout
    from tuneforge.methods.fused_lora import FusedLoraLinear

    model = used["loss"].args[0]  # the decoder the fast loss runs
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == 14
    assert sum(isinstance(m, ByteDropout) for m in model.modules()) == 14
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["FusedLlamaMLP"] * 2
    assert used["loss"].func is hidden_states_loss_sum
    expected = "bfloat16" if cpu_has_fast_bf16() else "float32"
    assert s["precision"] == expected and s["base_dtype"] == expected
