"""The one-node RMSNorm equals transformers' in value and every gradient, and keeps less for backward."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import saved_bytes
from tuneforge.models import load_model
from tuneforge.models.rmsnorm import use_fused_rmsnorm


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers(tiny_models, arch, dtype):
    model = load_model(tiny_models[arch], dtype=dtype)
    norm = model.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x0 = torch.randn(2, 9, norm.weight.shape[0], dtype=dtype) * 3
    grads = []
    for fused in (False, True):
        if fused:
            assert use_fused_rmsnorm(model) == 2 * model.config.num_hidden_layers + 1
        x = x0.clone().requires_grad_(True)
        y, saved = saved_bytes(lambda: norm(x))
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads.append((y.detach(), x.grad, norm.weight.grad.clone(), saved))
        norm.weight.grad = None
    (y1, gx1, gw1, s1), (y2, gx2, gw2, s2) = grads
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(y2, y1, **tol)
    torch.testing.assert_close(gx2, gx1, **tol)
    torch.testing.assert_close(gw2, gw1, **tol)
    assert s2 < s1
