"""The hidden-states loss path equals the full-logits path in value and in every gradient."""
from __future__ import annotations


import pytest
import torch

from tests.conftest import CHAT_RECORDS
from tuneforge.data.batching import collate
from tuneforge.data.encode import IGNORE_INDEX, encode_chat
from tuneforge.methods import apply_method
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.tiny import make_tiny_model
from tuneforge.spec import AdapterSpec
from tuneforge.training.loss import causal_lm_loss_sum, linear_cross_entropy_sum, loss_fn_for, output_head


def batch_for(model_dir):
    tok = load_tokenizer(model_dir)
    return collate([encode_chat(tok, r) for r in CHAT_RECORDS], tok.pad_token_id)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("method, tied", [("lora", False), ("dora", False), ("full", True), ("full", False)])
def test_fast_path_matches_full_logits(tmp_path, method, tied):
    path = make_tiny_model("llama", tmp_path / "m", tie_word_embeddings=tied)
    model = apply_method(load_model(path), method, AdapterSpec(r=4, dropout=0.0))
    with torch.no_grad():  # non-zero adapters, so their gradients are non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batch = batch_for(path)
    assert output_head(model) is not None
    ref_loss, ref_ok = causal_lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                          batch["labels"])
    ref = grads_of(model, ref_loss)
    loss, ok = loss_fn_for(model)(batch)
    got = grads_of(model, loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-6)
    assert int(ok) == int(ref_ok)
    assert set(got) == set(ref) and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4)


def test_chunking_is_exact_and_weight_gradient(tmp_path):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (h, w))
    loss, _ = linear_cross_entropy_sum(h, w, t, chunk=5)
    gh2, gw2 = torch.autograd.grad(loss * 2.0, (h, w))  # upstream gradient is applied
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh2, 2 * gh)
    torch.testing.assert_close(gw2, 2 * gw)


def test_prompt_tuning_uses_full_logits(tiny_models):
    model = apply_method(load_model(tiny_models["llama"]), "prompt_tuning", AdapterSpec(num_virtual_tokens=4))
    assert output_head(model) is None
    batch = batch_for(tiny_models["llama"])
    loss, _ = loss_fn_for(model)(batch)
    assert torch.isfinite(loss) and loss.requires_grad


def test_bf16_autocast_close_to_fp32(tiny_models):
    model = apply_method(load_model(tiny_models["qwen2"]), "lora", AdapterSpec(r=4, dropout=0.0))
    batch = batch_for(tiny_models["qwen2"])
    fp32, _ = loss_fn_for(model)(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = loss_fn_for(model)(batch)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(fp32.item() - bf16.item()) / n < 0.02
