"""ByteDropout behaves like nn.Dropout (keep rate, unbiased output, exact gradient, eval identity), and
folding it into lora_A changes memory, not math."""
from __future__ import annotations

import pytest
import torch

from tuneforge.methods.dropout import ByteDropout, DropoutLoraA, use_byte_dropout
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


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_folded_lora_a_equals_dropout_then_linear(autocast):
    """Same RNG state -> same mask, output and every gradient as ByteDropout followed by lora_A,
    while keeping less for backward (no mask, no dropped copy)."""
    x0 = torch.randn(3, 17, 40, dtype=torch.bfloat16 if autocast else torch.float32)  # as the base hands it over
    weight = torch.nn.Parameter(torch.randn(8, 40) * 0.1)
    lin = torch.nn.Linear(40, 8, bias=False)
    lin.weight = weight
    byte = ByteDropout(0.1).train()
    fused = DropoutLoraA(40, 8, bias=False)
    fused.weight, fused.threshold, fused.scale = weight, byte.threshold, byte.scale
    results = []
    for f in (lambda x: lin(byte(x)), fused):
        torch.manual_seed(5)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y, saved = _saved_bytes(lambda: f(x))
        (y.float() ** 2).sum().backward()
        results.append((y.detach().float(), x.grad.clone(), weight.grad.clone(), saved, torch.rand(1)))
        weight.grad = None
    (y1, gx1, gw1, saved1, next1), (y2, gx2, gw2, saved2, next2) = results
    tol = {"atol": 1e-2, "rtol": 1e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}  # bf16: summation order
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(gx2, gx1, **tol)
    torch.testing.assert_close(gw2, gw1, **tol)
    assert torch.equal(next1, next2)  # the global RNG stream advanced identically: resume stays exact
    assert saved2 < saved1


def test_folding_keeps_state_dict_and_dora_unfolded(tiny_models):
    model = apply_method(load_model(tiny_models["llama"]), "lora", AdapterSpec(r=4, dropout=0.05))
    keys = set(model.state_dict())
    use_byte_dropout(model)
    assert set(model.state_dict()) == keys
    assert sum(isinstance(m, DropoutLoraA) for m in model.modules()) == 14
    dora = apply_method(load_model(tiny_models["llama"]), "dora", AdapterSpec(r=4, dropout=0.05))
    assert use_byte_dropout(dora) == 14
    assert not any(isinstance(m, DropoutLoraA) for m in dora.modules())
