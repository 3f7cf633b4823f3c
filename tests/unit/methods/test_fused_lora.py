"""The fused LoRA layer changes speed and memory, not math: same outputs, every gradient and RNG stream
as peft's own forward (with ByteDropout), on four architectures, in fp32 and under bf16 autocast."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import saved_bytes
from tuneforge.methods import apply_method
from tuneforge.methods.dropout import use_byte_dropout
from tuneforge.methods.fused_lora import FusedLoraLinear, use_fused_lora
from tuneforge.models import load_model
from tuneforge.spec import AdapterSpec


def _lora(path, method="lora", dtype=torch.float32, dropout=0.1):
    model = apply_method(load_model(path, dtype=dtype), method, AdapterSpec(r=4, dropout=dropout))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if p.requires_grad:  # peft starts lora_B at zero, which would hide lora_A's gradient
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.05
    use_byte_dropout(model)
    return model.train()


def _step(model, ids, autocast):
    torch.manual_seed(7)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits.float() * weights).mean().backward()  # linear in the logits: gradients don't amplify rounding
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach().float(), grads, torch.rand(3)


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "mistral"])
def test_fused_equals_peft_fp32(tiny_models, arch):
    reference = _lora(tiny_models[arch])
    fused = copy.deepcopy(reference)
    assert use_fused_lora(fused) == sum(isinstance(m, FusedLoraLinear) for m in fused.modules()) > 0
    mlps = [type(m).__name__ for m in fused.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all(n.startswith("Fused") for n in mlps)  # the recomputing SwiGLU path is under test too
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    (l1, g1, next1), (l2, g2, next2) = _step(reference, ids, False), _step(fused, ids, False)
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:  # relative to each tensor's largest entry: the dropout scale is applied on the rank-r side
        scale = g1[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(g2[name] / scale, g1[name] / scale, atol=2e-4, rtol=1e-3, msg=name)
    assert torch.equal(next1, next2)  # the global RNG stream advanced identically: resume stays exact


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "mistral"])
def test_fused_is_as_accurate_as_peft_under_bf16_autocast(tiny_models, arch):
    """bf16 rounds in a different order, so compare both against the fp32 computation of the same weights."""
    reference = _lora(tiny_models[arch], dtype=torch.bfloat16)  # bf16 frozen base, as the recipe stores it
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    truth = copy.deepcopy(reference).float()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    (lt, gt, nt), (l1, g1, n1), (l2, g2, n2) = (_step(truth, ids, False), _step(reference, ids, True),
                                                 _step(fused, ids, True))
    assert (l2 - lt).abs().mean() <= 1.25 * (l1 - lt).abs().mean() + 1e-3
    for name in gt:
        err_peft, err_fused = (g1[name] - gt[name]).norm(), (g2[name] - gt[name]).norm()
        assert err_fused <= 1.5 * err_peft + 1e-2 * gt[name].norm(), name
    assert torch.equal(n1, n2) and torch.equal(nt, n1)


def test_dropout_is_really_applied(tiny_models):
    model = _lora(tiny_models["llama"], dropout=0.5)
    use_fused_lora(model)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    assert not torch.allclose(a, b)  # two draws of the mask
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _saved_bytes(model, ids):
    params = sum(p.untyped_storage().nbytes() for p in model.parameters())  # counted once, if at all

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            model(input_ids=ids).logits.float().sum().backward()

    return saved_bytes(step)[1] - params


def test_fused_keeps_less_for_backward(tiny_models):
    reference = _lora(tiny_models["llama"], dtype=torch.bfloat16)
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    ids = torch.randint(0, 200, (4, 64), generator=torch.Generator().manual_seed(1))
    assert _saved_bytes(fused, ids) < 0.75 * _saved_bytes(reference, ids)


def test_calls_it_does_not_cover_run_peft(tiny_models):
    model = _lora(tiny_models["llama"])
    dora = _lora(tiny_models["llama"], method="dora")
    dora_fused = copy.deepcopy(dora)
    keys = set(dora.state_dict())
    use_fused_lora(dora_fused)
    assert set(dora_fused.state_dict()) == keys
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    (l1, g1, _), (l2, g2, _) = _step(dora, ids, False), _step(dora_fused, ids, False)
    torch.testing.assert_close(l2, l1)  # DoRA falls back to peft's forward, bit for bit
    base = copy.deepcopy(model)
    use_fused_lora(model)
    model.eval()
    with model.disable_adapter():
        off = model(input_ids=ids).logits
    with base.disable_adapter():
        torch.testing.assert_close(off, base.eval()(input_ids=ids).logits)
    on = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, on, atol=1e-5, rtol=1e-4)
