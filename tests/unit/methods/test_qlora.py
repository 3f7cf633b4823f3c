"""QLoRA: the frozen base's linear weights are really stored as 4-bit NF4, and training works."""
from __future__ import annotations

import torch

from tests.conftest import tiny_spec
from tuneforge import api
from tuneforge.methods import apply_method
from tuneforge.methods.peft_builders import base_weight_bytes
from tuneforge.models import load_model
from tuneforge.spec import AdapterSpec


def test_base_linear_weights_are_4bit(tiny_models):
    import bitsandbytes as bnb

    fp32 = load_model(tiny_models["llama"])
    linear_numel = sum(m.weight.numel() for n, m in fp32.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    q = apply_method(load_model(tiny_models["llama"], load_in_4bit=True), "qlora", AdapterSpec(r=4))
    quantised = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for m in quantised:
        assert m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4"
    measured = base_weight_bytes(q)
    assert measured["nf4"] == linear_numel // 2  # two 4-bit values per byte
    assert linear_numel * 4 / measured["nf4"] == 8  # 8x smaller than fp32, 4x smaller than bf16
    assert measured["nf4_absmax"] > 0


def test_qlora_trains_and_reports_bytes(tiny_models, chat_file, tmp_path):
    spec = tiny_spec(tiny_models["phi3"], chat_file, tmp_path / "run", max_steps=6, batch_size=8)
    spec["method"] = "qlora"
    s = api.train(spec, progress=False)
    assert s.base_weight_bytes["nf4"] > 0
    assert s.final_train_loss < 5.5  # from ~5.57 at random init
