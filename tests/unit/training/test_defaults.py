"""The defaults take the fastest correct path (see docs/benchmarks.md for what each lever buys)."""
from __future__ import annotations

import torch

from tests.conftest import tiny_spec
from tuneforge import api
from tuneforge.spec import JobSpec
from tuneforge.hardware import cpu_has_fast_bf16, resolve_base_dtype, resolve_precision
from tuneforge.training.recipe import uses_gradient_checkpointing


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


def _built(spec_dict, kernels):
    from tuneforge.models import resolve_model
    from tuneforge.spec import build_spec
    from tuneforge.training.kernels import resolve_kernels
    from tuneforge.training.recipe import build_model

    spec = build_spec(spec_dict)
    resolved = resolve_kernels(kernels, torch.device("cpu"), spec.method, spec.adapter.dropout)
    return resolved, build_model(spec, resolve_model(spec.model), torch.device("cpu"), torch.float32, resolved)


def test_default_run_uses_fast_paths_and_records_them(tiny_models, chat_file, tmp_path):
    from tuneforge.methods.dropout import ByteDropout
    from tuneforge.methods.fused_lora import FusedLoraLinear
    from tuneforge.models.rmsnorm import _forward as fused_norm_forward

    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=1)
    del spec["training"]["precision"]
    spec["adapter"]["dropout"] = 0.05
    s = api.train(spec, progress=False)
    assert s.kernels == {"loss": "chunked", "rmsnorm": "fused", "dropout": "byte", "lora": "fused",
                         "attention": "math-short"}
    assert s.adapter_dropout == 13 / 256  # 0.05 rounded to a multiple of 1/256
    expected = "bfloat16" if cpu_has_fast_bf16() else "float32"
    assert s.precision == expected and s.base_dtype == expected

    kernels, model = _built(spec, "auto")
    base = model.get_base_model().model
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == 14  # every adapted linear
    assert sum(isinstance(m, ByteDropout) for m in model.modules()) == 14
    assert [type(layer.mlp).__name__ for layer in base.layers] == ["FusedLlamaMLP"] * 2
    assert base.norm.forward.__func__ is fused_norm_forward


def test_library_kernels_leave_the_libraries_own_modules(tiny_models, chat_file, tmp_path):
    from tuneforge.methods.dropout import ByteDropout
    from tuneforge.methods.fused_lora import FusedLoraLinear

    spec = tiny_spec(tiny_models["llama"], chat_file, tmp_path / "run", max_steps=1, kernels="library")
    spec["adapter"]["dropout"] = 0.05
    s = api.train(spec, progress=False)
    assert s.kernels == {"loss": "library", "rmsnorm": "library", "dropout": "library", "lora": "library",
                         "attention": "library"}
    assert s.adapter_dropout == 0.05
    _, model = _built(spec, "library")
    base = model.get_base_model().model
    assert not any(isinstance(m, (FusedLoraLinear, ByteDropout)) for m in model.modules())
    assert [type(layer.mlp).__name__ for layer in base.layers] == ["LlamaMLP"] * 2
    assert "forward" not in vars(base.norm)  # transformers' own RMSNorm.forward
    # Fused LoRA draws byte masks: with torch's dropout the fused layer cannot run, and is recorded as peft's.
    kernels, _ = _built(spec, {"dropout": "library"})
    assert kernels.lora == "library"
