"""Padding-free packing: per-example logits, loss and gradients equal the padded batch's, and no
attention crosses from one packed example into another."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from tests.conftest import CHAT_RECORDS, tiny_spec
from tests.unit.training.test_invariants import losses
from tuneforge import api
from tuneforge.data.batching import collate, collate_packed
from tuneforge.data.encode import Example, encode_chat
from tuneforge.methods import apply_method
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.attention import use_tuneforge_attention
from tuneforge.spec import AdapterSpec
from tuneforge.training.loss import loss_fn_for, model_inputs


def lora_model(path, packed_attention=None):
    """packed_attention: None (transformers' SDPA), "per-example" or "per-example+math" (models/attention.py)."""
    base = load_model(path)
    if packed_attention:
        use_tuneforge_attention(base, short_math=packed_attention.endswith("math"))
    model = apply_method(base, "lora", AdapterSpec(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


@pytest.mark.parametrize("packed_attention", [None, "per-example", "per-example+math"])
@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2", "mistral"])
def test_packed_equals_padded(tiny_models, arch, packed_attention):
    tok = load_tokenizer(tiny_models[arch])
    examples = [encode_chat(tok, r) for r in CHAT_RECORDS[:5]]
    model = lora_model(tiny_models[arch], packed_attention)
    padded, packed = collate(examples, tok.pad_token_id), collate_packed(examples)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))

    logits_padded = model(**model_inputs(padded)).logits
    logits_packed = model(**model_inputs(packed)).logits[0]
    start = 0
    for b, e in enumerate(examples):  # every example's logits, position by position
        n = len(e.input_ids)
        torch.testing.assert_close(logits_packed[start : start + n], logits_padded[b, :n], atol=2e-5, rtol=1e-4)
        start += n

    loss_fn = loss_fn_for(model)
    grads = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        loss, correct = loss_fn(batch)
        loss.backward()
        grads.append((loss.detach(), correct, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, c1, g1), (l2, c2, g2) = grads
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-5)
    assert c1 == c2 and g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("packed_attention", [None, "per-example", "per-example+math"])
def test_no_attention_across_examples(tiny_models, packed_attention):
    model = lora_model(tiny_models["llama"], packed_attention).eval()
    a, b = Example(list(range(5, 25)), list(range(5, 25))), Example(list(range(40, 52)), list(range(40, 52)))
    changed = Example(list(range(60, 80)), list(range(60, 80)))  # a different first example
    with torch.no_grad():
        one = model(**model_inputs(collate_packed([a, b]))).logits[0, 20:]
        two = model(**model_inputs(collate_packed([changed, b]))).logits[0, 20:]
        alone = model(**model_inputs(collate_packed([b]))).logits[0]
    torch.testing.assert_close(one, two, atol=1e-6, rtol=0)
    torch.testing.assert_close(one, alone, atol=2e-5, rtol=1e-4)
    if packed_attention:  # one SDPA call per example and layer, not one masked call per layer
        import transformers.integrations.sdpa_attention as sdpa

        with mock.patch.object(sdpa, "sdpa_attention_forward", wraps=sdpa.sdpa_attention_forward) as calls:
            with torch.no_grad():
                model(**model_inputs(collate_packed([a, b])))
        assert calls.call_count == 2 * model.config.num_hidden_layers
        assert all(c.args[4] is None for c in calls.call_args_list)  # no mask: the fused causal kernel
    # Without restarting positions the second example would see the first: the check above can fail.
    leaky = {"input_ids": collate_packed([changed, b])["input_ids"], "use_cache": False}
    with torch.no_grad():
        assert not torch.allclose(model(**leaky).logits[0, 20:], one, atol=1e-3)


def test_packed_training_matches_padded(tiny_models, chat_file, tmp_path):
    padded = tiny_spec(tiny_models["qwen2"], chat_file, tmp_path / "padded", max_steps=3)
    packed = tiny_spec(tiny_models["qwen2"], chat_file, tmp_path / "packed", max_steps=3, packing=True)
    api.train(padded, progress=False)
    summary = api.train(packed, progress=False)
    assert losses(tmp_path / "packed") == pytest.approx(losses(tmp_path / "padded"), abs=1e-5)
    assert summary.status == "succeeded"
