"""ByteDropout behaves like nn.Dropout (keep rate, unbiased output, exact gradient, eval identity)."""
from __future__ import annotations

import torch

from tuneforge.methods.dropout import ByteDropout, use_byte_dropout
from tuneforge.methods import apply_method
from tuneforge.models import load_model
from tuneforge.spec import AdapterSpec


def test_statistics_match_nn_dropout():
    torch.manual_seed(0)
    x = torch.ones(1_000_003)
    d = ByteDropout(0.1).train()
    out = d(x)
    kept = (out != 0).float().mean().item()
    assert abs(kept - (1 - d.threshold / 256)) < 2e-3
    assert abs(out.mean().item() - 1.0) < 5e-3  # unbiased, like nn.Dropout
    ref = torch.nn.Dropout(0.1).train()(x)
    assert abs(kept - (ref != 0).float().mean().item()) < 5e-3


def test_gradient_is_mask_times_scale_and_eval_is_identity():
    torch.manual_seed(1)
    x = torch.randn(4, 33, 7, requires_grad=True)
    d = ByteDropout(0.3).train()
    out = d(x)
    out.sum().backward()
    keep = out.detach() != 0
    torch.testing.assert_close(x.grad, keep.float() * d.scale)
    torch.testing.assert_close(out.detach(), x.detach() * keep * d.scale)
    assert d.eval()(x) is x


def test_same_seed_same_mask():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = ByteDropout(0.5).train()(x)
    torch.manual_seed(3)
    b = ByteDropout(0.5).train()(x)
    assert torch.equal(a, b)


def test_swaps_peft_dropouts(tiny_models):
    model = apply_method(load_model(tiny_models["llama"]), "lora", AdapterSpec(r=4, dropout=0.05))
    assert use_byte_dropout(model) == 2 * 7
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for n, m in model.named_modules() if "lora_dropout" in n)
